"""The REST adapter: parses HTTP requests, calls the classifier core, formats JSON replies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.classifier import MAX_TOP_K, Classifier, Prediction
from service.errors import (
    BodyTimeout,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidArgument,
    InvalidImage,
    NotReady,
    Overloaded,
    ServiceError,
    UnsupportedMediaType,
)
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

# ServiceError -> HTTP status: the one mapping table of this adapter (DESIGN.md's error table).
STATUS_OF: Final[dict[type[ServiceError], int]] = {
    InvalidImage: 400,
    InvalidArgument: 400,
    UnsupportedMediaType: 415,
    ImageTooLarge: 413,
    BodyTimeout: 408,
    Overloaded: 503,
    DeadlineExceeded: 504,
    NotReady: 503,
}
# Raw bodies we accept; the bytes are sniffed anyway, so octet-stream is fine too.
RAW_TYPES: Final = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "image/gif",
     "image/tiff", "application/octet-stream"}
)  # fmt: skip
# Multipart framing around an image: boundaries and part headers, never near this size.
MULTIPART_MARGIN: Final = 64 * 1024
TIMEOUT_HEADER: Final = "x-request-timeout-ms"
# API paths and the method label of their metrics (probes and /metrics are not requests).
API_METHODS: Final = {
    "/v1/classify": "classify",
    "/classify": "classify",
    "/v1/classify/batch": "classify_batch",
    "/v1/model": "get_model",
}


# ---- response schemas (OpenAPI documentation; replies are built as plain dicts for speed) ----


class PredictionOut(BaseModel):
    index: int = Field(description="ImageNet-1k class index (torchvision order)", examples=[652])
    label: str = Field(examples=["military uniform"])
    score: float = Field(description="softmax probability", examples=[0.31])


class ModelOut(BaseModel):
    name: str = Field(examples=["mobilenet_v3_large"])
    arch: str = Field(examples=["large"])
    weights: str = Field(examples=["imagenet"])
    weights_sha256: str
    version: str = Field(description="first 12 hex digits of the model file's sha256")
    input_size: int = Field(examples=[224])
    num_classes: int = Field(examples=[1000])


class ClassifyOut(BaseModel):
    model: ModelOut
    predictions: list[PredictionOut]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["not an image: unsupported or unrecognised image format"])


class ErrorOut(BaseModel):
    error: ErrorDetail


class BatchItemOut(BaseModel):
    filename: str | None = None
    predictions: list[PredictionOut] | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    model: ModelOut
    results: list[BatchItemOut]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "not an image, corrupt, or a bad parameter",
        408: "the body did not arrive before the deadline",
        413: "too many bytes or pixels",
        415: "the Content-Type is not an image",
        503: "overloaded (with Retry-After) or not ready",
        504: "the deadline passed before the image was computed",
    }
    return {s: {"model": ErrorOut, "description": texts[s]} for s in statuses}


IMAGE_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(RAW_TYPES)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
BATCH_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            }
        },
    }
}
TOP_K = Query(5, ge=1, le=MAX_TOP_K, description="how many classes to return")
TIMEOUT_DOC: Final = {
    "parameters": [
        {
            "name": "X-Request-Timeout-Ms",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "deadline for this request; default MNV3_REQUEST_TIMEOUT_MS",
        }
    ]
}


# ---- request parsing ----------------------------------------------------------------------


def _classifier(app: Starlette) -> Classifier:
    """The core, once the lifespan has built it."""
    classifier: Classifier | None = getattr(app.state, "classifier", None)
    if classifier is None:
        raise NotReady("the model is not ready (warming up or shutting down)")
    return classifier


def _deadline(request: Request, settings: Settings) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    timeout_ms = settings.request_timeout_ms
    if raw is not None:
        try:
            timeout_ms = int(raw)
        except ValueError:
            timeout_ms = 0
        if not 1 <= timeout_ms <= 600_000:
            raise InvalidArgument(f"X-Request-Timeout-Ms must be 1..600000 ms, got {raw!r}")
    return time.monotonic() + timeout_ms / 1000


async def _read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (never read whole),
    and with 408 if it has not fully arrived by the request's deadline (a trickling sender
    would otherwise hold its connection and memory for as long as it likes)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ImageTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive in time ({size} bytes received)"
        ) from None
    return b"".join(chunks)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock (asyncio.timeout_at's)."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _files(request: Request, body: bytes, max_files: int) -> list[tuple[str | None, bytes]]:
    """The `file` parts of a multipart body, in order, as (filename, bytes)."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=max_files, max_fields=100, max_part_size=1024 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidArgument(f"bad multipart body: {exc.message}") from None
    files = []
    for value in form.getlist("file"):
        if isinstance(value, UploadFile):
            files.append((value.filename, await value.read()))
        else:  # a plain text field named "file": the client forgot the filename / file upload
            files.append((None, value.encode()))
    await form.close()
    if not files:
        raise InvalidArgument("multipart body has no 'file' field")
    return files


async def _images(
    request: Request, settings: Settings, batch: bool, deadline: float
) -> list[tuple[str | None, bytes]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    per_image = settings.max_image_bytes
    if content_type == "multipart/form-data":
        count = settings.max_batch_images if batch else 1
        body = await _read_body(request, count * per_image + MULTIPART_MARGIN, deadline)
        files = await _files(request, body, count)
        if len(files) > count:
            raise InvalidArgument(f"at most {count} files per request, got {len(files)}")
        return files
    if batch:
        raise UnsupportedMediaType("the batch endpoint takes multipart/form-data with 'file' parts")
    if content_type not in RAW_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not an image: send the image bytes "
            "with e.g. 'Content-Type: image/jpeg', or multipart/form-data with a 'file' field"
        )
    return [(None, await _read_body(request, per_image, deadline))]


