#!/usr/bin/env bash
# The floors environment: core dependencies of pyproject.toml at the lowest release they allow (`>=X` installed as
# `==X`), then the fast tests that exercise those libraries (FLOORS_TESTS below). A floor that does not work fails CI.
#
# In CI (the default) the Python-level libraries whose floors have broken us before are pinned: lightning,
# lightning-utilities, torchmetrics and jsonargparse. torch, torchvision and the rest come from the main test
# environment (a .pth line naming its site-packages, after the venv's own, so the pins win): torch's CUDA build is
# about 3 GB of downloads and its first install took 31 min here, past CI's budget. `QKV_FLOORS_ALL=1 bash
# .ci/floors.sh` pins every core dependency, torch 2.6 / torchvision 0.21 included (what the README's floors
# section reports). The venv is kept under ~/.cache/qkv-lightning and rebuilt whenever the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${QKV_FLOORS_CACHE:-$HOME/.cache/qkv-lightning}
venv=$cache/floors-venv
wheels=$cache/floors-wheels
mkdir -p "$cache" "$wheels"
pins=$(python3 - <<'PY'
import os, re, tomllib
PINNED_IN_CI = {"lightning", "lightning-utilities", "torchmetrics", "jsonargparse"}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*>=\s*([^,;\s]+)", dep)
    assert m, f"pyproject dependency {dep!r} has no plain `>=` floor"
    name = m.group(1).split("[")[0].lower()
    if os.environ.get("QKV_FLOORS_ALL") == "1" or name in PINNED_IN_CI:
        print(f"{m.group(1)}=={m.group(2)}")
PY
)
# the libraries the tests themselves need, not pinned (the floors constrain what pip may choose for them)
extras="pytest"
echo "floors: $(echo $pins | tr '\n' ' ')"
start=$SECONDS
mode=${QKV_FLOORS_ALL:-0}
main_python=${1:-.venv/bin/python}
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$mode $pins" ]; then
  echo "floors: reusing $venv (same pins)"
else
  rm -rf "$venv"
  python3 -m venv "$venv"
  printf '%s\n' $pins > "$cache/floors-requirements.txt"
  if [ "$mode" = 1 ]; then
    "$venv/bin/pip" download -q -d "$wheels" -r "$cache/floors-requirements.txt" $extras 2>&1 | grep -v "is ignored" || true
    "$venv/bin/pip" install -q --no-index --find-links "$wheels" -r "$cache/floors-requirements.txt" $extras \
      2>&1 | grep -v "is ignored" || true
  else  # the pins alone; everything else (torch, pytest, ...) from the main test environment, after them on sys.path
    "$venv/bin/pip" install -q --no-deps -r "$cache/floors-requirements.txt" 2>&1 | grep -v "is ignored" || true
    site=$("$main_python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    own=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$site" > "$own/zz_main_environment.pth"
  fi
  echo "$mode $pins" > "$venv/.pins"
fi
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
echo "floors: environment ready in $((SECONDS - start)) s"
# What the floors must carry: FSDP2 on CPUs is refused below torch 2.9 (qkv_lightning.parallel.CPU_FSDP2_TORCH; its
# tests skip there, tests/test_floors.py checks the refusal), jsonargparse's messages and `convert --config` (tests/test_floors.py),
# torch's SDPA attention, Lightning's CLI and Trainer with jsonargparse (fit, checkpoint, resume through configs),
# torchmetrics (every task's metrics), torchvision (image data), scipy (the study's statistics), numpy/matplotlib/
# PyYAML (the study's outputs).
FLOORS_TESTS=(
  tests/test_attention.py
  tests/test_tasks.py
  tests/test_configs_resume.py
  tests/test_packaging.py::test_shipped_config_names_are_the_top_level_configs_files
  tests/test_floors.py
  tests/test_quiet.py::test_no_network_returns_a_view_tensor_under_fsdp2
)
start=$SECONDS
QKV_SHARED_DATA=${QKV_SHARED_DATA:-../shared/data} "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
  "${FLOORS_TESTS[@]}"
echo "floors: tests in $((SECONDS - start)) s"
