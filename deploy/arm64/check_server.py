"""Host-side client of the arm64 smoke test: waits for a server, checks REST, gRPC, metrics."""

# It runs in the host's x86_64 venv against either server (the x86 reference or the emulated
# aarch64 one) and speaks only the public contracts (REST, gRPC health, /metrics), so the two
# are checked the same way and the test does not depend on the server's internals.

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
# Softmax scores of the two builds agree to ~1e-6; this only has to catch a different model
# or different preprocessing, not rounding.
SCORE_TOLERANCE = 1e-3


class CheckFailed(Exception):
    """A check did not pass; the message says which and why."""


def http(port: int, method: str, path: str, body: bytes | None = None, **headers: str) -> bytes:
    """One request to 127.0.0.1:port; raises CheckFailed on a non-2xx reply or no reply."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            data: bytes = reply.read()
            return data
    except urllib.error.HTTPError as exc:
        raise CheckFailed(f"{method} {path} -> {exc.code}: {exc.read()[:300]!r}") from exc


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_ready(port: int, pid: int, timeout: float) -> float:
    """Polls GET /readyz until 200; fails early when the server process is gone."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not process_alive(pid):
            raise CheckFailed(f"server process {pid} exited before it became ready")
        try:
            http(port, "GET", "/readyz")
            return time.monotonic() - start
        except (CheckFailed, OSError):
            time.sleep(0.5)  # not listening yet, or still warming up: 503
    raise CheckFailed(f"server not ready after {timeout:.0f} s")


def classify(port: int, image: Path, requests: int) -> dict[str, Any]:
    """POSTs the image `requests` times; returns the top-1 and each request's latency."""
    content_type = CONTENT_TYPES[image.suffix.lower()]
    body = image.read_bytes()
    latencies: list[float] = []
    replies: list[dict[str, Any]] = []
    for _ in range(requests):
        start = time.monotonic()
        raw = http(port, "POST", "/v1/classify?top_k=5", body, **{"Content-Type": content_type})
        latencies.append(time.monotonic() - start)
        replies.append(json.loads(raw))
    tops = {(r["predictions"][0]["index"], r["predictions"][0]["label"]) for r in replies}
    if len(tops) != 1:
        raise CheckFailed(f"the same image got different top-1 answers: {sorted(tops)}")
    best = replies[0]["predictions"][0]
    return {
        "top1": int(best["index"]),
        "label": str(best["label"]),
        "score": float(best["score"]),
        "latencies": latencies,
    }


def grpc_health(port: int) -> str:
    """The standard grpc.health.v1 Check of the whole server ('' service)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Any: the generated stub sets its methods in an untyped __init__.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return status


def metric_series(port: int) -> list[str]:
    """Names of the mnv3_ samples that GET /metrics exposes."""
    text = http(port, "GET", "/metrics").decode()
    return [line.split("{")[0].split()[0] for line in text.splitlines() if line.startswith("mnv3_")]


def check(args: argparse.Namespace) -> dict[str, Any]:
    """All checks against one running server; prints one line per check."""
    result = classify(args.http_port, args.image, args.requests)
    times = ", ".join(f"{t:.2f}" for t in result["latencies"])
    print(
        f"{args.name}: REST top-1 {result['top1']} ({result['label']},"
        f" score {result['score']:.4f});"
        f" {args.requests} requests took [{times}] s,"
        f" median {statistics.median(result['latencies']):.2f} s"
    )
    if args.acceptable is not None:
        images = json.loads(args.acceptable.read_text())["images"]
        acceptable = images[args.image.name]["acceptable_top1"]
        if result["top1"] not in acceptable:
            raise CheckFailed(f"top-1 {result['top1']} is not one of {acceptable}")
    if args.reference is not None:
        reference = json.loads(args.reference.read_text())
        if result["top1"] != reference["top1"]:
            raise CheckFailed(f"top-1 {result['top1']} differs from the reference {reference}")
        if abs(result["score"] - reference["score"]) > SCORE_TOLERANCE:
            raise CheckFailed(f"score {result['score']} differs from the reference {reference}")
        print(
            f"PROOF REST top-1 {args.name} = {result['top1']} ({result['label']})"
            f" == reference {reference['top1']} ({reference['label']}),"
            f" scores {result['score']:.6f} vs {reference['score']:.6f}"
        )
    status = grpc_health(args.grpc_port)
    if status != "SERVING":
        raise CheckFailed(f"gRPC health is {status}, not SERVING")
    print(f"PROOF gRPC health {args.name}: {status}")
    series = metric_series(args.http_port)
    if "mnv3_request_duration_seconds_count" not in series:
        raise CheckFailed(f"/metrics lacks mnv3_request_duration_seconds: {sorted(set(series))}")
    print(f"PROOF metrics {args.name}: {len(series)} mnv3_ samples, {len(set(series))} names")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_server.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="wait until GET /readyz answers 200")
    wait.add_argument("--http-port", type=int, required=True)
    wait.add_argument("--pid", type=int, required=True, help="the server; fail early if it dies")
    wait.add_argument("--timeout", type=float, default=300)
    run = sub.add_parser("check", help="REST classify, gRPC health, /metrics")
    run.add_argument("--name", required=True, help="what to call this server in the output")
    run.add_argument("--http-port", type=int, required=True)
    run.add_argument("--grpc-port", type=int, required=True)
    run.add_argument("--image", type=Path, required=True)
    run.add_argument("--requests", type=int, default=3)
    run.add_argument("--acceptable", type=Path, help="EXPECTED.json: top-1 must be acceptable")
    run.add_argument("--reference", type=Path, help="a --json file: top-1 must equal its top-1")
    run.add_argument("--json", type=Path, help="write the top-1 and latencies here")
    args = parser.parse_args(argv)
    try:
        if args.command == "wait":
            print(f"{wait_ready(args.http_port, args.pid, args.timeout):.1f}")
        else:
            result = check(args)
            if args.json is not None:
                args.json.write_text(json.dumps(result))
    except CheckFailed as exc:
        print(f"check_server: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
