"""The .proto contract: the committed generated code matches protos/, and the API is documented."""

from __future__ import annotations

import difflib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "service" / "proto"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    # Exactly what `make proto` runs, into a temporary root.
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = _files(tmp_path / "service" / "proto")
    committed = _files(GENERATED)
    hint = (
        f"service/proto/ is stale: run `make proto` and commit the result "
        f"(grpcio-tools {version('grpcio-tools')}, mypy-protobuf {version('mypy-protobuf')})"
    )
    assert sorted(fresh) == sorted(committed), hint
    for name, text in fresh.items():
        if text != committed[name]:
            diff = difflib.unified_diff(
                committed[name].decode().splitlines(),
                text.decode().splitlines(),
                f"committed/{name}",
                f"fresh/{name}",
                lineterm="",
            )
            raise AssertionError(hint + "\n" + "\n".join(list(diff)[:40]))


def test_every_service_method_message_and_field_is_commented(tmp_path: Path) -> None:
    # grpcurl users read these comments (`grpcurl describe`); protoc keeps them as source info.
    out = tmp_path / "classifier.pb"
    protos = REPO / "protos"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{protos}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            "mnv3/v1/classifier.proto",
        ],
        check=True,
    )
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    comments = {
        tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
    }
    # Paths of FileDescriptorProto: 4 = message_type, 2 = field; 6 = service, 2 = method.
    expected: dict[tuple[int, ...], str] = {}
    for i, message in enumerate(file.message_type):
        expected[(4, i)] = message.name
        for j, field in enumerate(message.field):
            expected[(4, i, 2, j)] = f"{message.name}.{field.name}"
    for i, service in enumerate(file.service):
        expected[(6, i)] = service.name
        for j, method in enumerate(service.method):
            expected[(6, i, 2, j)] = f"{service.name}.{method.name}"
    missing = [name for path, name in expected.items() if not comments.get(path)]
    assert missing == []
    assert file.package == "mnv3.v1"
    assert [m.name for m in file.service[0].method] == [
        "Classify",
        "ClassifyBatch",
        "ClassifyStream",
        "GetModel",
    ]


def test_generated_package_imports_as_a_normal_path() -> None:
    from service.proto.mnv3.v1 import classifier_pb2, classifier_pb2_grpc

    assert classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name == (
        "mnv3.v1.Classifier"
    )
    assert (
        classifier_pb2_grpc.ClassifierStub.__module__ == "service.proto.mnv3.v1.classifier_pb2_grpc"
    )


def test_grpcio_tools_is_not_newer_than_grpcio() -> None:
    # Generated *_pb2_grpc.py refuses to import under an older grpcio than the generator's.
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:3])

    assert key(version("grpcio-tools")) <= key(version("grpcio"))
