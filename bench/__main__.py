"""`python -m bench` (make bench): the benchmark, from inputs to the JSON/Markdown/PNG report."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.ceiling import ceiling, single_image_ms
from bench.inputs import two_megapixel_jpegs
from bench.loadgen import (
    GrpcTarget,
    RestTarget,
    Result,
    closed_loop,
    open_loop,
    open_loop_elsewhere,
)
from bench.report import write_report

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MNV3_SHARED", REPO.parent / "shared"))


def say(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds} s")


@contextmanager
def process(args: list[str], env: dict[str, str], ready_url: str) -> Iterator[int]:
    """A server subprocess on loopback, ready; SIGTERM and wait on exit. Yields its PID."""
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ready_url, proc)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(url: str) -> dict[str, float]:
    """The sums and counts of the stage histograms, to split latency by stage per level."""
    wanted = {
        "mnv3_queue_wait_seconds",
        "mnv3_inference_duration_seconds",
        "mnv3_batch_size",
        "mnv3_preprocess_duration_seconds",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        if family.name in wanted:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[sample.name] = sample.value
    return out


def request_buckets(url: str) -> dict[tuple[str, str, float], float]:
    """mnv3_request_duration_seconds buckets by (protocol, code, le), all methods summed."""
    out: dict[tuple[str, str, float], float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        if family.name == "mnv3_request_duration_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    key = (s.labels["protocol"], s.labels["code"], float(s.labels["le"]))
                    out[key] = out.get(key, 0) + s.value
    return out


def server_p99_ms(
    before: dict[tuple[str, str, float], float],
    after: dict[tuple[str, str, float], float],
    codes: set[str],
) -> float | None:
    """p99 of the server's own request durations with these codes (upper bucket bound)."""
    counts: dict[float, float] = {}
    for (protocol, code, le), value in after.items():
        if code in codes:
            counts[le] = counts.get(le, 0) + value - before.get((protocol, code, le), 0)
    total = counts.get(float("inf"), 0)
    if not total:
        return None
    return next(le for le in sorted(counts) if counts[le] >= 0.99 * total) * 1000


def stage_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(name: str) -> float:
        n = after[f"{name}_count"] - before.get(f"{name}_count", 0)
        return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / n if n else float("nan")

    return {
        "queue_wait_ms": round(mean("mnv3_queue_wait_seconds") * 1000, 2),
        "preprocess_ms": round(mean("mnv3_preprocess_duration_seconds") * 1000, 2),
        "inference_ms_per_batch": round(mean("mnv3_inference_duration_seconds") * 1000, 2),
        "mean_batch_size": round(mean("mnv3_batch_size"), 2),
    }


def ensure_model(path: Path) -> Path:
    """The real Small model (../shared weights, padding tf) the benchmark serves."""
    if not path.exists():
        weights = SHARED / "weights" / "mobilenet_v3_small-tfslim-8bit.pth"
        say(f"exporting {path.name} from {weights}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "models.export",
                "--arch",
                "small",
                "--weights",
                str(weights),
                "--out",
                str(path),
            ],
            check=True,
            cwd=REPO,
        )
    return path


