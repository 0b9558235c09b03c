"""Study cells beyond one machine: ``--launcher slurm`` submits every pending cell as one SLURM job array through
submitit (``pip install 'qkv-lightning[slurm]'``). Each job runs the normal ``fit`` of the cell (the same
:func:`qkv_lightning.study.runner.run_cell`), with the strategy config the study names (``study.strategy``), so a
cell can itself be multi-GPU or multi-node (``study.slurm``: ``nodes``, ``tasks_per_node``, ``gpus_per_node``, ...).
The study process waits for the jobs, collects their results into the same ``results.csv`` and summary, and keeps
the study lock meanwhile; Ctrl-C cancels the jobs, and a re-run skips the finished cells.

``--launcher submitit_local`` runs the same job array with submitit's local executor (each cell a separate process
on this machine): what the tests use, and a way to try a SLURM study's settings without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qkv_lightning.errors import ConfigError

LAUNCHERS = ("local", "slurm", "submitit_local")
"""``study.launcher`` values: the local worker pool, SLURM through submitit, submitit's local executor."""


def run_cell_job(spec: dict) -> dict:
    """The job of one cell (in a SLURM task or a local submitit process): the cell's fit on every task of the job,
    its result written by global rank 0 only (the others return theirs without writing)."""
    import submitit

    from qkv_lightning.study.runner import run_cell

    try:
        rank = submitit.JobEnvironment().global_rank
    except RuntimeError:  # not inside a submitit job (called directly)
        rank = 0
    return run_cell(spec, prepared=True, writer=rank == 0)


def _executor(config: object, folder: Path) -> object:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            f"study.launcher={config.launcher} needs submitit: pip install 'qkv-lightning[slurm]' (or use "
            "--launcher local)."
        ) from None
    cluster = "slurm" if config.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    settings = {"name": "qkv-study", "timeout_min": 24 * 60, **dict(config.slurm)}
    if cluster == "local":  # the local executor knows no SLURM settings; what the cells need is the same
        settings = {k: v for k, v in settings.items() if not k.startswith("slurm_")}
    try:
        executor.update_parameters(**settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"study.slurm={dict(config.slurm)}: submitit rejects it ({error}).") from None
    return executor


def run_with_submitit(
    config: object, specs: list[dict], study_dir: Path, on_result: Callable[[dict], None], poll_s: float = 2.0
) -> str:
    """Submit ``specs`` as one job array, print the job ids and how to watch them, then wait and hand each result
    to ``on_result`` as its job finishes. A job that fails without a result (killed, out of time) fails its cell,
    naming the job and its log."""
    from qkv_lightning.study.runner import crash_result, prepare_cell

    folder = study_dir / "slurm"
    executor = _executor(config, folder)
    for spec in specs:
        prepare_cell(spec)  # the cell folder and its cell.yaml, before any task of its job reads them
    jobs = executor.map_array(run_cell_job, specs)
    ids = [str(job.job_id) for job in jobs]
    if config.launcher == "slurm":
        array = ids[0].split("_")[0]
        print(f"study: submitted {len(jobs)} cells as SLURM job array {array} ({ids[0]} .. {ids[-1]})", flush=True)
        print(f"study: watch: squeue -j {array}; logs: {folder}/{array}_<index>_0_log.out / .err; this process "
              "collects the results (Ctrl-C cancels the jobs; the same command again skips finished cells)",
              flush=True)
    else:
        print(f"study: started {len(jobs)} cells with submitit's local executor (processes {', '.join(ids)}); "
              f"logs: {folder}", flush=True)
    pending = dict(zip(ids, zip(jobs, specs, strict=True), strict=True))
    try:
        while pending:
            for job_id, (job, spec) in list(pending.items()):
                if not job.done():
                    continue
                del pending[job_id]
                try:
                    result = job.result()
                except Exception as error:  # noqa: BLE001 - the job died: its cell fails, the study goes on
                    first = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
                    result = crash_result(spec, f"job {job_id} failed: {first} (log: {job.paths.stderr})")
                on_result(result)
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for job, _ in pending.values():
            job.cancel(check=False)
        raise
    return f"{len(jobs)} {'SLURM jobs' if config.launcher == 'slurm' else 'submitit local processes'}"
