#!/usr/bin/env bash
# The floors environment: every core dependency of pyproject.toml at the lowest release it allows (`>=X` installed
# as `==X`), then the fast tests that exercise those libraries (FLOORS_TESTS below). A floor that does not work
# fails CI. The venv is kept between CI runs on one machine under ~/.cache/qkv-lightning (rebuilt whenever the pins
# change), and the wheels it needs are kept in a wheelhouse beside it, since pip's HTTP cache is not used here and
# torch's CUDA build is about 3 GB of downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
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
# the libraries the tests themselves need, not pinned (the floors constrain what pip may choose for them)
extras="pytest"
echo "floors: $(echo $pins | tr '\n' ' ')"
start=$SECONDS
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; then
  echo "floors: reusing $venv (same pins)"
else
  rm -rf "$venv"
  python3 -m venv "$venv"
  printf '%s\n' $pins > "$cache/floors-requirements.txt"
  "$venv/bin/pip" download -q -d "$wheels" -r "$cache/floors-requirements.txt" $extras 2>&1 | grep -v "is ignored" || true
  "$venv/bin/pip" install -q --no-index --find-links "$wheels" -r "$cache/floors-requirements.txt" $extras \
    2>&1 | grep -v "is ignored" || true
  echo "$pins" > "$venv/.pins"
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
# FSDP2 on CPUs (gloo) fails on torch 2.6 ('Stream' object has no attribute 'record_event' in fully_shard's
# all-gather), so the CPU FSDP2 tests are left out here; torch 2.6 is the floor for FSDP2 on GPUs.
# What the floors must carry: torch's SDPA attention, Lightning's CLI and
# Trainer with jsonargparse (fit, checkpoint, resume through configs), torchmetrics (every task's metrics),
# torchvision (image data), scipy (the study's statistics), numpy/matplotlib/PyYAML (the study's outputs).
FLOORS_TESTS=(
  tests/test_attention.py
  tests/test_tasks.py
  tests/test_configs_resume.py
  tests/test_packaging.py::test_shipped_config_names_are_the_top_level_configs_files
)
start=$SECONDS
QKV_SHARED_DATA=${QKV_SHARED_DATA:-../shared/data} "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
  "${FLOORS_TESTS[@]}"
echo "floors: tests in $((SECONDS - start)) s"
