"""The export CLI: one checked ONNX file with its metadata, and clear errors for bad weights."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import export as export_module
from models import weights as weights_module
from models.export import main
from models.mobilenetv3 import ARCHS
from models.weights import resolve
from tests.conftest import IMAGES, WEIGHTS
from tests.reference import torchvision_input

METADATA_KEYS = {
    "arch", "weights", "weights_sha256", "padding", "resize_shorter", "crop",
    "interpolation", "mean", "std", "labels", "exporter_version",
}  # fmt: skip


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def lively_checkpoint(arch: str, path: Path) -> Path:
    """Random weights whose logits are O(1), unlike a fresh init's near-zero ones.

    Identity BatchNorm statistics and a 0.01-scale classifier would make any two graphs agree
    to 1e-15; perturbed statistics and a larger classifier make the parity check bite.
    """
    g = torch.Generator().manual_seed(1)
    sd = ARCHS[arch]().state_dict()
    for name, t in sd.items():
        if name.endswith("running_var"):
            sd[name] = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        elif name.endswith(("running_mean", ".bias")):
            sd[name] = torch.randn(t.shape, generator=g) * 0.1
        elif name.startswith("classifier") and name.endswith("weight"):
            sd[name] = torch.randn(t.shape, generator=g) * 0.05
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("padding", ["symmetric", "tf"])
def test_export_parity_and_dynamic_batch(
    arch: str, padding: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = lively_checkpoint(arch, tmp_path / f"lively-{arch}.pth")
    out = tmp_path / "m.onnx"
    args = ["--arch", arch, "--weights", str(ckpt), "--padding", padding, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max |onnxruntime - torch| = ")[1].split()[0])
    assert diff <= 1e-4

    meta = metadata_of(out)
    assert set(meta) >= METADATA_KEYS
    assert meta["arch"] == f"mobilenet_v3_{arch}"
    assert meta["weights"] == ckpt.name
    assert meta["padding"] == padding
    labels = json.loads(meta["labels"])
    assert len(labels) == 1000
    assert labels[652] == "military uniform"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.shape[1:]) == ("input", [3, 224, 224])
    for n in (1, 3, 8):
        x = np.random.default_rng(n).standard_normal((n, 3, 224, 224), dtype=np.float32)
        (logits,) = session.run(["logits"], {"input": x})
        assert logits.shape == (n, 1000)
        assert np.isfinite(logits).all()
        assert logits.std() > 0.1  # outputs of substance: the parity above was not 0 == 0


def test_same_inputs_give_the_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert main(["--arch", "small", "--weights", "random", "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert metadata_of(a)["weights"] == "random"  # recorded as such in the file


def test_disagreeing_runtime_is_refused_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Any real difference (here ~1e-6) exceeds a zero tolerance: the refusal path, for real.
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", 0.0)
    out = tmp_path / "m.onnx"
    assert main(["--arch", "small", "--weights", "random", "--out", str(out)]) == 1
    assert "ONNX Runtime disagrees with PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_real_weights_top1_through_onnxruntime(small_model: Path, expected: dict[str, Any]) -> None:
    """The issue's done-when: grace_hopper.jpg is 652 (military uniform) in ONNX Runtime."""
    meta = metadata_of(small_model)
    assert meta["padding"] == "tf"
    assert meta["weights"] == WEIGHTS.name
    assert meta["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    session = ort.InferenceSession(str(small_model), providers=["CPUExecutionProvider"])
    for image in ("grace_hopper.jpg", "chelsea.png", "coffee.png", "camera.png"):
        (logits,) = session.run(["logits"], {"input": torchvision_input(IMAGES / image, mean, std)})
        top1 = int(logits[0].argmax())
        assert top1 in expected[image]["acceptable_top1"], image
    (logits,) = session.run(
        ["logits"], {"input": torchvision_input(IMAGES / "grace_hopper.jpg", mean, std)}
    )
    assert int(logits[0].argmax()) == 652


# ---- bad checkpoints: one clear line, exit 1, no traceback --------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_checkpoint_of_the_other_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "small.pth"
    shutil.copy(WEIGHTS, ckpt)  # without its manifest: the keys themselves must tell
    code, err = run_cli(["--arch", "large", "--weights", str(ckpt), "--out", "x.onnx"], capsys)
    assert code == 1
    assert err.startswith("export failed: checkpoint 'small.pth' does not fit MobileNetV3:")
    assert "wrong shapes" in err
    assert "--arch large/small" in err
    assert "\n" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda sd: sd.pop("classifier.3.bias"), "1 missing keys (e.g. classifier.3.bias)"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "1 unexpected keys (e.g. extra)"),
        (
            lambda sd: sd.update({"classifier.3.bias": torch.zeros(10)}),
            "1 wrong shapes (e.g. classifier.3.bias [10] vs [1000]",
        ),
    ],
)
def test_checkpoint_that_does_not_fit(
    mutate: Any, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = torch.load(WEIGHTS, weights_only=True)
    mutate(sd)
    ckpt = tmp_path / "bad.pth"
    torch.save(sd, ckpt)
    code, err = run_cli(["--arch", "small", "--weights", str(ckpt), "--out", "x.onnx"], capsys)
    assert code == 1
    assert says in err


def test_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    code, err = run_cli(["--arch", "small", "--weights", str(junk), "--out", "x.onnx"], capsys)
    assert code == 1
    assert err.startswith(f"export failed: {junk} is not a readable PyTorch checkpoint")


def test_missing_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["--arch", "small", "--weights", "nope.pth", "--out", "x.onnx"], capsys)
    assert (code, err) == (
        1,
        "export failed: no checkpoint at nope.pth (expected imagenet, random or a file path)",
    )


