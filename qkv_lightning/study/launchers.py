"""Where a study's cells run: the local worker pool (:func:`run_in_workers`: cells in this process or in worker
subprocesses, one per visible GPU or several single-threaded ones on CPU) and, beyond one machine, SLURM.

Study cells beyond one machine: ``--launcher slurm`` submits every pending cell as one SLURM job array through
submitit (``pip install 'qkv-lightning[slurm]'``). Each job runs the normal ``fit`` of the cell (the same
:func:`qkv_lightning.study.cell.run_cell`), with the strategy config the study names (``study.strategy``), so a
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

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from qkv_lightning.errors import ConfigError
from qkv_lightning.files import atomic_write_json, read_json
from qkv_lightning.study.cell import prepare_cell, run_cell
from qkv_lightning.study.config import (
    StudyConfig,
)
from qkv_lightning.study.results import crash_result, is_finished, read_result
from qkv_lightning.study.safety import PARENT_ENV

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
    record = read_json(path, "the cell's job record", damaged_ok=True)
    if record is None or record.get("launcher") != config.launcher or "job_id" not in record:
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

    folder = study_dir / "slurm"
    executor = _executor(config, folder)
    attached = live_jobs(config, specs)
    if attached:
        print(f"study: {len(attached)} cells still have their job from an earlier run of this study (jobs "
              f"{', '.join(str(job.job_id) for job in attached.values())}): waiting on them, not submitting them "
              "again", flush=True)

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


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (as CUDA_VISIBLE_DEVICES names them), without creating a CUDA context."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def plan_workers(config: StudyConfig, pending: int) -> tuple[int, int | None, list[str]]:
    """(workers, torch threads per cell, GPU ids) for ``pending`` cells; 0 workers means in this process."""
    gpus = visible_gpus()
    cores = os.cpu_count() or 1
    workers = config.workers
    if workers is None:
        workers = len(gpus) if gpus else min(4, cores)
    workers = min(workers, pending)
    threads = config.threads
    if threads is None and workers > 0:
        threads = max(1, cores // workers)
    return workers, threads, gpus


def gpu_share(gpus: list[str], workers: int, slot: int) -> list[str]:
    """The GPUs worker ``slot`` sees: every ``workers``-th GPU from its slot (all of them for a single worker, so
    that a cell can use DDP), or one GPU shared round-robin when there are more workers than GPUs."""
    if workers <= len(gpus):
        return gpus[slot::workers]
    return [gpus[slot % len(gpus)]]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_in_workers(
    specs: list[dict],
    workers: int,
    threads: int | None,
    gpus: list[str],
    log_dir: Path,
    on_result: Callable[[dict], None],
) -> None:
    """Run ``specs`` on ``workers`` subprocesses (``python -m qkv_lightning.study.worker``), each taking the next
    cell when free, each seeing only its share of the GPUs (:func:`gpu_share`). A worker that dies fails its cell
    and is replaced. Ctrl-C stops every worker; the cells they were running are redone on the next run."""
    import qkv_lightning

    log_dir.mkdir(parents=True, exist_ok=True)
    queue = deque(specs)
    lock = threading.Lock()
    stop = threading.Event()
    processes: dict[int, subprocess.Popen] = {}
    package_root = str(Path(qkv_lightning.__file__).resolve().parents[1])

    def start(slot: int) -> subprocess.Popen:
        env = dict(os.environ)
        env[PARENT_ENV] = str(os.getpid())  # the worker dies with this process (see safety.die_with_parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_share(gpus, workers, slot))
        if threads:
            env["QKV_STUDY_THREADS"] = str(threads)
            env["OMP_NUM_THREADS"] = str(threads)
        log = open(log_dir / f"worker-{slot}.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "qkv_lightning.study.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                bufsize=1,
            )
        finally:
            log.close()

    def serve(slot: int) -> None:
        process = None
        while not stop.is_set():
            with lock:
                if not queue:
                    break
                spec = queue.popleft()
            if process is None or process.poll() is not None:
                process = start(slot)
                processes[slot] = process
            try:
                process.stdin.write(json.dumps(spec) + "\n")
                process.stdin.flush()
                line = process.stdout.readline()
            except OSError:
                line = ""
            if stop.is_set():
                break
            if line:
                result = json.loads(line)
            else:
                code = process.wait()
                process = None
                tail = _tail(Path(spec["dir"]) / "log.txt") or _tail(log_dir / f"worker-{slot}.log")
                result = crash_result(spec, f"worker process died (exit code {code}); last output: {tail}")
            with lock:
                on_result(result)
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.wait()

    threads_ = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in range(workers)]
    for thread in threads_:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads_):
            for thread in threads_:
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        raise


def run_cells(config: StudyConfig, specs: list[dict], study_dir: Path, on_result: Callable[[dict], None]) -> str:
    """Run the pending cells, calling ``on_result`` after each; returns a line describing how they ran."""
    if config.launcher != "local":  # SLURM (or submitit's local executor): qkv_lightning.study.launchers
        from qkv_lightning.study.launchers import run_with_submitit

        return run_with_submitit(config, specs, study_dir, on_result)
    workers, threads, gpus = plan_workers(config, len(specs))
    if workers == 0:
        if threads:
            import torch

            torch.set_num_threads(threads)
        how = "in this process" + (f", {threads} thread(s)" if threads else "")
        for spec in specs:
            on_result(run_cell(spec))
        return how
    how = f"{workers} worker process(es)" + (f" on GPU(s) {','.join(gpus)}" if gpus else f" x {threads} thread(s)")
    run_in_workers(specs, workers, threads, gpus, study_dir / "workers", on_result)
    return how


