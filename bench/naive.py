"""The naive baseline: one FastAPI endpoint, plain Pillow decode, one ORT call per request."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool


def create_app(model: str) -> FastAPI:
    """What a first version of an image endpoint usually looks like: no batching, no draft."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean = np.asarray(json.loads(meta["mean"]), dtype=np.float32)
    std = np.asarray(json.loads(meta["std"]), dtype=np.float32)
    labels = json.loads(meta["labels"])
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, object]:
        # The body is read whole, then the work goes to FastAPI's default thread pool (40
        # threads), each request its own ORT call with ORT's default threads.
        return await run_in_threadpool(predict, await request.body())

    def predict(data: bytes) -> dict[str, object]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
        img = img.crop((left, top, left + 224, top + 224))
        x = (np.asarray(img, dtype=np.float32) / 255 - mean) / std
        (logits,) = session.run(None, {"input": x.transpose(2, 0, 1)[None].astype(np.float32)})
        top5 = np.argsort(-logits[0])[:5]
        return {"predictions": [{"index": int(i), "label": labels[i]} for i in top5]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