# ---- imagenet downloads, simulated on a loopback server -----------------------------------


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A loopback HTTP 'mirror' serving a folder; the checkpoint cache is a fresh temp dir."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MNV3_WEIGHTS_BASE_URL", f"http://127.0.0.1:{server.server_port}/models/")
    monkeypatch.setenv("MNV3_CACHE_DIR", str(tmp_path / "cache"))
    (root / "models").mkdir()
    yield root / "models"
    server.shutdown()
    server.server_close()


def test_imagenet_download_checks_hash_and_caches(
    mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # We cannot forge torchvision's hash, so publish ../shared's checkpoint under a name whose
    # hash prefix is its own: download, hash check, cache and strict load all run for real.
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    name = f"mobilenet_v3_small-{digest[:8]}.pth"
    shutil.copy(WEIGHTS, mirror / name)
    monkeypatch.setitem(weights_module.CHECKPOINTS, "small", name)

    w = resolve("small", "imagenet", None)
    assert (w.source, w.sha256, w.padding) == ("imagenet", digest, "symmetric")
    cached = weights_module.cache_dir() / name
    assert cached.read_bytes() == WEIGHTS.read_bytes()
    (mirror / name).unlink()  # second time: from the cache, no network
    assert resolve("small", "imagenet", None).sha256 == digest


def test_imagenet_download_with_wrong_hash_is_refused(
    mirror: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(WEIGHTS, mirror / weights_module.CHECKPOINTS["small"])  # not torchvision's bytes
    code, err = run_cli(["--arch", "small", "--weights", "imagenet", "--out", "x.onnx"], capsys)
    assert code == 1
    assert "but it is corrupt" in err
    assert not weights_module.cache_dir().joinpath(weights_module.CHECKPOINTS["small"]).exists()


def test_imagenet_offline_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A closed loopback port stands in for an offline box: the connection is refused at once.
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MNV3_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("MNV3_CACHE_DIR", str(tmp_path))
    out = tmp_path / "m.onnx"
    code, err = run_cli(["--arch", "large", "--weights", "imagenet", "--out", str(out)], capsys)
    assert code == 1
    assert err.startswith(
        f"export failed: could not download http://127.0.0.1:{port}/mobilenet_v3_large-8738ca79.pth"
    )
    assert "Connection refused" in err
    assert "pass --weights /path/to/mobilenet_v3_large-8738ca79.pth" in err
    assert "\n" not in err
    assert not out.exists()
