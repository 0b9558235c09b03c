"""Fixtures shared by several test modules."""

import os
import socket
from collections import Counter

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Files with more slow (multi-process) tests run first, the others after them in their usual order.

    ``pytest -n 2 --dist loadfile`` (the README's test command) hands out whole files in collection order. In
    alphabetical order the long multi-process files of ``test_study_*`` and ``test_uptrain_*`` came last, and one
    worker ran them alone while the other had nothing left; started first, they overlap the many short files.
    Tests within a file keep their order (a stable sort on a per-file key).
    """
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: index for index, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plain_argv(monkeypatch):
    """LightningCLI warns when both sys.argv (here: pytest's) and args are given."""
    monkeypatch.setattr("sys.argv", ["cli.py"])


_PORTS_PER_WORKER = 1000
_next_port: dict[str, int] = {}


def rendezvous_port() -> int:
    """A free TCP port for a distributed run, from a block of ports that belongs to this pytest-xdist worker alone.

    Lightning picks its rendezvous port by binding port 0 and closing it again; two xdist workers that each start a
    2-process run can be handed the same port in between (EADDRINUSE: one CI run failed so). The blocks lie below
    Linux's ephemeral range (32768-60999), where the kernel never hands out ports on its own.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = 12000 + (index % 20) * _PORTS_PER_WORKER
    while True:
        port = _next_port.get(worker, start)
        _next_port[worker] = start + (port + 1 - start) % _PORTS_PER_WORKER
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port


@pytest.fixture(autouse=True)
def own_rendezvous_port(monkeypatch):
    """Every test's distributed runs (subprocesses inherit the variable) rendezvous on a port of its own:
    Lightning's ``find_free_network_port`` returns ``STANDALONE_PORT`` when it is set.

    An in-process distributed run of an earlier test leaves ``MASTER_PORT`` (which Lightning prefers to
    ``STANDALONE_PORT``) in ``os.environ``, with its store still listening there; a subprocess that inherits it fails
    with EADDRINUSE. So every test starts without the settings such a run leaves behind.
    """
    from tests.run_fixtures import LEFT_BEHIND

    for name in LEFT_BEHIND:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STANDALONE_PORT", str(rendezvous_port()))
