"""A study worker process: reads one cell spec (a JSON line) at a time from stdin, runs it, answers with the result.

Started by :func:`qkv_lightning.study.launchers.run_in_workers`; ``CUDA_VISIBLE_DEVICES`` selects its GPU and
``QKV_STUDY_THREADS`` its torch CPU threads. Everything the cells print goes to stderr (or the cell's log), so
stdout carries only the answers.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    from qkv_lightning.study.safety import die_with_parent

    die_with_parent()  # a study process killed with -9 leaves no worker behind
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not corrupt the answers
    import torch

    from qkv_lightning.study.cell import run_cell

    threads = int(os.environ.get("QKV_STUDY_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(run_cell(json.loads(line)), default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
