"""Python clients of mnv3-serve (REST over httpx, gRPC over the generated stubs) and their CLI.

    python -m service.client classify IMAGE... [--grpc HOST:PORT | --url URL] [--top-k N] [--json]

Exit status: 0 when every image was classified, 1 when any failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TextIO

import grpc
import httpx

from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_URL: Final = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT: Final = 30.0  # seconds, per call; also sent to the server as the deadline
ERROR_CODE_KEY: Final = "mnv3-error-code"  # trailing metadata set by service.grpc_api
# Ping the server when a connection is quiet so that a dead link is noticed (the server
# permits pings every >= 10 s; see service.grpc_api.server_options).
GRPC_OPTIONS: Final = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]

# Leading bytes of the image formats the server decodes -> Content-Type for REST.
_MAGIC: Final = [
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


@dataclass(frozen=True)
class Prediction:
    index: int  # ImageNet-1k class index
    label: str
    score: float  # softmax probability


@dataclass(frozen=True)
class Classification:
    """One image's answer, the same whichever protocol carried it."""

    model: dict[str, Any]  # name, arch, weights, weights_sha256, version, input_size, num_classes
    predictions: list[Prediction]

    def to_json(self) -> dict[str, Any]:
        """The REST API's reply shape."""
        return {"model": self.model, "predictions": [asdict(p) for p in self.predictions]}


class ClientError(Exception):
    """The server refused the request, or could not be reached.

    `code` is the server's error word (the REST API's error code, e.g. "invalid_image") when
    it sent one, "unreachable" when no server answered; `status` the HTTP status or gRPC code.
    """

    def __init__(self, code: str, message: str, status: int | str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def content_type(image: bytes) -> str:
    """The image's media type from its first bytes (the REST API wants one)."""
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    for magic, media_type in _MAGIC:
        if image.startswith(magic):
            return media_type
    return "application/octet-stream"  # the server sniffs the bytes and says what is wrong


# ---------------------------------------------------------------------------- REST


def _rest_request(
    image: bytes, top_k: int, media_type: str | None, timeout: float
) -> dict[str, Any]:
    return {
        "content": image,
        "params": {"top_k": top_k},
        "headers": {
            "Content-Type": media_type or content_type(image),
            # The server gives up (504) when we would have stopped waiting anyway.
            "X-Request-Timeout-Ms": str(max(1, round(timeout * 1000))),
        },
    }


def _rest_json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        raise ClientError(str(error.get("code")), str(error.get("message")), response.status_code)
    raise ClientError(f"http_{response.status_code}", response.text[:200], response.status_code)


def _rest_classification(body: dict[str, Any]) -> Classification:
    predictions = [Prediction(p["index"], p["label"], p["score"]) for p in body["predictions"]]
    return Classification(body["model"], predictions)


def _unreachable(exc: httpx.TransportError) -> ClientError:
    return ClientError("unreachable", f"{type(exc).__name__}: {exc}")


class RestClient:
    """Blocking REST client: POST /v1/classify with the raw image bytes."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._http = httpx.Client(base_url=url, timeout=timeout, transport=transport)

    def classify(
        self, image: bytes, *, top_k: int = 5, media_type: str | None = None
    ) -> Classification:
        try:
            response = self._http.post(
                "/v1/classify", **_rest_request(image, top_k, media_type, self._timeout)
            )
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return _rest_classification(_rest_json(response))

    def model(self) -> dict[str, Any]:
        try:
            return _rest_json(self._http.get("/v1/model"))
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRestClient:
    """asyncio REST client: POST /v1/classify with the raw image bytes."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)

    async def classify(
        self, image: bytes, *, top_k: int = 5, media_type: str | None = None
    ) -> Classification:
        try:
            response = await self._http.post(
                "/v1/classify", **_rest_request(image, top_k, media_type, self._timeout)
            )
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return _rest_classification(_rest_json(response))

    async def model(self) -> dict[str, Any]:
        try:
            return _rest_json(await self._http.get("/v1/model"))
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------------- gRPC


_STATUS_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}


def _model_dict(model: pb.ModelInfo) -> dict[str, Any]:
    return {field.name: getattr(model, field.name) for field in model.DESCRIPTOR.fields}


def _grpc_classification(reply: pb.ClassifyResponse) -> Classification:
    predictions = [Prediction(p.index, p.label, p.score) for p in reply.predictions]
    return Classification(_model_dict(reply.model), predictions)


def _grpc_batch(reply: pb.ClassifyBatchResponse) -> list[Classification | ClientError]:
    model = _model_dict(reply.model)
    results: list[Classification | ClientError] = []
    for item in reply.results:
        if item.WhichOneof("result") == "error":
            status = grpc.StatusCode(
                _STATUS_BY_NUMBER.get(item.error.code, grpc.StatusCode.UNKNOWN)
            )
            results.append(ClientError(item.error.reason, item.error.message, status.name))
        else:
            preds = [Prediction(p.index, p.label, p.score) for p in item.predictions.predictions]
            results.append(Classification(model, preds))
    return results


