#!/usr/bin/env bash
# The floors environment: every core dependency of pyproject.toml at the lowest release it allows (`>=X` installed as
# `==X`: torch 2.6 and torchvision 0.21 too), then the fast tests that exercise those libraries (FLOORS_TESTS below)
# on 2 workers (test by test: no file is long enough to keep one worker busy alone). A floor that does not work
# fails CI.
#
#   bash .ci/floors.sh build   build the venv: ~/.cache/qkv-lightning/floors-venv ($QKV_FLOORS_CACHE), reused while
#                              the pins are unchanged, the downloaded wheels kept beside it
#   bash .ci/floors.sh test    run the tests in it
#   bash .ci/floors.sh         both
#
# .ci/run starts `build` in the background before the README's test command: PyPI's Linux torch wheel is the CUDA
# build, and torch 2.6 with its nvidia-* wheels is about 3 GB to download and unpack (in a fresh-clone CI run here:
# `downloaded in 102 s`, `environment ready in 218 s`, all of it while the main tests ran).
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-all}
case $action in build|test|all) ;; *) echo "usage: .ci/floors.sh [build|test]" >&2; exit 2 ;; esac
cache=${QKV_FLOORS_CACHE:-$HOME/.cache/qkv-lightning}
venv=$cache/floors-venv
wheels=$cache/floors-wheels
mkdir -p "$cache" "$wheels"
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*>=\s*([^,;\s]+)", dep)
    assert m, f"pyproject dependency {dep!r} has no plain `>=` floor"
    print(f"{m.group(1)}=={m.group(2)}")
PY
)
# what the tests themselves need, not pinned (the floors constrain what pip may choose for them)
tools="pytest pytest-xdist"

quiet_pip() {  # pip, without the warnings about this machine's local index folders; pip's own exit status
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return $rc
}

build() {
  local start=$SECONDS
  echo "floors: $(echo $pins | tr '\n' ' ')"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins $tools" ]; then
    echo "floors: reusing $venv (same pins)"
    return
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  printf '%s\n' $pins > "$cache/floors-requirements.txt"
  quiet_pip "$venv/bin/pip" download -q -d "$wheels" -r "$cache/floors-requirements.txt" $tools
  echo "floors: downloaded in $((SECONDS - start)) s ($(du -sh "$wheels" | cut -f1) of wheels)"
  quiet_pip "$venv/bin/pip" install -q --no-index --find-links "$wheels" -r "$cache/floors-requirements.txt" $tools
  "$venv/bin/python" - "$pins" <<'PY'
import importlib.metadata as md, re, sys
wrong = []
for pin in sys.argv[1].split():
    name, version = re.sub(r"\[.*\]", "", pin).split("==")
    have = md.version(name)
    if have.split("+")[0] != version and not have.startswith(version + "."):
        wrong.append(f"{name}: {have} installed, floor {version}")
assert not wrong, wrong
names = [re.sub(r"\[.*\]", "", pin).split("==")[0] for pin in sys.argv[1].split()]
print("floors: installed " + ", ".join(f"{name} {md.version(name)}" for name in names))
PY
  echo "$pins $tools" > "$venv/.pins"
  echo "floors: environment ready in $((SECONDS - start)) s"
}

# What the floors must carry, and the tests that exercise it: FSDP2 on CPUs is refused below torch 2.9
# (qkv_lightning.parallel.CPU_FSDP2_TORCH; its tests skip there, test_floors.py checks the refusal); jsonargparse's
# messages and `convert --config` (test_floors.py); torch's SDPA attention (test_attention.py); Lightning's CLI and
# Trainer with jsonargparse, fit/checkpoint/resume through the shipped configs, with TensorBoard (test_configs_resume.py,
# test_loggers.py); LightningCLI's --optimizer (test_optimizers.py); Lightning's public Throughput (test_perf_callbacks.py);
# torchmetrics (test_tasks.py, test_configs_resume.py); torchvision and Pillow (test_images_data.py); tiktoken's GPT-2
# BPE (test_wikitext.py); tqdm and the progress lines (test_data_progress.py, test_progress_lines.py); scipy, numpy,
# matplotlib and PyYAML in a study's statistics, tables and plots (test_study.py, test_study_effects.py; matplotlib 3.8's
# axvspan returns a Polygon, not a Rectangle, which a test once assumed; tiktoken's loader reads a local ranks file
# from 0.12 on, through the optional blobfile before, which the floors environment lacks); filelock's kernel lock
# for the study folder (the two lock tests of test_study_safety.py).
FLOORS_TESTS=(
  tests/test_attention.py
  tests/test_tasks.py
  tests/test_configs_resume.py
  tests/test_packaging.py::test_shipped_config_names_are_the_top_level_configs_files
  tests/test_floors.py
  tests/test_quiet.py::test_no_network_returns_a_view_tensor_under_fsdp2
  tests/test_loggers.py
  tests/test_optimizers.py
  tests/test_perf_callbacks.py
  tests/test_images_data.py
  tests/test_wikitext.py
  tests/test_data_progress.py
  tests/test_progress_lines.py
  tests/test_study.py
  tests/test_study_effects.py
  tests/test_study_safety.py::test_a_held_lock_is_refused_a_free_one_is_taken_and_a_survivors_cell_is_left_alone
  tests/test_study_safety.py::test_a_lock_held_on_another_host_is_refused_and_left_in_place
)
run_tests() {
  local start=$SECONDS
  [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins $tools" ] || {
    echo "floors: no environment with these pins at $venv; run: bash .ci/floors.sh build" >&2; exit 1; }
  # an empty tiktoken cache: a ranks file tiktoken cached earlier must not hide a loader that fails at the floor
  tiktoken_cache=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
  trap 'rm -rf "$tiktoken_cache"' EXIT  # the folder mktemp just made, nothing else
  TIKTOKEN_CACHE_DIR=$tiktoken_cache QKV_SHARED_DATA=${QKV_SHARED_DATA:-../shared/data} "$venv/bin/python" -m pytest \
    -q -p no:cacheprovider -n 2 --dist load -m "not slow" "${FLOORS_TESTS[@]}"
  echo "floors: tests in $((SECONDS - start)) s"
}

case $action in
  build) build ;;
  test) run_tests ;;
  all) build; run_tests ;;
esac
