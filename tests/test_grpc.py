"""The gRPC adapter over a real grpc.aio server on 127.0.0.1, called through the generated stubs."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.errors import (
    DeadlineExceeded,
    ImageTooLarge,
    InvalidArgument,
    InvalidImage,
    NotReady,
    Overloaded,
    ServiceError,
    UnsupportedMediaType,
)
from service.grpc_api import (
    ERROR_CODE_KEY,
    MESSAGE_MARGIN,
    STATUS_OF,
    STREAM_CONCURRENCY,
    GrpcServer,
)
from service.metrics import Metrics
from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import IMAGES, make_settings, metric, serving

TIMEOUT = 5.0  # upper bound for anything that should happen "now"; never the thing asserted
FAKE_LIMIT = 4096  # the fake core's max_image_bytes


# ---------------------------------------------------------------------------- a fake core


@dataclass(frozen=True)
class FakePrediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class FakeModelInfo:
    name: str = "fake_mnv3"
    arch: str = "small"
    weights: str = "random"
    weights_sha256: str = "0" * 64
    version: str = "test"
    input_size: int = 224
    num_classes: int = 1000


# What the fake does with an image whose bytes are exactly this (DESIGN.md's error table).
FAKE_ERRORS: dict[bytes, Exception] = {
    b"corrupt": InvalidImage("not a decodable image"),
    b"text/plain": UnsupportedMediaType("not an image type"),
    b"huge-pixels": ImageTooLarge("image has too many pixels"),
    b"busy": Overloaded("queue full"),
    b"late": DeadlineExceeded("deadline passed before compute"),
    b"down": NotReady("draining"),
    b"base": ServiceError("the bare base class"),
    b"bug": RuntimeError("secret internals /etc/passwd"),
}


@dataclass
class FakeCore:
    """Implements service.classifier.Classifier's surface; behaviour keyed by the image bytes.

    b"hang" waits for `release`; b"slow" sleeps a little so that stream items overlap;
    any other bytes answer index = len(image) % 1000.
    """

    info: FakeModelInfo = field(default_factory=FakeModelInfo)
    deadlines: list[float | None] = field(default_factory=list)
    batch_calls: list[int] = field(default_factory=list)
    in_core: int = 0
    max_in_core: int = 0
    cancelled: int = 0
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    refusal: ServiceError | None = None  # what check_admission raises; None admits

    def check_admission(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    async def classify(
        self, image: bytes, *, top_k: int = 5, deadline: float | None = None
    ) -> list[FakePrediction]:
        if not 1 <= top_k <= 20:
            raise InvalidArgument("top_k must be 1..20")
        self.deadlines.append(deadline)
        return await self._one(image, top_k)

    async def classify_batch(
        self, images: Sequence[bytes], *, top_k: int = 5, deadline: float | None = None
    ) -> list[list[FakePrediction] | ServiceError]:
        if not 1 <= top_k <= 20:
            raise InvalidArgument("top_k must be 1..20")
        self.deadlines.append(deadline)
        self.batch_calls.append(len(images))
        results: list[list[FakePrediction] | ServiceError] = []
        for image in images:
            try:
                results.append(await self._one(image, top_k))
            except ServiceError as exc:
                results.append(exc)
        return results

    async def _one(self, image: bytes, top_k: int) -> list[FakePrediction]:
        if len(image) > FAKE_LIMIT:
            raise ImageTooLarge(f"image is {len(image)} bytes, limit {FAKE_LIMIT}")
        if image in FAKE_ERRORS:
            raise FAKE_ERRORS[image]
        self.in_core += 1
        self.max_in_core = max(self.max_in_core, self.in_core)
        self.entered.set()
        try:
            if image == b"hang":
                await self.release.wait()
            elif image.startswith(b"slow"):
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_core -= 1
        index = len(image) % 1000
        return [
            FakePrediction(
                index=(index + i) % 1000, label=f"class {(index + i) % 1000}", score=0.5 / (i + 1)
            )
            for i in range(top_k)
        ]


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Running:
    server: GrpcServer
    port: int
    metrics: Metrics
    channel: grpc.aio.Channel
    stub: pb_grpc.ClassifierAsyncStub

    def count(self, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mnv3_request_duration_seconds_count",
            {"protocol": "grpc", "method": method, "code": code},
        )
        return value or 0.0

    def inflight(self) -> float:
        return self.metrics.registry.get_sample_value("mnv3_inflight_requests") or 0.0


@asynccontextmanager
async def running(core: Any, *, serving: bool = True, **limits: Any) -> AsyncIterator[Running]:
    metrics = Metrics()
    server = GrpcServer(core, metrics, host="127.0.0.1", port=0, **limits)
    port = await server.start()
    if serving:
        server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(server, port, metrics, channel, pb_grpc.ClassifierStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=1.0)


@pytest.fixture
def fake() -> FakeCore:
    return FakeCore()


@pytest.fixture
async def grpc_fake(fake: FakeCore) -> AsyncIterator[Running]:
    async with running(fake, max_image_bytes=FAKE_LIMIT, max_batch_images=8) as r:
        yield r


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll for something the server does after the client saw its reply (no event to wait on)."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.005)


def reason(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_CODE_KEY:
            return str(value)
    return None


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---------------------------------------------------------------------------- the adapter


async def test_classify_and_get_model(grpc_fake: Running) -> None:
    reply = await grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"x" * 10, top_k=3))
    assert [p.index for p in reply.predictions] == [10, 11, 12]
    assert reply.predictions[0].label == "class 10"
    assert reply.model.name == "fake_mnv3"
    assert reply.model.input_size == 224
    # top_k = 0 (unset) means 5
    reply = await grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"x"))
    assert len(reply.predictions) == 5
    model = await grpc_fake.stub.GetModel(pb.GetModelRequest())
    assert model == reply.model
    assert model.num_classes == 1000


# DESIGN.md's error table, gRPC column: (image the fake refuses, status, reason word).
ERROR_TABLE = [
    (b"corrupt", grpc.StatusCode.INVALID_ARGUMENT, "invalid_image"),
    (b"text/plain", grpc.StatusCode.INVALID_ARGUMENT, "unsupported_media_type"),
    (b"huge-pixels", grpc.StatusCode.INVALID_ARGUMENT, "image_too_large"),
    (b"x" * (FAKE_LIMIT + 1), grpc.StatusCode.INVALID_ARGUMENT, "image_too_large"),
    (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    (b"late", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"),
    (b"down", grpc.StatusCode.UNAVAILABLE, "not_ready"),
    (b"base", grpc.StatusCode.INTERNAL, "internal"),
    (b"bug", grpc.StatusCode.INTERNAL, "internal"),
]


@pytest.mark.parametrize(("image", "code", "why"), ERROR_TABLE, ids=[w for _, _, w in ERROR_TABLE])
async def test_error_table(
    grpc_fake: Running, image: bytes, code: grpc.StatusCode, why: str
) -> None:
    error = await rpc_error(grpc_fake.stub.Classify(pb.ClassifyRequest(image=image)))
    assert error.code() == code
    assert reason(error) == why
    if code == grpc.StatusCode.INTERNAL:
        assert error.details() == "internal error"  # nothing of the exception leaks
    elif image in FAKE_ERRORS:
        assert error.details() == str(FAKE_ERRORS[image])
    else:
        assert error.details() == f"image is {len(image)} bytes, limit {FAKE_LIMIT}"
    assert grpc_fake.count("Classify", code.name) == 1
    assert grpc_fake.inflight() == 0


def test_every_service_error_has_a_status() -> None:
    # A new error class must be given its gRPC status here, not fall through to INTERNAL.
    assert set(ServiceError.__subclasses__()) == set(STATUS_OF)


async def test_internal_error_is_logged(
    grpc_fake: Running, caplog: pytest.LogCaptureFixture
) -> None:
    await rpc_error(grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"bug")))
    assert "secret internals" in caplog.text  # the operator sees what the client does not


async def test_top_k_out_of_range(grpc_fake: Running) -> None:
    error = await rpc_error(grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"x", top_k=21)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "invalid_argument"


async def test_message_over_limit_is_refused_by_grpc(grpc_fake: Running) -> None:
    # A message may carry max_batch_images images of max_image_bytes; over that (plus a small
    # margin) gRPC itself refuses it, before our code runs.
    image = b"x" * (8 * FAKE_LIMIT + MESSAGE_MARGIN + 1)
    error = await rpc_error(grpc_fake.stub.Classify(pb.ClassifyRequest(image=image)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # ...while a full batch of largest images fits.
    full = pb.ClassifyBatchRequest(images=[b"x" * FAKE_LIMIT] * 8)
    reply = await grpc_fake.stub.ClassifyBatch(full)
    assert all(r.WhichOneof("result") == "predictions" for r in reply.results)


@pytest.mark.parametrize(
    ("refusal", "code", "word"),
    [
        (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
        (NotReady("draining"), grpc.StatusCode.UNAVAILABLE, "not_ready"),
    ],
)
@pytest.mark.parametrize("method", ["Classify", "ClassifyBatch"])
async def test_refused_calls_are_answered_before_their_request_is_read(
    grpc_fake: Running,
    fake: FakeCore,
    method: str,
    refusal: ServiceError,
    code: grpc.StatusCode,
    word: str,
) -> None:
    # The request is not even a protobuf message: had gRPC read and parsed it, the call would
    # fail as unparsable. A refusal costs neither the upload nor the parse.
    fake.refusal = refusal
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = grpc_fake.channel.unary_unary(
        f"/mnv3.v1.Classifier/{method}"
    )
    error = await rpc_error(call(b"\xff" * 1000, timeout=TIMEOUT))
    assert (error.code(), reason(error)) == (code, word)
    assert error.details() == refusal.message
    assert fake.deadlines == []  # the core was never called
    assert grpc_fake.count(method, code.name) == 1
    # The same bytes, admitted, reach the parser and fail there.
    fake.refusal = None
    error = await rpc_error(call(b"\xff" * 1000, timeout=TIMEOUT))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")


@pytest.mark.parametrize("method", ["Classify", "ClassifyBatch", "GetModel"])
async def test_a_request_that_does_not_parse_is_invalid_argument(
    grpc_fake: Running, method: str
) -> None:
    # grpc alone would answer UNKNOWN (a server error) for the client's mistake.
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = grpc_fake.channel.unary_unary(
        f"/mnv3.v1.Classifier/{method}"
    )
    error = await rpc_error(call(b"\xff" * 100, timeout=TIMEOUT))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    assert (error.details() or "").startswith(f"the request is not a valid {method} message")
    assert grpc_fake.count(method, "INVALID_ARGUMENT") == 1


async def test_a_stream_item_that_does_not_parse_ends_the_stream_as_invalid_argument(
    grpc_fake: Running,
) -> None:
    call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = grpc_fake.channel.stream_stream(
        "/mnv3.v1.Classifier/ClassifyStream"
    )
    good = pb.StreamRequest(id="1", image=b"ok").SerializeToString()
    stream = call(iter([good, b"\xff" * 100]), timeout=TIMEOUT)
    replies: list[str] = []

    async def read_all() -> None:
        async for raw in stream:
            replies.append(pb.StreamResponse.FromString(raw).id)

    error = await rpc_error(read_all())
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    assert replies in ([], ["1"])  # the good item may have been answered first


async def test_refusal_does_not_gate_get_model(grpc_fake: Running, fake: FakeCore) -> None:
    fake.refusal = Overloaded("busy")
    assert (await grpc_fake.stub.GetModel(pb.GetModelRequest())).name == "fake_mnv3"


async def test_deadline_is_carried_into_the_core(fake: FakeCore) -> None:
    async with running(fake, max_image_bytes=FAKE_LIMIT, default_timeout=7.0) as r:
        before = time.monotonic()
        await r.stub.Classify(pb.ClassifyRequest(image=b"x"), timeout=30)
        await r.stub.Classify(pb.ClassifyRequest(image=b"x"))  # no deadline: the default
        after = time.monotonic()
        # A stream item without a call deadline: the default, counted from when it is read.
        item = pb.StreamRequest(id="a", image=b"x")
        [_ async for _ in r.stub.ClassifyStream(iter([item]))]
        streamed = time.monotonic()
    with_timeout, default, stream_item = fake.deadlines
    assert with_timeout is not None
    assert default is not None
    assert stream_item is not None
    # gRPC carries the timeout with some rounding: a second of slack is plenty.
    assert before + 29 < with_timeout < after + 31
    assert before + 7 <= default <= after + 7
    assert after + 7 <= stream_item <= streamed + 7


async def test_no_deadline_and_no_default(grpc_fake: Running, fake: FakeCore) -> None:
    await grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"x"))
    assert fake.deadlines == [None]


async def test_deadline_expiring_in_the_core(grpc_fake: Running, fake: FakeCore) -> None:
    error = await rpc_error(grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"hang"), timeout=0.2))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # gRPC cancels the handler at the deadline; the cancellation reaches the core's await.
    await wait_for(lambda: fake.cancelled == 1)
    await wait_for(lambda: grpc_fake.count("Classify", "DEADLINE_EXCEEDED") == 1)
    assert fake.in_core == 0
    assert grpc_fake.inflight() == 0


async def test_client_cancel_frees_the_core(grpc_fake: Running, fake: FakeCore) -> None:
    call = grpc_fake.stub.Classify(pb.ClassifyRequest(image=b"hang"))
    async with asyncio.timeout(TIMEOUT):
        await fake.entered.wait()
    assert grpc_fake.inflight() == 1
    call.cancel()
    await wait_for(lambda: fake.cancelled == 1)
    await wait_for(lambda: grpc_fake.count("Classify", "CANCELLED") == 1)
    assert fake.in_core == 0
    assert grpc_fake.inflight() == 0


async def test_batch_item_errors_do_not_fail_the_others(grpc_fake: Running, fake: FakeCore) -> None:
    images = [b"x" * 7, b"corrupt", b"busy", b"x" * (FAKE_LIMIT + 1), b"x" * 9]
    reply = await grpc_fake.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=images, top_k=2))
    assert fake.batch_calls == [5]  # one call to the core: it batches them
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["predictions", "error", "error", "error", "predictions"]
    assert [p.index for p in reply.results[0].predictions.predictions] == [7, 8]
    assert [p.index for p in reply.results[4].predictions.predictions] == [9, 10]
    errors = [reply.results[i].error for i in (1, 2, 3)]
    assert [e.code for e in errors] == [
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert [e.reason for e in errors] == ["invalid_image", "overloaded", "image_too_large"]
    assert errors[0].message == "not a decodable image"
    assert reply.model.name == "fake_mnv3"
    assert grpc_fake.count("ClassifyBatch", "OK") == 1


@pytest.mark.parametrize(
    "request_",
    [
        pb.ClassifyBatchRequest(images=[b"x"], top_k=99),
        pb.ClassifyBatchRequest(images=[]),
        pb.ClassifyBatchRequest(images=[b"x"] * 9),  # max_batch_images is 8
    ],
    ids=["top_k", "empty", "too-many"],
)
async def test_batch_level_errors(grpc_fake: Running, request_: pb.ClassifyBatchRequest) -> None:
    error = await rpc_error(grpc_fake.stub.ClassifyBatch(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "invalid_argument"
    assert grpc_fake.count("ClassifyBatch", "INVALID_ARGUMENT") == 1


async def test_stream_is_concurrent_bounded_and_keeps_every_id(
    grpc_fake: Running, fake: FakeCore
) -> None:
    requests = [pb.StreamRequest(id=f"id-{i}", image=b"slow" + b"x" * i) for i in range(100)]
    responses = [r async for r in grpc_fake.stub.ClassifyStream(iter(requests))]
    assert sorted(r.id for r in responses) == sorted(r.id for r in requests)
    for r in responses:
        i = int(r.id.removeprefix("id-"))
        assert r.predictions.predictions[0].index == 4 + i  # each answer matches its request
    # Items overlap (so they batch) but no more than STREAM_CONCURRENCY at once.
    assert 1 < fake.max_in_core <= STREAM_CONCURRENCY
    assert grpc_fake.count("ClassifyStream", "OK") == 1
    assert grpc_fake.inflight() == 0


async def test_stream_survives_bad_items(grpc_fake: Running) -> None:
    images = [b"x", b"corrupt", b"bug", b"busy", b"x" * 3, b"x", b""]
    requests = [
        pb.StreamRequest(id=str(i), image=image, top_k=30 if i == 5 else 1)
        for i, image in enumerate(images)
    ]
    responses = {r.id: r async for r in grpc_fake.stub.ClassifyStream(iter(requests))}
    assert set(responses) == {str(i) for i in range(len(images))}
    assert responses["0"].predictions.predictions[0].index == 1
    assert responses["4"].predictions.predictions[0].index == 3
    assert responses["1"].error.reason == "invalid_image"
    assert responses["2"].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert responses["2"].error.message == "internal error"
    assert responses["3"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert responses["5"].error.reason == "invalid_argument"  # top_k 30
    assert responses["6"].WhichOneof("result") == "predictions"
    assert grpc_fake.count("ClassifyStream", "OK") == 1


async def test_stream_cancel_cancels_its_items_in_the_core(
    grpc_fake: Running, fake: FakeCore
) -> None:
    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(id="ok", image=b"x")
        for i in range(5):
            yield pb.StreamRequest(id=f"hang-{i}", image=b"hang")
        await asyncio.sleep(TIMEOUT * 2)  # keep the stream open

    call = grpc_fake.stub.ClassifyStream(requests())
    first = await call.read()
    assert isinstance(first, pb.StreamResponse)
    assert first.id == "ok"
    await wait_for(lambda: fake.in_core == 5)
    call.cancel()
    # Every item still in the core is cancelled: their batch slots are free.
    await wait_for(lambda: fake.cancelled == 5)
    await wait_for(lambda: grpc_fake.count("ClassifyStream", "CANCELLED") == 1)
    assert grpc_fake.inflight() == 0


async def test_stream_deadline(grpc_fake: Running, fake: FakeCore) -> None:
    requests = [pb.StreamRequest(id="a", image=b"hang")]
    call = grpc_fake.stub.ClassifyStream(iter(requests), timeout=0.3)
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.deadlines[0] is not None
    await wait_for(lambda: fake.cancelled == 1)


async def test_empty_stream(grpc_fake: Running) -> None:
    responses = [r async for r in grpc_fake.stub.ClassifyStream(iter([]))]
    assert responses == []


# ---------------------------------------------------------------------------- the server


def health_stub(channel: grpc.aio.Channel) -> Any:
    # Any: the typeshed stubs of grpcio-health-checking declare no methods on HealthStub.
    return health_pb2_grpc.HealthStub(channel)


async def health(r: Running, service: str) -> int:
    reply = await health_stub(r.channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_health_follows_set_serving(fake: FakeCore) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    async with running(fake, max_image_bytes=FAKE_LIMIT, serving=False) as r:
        assert await health(r, "") == not_serving
        assert await health(r, "mnv3.v1.Classifier") == not_serving
        watch = health_stub(r.channel).Watch(
            health_pb2.HealthCheckRequest(service="mnv3.v1.Classifier")
        )
        assert (await watch.read()).status == not_serving
        r.server.set_serving(True)
        assert await health(r, "") == serving
        assert await health(r, "mnv3.v1.Classifier") == serving
        assert (await watch.read()).status == serving  # Watch streams are woken
        r.server.set_serving(False)
        assert await health(r, "") == not_serving
        assert await health(r, "mnv3.v1.Classifier") == not_serving
        assert (await watch.read()).status == not_serving
        error = await rpc_error(health(r, "no.such.Service"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        watch.cancel()


async def test_reflection_lists_and_describes_the_service(grpc_fake: Running) -> None:
    channel: Any = grpc_fake.channel  # the reflection stubs' types know only sync channels
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="mnv3.v1.Classifier"),
    ]
    listing, file = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in listing.list_services_response.service}
    assert {"mnv3.v1.Classifier", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(
        file.file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "mnv3.v1"
    methods = [m.name for m in proto.service[0].method]
    assert methods == ["Classify", "ClassifyBatch", "ClassifyStream", "GetModel"]


async def test_stop_lets_running_calls_finish_within_grace(fake: FakeCore) -> None:
    async with running(fake, max_image_bytes=FAKE_LIMIT) as r:
        watch = health_stub(r.channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        call = r.stub.Classify(pb.ClassifyRequest(image=b"hang"))
        async with asyncio.timeout(TIMEOUT):
            await fake.entered.wait()
        stopping = asyncio.create_task(r.server.stop(grace=TIMEOUT))
        # Health turns NOT_SERVING as stopping starts, and new calls are refused...
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        error = await rpc_error(r.stub.Classify(pb.ClassifyRequest(image=b"x")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # ...while the call already running finishes normally within the grace period.
        fake.release.set()
        reply = await call
        assert reply.predictions[0].index == 4
        watch.cancel()  # open streams, Watch included, hold stop() until the grace runs out
        async with asyncio.timeout(TIMEOUT - 1):
            await stopping


async def test_stop_cancels_calls_after_grace(fake: FakeCore) -> None:
    async with running(fake, max_image_bytes=FAKE_LIMIT) as r:
        call = r.stub.Classify(pb.ClassifyRequest(image=b"hang"))
        async with asyncio.timeout(TIMEOUT):
            await fake.entered.wait()
        await r.server.stop(grace=0.1)
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        await wait_for(lambda: fake.cancelled == 1)


async def test_port_in_use_fails_loudly(grpc_fake: Running, fake: FakeCore) -> None:
    other = GrpcServer(fake, Metrics(), host="127.0.0.1", port=grpc_fake.port, max_image_bytes=1)
    with pytest.raises(RuntimeError, match="cannot listen"):
        await other.start()


# ---------------------------------------------------------------------------- the real service
# The app of service.app (lifespan, real core, real small-model weights) with its own gRPC
# server, reached on its real port.

GRADED = ["grace_hopper.jpg", "chelsea.png", "coffee.png", "camera.png", "motorcycle_left.png"]


def photo(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


@asynccontextmanager
async def real_service(
    small_model: Path, **overrides: Any
) -> AsyncIterator[tuple[Any, pb_grpc.ClassifierAsyncStub, grpc.aio.Channel]]:
    async with serving(make_settings(small_model, **overrides)) as (app, _):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}")
        try:
            yield app, pb_grpc.ClassifierStub(channel), channel
        finally:
            await channel.close()


def grpc_count(app: Any, method: str, code: str) -> float:
    labels = {"protocol": "grpc", "method": method, "code": code}
    return metric(app, "mnv3_request_duration_seconds_count", labels)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (no pixel data needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


async def test_all_four_rpcs_on_real_photos(small_model: Path, expected: dict[str, Any]) -> None:
    async with real_service(small_model) as (app, stub, _):
        model = await stub.GetModel(pb.GetModelRequest())
        assert model.name == "mobilenet_v3_small"
        assert model.arch == "small"
        assert (model.input_size, model.num_classes) == (224, 1000)
        assert {f.name: getattr(model, f.name) for f in model.DESCRIPTOR.fields} == (
            app.state.model_json
        )  # the same description as REST's GET /v1/model

        for name in GRADED:
            reply = await stub.Classify(pb.ClassifyRequest(image=photo(name)))
            assert reply.predictions[0].index in expected[name]["acceptable_top1"], name
            assert len(reply.predictions) == 5
            assert reply.model == model
            scores = [p.score for p in reply.predictions]
            assert scores == sorted(scores, reverse=True)
            assert 0 < scores[0] <= 1

        batch = await stub.ClassifyBatch(
            pb.ClassifyBatchRequest(images=[photo(n) for n in GRADED], top_k=3)
        )
        assert batch.model == model
        for name, result in zip(GRADED, batch.results, strict=True):
            top = result.predictions.predictions
            assert len(top) == 3
            assert top[0].index in expected[name]["acceptable_top1"], name

        requests = [pb.StreamRequest(id=name, image=photo(name), top_k=1) for name in GRADED]
        responses = [r async for r in stub.ClassifyStream(iter(requests))]
        assert sorted(r.id for r in responses) == sorted(GRADED)
        for r in responses:
            assert r.predictions.predictions[0].index in expected[r.id]["acceptable_top1"]

        for method in ("GetModel", "ClassifyBatch", "ClassifyStream"):
            assert grpc_count(app, method, "OK") == 1
        assert grpc_count(app, "Classify", "OK") == len(GRADED)


async def test_a_bad_image_in_a_batch_fails_alone(
    small_model: Path, expected: dict[str, Any]
) -> None:
    images = [photo("chelsea.png"), b"not an image at all", photo("camera.png"), b""]
    async with real_service(small_model) as (app, stub, _):
        reply = await stub.ClassifyBatch(pb.ClassifyBatchRequest(images=images))
        assert [r.WhichOneof("result") for r in reply.results] == [
            "predictions",
            "error",
            "predictions",
            "error",
        ]
        assert (
            reply.results[0].predictions.predictions[0].index
            in (expected["chelsea.png"]["acceptable_top1"])
        )
        assert (
            reply.results[2].predictions.predictions[0].index
            in (expected["camera.png"]["acceptable_top1"])
        )
        for bad in (reply.results[1].error, reply.results[3].error):
            assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert bad.reason == "invalid_image"
            assert bad.message
        assert grpc_count(app, "ClassifyBatch", "OK") == 1


async def test_a_stream_of_50_images_keeps_every_id_and_batches(small_model: Path) -> None:
    names = [GRADED[i % len(GRADED)] for i in range(50)]
    requests = [
        pb.StreamRequest(id=f"{i}:{name}", image=photo(name)) for i, name in enumerate(names)
    ]
    requests[17] = pb.StreamRequest(id="17:broken", image=b"\x89PNG broken")
    async with real_service(small_model, max_batch_delay_ms=5) as (app, stub, _):
        top1 = {}
        for name in GRADED:
            reply = await stub.Classify(pb.ClassifyRequest(image=photo(name)))
            top1[name] = reply.predictions[0].index
        before = metric(app, "mnv3_batch_size_count")
        responses = [r async for r in stub.ClassifyStream(iter(requests))]
        batches = metric(app, "mnv3_batch_size_count") - before
    assert sorted(r.id for r in responses) == sorted(r.id for r in requests)
    for r in responses:
        if r.id == "17:broken":
            assert r.error.reason == "invalid_image"
        else:  # each answer belongs to its own image
            assert r.predictions.predictions[0].index == top1[r.id.split(":")[1]], r.id
    assert batches < 49  # items of one stream share batches
    print(f"49 stream items in {batches:.0f} batches")


async def test_health_follows_readiness_and_drain(small_model: Path) -> None:
    async with real_service(small_model) as (app, _, channel):
        stub = health_stub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="mnv3.v1.Classifier"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        app.state.begin_drain()  # what SIGTERM does first
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Not ready yet still serving: calls already on their way complete (lame-duck period).
        classifier = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(image=photo("chelsea.png"))
        assert (await classifier.Classify(request)).predictions[0].index in (281, 282, 285)
        # Draining: the core refuses new work, which gRPC callers see as UNAVAILABLE.
        await app.state.classifier.drain()
        error = await rpc_error(classifier.Classify(request))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(error) == "not_ready"
        watch.cancel()


async def test_reflection_on_the_real_server(small_model: Path) -> None:
    async with real_service(small_model) as (_, _, channel):
        any_channel: Any = channel
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(any_channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in reply.list_services_response.service}
        assert names >= {"mnv3.v1.Classifier", "grpc.health.v1.Health"}


async def test_deadline_exceeded_frees_the_slot(small_model: Path) -> None:
    async with real_service(small_model, max_batch_size=1) as (app, stub, _):
        classifier = app.state.classifier
        original = classifier.engine.run

        def slow_run(batch: Any) -> Any:
            time.sleep(0.3)  # one long batch keeps the next request waiting past its deadline
            return original(batch)

        classifier.engine.run = slow_run
        first = stub.Classify(pb.ClassifyRequest(image=photo("chelsea.png")))
        await wait_for(lambda: classifier._admitted == 1)
        late = stub.Classify(pb.ClassifyRequest(image=photo("chelsea.png")), timeout=0.1)
        error = await rpc_error(late)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await first).predictions[0].index in (281, 282, 285)
        await wait_for(lambda: classifier._admitted == 0)  # the late one holds no slot
        await wait_for(lambda: grpc_count(app, "Classify", "DEADLINE_EXCEEDED") == 1)
        assert grpc_count(app, "Classify", "OK") == 1


async def test_size_limits_give_the_table_codes(small_model: Path) -> None:
    limits = {"max_image_bytes": 200_000, "max_batch_images": 2, "max_image_pixels": 1_000_000}
    async with real_service(small_model, **limits) as (app, stub, _):
        # One byte over the image limit, still well inside the message limit: our code.
        error = await rpc_error(stub.Classify(pb.ClassifyRequest(image=b"\xff" * 200_001)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(error) == "image_too_large"
        # Too many pixels declared in the header, checked before decoding.
        error = await rpc_error(stub.Classify(pb.ClassifyRequest(image=png_claiming(2000, 2000))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(error) == "image_too_large"
        # Over max_batch_images x max_image_bytes (+ margin): gRPC's own message limit.
        error = await rpc_error(stub.Classify(pb.ClassifyRequest(image=photo("astronaut.png"))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Under every limit: fine.
        reply = await stub.Classify(pb.ClassifyRequest(image=photo("grace_hopper.jpg")))
        assert reply.predictions[0].index == 652
        assert grpc_count(app, "Classify", "INVALID_ARGUMENT") == 2
        assert grpc_count(app, "Classify", "OK") == 1
        assert metric(app, "mnv3_inflight_requests") == 0


async def test_overload_is_per_item_in_a_batch(small_model: Path) -> None:
    settings = {"max_batch_size": 1, "max_queue": 1, "max_batch_images": 16}
    async with real_service(small_model, **settings) as (_, stub, _):
        images = [photo("grace_hopper.jpg")] * 6  # capacity = max_queue + max_batch_size = 2
        reply = await stub.ClassifyBatch(pb.ClassifyBatchRequest(images=images))
        kinds = [r.WhichOneof("result") for r in reply.results]
        assert kinds.count("predictions") >= 2
        shed = [r.error for r in reply.results if r.WhichOneof("result") == "error"]
        assert shed
        assert {(e.code, e.reason) for e in shed} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "overloaded")
        }


async def test_the_app_gives_grpc_the_rest_limits(small_model: Path) -> None:
    """MNV3_MAX_BATCH_IMAGES and MNV3_REQUEST_TIMEOUT_MS apply to gRPC as they do to REST."""
    settings = {"max_batch_images": 2, "request_timeout_ms": 100, "max_batch_size": 1}
    async with real_service(small_model, **settings) as (app, stub, _):
        image = photo("chelsea.png")
        error = await rpc_error(stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[image] * 3)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 2 images" in str(error.details())

        classifier = app.state.classifier
        original = classifier.engine.run

        def slow_run(batch: Any) -> Any:
            time.sleep(0.4)  # one long batch keeps the next request waiting
            return original(batch)

        classifier.engine.run = slow_run
        first = stub.Classify(pb.ClassifyRequest(image=image), timeout=5)
        await wait_for(lambda: classifier._admitted == 1)
        # No gRPC deadline: the server's 100 ms default applies and the core gives up.
        error = await rpc_error(stub.Classify(pb.ClassifyRequest(image=image)))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason(error) == "deadline_exceeded"
        assert (await first).predictions
