"""Prometheus metrics: DESIGN.md's names, labels and units, counts that follow traffic, promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from service.proto.mnv3.v1 import classifier_pb2 as pb
from service.proto.mnv3.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import IMAGES, make_settings, metric, serving

# name -> (type, label names) exactly as DESIGN.md fixes them.
EXPECTED = {
    "mnv3_request_duration_seconds": ("histogram", {"protocol", "method", "code"}),
    "mnv3_queue_wait_seconds": ("histogram", set()),
    "mnv3_preprocess_duration_seconds": ("histogram", set()),
    "mnv3_inference_duration_seconds": ("histogram", set()),
    "mnv3_batch_size": ("histogram", set()),
    "mnv3_queue_depth": ("gauge", set()),
    "mnv3_inflight_requests": ("gauge", set()),
    "mnv3_requests_rejected": ("counter", {"reason"}),
    "mnv3_model_info": ("gauge", {"arch", "weights", "version"}),  # an Info, exposed as gauge
}


async def test_names_labels_units_and_counts(small_model: Path) -> None:
    photo = (IMAGES / "chelsea.png").read_bytes()
    png = {"Content-Type": "image/png"}
    async with serving(make_settings(small_model)) as (app, client):
        for _ in range(5):
            assert (
                await client.post("/v1/classify", content=photo, headers=png)
            ).status_code == 200
        for _ in range(2):
            r = await client.post("/v1/classify", content=b"not an image", headers=png)
            assert r.status_code == 400
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            for _ in range(3):
                await stub.Classify(pb.ClassifyRequest(image=photo))
        text = (await client.get("/metrics")).text

        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, (kind, labels) in EXPECTED.items():
            assert families[name].type == kind, name
            for sample in families[name].samples:
                if not sample.name.endswith(("_created", "_bucket")):
                    assert set(sample.labels) == labels, sample
        # Seconds, with buckets from about 1 ms to 5 s.
        buckets = [
            float(s.labels["le"])
            for s in families["mnv3_inference_duration_seconds"].samples
            if s.name.endswith("_bucket")
        ]
        assert buckets[0] == 0.001
        assert buckets[-2:] == [5.0, float("inf")]

        def requests(protocol: str, method: str, code: str) -> float:
            labels = {"protocol": protocol, "method": method, "code": code}
            return metric(app, "mnv3_request_duration_seconds_count", labels)

        assert requests("rest", "classify", "200") == 5
        assert requests("rest", "classify", "400") == 2  # errors carry their code
        assert requests("grpc", "Classify", "OK") == 3
        # 8 images reached the batcher (5 REST + 3 gRPC); the 2 bad ones never did.
        assert metric(app, "mnv3_queue_wait_seconds_count") == 8
        assert metric(app, "mnv3_batch_size_sum") == 8
        assert metric(app, "mnv3_preprocess_duration_seconds_count") == 10
        batches = metric(app, "mnv3_batch_size_count")
        assert metric(app, "mnv3_inference_duration_seconds_count") == batches
        assert metric(app, "mnv3_inflight_requests") == 0
        assert metric(app, "mnv3_queue_depth") == 0
        (model,) = families["mnv3_model_info"].samples
        assert model.value == 1
        assert model.labels == {
            "arch": "small",
            "weights": "mobilenet_v3_small-tfslim-8bit.pth",
            "version": app.state.classifier.info.version,
        }
        for reason in ("queue_full", "deadline", "not_ready"):
            assert metric(app, "mnv3_requests_rejected_total", {"reason": reason}) == 0

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (.ci/run does)"
    check = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
