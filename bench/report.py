"""The benchmark report: JSON for machines, a Markdown table for the README, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """The headline ratios: each protocol's best throughput against the ceiling and the naive."""
    server = report["server"]
    best = {p: max(r["throughput_rps"] for r in server[p]) for p in ("rest", "grpc")}
    naive_best = max(r["throughput_rps"] for r in report["naive"])
    c1 = next((r for r in server["rest"] if r["concurrency"] == 1), None)
    return {
        "rest_vs_ceiling": round(best["rest"] / report["ceiling_rps"], 3),
        "grpc_vs_ceiling": round(best["grpc"] / report["ceiling_rps"], 3),
        "rest_vs_naive": round(best["rest"] / naive_best, 2),
        "grpc_vs_naive": round(best["grpc"] / naive_best, 2),
        "rest_c1_p50_minus_single_ms": (
            round(c1["p50_ms"] - report["single_image_ms"], 2) if c1 else float("nan")
        ),
    }


def markdown(report: dict[str, Any]) -> str:
    m, server, r = report["machine"], report["server"], ratios(report)
    lines = [
        f"Machine: {m['cpus']} x {m['cpu']} ({m['arch']}), Python {m['python']}, "
        f"kernel {m['kernel']}. Model: {report['model']}. Inputs: {report['inputs']}. "
        f"Server: batch <= {report['settings']['max_batch_size']}, delay "
        f"{report['settings']['max_batch_delay_ms']} ms, {report['settings']['intra']} ORT "
        f"threads, {report['settings']['decode']} decode threads.",
        "",
        f"In-process ceiling (decode + ONNX Runtime, best batch, no network): "
        f"**{report['ceiling_rps']} img/s**; single image {report['single_image_ms']} ms.",
        "",
        "| protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | queue wait ms "
        "| inference ms/batch | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol in ("rest", "grpc"):
        for row in server[protocol]:
            errors = {k: v for k, v in row["codes"].items() if k not in ("200", "OK")}
            lines.append(
                f"| {protocol} | {row['concurrency']} | {row['throughput_rps']} | {row['p50_ms']} "
                f"| {row['p95_ms']} | {row['p99_ms']} | {row['mean_batch_size']} "
                f"| {row['queue_wait_ms']} | {row['inference_ms_per_batch']} | {errors or '-'} |"
            )
    for row in report["naive"]:
        errors = {k: v for k, v in row["codes"].items() if k != "200"}
        lines.append(
            f"| naive | {row['concurrency']} | {row['throughput_rps']} | {row['p50_ms']} "
            f"| {row['p95_ms']} | {row['p99_ms']} | 1 | - | - | {errors or '-'} |"
        )
    lines += [
        "",
        f"Ratios: REST {r['rest_vs_ceiling']:.0%} and gRPC {r['grpc_vs_ceiling']:.0%} of the "
        f"ceiling; {r['rest_vs_naive']}x (REST) and {r['grpc_vs_naive']}x (gRPC) the naive "
        f"baseline; REST p50 at concurrency 1 is {r['rest_c1_p50_minus_single_ms']} ms above "
        "the in-process single-image time.",
    ]
    if "open_loop" in server:
        lines.append("")
        lines.append("| open loop, offered req/s | p50 ms | p99 ms | codes |")
        lines.append("|---|---|---|---|")
        for row in server["open_loop"]:
            lines.append(
                f"| {row['rate_rps']} | {row['p50_ms']} | {row['p99_ms']} | {row['codes']} |"
            )
    if o := server.get("overload"):
        lines += [
            "",
            f"Overload ({o['offered_rps']} req/s offered, 3x capacity): accepted "
            f"{o['accepted_rps']} req/s with p99 {o['accepted_p99_ms']} ms (p99 at capacity "
            f"{o['p99_at_capacity_ms']} ms); {o['rejected']} shed with p99 "
            f"{o['rejection_p99_ms']} ms at the client (REST {o.get('rejection_p99_ms_rest')} "
            f"ms, gRPC {o.get('rejection_p99_ms_grpc')} ms), "
            f"<= {o['server_rejection_p99_ms']} ms in "
            f"the server's own histogram; RSS {o['rss_mb_before']} -> {o['rss_mb_after']} MB "
            f"({o['rss_growth_pct']:+}%); right after, p50 {o['recovery_p50_ms']} ms "
            f"({o['recovery_codes']}).",
        ]
    if s := server.get("soak"):
        lines += [
            "",
            f"Soak: {s['rate_rps']} req/s for {s['seconds']:.0f} s, RSS MB every 10 s: "
            f"{s['rss_mb'][0]} -> {s['rss_mb'][-1]} (max {max(s['rss_mb'])}; "
            f"{s['rss_growth_pct']:+}% after the first 10 s); codes {s['codes']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency (p50 solid, p99 dashed) against throughput, one line per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = [("REST", report["server"]["rest"]), ("gRPC", report["server"]["grpc"]),
              ("naive", report["naive"])]  # fmt: skip
    for (name, rows), color in zip(series, ("tab:blue", "tab:orange", "tab:gray"), strict=True):
        x = [r["throughput_rps"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{name} p99")
        for r in rows:
            ax.annotate(f"c{r['concurrency']}", (r["throughput_rps"], r["p50_ms"]), fontsize=7)
    ax.axvline(report["ceiling_rps"], color="tab:green", linestyle=":", label="in-process ceiling")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    m = report["machine"]
    ax.set_title(f"mnv3-serve, {report['model']}, {m['cpus']} x {m['cpu'][:40]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    report["ratios"] = ratios(report)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
