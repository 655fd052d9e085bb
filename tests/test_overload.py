"""Overload, disconnects and shutdown at small scale: shed fast, leak nothing, lose nothing.

The in-process app serves the tests that need white-box access (its classifier and metrics);
`python -m service` as a real process serves those that need real sockets, RSS or signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from service.grpc_api import ERROR_CODE_KEY
from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import IMAGES, make_settings, metric, serving
from tests.imagegen import upscaled_jpeg
from tests.server_process import ServerProcess, server_process

CHELSEA = (IMAGES / "chelsea.png").read_bytes()
HOPPER = (IMAGES / "grace_hopper.jpg").read_bytes()
PHOTOS = {"chelsea.png": CHELSEA, "grace_hopper.jpg": HOPPER}
CONTENT_TYPE = {"chelsea.png": "image/png", "grace_hopper.jpg": "image/jpeg"}
TOP1 = {"chelsea.png": 285, "grace_hopper.jpg": 652}  # Egyptian cat, military uniform

# A deliberately small server: 4 queued + 2 computing = 6 images admitted at most.
SMALL = {"max_queue": 4, "max_batch_size": 2}
CAPACITY = 6
CLIENTS = 3 * CAPACITY  # concurrent clients in a burst: 3x what the server can hold
# After a rejection a client waits this long (Retry-After, scaled down) before trying again,
# as a polite client does; 18 clients spinning on rejections would starve the server's CPU.
BACKOFF = 0.02
BOUND = 10.0  # seconds: upper bound for polls; never the thing asserted


# ---------------------------------------------------------------------------- helpers


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll for a state the server reaches without telling anyone (counters, gauges)."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"not within {BOUND} s: {what}"
        await asyncio.sleep(0.01)


def grpc_reason(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(ERROR_CODE_KEY)


# ---------------------------------------------------------------------------- bursts


@dataclass
class Burst:
    """What the clients of one burst saw."""

    served: list[tuple[str, str, int, float]] = field(default_factory=list)  # proto, photo, top1, p
    served_seconds: list[float] = field(default_factory=list)  # client-side, both protocols
    # Client-side latency of every rejection, by protocol.
    shed_seconds: dict[str, list[float]] = field(default_factory=lambda: {"rest": [], "grpc": []})
    other: list[str] = field(default_factory=list)  # anything else: must stay empty

    @property
    def shed(self) -> dict[str, int]:
        return {proto: len(seconds) for proto, seconds in self.shed_seconds.items()}

    def served_by(self, proto: str) -> int:
        return sum(1 for p, *_ in self.served if p == proto)

    def summary(self) -> str:
        latency = ", ".join(
            f"{proto} p50 {percentile(s, 50) * 1000:.1f} ms p99 {percentile(s, 99) * 1000:.1f} ms "
            f"max {max(s) * 1000:.1f} ms"
            for proto, s in self.shed_seconds.items()
            if s
        )
        served = {proto: self.served_by(proto) for proto in self.shed_seconds}
        return f"served {served}, shed {self.shed}; client-side rejection latency: {latency}"


async def burst(
    rest: httpx.AsyncClient,
    stub: pb_grpc.ClassifierAsyncStub,
    seconds: float,
    clients: int = CLIENTS,
) -> Burst:
    """`clients` clients (half REST, half gRPC) each sending photos back to back for `seconds`."""
    seen = Burst()
    stop = time.monotonic() + seconds

    async def rest_client(n: int) -> None:
        while time.monotonic() < stop:
            name = list(PHOTOS)[n % 2]
            n += 1
            started = time.perf_counter()
            r = await rest.post(
                "/v1/classify", content=PHOTOS[name], headers={"Content-Type": CONTENT_TYPE[name]}
            )
            took = time.perf_counter() - started
            if r.status_code == 200:
                top = r.json()["predictions"][0]
                seen.served.append(("rest", name, top["index"], top["score"]))
                seen.served_seconds.append(took)
            elif (
                r.status_code == 503
                and r.headers.get("Retry-After") == "1"
                and r.json()["error"]["code"] == "overloaded"
            ):
                seen.shed_seconds["rest"].append(took)
                await asyncio.sleep(BACKOFF)
            else:
                seen.other.append(f"REST {r.status_code} {r.text}")

    async def grpc_client(n: int) -> None:
        while time.monotonic() < stop:
            name = list(PHOTOS)[n % 2]
            n += 1
            started = time.perf_counter()
            try:
                reply = await stub.Classify(pb.ClassifyRequest(image=PHOTOS[name]), timeout=BOUND)
            except grpc.aio.AioRpcError as error:
                took = time.perf_counter() - started
                if (
                    error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and grpc_reason(error) == "overloaded"
                ):
                    seen.shed_seconds["grpc"].append(took)
                    await asyncio.sleep(BACKOFF)
                else:
                    seen.other.append(f"gRPC {error.code().name} {error.details()}")
                continue
            top = reply.predictions[0]
            seen.served.append(("grpc", name, top.index, top.score))
            seen.served_seconds.append(time.perf_counter() - started)

    async with asyncio.TaskGroup() as group:
        for n in range(clients // 2):
            group.create_task(rest_client(n))
            group.create_task(grpc_client(n))
    return seen


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------------- overload


async def test_overload_is_shed_fast_and_what_is_accepted_is_right(small_model: Path) -> None:
    """18 clients (9 REST, 9 gRPC) for 3 s against room for 6 images.

    The server sheds with 503 + Retry-After / RESOURCE_EXHAUSTED, fast; every accepted
    request gets its own photo's answer; the queue_full counter equals the sheds seen; the
    first request after the burst is served at once.
    """
    async with serving(make_settings(small_model, **SMALL)) as (app, rest):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}")
        stub = pb_grpc.ClassifierStub(channel)
        calm = {}  # each photo's top-1 score when the server is idle
        for name, image in PHOTOS.items():
            reply = await stub.Classify(pb.ClassifyRequest(image=image))
            assert reply.predictions[0].index == TOP1[name]
            calm[name] = reply.predictions[0].score
        rejected_before = metric(app, "mnv3_requests_rejected_total", {"reason": "queue_full"})

        seen = await burst(rest, stub, seconds=3.0)

        # Recovery: the very next request is served at once.
        await eventually(lambda: app.state.classifier._admitted == 0, "nothing admitted")
        started = time.perf_counter()
        after = await rest.post(
            "/v1/classify", content=CHELSEA, headers={"Content-Type": "image/png"}
        )
        recovery = time.perf_counter() - started
        assert after.status_code == 200
        assert after.json()["predictions"][0]["index"] == TOP1["chelsea.png"]
        reply = await stub.Classify(pb.ClassifyRequest(image=HOPPER), timeout=1)
        assert reply.predictions[0].index == TOP1["grace_hopper.jpg"]
        assert (await rest.get("/healthz")).status_code == 200

        rejected = metric(app, "mnv3_requests_rejected_total", {"reason": "queue_full"})
        rejections = {  # the server's own measure: request in -> reply ready
            proto: {
                le: metric(
                    app,
                    "mnv3_request_duration_seconds_bucket",
                    {"protocol": proto, "method": method, "code": code, "le": le},
                )
                for le in ("0.02", "0.25")
            }
            for proto, method, code in (
                ("rest", "classify", "503"),
                ("grpc", "Classify", "RESOURCE_EXHAUSTED"),
            )
        }
        depth = metric(app, "mnv3_queue_depth")
        inflight = metric(app, "mnv3_inflight_requests")
        await channel.close()

    print(f"\n{seen.summary()}; first request after the burst {recovery * 1000:.1f} ms")
    assert seen.other == []  # every answer was a correct result or a clean shed
    assert seen.shed["rest"] > 0
    assert seen.shed["grpc"] > 0
    assert seen.served_by("rest") > 0
    for _, name, top1, score in seen.served:  # each caller got its own photo's answer
        assert top1 == TOP1[name]
        assert score == pytest.approx(calm[name], abs=1e-4)
    assert rejected - rejected_before == seen.shed["rest"] + seen.shed["grpc"]
    assert (depth, inflight) == (0, 0)
    # Rejection latency as the server measures it: 99% within 20 ms, all within 250 ms.
    # Measured on a 2-core box: all <= 5 ms when this test runs alone; run after other modules,
    # one in ~1000 takes 50-160 ms: a full garbage collection of this test process's large heap
    # pausing the event loop the server shares with it.
    for proto, le in rejections.items():
        assert le["0.02"] >= 0.99 * seen.shed[proto], (proto, le, seen.shed)
        assert le["0.25"] == seen.shed[proto], (proto, le, seen.shed)
    # What REST clients saw: measured p50 ~1 ms, p99 ~5-10 ms (they share the server's event
    # loop here). The bound leaves room for a loaded CI box. gRPC clients in this process
    # are not held to it: their calls cross grpc's completion-queue thread into this busy
    # loop and back, ~15-130 ms at p50 here against ~5-20 ms from another process (see
    # test_rss_stays_flat_across_repeated_bursts).
    assert percentile(seen.shed_seconds["rest"], 99) < 0.050
    assert recovery < 0.5


def test_repeated_bursts_keep_rss_flat_and_accepted_latency_within_2x(small_model: Path) -> None:
    """A real process at capacity (6 clients), then four bursts at 3x (18 clients).

    RSS after bursts 2-4 stays within 10% of after burst 1, and the p99 of accepted requests
    in the bursts within 2x of the p99 at capacity: shedding keeps the queue, hence the
    latency, bounded. The clients run in this process, the server in its own, as in
    production; so each burst also checks what a remote client sees: correct answers or clean
    sheds on both protocols.
    """
    with server_process(small_model, **SMALL) as server:

        async def one_burst(clients: int = CLIENTS) -> Burst:
            limits = httpx.Limits(max_connections=CLIENTS)
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=BOUND, limits=limits) as rest,
                grpc.aio.insecure_channel(server.grpc_target) as channel,
            ):
                return await burst(rest, pb_grpc.ClassifierStub(channel), 2.0, clients)

        def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            deadline = time.monotonic() + BOUND
            while (m := server.metrics())[("mnv3_inflight_requests", ())] != 0:
                assert time.monotonic() < deadline, "requests still in flight"
                time.sleep(0.01)
            return m

        at_capacity = asyncio.run(one_burst(clients=CAPACITY))
        assert at_capacity.shed == {"rest": 0, "grpc": 0}
        queue_full = ("mnv3_requests_rejected_total", (("reason", "queue_full"),))
        idle = server.rss_kib()
        rss, shed, accepted = [], 0, []
        for _ in range(4):
            seen = asyncio.run(one_burst())
            accepted += seen.served_seconds
            print(f"\n{seen.summary()}")
            assert seen.other == []
            assert seen.served_by("rest") > 0
            assert seen.served_by("grpc") > 0
            assert all(top1 == TOP1[name] for _, name, top1, _ in seen.served)
            assert seen.shed["rest"] > 0  # every burst did overload the server
            assert seen.shed["grpc"] > 0
            shed += seen.shed["rest"] + seen.shed["grpc"]
            metrics = settled()
            assert metrics[("mnv3_queue_depth", ())] == 0
            assert metrics[queue_full] == shed
            rss.append(server.rss_kib())
    p99_capacity = percentile(at_capacity.served_seconds, 99)
    p99_overload = percentile(accepted, 99)
    print(f"RSS idle {idle} KiB, after each burst {rss} KiB")
    print(
        f"accepted p99: {p99_capacity * 1000:.1f} ms at capacity, {p99_overload * 1000:.1f} at 3x"
    )
    # Measured: +1.4 MB per burst (~1%), from glibc's per-thread malloc arenas (decode and
    # inference threads); Python objects do not grow (tracemalloc), and with MALLOC_ARENA_MAX=2
    # the growth halves. A leak of even 2 KB per request would exceed the bound.
    assert max(rss[1:]) <= rss[0] * 1.10
    assert p99_overload <= 2 * p99_capacity


def test_a_flood_of_large_images_on_one_grpc_channel(small_model: Path) -> None:
    """300 calls with a 2 MP photo (~80 MB in all) at once on one channel, against room for 6.

    Each call gets its own answer or a clean RESOURCE_EXHAUSTED, most are shed rather than
    queued, and the server answers at once afterwards. (Before refused calls were answered
    unread, such a flood at full scale piled up messages: RSS 252 -> 871 MB.)
    """
    photo = upscaled_jpeg(IMAGES / "grace_hopper.jpg", megapixels=2.0)
    request = pb.ClassifyRequest(image=photo)

    async def flood(calls: int) -> Counter[str]:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)

            async def one() -> str:
                try:
                    reply = await stub.Classify(request, timeout=BOUND)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return f"OK {reply.predictions[0].index}"

            return Counter(await asyncio.gather(*(one() for _ in range(calls))))

    with server_process(small_model, **SMALL) as server:
        seen = asyncio.run(flood(300))
        after = asyncio.run(flood(1))
    print(f"\nflood {dict(seen)}")
    assert set(seen) == {"OK 652", "RESOURCE_EXHAUSTED"}
    assert seen["OK 652"] >= CAPACITY
    assert seen["RESOURCE_EXHAUSTED"] >= 200  # measured 260-290: shed, not queued
    assert after == {"OK 652": 1}


# ---------------------------------------------------------------------------- disconnects


def request_head(length: int) -> bytes:
    return (
        "POST /v1/classify HTTP/1.1\r\nHost: mnv3\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def small_server(small_model: Path) -> Iterator[ServerProcess]:
    with server_process(small_model, **SMALL) as server:
        yield server


async def settled_rest(
    server: ServerProcess, requests: int, before: dict[str, float]
) -> dict[str, float]:
    """Once `requests` more REST classify requests are counted and none is in flight: the
    counts of those requests by status code."""

    def delta() -> dict[str, float]:
        now = server.rest_counts()
        return {c: n - before.get(c, 0) for c, n in now.items() if n != before.get(c, 0)}

    await eventually(
        lambda: (
            sum(delta().values()) == requests
            and server.metrics()[("mnv3_inflight_requests", ())] == 0
        ),
        f"{requests} requests answered",
    )
    return delta()


async def assert_serves(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=BOUND) as client:
        r = await client.post(
            "/v1/classify", content=CHELSEA, headers={"Content-Type": "image/png"}
        )
    assert r.status_code == 200
    assert r.json()["predictions"][0]["index"] == TOP1["chelsea.png"]


async def test_rest_clients_that_hang_up_after_sending_free_their_slots(
    small_server: ServerProcess,
) -> None:
    """50 whole requests, each socket closed right after sending: nothing stays admitted."""
    before = small_server.rest_counts()
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", small_server.http_port)) as sock:
            sock.sendall(request_head(len(CHELSEA)) + CHELSEA)
    counts = await settled_rest(small_server, 50, before)
    # uvicorn runs a request to its end even when its client is gone (its answer is dropped):
    # each was computed (200) or shed (503: at most 6 of the 50 fit at once).
    assert set(counts) <= {"200", "503"}, counts
    metrics = small_server.metrics()
    assert metrics[("mnv3_inflight_requests", ())] == 0
    assert metrics[("mnv3_queue_depth", ())] == 0
    await assert_serves(small_server)


async def test_rest_clients_that_hang_up_mid_upload_are_not_server_errors(
    small_server: ServerProcess,
) -> None:
    """10 clients send half a body, then close: the slots are freed, and that is no 5xx.

    A vanished client is the client's doing. Counting it as code="500" feeds the
    MNV3HighErrorRatio alert (code=~"5..") and logs a traceback per flaky mobile client.
    """
    before = small_server.rest_counts()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", small_server.http_port)) as sock:
            sock.sendall(request_head(len(CHELSEA)) + CHELSEA[: len(CHELSEA) // 2])
            await asyncio.sleep(0.02)  # let the server start reading the body
    counts = await settled_rest(small_server, 10, before)
    assert small_server.metrics()[("mnv3_queue_depth", ())] == 0
    await assert_serves(small_server)
    assert [code for code in counts if code.startswith("5")] == [], counts
    assert "ClientDisconnect" not in small_server.log()


async def test_cancelled_grpc_calls_free_their_slots_and_are_not_computed(
    small_model: Path,
) -> None:
    """16 calls queued behind a slow batch, then cancelled: the core lets go of every one,
    and the ones still waiting in the queue are never computed."""
    settings = make_settings(small_model, max_queue=16, max_batch_size=2)
    async with serving(settings) as (app, _):
        classifier = app.state.classifier
        original = classifier.engine.run

        def slow_run(batch: Any) -> Any:
            time.sleep(0.2)  # keeps the other calls queued while they are cancelled
            return original(batch)

        classifier.engine.run = slow_run
        images_before = metric(app, "mnv3_batch_size_sum")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            calls = [stub.Classify(pb.ClassifyRequest(image=CHELSEA)) for _ in range(16)]
            await eventually(lambda: classifier._admitted == 16, "16 calls admitted")
            await eventually(lambda: metric(app, "mnv3_queue_depth") >= 12, "calls queued")
            for call in calls:
                call.cancel()
            for call in calls:
                with pytest.raises(asyncio.CancelledError):
                    await call
            await eventually(lambda: classifier._admitted == 0, "nothing admitted")
            await eventually(
                lambda: (
                    metric(
                        app,
                        "mnv3_request_duration_seconds_count",
                        {"protocol": "grpc", "method": "Classify", "code": "CANCELLED"},
                    )
                    == 16
                ),
                "16 cancellations recorded",
            )
            assert metric(app, "mnv3_queue_depth") == 0
            assert metric(app, "mnv3_inflight_requests") == 0
            classifier.engine.run = original
            reply = await stub.Classify(pb.ClassifyRequest(image=CHELSEA), timeout=BOUND)
            assert reply.predictions[0].index == TOP1["chelsea.png"]
        computed = metric(app, "mnv3_batch_size_sum") - images_before - 1
    print(f"\n16 cancelled calls, {computed:.0f} of them computed")
    # At most the batch computing and the one taken next when the calls were cancelled.
    assert computed <= 4, computed


# ---------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize(
    ("items", "grace_s", "stream_ends"),
    [(200, 20, grpc.StatusCode.OK), (1000, 2, grpc.StatusCode.UNAVAILABLE)],
    ids=["stream ends within the grace period", "stream outlasts the grace period"],
)
def test_sigterm_during_a_grpc_stream(
    small_model: Path, items: int, grace_s: int, stream_ends: grpc.StatusCode
) -> None:
    """SIGTERM after 40 answers of a ClassifyStream sending an image every 10 ms.

    Every answer received is correct or a clean UNAVAILABLE item; a stream that ends within
    MNV3_SHUTDOWN_GRACE_S gets every item answered and ends OK; one that would outlast it is
    ended by the server with UNAVAILABLE when the grace period is over. Either way the
    process exits 0, without a traceback.
    """
    names = [list(PHOTOS)[i % 2] for i in range(items)]
    with server_process(small_model, shutdown_grace_s=grace_s) as server:

        async def stream() -> tuple[list[pb.StreamResponse], grpc.StatusCode, str, float]:
            received: list[pb.StreamResponse] = []

            async def requests() -> AsyncIterator[pb.StreamRequest]:
                for i, name in enumerate(names):
                    yield pb.StreamRequest(id=f"{i}:{name}", image=PHOTOS[name])
                    await asyncio.sleep(0.01)

            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                call = pb_grpc.ClassifierStub(channel).ClassifyStream(requests(), timeout=60)
                signalled = 0.0
                with contextlib.suppress(grpc.aio.AioRpcError):  # its code is checked below
                    async for response in call:
                        received.append(response)
                        if len(received) == 40:
                            server.proc.send_signal(signal.SIGTERM)
                            signalled = time.monotonic()
                return received, await call.code(), await call.details(), signalled

        received, code, details, signalled = asyncio.run(stream())
        exit_code = server.proc.wait(timeout=30)
        exited_after = time.monotonic() - signalled
        log = server.log()

    served = [r for r in received if r.WhichOneof("result") == "predictions"]
    refused = [r for r in received if r.WhichOneof("result") == "error"]
    print(
        f"\n{len(served)} answered, {len(refused)} UNAVAILABLE of {items}, stream {code.name}, "
        f"exit {exit_code} {exited_after:.1f} s after SIGTERM"
    )
    assert exit_code == 0, log
    assert "shutdown complete" in log
    assert "Traceback" not in log, log
    if (code, details) == (grpc.StatusCode.INTERNAL, "Internal error from Core"):
        # grpcio's asyncio client, when one of its writes races with the server ending the
        # call, replaces the server's status with this local one (grpc/grpc#36066): seen in
        # ~1 run of 6 here. The server did send UNAVAILABLE ("Cancelling all calls").
        code = grpc.StatusCode.UNAVAILABLE
    assert code == stream_ends, details
    assert len(served) >= 40
    for r in served:
        assert r.predictions.predictions[0].index == TOP1[r.id.split(":")[1]], r.id
    for r in refused:
        assert (r.error.code, r.error.reason) == (grpc.StatusCode.UNAVAILABLE.value[0], "not_ready")
        assert r.error.message
    if stream_ends == grpc.StatusCode.OK:
        assert sorted(r.id for r in received) == sorted(f"{i}:{n}" for i, n in enumerate(names))
    else:  # cut at the end of the grace period, not at the end of the stream (10 s)
        assert len(received) < items
        assert exited_after < grace_s + 3