async def sweep(
    target: Any, levels: list[int], seconds: float, metrics_url: str
) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        before = scrape(metrics_url)
        result = await closed_loop(target.call, c, seconds)
        row = {"concurrency": c, **result.summary(), **stage_split(before, scrape(metrics_url))}
        say(
            f"  c={c:<3} {row['throughput_rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
            f"p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch_size']}  {row['codes']}"
        )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=REPO / "build" / "bench-small-tf.onnx")
    parser.add_argument("--seconds", type=float, default=10, help="per load level")
    parser.add_argument("--levels", default="1,4,8,16,32", help="closed-loop concurrencies")
    parser.add_argument("--overload-seconds", type=float, default=30)
    parser.add_argument("--soak-seconds", type=float, default=300, help="0 skips the soak")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    model = ensure_model(args.model)
    bodies = two_megapixel_jpegs(SHARED / "images")
    mean_kb = sum(map(len, bodies)) // len(bodies) // 1000
    say(f"inputs: {len(bodies)} JPEGs of ~2 MP, {mean_kb} KB each")
    threads = {"intra": 2, "decode": 2}
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "arch": platform.machine(),
        },
        "model": model.name,
        "inputs": f"{len(bodies)} JPEGs ~2 MP (../shared/images upscaled)",
        "settings": {"max_batch_size": 8, "max_batch_delay_ms": 2, **threads},
    }

    say("in-process: single image (decode + ORT batch 1)")
    report["single_image_ms"] = round(single_image_ms(model, bodies, intra_threads=2), 2)
    say(f"  {report['single_image_ms']} ms")
    ceilings = {}
    for batch in (1, 4, 8, 16):
        ceilings[batch] = round(
            ceiling(model, bodies, seconds=args.seconds / 2, batch_size=batch), 1
        )
        say(f"in-process ceiling at batch {batch}: {ceilings[batch]} img/s")
    report["ceiling_by_batch"] = ceilings
    report["ceiling_rps"] = max(ceilings.values())

    http_port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    env = {
        "MNV3_MODEL_PATH": str(model),
        "MNV3_HTTP_HOST": "127.0.0.1",
        "MNV3_HTTP_PORT": str(http_port),
        "MNV3_GRPC_PORT": str(grpc_port),
        "MNV3_MAX_BATCH_SIZE": "8",
        "MNV3_MAX_BATCH_DELAY_MS": "2",
        "MNV3_INTRA_OP_THREADS": "2",
        "MNV3_DECODE_THREADS": "2",
        "MALLOC_ARENA_MAX": "2",  # as in the container image
    }
    with process([sys.executable, "-m", "service"], env, f"{base}/readyz") as pid:
        report["server"] = asyncio.run(
            _serve_suite(args, levels, bodies, base, grpc_port, pid, report)
        )

    naive_port = free_port()
    naive = [sys.executable, "-m", "bench.naive", "--model", str(model), "--port", str(naive_port)]
    with process(naive, {}, f"http://127.0.0.1:{naive_port}/docs"):
        say("naive baseline (FastAPI + ORT per request, no batching, plain decode)")

        async def naive_suite() -> list[dict[str, Any]]:
            target = RestTarget("127.0.0.1", naive_port, bodies)
            await closed_loop(target.call, 4, 2)
            rows = []
            for c in (1, 16):
                r = await closed_loop(target.call, c, args.seconds)
                rows.append({"concurrency": c, **r.summary()})
                say(f"  c={c:<3} {r.throughput:7.1f} req/s  p99 {r.quantile(0.99) * 1000:7.1f} ms")
            await target.close()
            return rows

        report["naive"] = asyncio.run(naive_suite())

    paths = write_report(report, args.out)
    say("wrote " + ", ".join(str(p) for p in paths))
    return 0


async def _serve_suite(
    args: argparse.Namespace,
    levels: list[int],
    bodies: list[bytes],
    base: str,
    grpc_port: int,
    pid: int,
    report: dict[str, Any],
) -> dict[str, Any]:
    metrics_url = f"{base}/metrics"
    rest = RestTarget("127.0.0.1", int(base.rsplit(":", 1)[1]), bodies)
    grpc_target = GrpcTarget(f"127.0.0.1:{grpc_port}", bodies)
    out: dict[str, Any] = {"rss_mb_start": round(rss_mb(pid), 1)}
    say("warm-up: 3 s at c=8")
    await closed_loop(rest.call, 8, 3)
    say("REST closed-loop sweep")
    out["rest"] = await sweep(rest, levels, args.seconds, metrics_url)
    say("gRPC closed-loop sweep")
    out["grpc"] = await sweep(grpc_target, levels, args.seconds, metrics_url)
    capacity = max(r["throughput_rps"] for r in out["rest"])

    say(f"open loop (fixed rate) at 50% and 90% of REST capacity {capacity:.0f} req/s")
    out["open_loop"] = []
    for share in (0.5, 0.9):
        r = await open_loop(rest.call, capacity * share, args.seconds)
        out["open_loop"].append({"rate_rps": round(capacity * share, 1), **r.summary()})
        say(
            f"  {capacity * share:6.0f} req/s offered: p50 {r.quantile(0.5) * 1000:.1f} ms  "
            f"p99 {r.quantile(0.99) * 1000:.1f} ms  {dict(r.codes)}"
        )

    out["overload"] = await _overload(
        rest, grpc_target.address, bodies, capacity, args.overload_seconds, pid, metrics_url
    )
    if args.soak_seconds > 0:
        out["soak"] = await _soak(rest, capacity * 0.7, args.soak_seconds, pid)
    await rest.close()
    await grpc_target.close()
    return out


