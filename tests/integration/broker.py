"""A private mosquitto for tests and benchmarks: free loopback port, own config, by PID.

Never a system broker: each :class:`Broker` writes its own config (``listener PORT
127.0.0.1``, persistence in its own directory, ``max_queued_messages 0`` so nothing
queued for a slow subscriber is silently dropped, ``user root`` when run as root),
and ``stop``/``start`` keep the port and the persistence, as a real restart does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Broker:
    """A private mosquitto process; ``stop``/``start`` keep its port and persistence."""

    def __init__(self, workdir: Path, *, extra: str = "", listener: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        lines = [
            f"listener {self.port} {HOST}",
            listener,
            "persistence true",
            f"persistence_location {self.dir}/",
            "max_queued_messages 0",
            f"log_dest file {self.log}",
            extra,
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}); see {self.log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto not listening on {self.port}") from None
                time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


SHIPPED_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto.conf"


def shipped_broker(workdir: Path, conf: Path = SHIPPED_CONF) -> Broker:
    """A private mosquitto with the options of ``deploy/mosquitto.conf`` (what users run).

    Only what makes it private is replaced: its listener, persistence directory and log;
    every other option is the shipped one.
    """
    own = ("listener", "persistence", "persistence_location", "max_queued_messages", "log_dest")
    keep = [
        line
        for line in conf.read_text().splitlines()
        if line.strip() and not line.startswith("#") and line.split()[0] not in own
    ]
    return Broker(workdir, extra="\n".join(["allow_anonymous true", *keep]))


def make_tls(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost, via openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=seqstream test CA", "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr))  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return {"ca": ca_crt, "cert": crt, "key": key}
