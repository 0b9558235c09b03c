"""Packaging: the shipped configs (``qkv:NAME``), declared dependencies, import safety, ``python -m``, ``__version__``.

The wheel itself is built, installed in a clean virtual environment and run outside the checkout by ``.ci/run``
(``.ci/wheel-check.sh``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qkv_lightning.config_files import config_root, resolve_config, resolve_config_args, shipped_configs
from qkv_lightning.errors import ConfigError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qkv_lightning"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (``jsonargparse[signatures]>=4`` -> jsonargparse)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def test_shipped_config_names_are_the_top_level_configs_files(tmp_path, monkeypatch):
    names = shipped_configs()
    on_disk = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert names == on_disk and "lm/wikitext2.yaml" in names
    shipped = Path(resolve_config("qkv:lm/wikitext2.yaml"))
    assert shipped.read_bytes() == (ROOT / "configs/lm/wikitext2.yaml").read_bytes()
    # outside the checkout, a configs/NAME missing from the working directory is the shipped file; a local one wins
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config("configs/lm/wikitext2.yaml")) == config_root() / "lm/wikitext2.yaml"
    (tmp_path / "configs/lm").mkdir(parents=True)
    (tmp_path / "configs/lm/wikitext2.yaml").write_text("mine: 1\n")
    assert resolve_config("configs/lm/wikitext2.yaml") == "configs/lm/wikitext2.yaml"
    assert resolve_config("configs/lm/none.yaml") == "configs/lm/none.yaml"  # left for the parser's own error
    assert resolve_config_args(["fit", "--config", "qkv:lm/wikitext2.yaml", "--config=qkv:variants/mqa.yaml", "x"]) == [
        "fit", "--config", str(config_root() / "lm/wikitext2.yaml"), f"--config={config_root() / 'variants/mqa.yaml'}",
        "x",
    ]
    with pytest.raises(ConfigError, match=r"qkv:lm/wikitext2\.yaml"):  # a typo is answered with the close names
        resolve_config("qkv:lm/wikitext-2.yaml")


def _third_party_imports() -> dict[str, dict[str, list[str]]]:
    """Top-level names of the non-stdlib modules that qkv_lightning imports -> {"module": [files], "local": [files]}:
    module level (every user needs them), or inside a function / a try block (a command or an option needs them)."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("qkv_lightning", "__future__"):
                    continue
                where = "module" if id(node) in top_level else "local"
                found.setdefault(top, {"module": [], "local": []})[where].append(str(path.relative_to(ROOT)))
    return found


EXTRA_MODULES = {"qkv_lightning/harness.py": "eval"}
"""Modules that exist only for one optional extra (they may import its packages at module level), and that
extra. Only a command imports them, inside a function: checked below."""


def test_extra_modules_are_imported_only_inside_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for module in EXTRA_MODULES:
                dotted = module.removesuffix(".py").replace("/", ".")
                assert dotted not in names, f"{path} imports {dotted} at module level; import it inside the command"


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for top, where in sorted(_third_party_imports().items()):
        names = {_name(d) for d in distributions.get(top, [top])}
        in_core_modules = [m for m in where["module"] if m not in EXTRA_MODULES]
        extra_of_modules = {EXTRA_MODULES[m] for m in where["module"] if m in EXTRA_MODULES}
        if in_core_modules and not names & core:
            problems.append(f"{top} ({sorted(names)}) is imported at module level by {in_core_modules} but is not core")
        extra_names = [{_name(r) for r in project["optional-dependencies"][e]} for e in extra_of_modules]
        if any(not names & (declared | core) for declared in extra_names):
            problems.append(f"{top} ({sorted(names)}) is imported by an extra's module but is not in its extra")
        if not where["module"] and not names & (core | extras):
            problems.append(f"{top} ({sorted(names)}) is imported by {where['local']} but declared nowhere")
    assert not problems, problems
    for name in ("numpy", "pyyaml", "pillow", "scipy"):  # the ones that once were missing
        assert name in core


def test_every_module_imports_without_posix_only_modules():
    """With ``resource`` unavailable (as on Windows), every module of the package still imports."""
    code = (
        "import sys, pkgutil, importlib; sys.modules['resource'] = None; import qkv_lightning; "
        "names = [m.name for m in pkgutil.walk_packages(qkv_lightning.__path__, 'qkv_lightning.')]; "
        "[importlib.import_module(n) for n in names]; print(len(names))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 50  # every module was imported, not only the package


def test_python_dash_m_and_version():
    import qkv_lightning

    assert qkv_lightning.__version__ == importlib.metadata.version("qkv-lightning")
    assert qkv_lightning.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "qkv_lightning", "configs"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [f"qkv:{name}" for name in shipped_configs()]


@pytest.mark.slow
def test_the_wheel_builds_without_setuptools_warnings_and_ships_every_config(tmp_path):
    """``pip wheel`` prints no "Package would be ignored" (each configs/ folder is a package of its own, setup.py) and
    the wheel holds every shipped config, as qkv_lightning/configs/...; built from a copy, so the checkout gets no
    build/ or egg-info folder."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("configs", "qkv_lightning"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "would be ignored" not in log and "SetuptoolsDeprecationWarning" not in log, log[-5000:]
    (wheel,) = (tmp_path / "dist").glob("qkv_lightning-*.whl")
    shipped = sorted(
        name.removeprefix("qkv_lightning/configs/") for name in zipfile.ZipFile(wheel).namelist()
        if name.startswith("qkv_lightning/configs/")
    )
    assert shipped == sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize(
    "path",
    ["logs/default/version_0/checkpoints/last.ckpt", "mlruns/0/meta.yaml", "wandb/latest-run", "generated.jsonl",
     "studies/synthetic/summary.md", ".cache/wikitext-2-offline/x", "data/cifar-10-python.tar.gz",
     "lightning_logs/version_0", "q-k=v.ckpt", "gpt2-tiny.ckpt.lm_eval.json"],
)
def test_what_the_commands_write_is_ignored_by_git(path):
    """The outputs of the README's commands at their defaults (loggers' folders, study folders, caches, downloads,
    generated text) never show up as untracked files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, timeout=60)
    assert out.returncode == 0, f"{path} is not ignored by .gitignore"



def test_checkpoints_kept_as_test_fixtures_are_not_ignored():
    """``*.ckpt`` is ignored, except the checkpoints tests/fixtures keeps (the legacy-format files the tests read)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "--no-index", "-q", "tests/fixtures/legacy/sequence-step3.ckpt"],
                         cwd=ROOT, timeout=60)
    assert out.returncode == 1, "tests/fixtures/legacy/sequence-step3.ckpt is ignored by .gitignore"
