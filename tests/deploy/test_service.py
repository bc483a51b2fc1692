"""pipeline.daemon.service on its own: the sd_notify wire format over real sockets, what systemd's
environment means, and the exit ledger that ExecStopPost feeds."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from pipeline.daemon.service import EXIT_RESULTS, Notifier, ServiceEnv, record_exit


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_notifier_speaks_sd_notify_over_a_path_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        n = Notifier(str(tmp_path / "notify"))
        assert n.ready("serving m 1")
        assert receive(sock) == {
            "READY": "1",
            "STATUS": "serving m 1",
            "MAINPID": str(os.getpid()),
        }
        assert n.watchdog()
        assert receive(sock) == {"WATCHDOG": "1"}
        assert n.reloading()
        got = receive(sock)
        assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
        assert n.stopping("stopping")
        assert receive(sock) == {"STOPPING": "1", "STATUS": "stopping"}
        n.close()


def test_notifier_reaches_an_abstract_socket(tmp_path: Path) -> None:
    name = f"seqstream-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier("@" + name).status("hello")
        assert receive(sock) == {"STATUS": "hello"}


def test_notifier_without_systemd_or_with_a_dead_socket_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    off = Notifier(None)
    assert not off.enabled and not off.ready("x") and not off.watchdog()
    dead = Notifier(str(tmp_path / "nobody-listens"))
    assert not dead.watchdog() and not dead.watchdog()
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_service_env_reads_what_systemd_sets(tmp_path: Path) -> None:
    assert ServiceEnv.from_environ({}) == ServiceEnv()
    env = ServiceEnv.from_environ(
        {
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": str(os.getpid()),
            "STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b",
        }
    )
    assert env == ServiceEnv("/run/systemd/notify", 30.0, tmp_path / "a")
    # The watchdog is meant for another process (we inherited the variables): no pings.
    other = ServiceEnv.from_environ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None
    assert ServiceEnv.from_environ({"WATCHDOG_USEC": "0"}).watchdog_s is None


def test_record_exit_counts_each_ended_run_once_and_keeps_the_counts(tmp_path: Path) -> None:
    zero = dict.fromkeys(EXIT_RESULTS, 0)
    assert record_exit(tmp_path) == zero  # first start ever
    (tmp_path / "last-exit").write_text("watchdog\n")
    assert record_exit(tmp_path) == {**zero, "watchdog": 1}
    assert not (tmp_path / "last-exit").exists()
    assert record_exit(tmp_path) == {**zero, "watchdog": 1}  # not counted twice
    for result in ("exit-code", "watchdog", "something-new"):
        (tmp_path / "last-exit").write_text(result)
        counts = record_exit(tmp_path)
    assert counts == {**zero, "watchdog": 2, "exit-code": 1, "other": 1}
    assert json.loads((tmp_path / "exits.json").read_text()) == counts


def test_record_exit_survives_a_corrupt_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "exits.json").write_text("{torn")
    (tmp_path / "last-exit").write_text("signal")
    assert record_exit(tmp_path)["signal"] == 1
    assert "unreadable" in caplog.text
