"""`python -m service`: read settings, load the model (failing fast), serve until SIGTERM."""

from __future__ import annotations

import json
import logging
import math
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import create_app, load_engine
from service.engine import ModelLoadError
from service.settings import Settings, describe


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class Server(uvicorn.Server):
    """uvicorn, plus: readiness drops the moment SIGTERM arrives, and a drained exit is 0.

    uvicorn's own handling first finishes in-flight HTTP requests, then runs the lifespan
    shutdown (stop gRPC, drain the batcher); /readyz meanwhile answers 503.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin_drain = getattr(self.app.state, "begin_drain", None)
        if begin_drain is not None:  # None while the lifespan is still starting
            begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal after shutdown, so the process would die "by
        # SIGTERM" (exit 143); after a complete drain the honest exit status is 0.
        self._captured_signals.clear()


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(describe(exc), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_format == "json":
        logging.getLogger().handlers[0].setFormatter(JsonFormatter())
    try:
        engine = load_engine(settings)  # before binding ports: a bad file is one clear line
    except ModelLoadError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,  # use the logging set up above
        access_log=False,  # per-request lines cost CPU on small boxes; metrics count requests
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        # Past this many connections or requests uvicorn answers 503 without reading the body.
        limit_concurrency=settings.transport_limit,
        lifespan="on",
    )
    Server(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
