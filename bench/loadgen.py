"""Load against a running server on loopback: closed and open loop, over REST and gRPC."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import grpc

from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc

# One request: sends image i, returns its status code ("200", "503", "OK", ...).
Call = Callable[[int], Awaitable[str]]


@dataclass
class Result:
    """What one load level measured: per-request latencies (s) and status codes."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    code_sequence: list[str] = field(default_factory=list)  # the code of latencies[i]

    def add(self, latency: float, code: str) -> None:
        self.latencies.append(latency)
        self.code_sequence.append(code)
        self.codes[code] += 1
        if code in ("200", "OK"):
            self.ok_latencies.append(latency)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return len(self.ok_latencies) / self.seconds

    def quantile(self, q: float, ok_only: bool = True) -> float:
        data = self.ok_latencies if ok_only else self.latencies
        if not data:
            return float("nan")
        if len(data) == 1:
            return data[0]
        return statistics.quantiles(data, n=1000, method="inclusive")[int(q * 1000) - 1]

    def summary(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 3),
            "requests": len(self.latencies),
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.quantile(0.50) * 1000, 2),
            "p95_ms": round(self.quantile(0.95) * 1000, 2),
            "p99_ms": round(self.quantile(0.99) * 1000, 2),
            "codes": dict(self.codes),
        }


# ---- REST: a minimal HTTP/1.1 keep-alive client on asyncio streams --------------------------
# Lighter than a general-purpose client (which would compete with the server for the same two
# cores); it speaks exactly what the benchmark needs.


class HttpConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> str:
        reused = self.writer is not None and not self.writer.is_closing()
        if not reused:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            self.writer.close()
            self.writer = None
            if reused:  # the server closed an idle keep-alive connection: retry on a fresh one
                return await self.request(raw)
            raise ConnectionError("server closed the connection")
        status = status_line.split()[1].decode()
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.writer = None
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def http_request(path: str, body: bytes, content_type: str = "image/jpeg") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class RestTarget:
    """POST /v1/classify of pre-built requests over a pool of keep-alive connections."""

    def __init__(self, host: str, port: int, bodies: Sequence[bytes], path: str = "/v1/classify"):
        self.host, self.port = host, port
        self.requests = [http_request(path, b) for b in bodies]
        self.idle: list[HttpConnection] = []

    async def call(self, i: int) -> str:
        conn = self.idle.pop() if self.idle else HttpConnection(self.host, self.port)
        try:
            status = await conn.request(self.requests[i % len(self.requests)])
        except (OSError, asyncio.IncompleteReadError) as exc:
            conn.close()
            return f"error:{type(exc).__name__}"
        self.idle.append(conn)
        return status

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class GrpcTarget:
    """mnv3.v1.Classifier/Classify on one HTTP/2 channel (gRPC multiplexes)."""

    def __init__(self, address: str, bodies: Sequence[bytes], timeout: float = 30.0) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.requests = [pb.ClassifyRequest(image=b, top_k=5) for b in bodies]
        self.timeout = timeout

    async def call(self, i: int) -> str:
        try:
            await self.stub.Classify(self.requests[i % len(self.requests)], timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    async def close(self) -> None:
        await self.channel.close()


async def closed_loop(call: Call, concurrency: int, seconds: float) -> Result:
    """`concurrency` workers, each sending its next request when the last one is answered."""
    stop = time.perf_counter() + seconds
    result = Result(seconds)
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            code = await call(next(counter))
            result.add(time.perf_counter() - started, code)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - began
    return result


async def open_loop(call: Call, rate: float, seconds: float, max_outstanding: int = 2000) -> Result:
    """Requests sent on a fixed schedule whatever the replies do (no coordinated omission).

    Latency counts from each request's scheduled send time. Past `max_outstanding` requests in
    flight, new ones count as "client_overflow" instead of piling up without bound.
    """
    result = Result(seconds)
    outstanding: set[asyncio.Task[None]] = set()
    began = time.perf_counter()

    async def one(i: int, scheduled: float) -> None:
        code = await call(i)
        result.add(time.perf_counter() - scheduled, code)

    n = int(rate * seconds)
    for i in range(n):
        scheduled = began + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(outstanding) >= max_outstanding:
            result.add(0.0, "client_overflow")
            continue
        task = asyncio.create_task(one(i, scheduled))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    await asyncio.gather(*outstanding)
    result.seconds = time.perf_counter() - began
    return result


def open_loop_elsewhere(
    address: str, bodies: Sequence[bytes], rate: float, seconds: float, start_at: float
) -> Result:
    """open_loop over gRPC from a process of its own, starting at wall-clock time `start_at`.

    A separate population of clients has its own event loop and grpc threads; sharing the REST
    generator's loop would delay both by each other's callbacks and blame the server for it.
    """
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork()
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_grpc_open_loop, address, list(bodies), rate, seconds, start_at).result()


def _grpc_open_loop(
    address: str, bodies: list[bytes], rate: float, seconds: float, start_at: float
) -> Result:
    async def run() -> Result:
        target = GrpcTarget(address, bodies)
        await target.stub.GetModel(pb.GetModelRequest())  # connected before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            return await open_loop(target.call, rate, seconds)
        finally:
            await target.close()

    return asyncio.run(run())