async def _overload(
    rest: RestTarget,
    grpc_address: str,
    bodies: list[bytes],
    capacity: float,
    seconds: float,
    pid: int,
    metrics_url: str,
) -> dict[str, Any]:
    """3x capacity, open loop, half REST half gRPC: shedding speed, accepted p99, RSS, recovery."""
    at_capacity = await open_loop(rest.call, capacity, 5)
    rss_before = rss_mb(pid)
    buckets_before = request_buckets(metrics_url)
    say(f"overload: {3 * capacity:.0f} req/s offered for {seconds:.0f} s (REST + gRPC)")
    # Two populations of clients: REST from this process, gRPC from another (its own loop).
    start_at = time.time() + 3  # time for the gRPC process to start and connect
    elsewhere = asyncio.to_thread(
        open_loop_elsewhere, grpc_address, bodies, 1.5 * capacity, seconds, start_at
    )

    async def rest_load() -> Result:
        await asyncio.sleep(start_at - time.time())
        return await open_loop(rest.call, 1.5 * capacity, seconds)

    rest_r, grpc_r = await asyncio.gather(rest_load(), elsewhere)
    rss_after = rss_mb(pid)
    buckets_after = request_buckets(metrics_url)
    shed_by = {
        name: Result(seconds, ok_latencies=_shed_latencies(r))
        for name, r in (("rest", rest_r), ("grpc", grpc_r))
    }
    shed = shed_by["rest"].ok_latencies + shed_by["grpc"].ok_latencies
    accepted = Result(seconds, ok_latencies=rest_r.ok_latencies + grpc_r.ok_latencies)
    recovery = await closed_loop(rest.call, 1, 3)
    shed_result = Result(seconds, ok_latencies=shed)
    summary = {
        "offered_rps": round(3 * capacity, 1),
        "p99_at_capacity_ms": round(at_capacity.quantile(0.99) * 1000, 1),
        "accepted_rps": round(accepted.throughput, 1),
        "accepted_p99_ms": round(accepted.quantile(0.99) * 1000, 1),
        "rejected": len(shed),
        "rejection_p99_ms": round(shed_result.quantile(0.99) * 1000, 2) if shed else None,
        # Per protocol: the two load generators share one event loop and the same two cores.
        **{
            f"rejection_p99_ms_{name}": round(r.quantile(0.99) * 1000, 2)
            for name, r in shed_by.items()
            if r.ok_latencies
        },
        # The server's own view (its histogram; bucket upper bounds): what shedding costs it,
        # without the load generator's scheduling delays on the same two cores.
        "server_rejection_p99_ms": server_p99_ms(
            buckets_before, buckets_after, {"503", "RESOURCE_EXHAUSTED"}
        ),
        "server_accepted_p99_ms": server_p99_ms(buckets_before, buckets_after, {"200", "OK"}),
        "codes_rest": dict(rest_r.codes),
        "codes_grpc": dict(grpc_r.codes),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "rss_growth_pct": round(100 * (rss_after / rss_before - 1), 1),
        "recovery_p50_ms": round(recovery.quantile(0.5) * 1000, 2),
        "recovery_codes": dict(recovery.codes),
    }
    say(
        f"  accepted {summary['accepted_rps']} req/s, p99 {summary['accepted_p99_ms']} ms "
        f"(at capacity {summary['p99_at_capacity_ms']} ms); {len(shed)} shed, p99 "
        f"{summary['rejection_p99_ms']} ms (server side <= {summary['server_rejection_p99_ms']} "
        f"ms); RSS {rss_before:.0f} -> {rss_after:.0f} MB; "
        f"recovery p50 {summary['recovery_p50_ms']} ms"
    )
    return summary


def _shed_latencies(result: Result) -> list[float]:
    """Client-side latencies of the requests the server shed (503 / RESOURCE_EXHAUSTED)."""
    return [
        latency
        for latency, code in zip(result.latencies, result.code_sequence, strict=True)
        if code in ("503", "RESOURCE_EXHAUSTED")
    ]


async def _soak(rest: RestTarget, rate: float, seconds: float, pid: int) -> dict[str, Any]:
    """Steady load for `seconds`, RSS sampled every 10 s: memory must stay flat."""
    say(f"soak: {rate:.0f} req/s for {seconds:.0f} s, RSS every 10 s")
    samples = [round(rss_mb(pid), 1)]
    codes: dict[str, int] = {}
    for _ in range(max(1, int(seconds // 10))):
        r = await open_loop(rest.call, rate, 10)
        for code, n in r.codes.items():
            codes[code] = codes.get(code, 0) + n
        samples.append(round(rss_mb(pid), 1))
    say(f"  RSS MB: {samples[0]} -> {samples[-1]} (max {max(samples)})")
    return {
        "rate_rps": round(rate, 1),
        "seconds": seconds,
        "rss_mb": samples,
        "codes": codes,
        "rss_growth_pct": round(100 * (samples[-1] / samples[1] - 1), 1),
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
