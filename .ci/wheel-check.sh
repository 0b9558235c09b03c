#!/usr/bin/env bash
# The wheel, installed in a clean virtual environment, runs the main command's first run from outside the checkout:
# `qkv-lightning study --config qkv:study/synthetic.yaml` on its first cell (QKV, seed 0), with the shipped configs
# read from the installed package. Usage: .ci/wheel-check.sh [PYTHON of the environment whose packages are reused]
#
# The clean venv gets the wheel alone (pip install --no-deps); its dependencies (torch's 5 GB CUDA build among them)
# come from the main test environment through a .pth line naming that environment's site-packages. A .pth line adds
# the folder to sys.path without running the .pth files inside it, so the checkout's editable install stays off.
# Whether the declared dependencies are enough is checked by the floors environment (.ci/floors.sh), which installs
# them from pyproject.toml alone, and by tests/test_packaging.py (every imported package is declared).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
"$python" -m pip wheel -q --no-deps -w "$work/dist" . 2>&1 | grep -v "is ignored" || true
wheel=$(ls "$work"/dist/qkv_lightning-*.whl)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-deps "$wheel" 2>&1 | grep -v "is ignored" || true
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" | {
  read -r own; echo "$site" > "$own/zz_reused_packages.pth"; }
echo "wheel: $(basename "$wheel") built and installed in $((SECONDS - start)) s"
expected=$(find configs -name '*.yaml' | wc -l)
cd "$work"
unset PYTHONPATH
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
venv/bin/python - "$work" "$expected" <<'PY'
import sys
from pathlib import Path

import qkv_lightning
from qkv_lightning.config_files import config_root, shipped_configs

work, expected = Path(sys.argv[1]), int(sys.argv[2])
assert Path(qkv_lightning.__file__).is_relative_to(work / "venv"), qkv_lightning.__file__
assert config_root().is_relative_to(work / "venv"), config_root()
assert len(shipped_configs()) == expected, (len(shipped_configs()), expected)
print(f"wheel: qkv_lightning {qkv_lightning.__version__} from {Path(qkv_lightning.__file__).parent}, "
      f"{expected} configs in {config_root()}")
PY
venv/bin/python -m qkv_lightning --help > /dev/null
start=$SECONDS
venv/bin/qkv-lightning study --config qkv:study/synthetic.yaml --sharing '[QKV]' --seeds '[0]' --output study \
  | tee study.log
grep -q "^QKV,.*,ok," study/results.csv || { echo "wheel: the first run did not finish ok" >&2; cat study/results.csv >&2; exit 1; }
echo "wheel: the main command's first run (QKV seed 0) from $work in $((SECONDS - start)) s"
