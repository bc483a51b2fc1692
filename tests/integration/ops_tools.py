"""Real stand-ins for what runs around the daemon in production: systemd's notify socket
and a Prometheus server, both private to a test and stopped by PID."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.broker import HOST, free_port, wait_until


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` of the test's own: records every sd_notify datagram.

    ``messages`` holds ``(monotonic time, {KEY: value})`` in arrival order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notify-socket", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def times(self, key: str, value: str | None = None) -> list[float]:
        return [t for t, f in self.snapshot() if key in f and (value is None or f[key] == value)]

    def wait_for(
        self, key: str, value: str | None = None, *, after: float = 0.0, timeout: float = 20.0
    ) -> dict[str, str]:
        """The first message after ``after`` (monotonic) that has ``key`` (= ``value``)."""
        found: list[dict[str, str]] = []

        def seen() -> bool:
            for t, f in self.snapshot():
                if t >= after and key in f and (value is None or f[key] == value):
                    found.append(f)
                    return True
            return False

        wait_until(seen, timeout, f"sd_notify {key}={value or '*'}")
        return found[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class Prometheus:
    """A real Prometheus on a free loopback port, scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        rules = "".join(f"  - {json.dumps(str(p))}\n" for p in rule_files)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rules}"
            "scrape_configs:\n  - job_name: seqstream\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.config}",
                f"--web.listen-address={HOST}:{self.port}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(ready, 20, "prometheus ready")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
