"""`python -m service` as a real process on free loopback ports, for tests that need real
sockets, signals, exit codes or RSS."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """`python -m service` started by a test: its process, ports and log."""

    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log_file: IO[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return self.log_file.read()

    def rss_kib(self) -> int:
        """Resident set size from /proc/PID/status (VmRSS, in KiB)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("VmRSS:")]
        return int(line.split()[1])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of GET /metrics, keyed by (name, sorted labels)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def rest_counts(self) -> dict[str, float]:
        """mnv3_request_duration_seconds_count of REST classify, by status code."""
        return {
            dict(labels)["code"]: value
            for (name, labels), value in self.metrics().items()
            if name == "mnv3_request_duration_seconds_count"
            and dict(labels)["protocol"] == "rest"
            and dict(labels)["method"] == "classify"
        }


@contextlib.contextmanager
def server_process(model: Path, **settings: Any) -> Iterator[ServerProcess]:
    """Start `python -m service` on free loopback ports, wait until ready, stop it after.

    `settings` are Settings fields (max_queue=4 -> MNV3_MAX_QUEUE=4). The log goes to a
    temporary file: a pipe nobody reads would block a chatty server.
    """
    http_port, grpc_port = free_port(), free_port()
    env = {
        "MNV3_MODEL_PATH": str(model),
        "MNV3_HTTP_HOST": "127.0.0.1",
        "MNV3_HTTP_PORT": str(http_port),
        "MNV3_GRPC_PORT": str(grpc_port),
        "MNV3_INTRA_OP_THREADS": "1",
        "MNV3_DECODE_THREADS": "2",
        **{f"MNV3_{key.upper()}": str(value) for key, value in settings.items()},
    }
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        server = ServerProcess(proc, http_port, grpc_port, log)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, server.log()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                        break
                assert time.monotonic() < deadline, "not ready in 60 s:\n" + server.log()
                time.sleep(0.05)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(timeout=30)