def _predictions(predictions: list[Prediction]) -> list[dict[str, Any]]:
    return [{"index": p.index, "label": p.label, "score": p.score} for p in predictions]


def _error_body(exc: ServiceError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


# ---- routes ---------------------------------------------------------------------------------


def router(settings: Settings, metrics: Metrics) -> APIRouter:
    """The REST endpoints of DESIGN.md."""
    api = APIRouter()

    async def classify(request: Request, top_k: int = TOP_K) -> Response:
        deadline = _deadline(request, settings)
        core = _classifier(request.app)
        ((_, image),) = await _images(request, settings, batch=False, deadline=deadline)
        predictions = await core.classify(image, top_k=top_k, deadline=deadline)
        model = request.app.state.model_json
        return JSONResponse({"model": model, "predictions": _predictions(predictions)})

    doc: dict[str, Any] = {
        "response_model": ClassifyOut,
        "responses": _errors(400, 408, 413, 415, 503, 504),
        "openapi_extra": IMAGE_BODY | TIMEOUT_DOC,
        "summary": "Classify one image",
        "description": "Body: the raw image bytes with an image Content-Type, or "
        "multipart/form-data with one `file` field. JPEG, PNG, WebP, BMP, GIF, TIFF.",
    }
    api.add_api_route("/v1/classify", classify, methods=["POST"], name="classify", **doc)
    api.add_api_route(
        "/classify", classify, methods=["POST"], name="classify_alias", include_in_schema=False
    )

    @api.post(
        "/v1/classify/batch",
        name="classify_batch",
        response_model=BatchOut,
        responses=_errors(400, 408, 413, 415, 503, 504),
        openapi_extra=BATCH_BODY | TIMEOUT_DOC,
        summary="Classify several images (multipart, several `file` fields)",
        description="One result per file, in order; a bad image gets its own error and does "
        "not fail the others.",
    )
    async def classify_batch(request: Request, top_k: int = TOP_K) -> Response:
        deadline = _deadline(request, settings)
        core = _classifier(request.app)
        files = await _images(request, settings, batch=True, deadline=deadline)
        results = await core.classify_batch(
            [image for _, image in files], top_k=top_k, deadline=deadline
        )
        items = [
            {"filename": name, **(_error_body(r) if isinstance(r, ServiceError) else
                                  {"predictions": _predictions(r)})}
            for (name, _), r in zip(files, results, strict=True)
        ]  # fmt: skip
        return JSONResponse({"model": request.app.state.model_json, "results": items})

    @api.get("/v1/model", name="get_model", response_model=ModelOut, summary="The served model")
    async def get_model(request: Request) -> Response:
        return JSONResponse(request.app.state.model_json)

    @api.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        summary="Readiness: warmed up and not draining",
        responses={503: {"model": ErrorOut, "description": "warming up or draining"}},
    )
    async def readyz(request: Request) -> dict[str, str]:
        # Not check_admission(): a busy server is still ready (shedding is per request).
        if not _classifier(request.app).ready:
            raise NotReady("the model is not ready (warming up or shutting down)")
        return {"status": "ready"}

    @api.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api


# ---- errors and metrics ---------------------------------------------------------------------


def error_response(exc: ServiceError) -> JSONResponse:
    """{"error": {"code", "message"}} with the table's status and the headers it calls for."""
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": "1"}
    elif isinstance(exc, NotReady | BodyTimeout):
        # Draining: tell keep-alive clients to reconnect (to another replica) rather than
        # reuse a connection this server is about to close. Body timeout: the rest of the
        # body was never read, and closing is the only way to stop a trickling sender
        # (RFC 9110 15.5.9).
        headers = {"Connection": "close"}
    status = STATUS_OF.get(type(exc), 500)
    return JSONResponse(_error_body(exc), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": {"code", "message"}} with the table's status."""

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client hung up before its body arrived: nobody reads this reply. 499 (nginx's
        # "client closed request") keeps it out of the 5xx error rate and out of the logs.
        return Response(status_code=499)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            _error_body(InvalidArgument(f"{where}: {first['msg']}")), status_code=400
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def bug(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"error": {"code": "internal", "message": "internal server error"}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, bug)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Admission:
    """ASGI middleware: refuses the classify requests the core would not admit, before routing.

    Under overload most requests are refused, so a refusal must be cheap: it skips routing,
    parameter parsing and exception handling (which cost more than the answer itself), and it
    never reads the body, which uvicorn then discards while keeping the connection open.
    """

    GATED: Final = frozenset(p for p, m in API_METHODS.items() if m.startswith("classify"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.GATED:
            try:
                _classifier(scope["app"]).check_admission()
            except ServiceError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: duration by API method and status code, and in-flight count.

    Plain ASGI rather than BaseHTTPMiddleware, which costs a task and a stream per request.
    Probes and /metrics are left out so they do not drown the request latency histogram.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = API_METHODS.get(scope["path"]) if scope["type"] == "http" else None
        if method is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app dies before answering

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_duration.labels("rest", method, str(status)).observe(
                time.perf_counter() - started
            )
