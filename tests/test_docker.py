"""The container and cluster files name paths that exist where they run.

No Docker engine runs here, so the image is laid out by reading the Dockerfile: its ``WORKDIR`` and ``COPY`` lines
(sources from the build context that compose names, minus ``.dockerignore``), and ``RUN mkdir -p``. The compose
file, the SLURM script and the torchrun launcher are parsed, and every config and folder they name is looked up in
that layout (or, for the launchers, which run in a checkout, in the repository).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def dockerignore_patterns(context: Path) -> list[str]:
    lines = (context / ".dockerignore").read_text().splitlines()
    return [line.strip().removeprefix("**/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: PurePosixPath, patterns: list[str]) -> bool:
    """Whether ``relative`` (or a folder above it) matches a .dockerignore pattern."""
    parts = relative.parts
    return any(
        fnmatch.fnmatch("/".join(parts[: i + 1]), p) or fnmatch.fnmatch(parts[i], p)
        for p in patterns
        for i in range(len(parts))
    )


def image_layout(dockerfile: Path, context: Path, until_run: str | None = None) -> tuple[PurePosixPath, dict]:
    """(WORKDIR, {image path: context file or None for a folder}) after the Dockerfile's COPY / RUN mkdir lines,
    stopping before the first RUN that contains ``until_run`` (when given)."""
    patterns = dockerignore_patterns(context)
    workdir = PurePosixPath("/")
    layout: dict[PurePosixPath, Path | None] = {}
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "WORKDIR":
            workdir = workdir / words[1]
            layout[workdir] = None
        elif op == "COPY":
            *sources, target = words[1:]
            destination = workdir / target
            for source in sources:
                path = context / source
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for file in files:
                    relative = PurePosixPath(file.relative_to(context).as_posix())
                    if ignored(relative, patterns):
                        continue
                    if path.is_file():
                        where = destination / path.name if target.endswith("/") or len(sources) > 1 else destination
                    else:
                        where = destination / PurePosixPath(file.relative_to(path).as_posix())
                    layout[where] = file
                    for parent in where.parents:
                        layout.setdefault(parent, None)
        elif op == "RUN":
            before = line.split(until_run)[0] if until_run else line
            for folder in re.findall(r"mkdir -p ([\w./-]+)", before):
                layout.setdefault(workdir / folder, None)
            if until_run is not None and until_run in line:
                break
    return workdir, layout


def config_values(words: list[str]) -> list[str]:
    """The values of every ``--config X`` / ``--config=X`` in a command's words."""
    values = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"]
    return values + [w.split("=", 1)[1] for w in words if w.startswith("--config=")]


def shell_defaults(script: str) -> dict[str, str]:
    """``NAME=${1:-default}`` / ``NAME=${NAME:-default}`` assignments of a shell script: NAME -> default."""
    return dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", script, flags=re.M))


def expand(word: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\$?\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), word)


def volume(text: str) -> tuple[str, str]:
    """(source, target) of a compose volume ``SOURCE:TARGET[:ro]`` (SOURCE may be ``${VAR:-default}``)."""
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(?:ro|rw))?", text)
    assert match, text
    return match.group(1), match.group(2)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_and_dockerfile_name_paths_that_exist_in_the_image():
    spec = compose()
    trainer = spec["services"]["trainer"]
    context = (DOCKER / trainer["build"]["context"]).resolve()
    assert context == ROOT
    dockerfile = context / trainer["build"]["dockerfile"]
    workdir, layout = image_layout(dockerfile, context)
    assert PurePosixPath(trainer["working_dir"]) == workdir
    entry = trainer["entrypoint"]
    assert entry[:2] == ["sh", "-c"] and entry[2].rstrip().endswith('"$$@"')  # arguments after the service name
    words = shlex.split(entry[2].replace("$$", "$"))
    defaults = {k: re.fullmatch(r"\$\{\w+:-(.*)\}", v).group(1) for k, v in trainer["environment"].items()}
    configs = [expand(c, defaults) for c in config_values(words)]
    assert configs == ["configs/lm/wikitext103.yaml", "configs/strategy/fsdp2.yaml"]
    for config in configs:
        assert workdir / config in layout, f"{config} is not in the image"
    mounts = {PurePosixPath(target): source for source, target in map(volume, trainer["volumes"])}
    save_dir = PurePosixPath(words[words.index("--trainer.logger.init_args.save_dir") + 1])
    assert save_dir in mounts and mounts[save_dir] == "logs"
    tensorboard = spec["services"]["tensorboard"]
    assert f"--logdir {save_dir}" in tensorboard["command"]
    assert ("logs", str(save_dir)) in map(volume, tensorboard["volumes"])
    # the default config's data folder, relative to the working directory, lies inside the data mount
    data_dir = yaml.safe_load((ROOT / configs[0]).read_text())["data"]["init_args"]["data_dir"]
    data_mount = next(target for target, source in mounts.items() if "DATA_DIR" in source)
    assert (workdir / data_dir).is_relative_to(data_mount), (data_dir, data_mount)
    assert mounts[data_mount].endswith(":-../data}") and (DOCKER / "../data").resolve() == ROOT / "data"
    for target in mounts:  # the Dockerfile declares the volumes compose mounts
        assert str(target) in dockerfile.read_text()
    # the image holds the sources and nothing heavy
    assert workdir / "cli.py" in layout and workdir / "qkv_lightning/cli.py" in layout
    patterns = dockerignore_patterns(context)
    for heavy in (".venv", ".git", "logs", "data", ".cache", "studies", "x/.venv", "runs/a/last.ckpt"):
        assert ignored(PurePosixPath(heavy), patterns), heavy


def test_the_dockerfile_install_layer_builds_from_what_it_copies(tmp_path):
    """The files copied before ``pip install`` are enough to build the package (setup.py, readme, license, the
    configs folder that setup.py maps): that layer is laid out in a folder and built as a wheel."""
    workdir, layout = image_layout(DOCKER / "Dockerfile", ROOT, until_run="pip install")
    for where, source in layout.items():
        if not where.is_relative_to(workdir) or where == workdir:
            continue
        target = tmp_path / "layer" / where.relative_to(workdir)
        if source is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(tmp_path / "layer")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert list((tmp_path / "w").glob("qkv_lightning-*.whl"))


def test_cluster_launchers_resume_and_name_existing_configs():
    for name in ("slurm.sbatch", "torchrun-multinode.sh"):
        script = (DOCKER / name).read_text()
        defaults = shell_defaults(script)
        words = shlex.split(" ".join(line.rstrip("\\") for line in script.splitlines() if not line.startswith("#")))
        configs = [expand(c, defaults) for c in config_values(words)]
        assert len(configs) == 4, configs
        for config in configs:
            assert (ROOT / config).is_file(), f"{name}: {config} does not exist"
        assert words[words.index("--ckpt_path") + 1] == "last", name  # a requeued / restarted job resumes
        usage = re.findall(r"(configs/[\w./=-]+\.yaml)", script)
        assert usage and all((ROOT / path).is_file() for path in usage), usage
    sbatch = (DOCKER / "slurm.sbatch").read_text()
    output = re.search(r"^#SBATCH --output=(\S+)", sbatch, flags=re.M).group(1)
    folder = str(PurePosixPath(output).parent)
    body = sbatch.split("\nset -euo pipefail", 1)[1]
    submit = body.index("exec sbatch")
    assert f"mkdir -p {folder}" in body[:submit], "the log folder must exist before sbatch opens --output"
