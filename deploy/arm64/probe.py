"""Runs a fixed input through the ONNX model on each arch and compares the two sets of logits."""

# `run` executes twice per smoke test, unchanged: in the host's x86_64 venv and under the
# aarch64 Python of the emulated root (which has numpy + onnxruntime + the stdlib, no repo
# code), so it imports nothing from the repo. `compare` runs on the host afterwards.

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

# e_machine values from the ELF header (offset 18, little-endian on both targets).
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
# ORT's kernels differ per CPU (AVX2/AVX-512 vs NEON): measured ~5e-7 apart on Small's logits.
TOLERANCE = 1e-4
BATCH = 2


def elf_machine(path: Path) -> str:
    """The CPU a shared library was compiled for, read from its ELF header."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return "not-elf"
    code = int.from_bytes(header[18:20], "little")
    return ELF_MACHINES.get(code, f"e_machine={code}")


def onnxruntime_build() -> dict[str, str]:
    """Where onnxruntime was imported from, its wheel tag, and its native library's CPU."""
    import onnxruntime as ort

    package = Path(ort.__file__).parent
    native = sorted((package / "capi").glob("onnxruntime_pybind11_state*.so"))
    wheel = metadata.distribution("onnxruntime").read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return {
        "version": ort.__version__,
        "path": str(package),
        "wheel_tag": ",".join(tags),
        "native_library": native[0].name if native else "missing",
        "native_machine": elf_machine(native[0]) if native else "missing",
    }


def run(model: Path, workdir: Path, expect_machine: str) -> int:
    """Logits of workdir/input.npy (made from a fixed seed by the first run) -> logits-<arch>."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    inputs = workdir / "input.npy"
    if not inputs.exists():
        # Made once and shipped to the other arch as a file, so both see identical bits.
        _, channels, height, width = spec.shape
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH, channels, height, width), dtype=np.float32)
        np.save(inputs, x)
    (logits,) = session.run(None, {spec.name: np.load(inputs)})
    machine = platform.machine()
    np.save(workdir / f"logits-{machine}.npy", logits)
    build = onnxruntime_build()
    print(json.dumps({"machine": machine, "python": platform.python_version(), **build}))
    wheel_ok = expect_machine in build["wheel_tag"]
    if not (machine == expect_machine and build["native_machine"] == expect_machine and wheel_ok):
        print(f"probe: FAILED: expected an {expect_machine} Python and wheel", file=sys.stderr)
        return 1
    print(
        f"PROOF onnxruntime on {machine}: version {build['version']} from {build['path']},"
        f" wheel tag {build['wheel_tag']}, {build['native_library']} is {build['native_machine']}"
    )
    return 0


def compare(workdir: Path) -> int:
    """The aarch64 logits must equal the x86_64 ones within TOLERANCE, with the same top-1."""
    x86 = np.load(workdir / "logits-x86_64.npy")
    arm = np.load(workdir / "logits-aarch64.npy")
    diff = float(np.abs(x86 - arm).max())
    same_top1 = bool((x86.argmax(axis=1) == arm.argmax(axis=1)).all())
    print(
        f"PROOF logits aarch64 vs x86_64: max |diff| = {diff:.3g} (tolerance {TOLERANCE:g}),"
        f" same top-1: {same_top1}"
    )
    return 0 if diff <= TOLERANCE and same_top1 else 1


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "run":
        return run(Path(argv[1]), Path(argv[2]), argv[3])
    if len(argv) == 2 and argv[0] == "compare":
        return compare(Path(argv[1]))
    print("usage: probe.py run MODEL.onnx DIR MACHINE | probe.py compare DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
