"""Study cells beyond one machine: ``--launcher slurm`` submits every pending cell as one SLURM job array through
submitit (``pip install 'qkv-lightning[slurm]'``). Each job runs the normal ``fit`` of the cell (the same
:func:`qkv_lightning.study.runner.run_cell`), with the strategy config the study names (``study.strategy``), so a
cell can itself be multi-GPU or multi-node (``study.slurm``: ``nodes``, ``tasks_per_node``, ``gpus_per_node``, ...).
The study process waits for the jobs, collects their results into the same ``results.csv`` and summary, and keeps
the study lock meanwhile; Ctrl-C cancels the jobs, and a re-run skips the finished cells.

``--launcher submitit_local`` runs the same job array with submitit's local executor (each cell a separate process
on this machine): what the tests use, and a way to try a SLURM study's settings without a cluster.

Each cell folder records its job (:data:`JOB_FILE`: launcher, job id, submitit folder). A re-run of the study while
a cell's job is still pending or running (the study process was killed, or the login node rebooted) waits on that
job instead of submitting the cell again.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from qkv_lightning.errors import ConfigError
from qkv_lightning.files import atomic_write_json

LAUNCHERS = ("local", "slurm", "submitit_local")
"""``study.launcher`` values: the local worker pool, SLURM through submitit, submitit's local executor."""
JOB_FILE = "job.json"
"""The job of a cell, in its folder: ``{"launcher", "job_id", "folder", "host", "start"}``."""
SLURM_WAITING_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")
"""SLURM job states (``sacct``) of a job that will still run or finish: a re-run waits on such a job."""


class _AttachedLocalJob:
    """A job of submitit's local executor started by an earlier study process: submitit keeps no handle on its
    process then (its ``done()`` would say True at once), so liveness is the controller process's (pid, start)."""

    def __init__(self, job: object, owner: dict) -> None:
        self.job, self.owner = job, owner
        self.job_id, self.paths = job.job_id, job.paths

    def done(self) -> bool:
        from qkv_lightning.study.safety import is_alive

        return is_alive(self.owner) is False

    def result(self) -> object:
        return self.job.result()

    def cancel(self, check: bool = False) -> None:
        import os
        import signal

        if not self.done():
            os.kill(int(self.job_id), signal.SIGINT)


def record_job(config: object, spec: dict, job: object, folder: Path) -> None:
    """Write the cell's :data:`JOB_FILE` (for a local job also its controller process's start time)."""
    from qkv_lightning.study.safety import process_start_time

    job_id = str(job.job_id)
    start = process_start_time(int(job_id)) if config.launcher == "submitit_local" else None
    record = {"launcher": config.launcher, "job_id": job_id, "folder": str(folder), "host": socket.gethostname(),
              "start": start}
    atomic_write_json(Path(spec["dir"]) / JOB_FILE, record)


def live_job(config: object, spec: dict) -> object | None:
    """The cell's recorded job if it is still pending or running (re-attached through submitit), else None."""
    path = Path(spec["dir"]) / JOB_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("launcher") != config.launcher or "job_id" not in record:
        return None
    import submitit

    job_id, folder = str(record["job_id"]), record.get("folder", "")
    if config.launcher == "slurm":
        job = submitit.SlurmJob(folder=folder, job_id=job_id)
        return job if job.state in SLURM_WAITING_STATES else None
    from qkv_lightning.study.safety import is_alive

    if not job_id.isdigit():
        return None
    owner = {"pid": int(job_id), "host": record.get("host"), "start": record.get("start")}
    if is_alive(owner) is not True:  # gone, or on another host (a local job cannot be followed from there)
        return None
    return _AttachedLocalJob(submitit.local.local.LocalJob(folder=folder, job_id=job_id), owner)


def live_jobs(config: object, specs: list[dict]) -> dict[str, object]:
    """``{cell folder: job}`` of the cells whose recorded job still waits or runs (nothing for the local pool)."""
    if config.launcher == "local":
        return {}
    _executor(config, Path("."), check_only=True)  # submitit is installed
    jobs = {}
    for spec in specs:
        job = live_job(config, spec)
        if job is not None:
            jobs[spec["dir"]] = job
    return jobs


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


def _executor(config: object, folder: Path, check_only: bool = False) -> object:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            f"study.launcher={config.launcher} needs submitit: pip install 'qkv-lightning[slurm]' (or use "
            "--launcher local)."
        ) from None
    if check_only:
        return None
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
    attached = live_jobs(config, specs)
    if attached:
        print(f"study: {len(attached)} cells still have their job from an earlier run of this study (jobs "
              f"{', '.join(str(job.job_id) for job in attached.values())}): waiting on them, not submitting them "
              "again", flush=True)
    from qkv_lightning.study.runner import is_finished, read_result

    fresh = []
    for spec in specs:
        if spec["dir"] in attached:
            continue
        result = read_result(Path(spec["dir"]))
        if (Path(spec["dir"]) / JOB_FILE).exists() and is_finished(result, spec, config.retry_failed):
            on_result(result)  # its earlier job finished since the study looked: collected, not run again
        else:
            fresh.append(spec)
    for spec in fresh:
        prepare_cell(spec)  # the cell folder and its cell.yaml, before any task of its job reads them
    jobs = executor.map_array(run_cell_job, fresh) if fresh else []
    for spec, job in zip(fresh, jobs, strict=True):
        record_job(config, spec, job, folder)
    ids = [str(job.job_id) for job in jobs]
    if not jobs:
        pass
    elif config.launcher == "slurm":
        array = ids[0].split("_")[0]
        print(f"study: submitted {len(jobs)} cells as SLURM job array {array} ({ids[0]} .. {ids[-1]})", flush=True)
        print(f"study: watch: squeue -j {array}; logs: {folder}/{array}_<index>_0_log.out / .err; this process "
              "collects the results (Ctrl-C cancels the jobs; the same command again skips finished cells and "
              "waits on queued ones)", flush=True)
    else:
        print(f"study: started {len(jobs)} cells with submitit's local executor (processes {', '.join(ids)}); "
              f"logs: {folder}", flush=True)
    pending = {str(job.job_id): (job, spec) for job, spec in zip(jobs, fresh, strict=True)}
    pending.update({str(job.job_id): (job, spec) for spec in specs if (job := attached.get(spec["dir"]))})
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
    kind = "SLURM jobs" if config.launcher == "slurm" else "submitit local processes"
    return f"{len(jobs)} {kind}" + (f", {len(attached)} earlier ones waited on" if attached else "")
