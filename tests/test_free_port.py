"""free_port: ports outside the kernel's ephemeral range, a block per pytest-xdist worker, a port in use skipped."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from pipeline.audit.base import serveproc
from pipeline.audit.base.serveproc import PORT_BASE, PORT_BLOCK, free_port


def _block(port: int) -> int:
    return (port - PORT_BASE) // PORT_BLOCK


def test_ports_come_from_the_workers_own_block_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    first = [free_port() for _ in range(20)]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    second = [free_port() for _ in range(20)]
    assert {_block(p) for p in first} == {0} and {_block(p) for p in second} == {1}
    assert len(set(first)) == 20  # never the same port twice in a row
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert max(first + second) < low  # no outgoing connection can be given one of them


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    taken = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        monkeypatch.setattr(serveproc, "_next_port", itertools.count(taken - PORT_BASE))
        port = free_port()
    assert port == taken + 1
    with socket.socket() as sock:  # and it is free to bind
        sock.bind(("127.0.0.1", port))


def test_with_its_whole_block_taken_it_falls_back_to_a_port_the_kernel_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(serveproc, "PORT_BLOCK", 3)  # a block of three ports, all held below
    start = free_port()
    monkeypatch.setattr(serveproc, "PORT_BASE", start)
    held = []
    try:
        for port in range(start, start + 3):
            sock = socket.socket()
            held.append(sock)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:  # taken by someone else already: as good
                pass
        port = free_port()
    finally:
        for sock in held:
            sock.close()
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert low <= port <= high  # from the kernel's ephemeral range, not the full block
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
