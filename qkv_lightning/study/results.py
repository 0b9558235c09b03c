"""A cell's result: the one record every part of a study reads and writes (``result.json`` in the cell's folder),
its schema, and the checks that a stored result is whole and belongs to its cell."""

from __future__ import annotations

import math
from pathlib import Path

from qkv_lightning.files import atomic_write_json, read_json

RESULT_FILE = "result.json"
"""Written into a cell's directory when the cell has finished (ok or failed); its absence marks a half-finished run."""


def read_result(directory: Path) -> dict | None:
    """The stored result of a cell (any JSON value: :func:`result_problem` checks it), or None when it has not finished
    or its file is damaged (the cell is then run again)."""
    return read_json(directory / RESULT_FILE, "the study result", expected=object, damaged_ok=True)


RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "variant": (str,),
    "seed": (int,),
    "status": (str,),
    "metrics": (dict,),
    "fingerprint": (str,),
    "error": (str,),
    "params": (int, type(None)),
    "attn_params": (int, type(None)),
    "kv_cache_bytes_per_token": (int, type(None)),
    "steps": (int, type(None)),
    "wall_s": (int, float, type(None)),
    "cpu_s": (int, float, type(None)),
}
"""The fields of ``result.json`` that the report reads, and their types."""


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: [0, 1] for accuracies, [1, inf) for perplexities, [0, inf) for losses."""
    name = metric.lower().rsplit("/", 1)[-1]
    if "acc" in name:
        return 0.0, 1.0
    if "ppl" in name or "perplexity" in name:
        return 1.0, math.inf
    if any(word in name for word in ("loss", "nll", "bpc", "error")):
        return 0.0, math.inf
    return -math.inf, math.inf


def clip_interval(interval: tuple[float, float], metric: str) -> tuple[float, float]:
    """A confidence interval of a mean of ``metric`` clipped to the values the metric can take
    (:func:`metric_range`): a t interval over three seeds of accuracies near 1 can reach past 1, one of small losses
    below 0, and a mean can lie in neither. NaN ends (fewer than two values) stay NaN."""
    low, high = interval
    lowest, highest = metric_range(metric)
    return (low if math.isnan(low) else max(low, lowest)), (high if math.isnan(high) else min(high, highest))


def result_problem(result: object, spec: dict) -> str | None:
    """What is wrong with a stored result of the cell ``spec`` (as this code never writes it), or None."""
    if not isinstance(result, dict):
        return f"it holds a JSON {type(result).__name__}, not a mapping"
    for name, types in RESULT_FIELDS.items():
        value = result.get(name)
        if name not in result or not isinstance(value, types) or isinstance(value, bool):
            return f"its field {name!r} is {value!r}, not {' or '.join(t.__name__ for t in types)}"
    if result["status"] not in ("ok", "failed"):
        return f"its status is {result['status']!r}, not 'ok' or 'failed'"
    bad = {k: v for k, v in result["metrics"].items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad:
        return f"its metrics {bad} are not numbers"
    for name, value in result["metrics"].items():
        lowest, highest = metric_range(name)
        if not (lowest <= value <= highest) and not math.isnan(value):
            return f"its metric {name}={value!r} lies outside the values a {name} can take [{lowest}, {highest}]"
    if result["variant"] != spec["label"] or result["seed"] != spec["seed"]:
        found, wanted = f"{result['variant']} seed {result['seed']}", f"{spec['label']} seed {spec['seed']}"
        return f"it is the result of {found}, not of {wanted}"
    return None


def check_stored_results(specs: list[dict]) -> None:
    """Every stored ``result.json`` of the grid is as this code writes it (an unreadable one is redone).

    Raises:
        DataError: naming the file, what is wrong, and how to redo the cell.
    """
    from qkv_lightning.errors import DataError

    for spec in specs:
        path = Path(spec["dir"]) / RESULT_FILE
        result = read_result(path.parent)
        if result is None:
            continue
        problem = result_problem(result, spec)
        if problem is not None:
            raise DataError(
                f"the study result {path} was edited or damaged: {problem}. Delete it (the cell is then run again) "
                "or restore it; nothing was run."
            )


def write_result(directory: Path, result: dict) -> None:
    """Write ``result.json`` atomically, so that an interrupted write never looks like a finished cell."""
    atomic_write_json(directory / RESULT_FILE, result, default=_json_default)


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def blank_result(spec: dict) -> dict:
    """A cell's result before it has run: identity filled in, status failed, no metrics."""
    return {
        **spec["row"],
        **({"group": spec["group"], "sweep": dict(spec["sweep"])} if spec.get("group") else {}),
        # every axis value by its config key, the task too (qkv_lightning.study.effects reads cells from them)
        **({"axes": {"task": spec["sweep"]["task"], **dict(spec["axes"])}} if spec.get("group") else {}),
        "seed": spec["seed"],
        "status": "failed",
        "metrics": {},
        "params": None,
        "attn_params": None,
        "kv_cache_bytes_per_token": None,
        "steps": None,
        "wall_s": None,
        "cpu_s": None,
        "error": "",
        "log_dir": spec["dir"],
        "fingerprint": spec["fingerprint"],
    }


def crash_result(spec: dict, message: str) -> dict:
    """The result of a cell whose worker process died without reporting (e.g. killed for memory)."""
    result = {**blank_result(spec), "error": message}
    write_result(Path(spec["dir"]), result)
    return result


def is_finished(result: dict | None, spec: dict, retry_failed: bool) -> bool:
    """Whether a stored result counts as done: same settings, and ok (or failed when failures are not retried)."""
    if result is None or result.get("fingerprint") != spec["fingerprint"]:
        return False
    return result.get("status") == "ok" or (result.get("status") == "failed" and not retry_failed)