def _grpc_error(exc: grpc.RpcError) -> ClientError:
    # Both grpc.RpcError raised by sync stubs and grpc.aio.AioRpcError are also grpc.Call-like.
    call: Any = exc
    status: grpc.StatusCode = call.code()
    reason = dict(call.trailing_metadata() or ()).get(ERROR_CODE_KEY)
    if reason is None and status == grpc.StatusCode.UNAVAILABLE:
        reason = "unreachable"  # the server would have said "not_ready"
    return ClientError(str(reason or status.name.lower()), str(call.details()), status.name)


class GrpcClient:
    """Blocking gRPC client of mnv3.v1.Classifier."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._timeout = timeout
        self._channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = pb_grpc.ClassifierStub(self._channel)

    def classify(self, image: bytes, *, top_k: int = 5) -> Classification:
        try:
            reply = self._stub.Classify(
                pb.ClassifyRequest(image=image, top_k=top_k), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return _grpc_classification(reply)

    def classify_batch(
        self, images: Sequence[bytes], *, top_k: int = 5
    ) -> list[Classification | ClientError]:
        """One result per image, in order: a bad image gets its error, the others their answer."""
        try:
            reply = self._stub.ClassifyBatch(
                pb.ClassifyBatchRequest(images=images, top_k=top_k), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return _grpc_batch(reply)

    def model(self) -> dict[str, Any]:
        try:
            return _model_dict(self._stub.GetModel(pb.GetModelRequest(), timeout=self._timeout))
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio gRPC client of mnv3.v1.Classifier (create it inside the running event loop)."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = pb_grpc.ClassifierStub(self._channel)

    async def classify(self, image: bytes, *, top_k: int = 5) -> Classification:
        try:
            reply = await self._stub.Classify(
                pb.ClassifyRequest(image=image, top_k=top_k), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return _grpc_classification(reply)

    async def classify_batch(
        self, images: Sequence[bytes], *, top_k: int = 5
    ) -> list[Classification | ClientError]:
        """One result per image, in order: a bad image gets its error, the others their answer."""
        try:
            reply = await self._stub.ClassifyBatch(
                pb.ClassifyBatchRequest(images=images, top_k=top_k), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return _grpc_batch(reply)

    async def model(self) -> dict[str, Any]:
        try:
            reply = await self._stub.GetModel(pb.GetModelRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        return _model_dict(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------------- CLI


def format_table(name: str, result: Classification) -> str:
    """A readable block for one image: a title line, then rank, index, label, score."""
    model = result.model
    title = f"{name}  ({model.get('name', '?')}, weights {model.get('weights', '?')}, "
    title += f"version {model.get('version', '?')})"
    rows = [("rank", "index", "label", "score")]
    rows += [
        (str(rank), str(p.index), p.label, f"{p.score:.4f}")
        for rank, p in enumerate(result.predictions, 1)
    ]
    width = max(len(row[2]) for row in rows)
    lines = [f"  {r:>4}  {i:>5}  {label:<{width}}  {s:>6}" for r, i, label, s in rows]
    return "\n".join([title, *lines])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.client", description="Client of the mnv3-serve classifier."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    where = classify.add_mutually_exclusive_group()
    where.add_argument("--url", default=DEFAULT_URL, help=f"REST base URL (default {DEFAULT_URL})")
    where.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at this address instead")
    classify.add_argument(
        "--top-k", type=int, default=5, metavar="N", help="classes per image (1..20, default 5)"
    )
    classify.add_argument("--json", action="store_true", help="print one JSON array")
    classify.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help="seconds per image"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """The CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    client: GrpcClient | RestClient = (
        GrpcClient(args.grpc, timeout=args.timeout)
        if args.grpc
        else RestClient(args.url, timeout=args.timeout)
    )
    documents: list[dict[str, Any]] = []
    failed = False
    with client:
        for path in args.images:
            try:
                result = client.classify(_read(path), top_k=args.top_k)
            except ClientError as exc:
                failed = True
                print(f"error: {path}: {exc.code}: {exc.message}", file=sys.stderr)
                documents.append(
                    {"image": str(path), "error": {"code": exc.code, "message": exc.message}}
                )
                if exc.code == "unreachable":
                    break  # every other image would fail the same way
                continue
            if args.json:
                documents.append({"image": str(path), **result.to_json()})
            else:
                print(format_table(str(path), result), file=out)
    if args.json:
        json.dump(documents, out, indent=2)
        print(file=out)
    return 1 if failed else 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientError("unreadable", exc.strerror or str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
