"""`python -m service` as a real process on real ports: start-up errors, serving, SIGTERM."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IMAGES, REPO
from tests.server_process import ServerProcess, server_process

RACE = 0.02  # seconds: a request started this close to SIGTERM may reach a closed connection


def run_to_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m service` expected to stop at start-up; its combined output."""
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def server(small_model: Path) -> Iterator[ServerProcess]:
    with server_process(small_model) as running:
        yield running


def test_sigterm_under_load_loses_no_accepted_request(server: ServerProcess) -> None:
    """Every request sent before SIGTERM is answered 200; later ones may be refused, not lost.

    After SIGTERM a request is answered 200, refused with 503 (draining), or finds the
    listener closed (connection refused or reset before the server read it); all three are
    "not accepted". A request sent *before* the signal was accepted, and must get its answer.
    A request started in the last RACE seconds before the signal counts with the later ones:
    the client may not have written it yet when the draining server closes its idle keep-alive
    connections (a ReadError, seen once in a fresh-clone CI run); HTTP/1.1 cannot tell that
    race from a lost request.
    """
    proc, url = server.proc, server.url
    body = (IMAGES / "grace_hopper.jpg").read_bytes()
    headers = {"Content-Type": "image/jpeg"}
    sent: list[tuple[float, str]] = []  # (when the request was sent, its outcome)
    signalled_at = math.inf

    async def client_loop(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = await client.post(f"{url}/v1/classify", content=body, headers=headers)
            except httpx.TransportError as exc:
                sent.append((started, f"transport error: {type(exc).__name__}"))
                await asyncio.sleep(0.01)
                continue
            if r.status_code == 200:
                assert r.json()["predictions"][0]["index"] == 652
            sent.append((started, str(r.status_code)))

    async def run() -> None:
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(client_loop(client, stop)) for _ in range(16)]
            await asyncio.sleep(1.5)  # steady load
            nonlocal signalled_at
            signalled_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 60)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())
    log = server.log()
    before = [outcome for started, outcome in sent if started < signalled_at - RACE]
    after = [outcome for started, outcome in sent if started >= signalled_at - RACE]
    assert proc.returncode == 0, log
    assert len(before) > 16
    assert set(before) == {"200"}, log  # including the 16 in flight when the signal came
    assert set(after) <= {"200", "503"} | {o for o in after if o.startswith("transport error")}
    assert "shutdown complete" in log


def test_missing_model_stops_startup_with_one_line(tmp_path: Path) -> None:
    done = run_to_exit({"MNV3_MODEL_PATH": str(tmp_path / "nope.onnx"), "MNV3_HTTP_PORT": "0"})
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [
        f"cannot start: cannot read model file {tmp_path / 'nope.onnx'}: No such file or directory"
    ]


def test_corrupt_model_stops_startup_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is no protobuf")
    done = run_to_exit({"MNV3_MODEL_PATH": str(bad)})
    assert done.returncode == 1
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith(f"cannot start: {bad} is not a loadable ONNX model")


def test_bad_setting_stops_startup_with_one_line() -> None:
    done = run_to_exit({"MNV3_MAX_BATCH_SIZE": "lots", "MNV3_HTTP_PORT": "99999"})
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "invalid settings: MNV3_HTTP_PORT='99999': Input should be less than or equal to 65535; "
        "MNV3_MAX_BATCH_SIZE='lots': Input should be a valid integer, unable to parse string "
        "as an integer"
    ]
