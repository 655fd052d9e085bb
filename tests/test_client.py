"""The Python clients and `python -m service.client`, against the real app on real ports."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.client import (
    AsyncGrpcClient,
    AsyncRestClient,
    Classification,
    ClientError,
    GrpcClient,
    Prediction,
    RestClient,
    content_type,
    format_table,
    main,
)
from tests.conftest import IMAGES, REPO, make_settings, wait_ready

GRACE = IMAGES / "grace_hopper.jpg"
CHELSEA = IMAGES / "chelsea.png"


@asynccontextmanager
async def real_servers(small_model: Path) -> AsyncIterator[tuple[str, str]]:
    """The real app under uvicorn on 127.0.0.1 port 0: (REST base URL, gRPC HOST:PORT)."""
    from service.app import create_app

    app = create_app(make_settings(small_model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        await wait_ready(app)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{app.state.grpc_port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def servers(small_model: Path) -> AsyncIterator[tuple[str, str]]:
    async with real_servers(small_model) as urls:
        yield urls


async def cli(*args: str) -> tuple[int, str]:
    """main() in a thread (its clients block) while this loop serves; (status, stdout)."""
    out = io.StringIO()
    status = await asyncio.to_thread(main, ["classify", *args], out=out)
    return status, out.getvalue()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nobody listens there any more


# ---------------------------------------------------------------------------- CLI


async def test_cli_prints_the_same_table_over_grpc_and_rest(
    servers: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, target = servers
    status, over_grpc = await cli(str(GRACE), str(CHELSEA), "--top-k", "3", "--grpc", target)
    assert status == 0
    status, over_rest = await cli(str(GRACE), str(CHELSEA), "--top-k", "3", "--url", url)
    assert status == 0
    assert over_grpc == over_rest  # one result type, whichever protocol carried it
    lines = over_grpc.splitlines()
    assert len(lines) == 2 * (1 + 1 + 3)  # per image: title, header, 3 rows
    assert lines[0].startswith(f"{GRACE}  (mobilenet_v3_small, weights ")
    assert lines[1].split() == ["rank", "index", "label", "score"]
    assert lines[2].split()[:4] == ["1", "652", "military", "uniform"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert lines[5].startswith(str(CHELSEA))
    assert capsys.readouterr().err == ""


async def test_cli_json_is_the_rest_reply_per_image(
    servers: tuple[str, str], expected: dict[str, Any]
) -> None:
    url, target = servers
    status, over_grpc = await cli(str(GRACE), str(CHELSEA), "--json", "--grpc", target)
    assert status == 0
    status, over_rest = await cli(str(GRACE), str(CHELSEA), "--json", "--url", url)
    assert status == 0
    documents = json.loads(over_grpc)
    assert documents == json.loads(over_rest)
    assert [d["image"] for d in documents] == [str(GRACE), str(CHELSEA)]
    for document in documents:
        assert set(document) == {"image", "model", "predictions"}
        assert document["model"]["name"] == "mobilenet_v3_small"
        assert set(document["model"]) == {
            "name",
            "arch",
            "weights",
            "weights_sha256",
            "version",
            "input_size",
            "num_classes",
        }
        assert len(document["predictions"]) == 5
        assert set(document["predictions"][0]) == {"index", "label", "score"}
    assert documents[0]["predictions"][0]["index"] == 652
    assert documents[1]["predictions"][0]["index"] in expected["chelsea.png"]["acceptable_top1"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
async def test_cli_reports_each_failure_in_one_line(
    servers: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    protocol: str,
) -> None:
    url, target = servers
    where = ["--grpc", target] if protocol == "grpc" else ["--url", url]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    status, out = await cli(str(text), str(GRACE), str(missing), "--json", *where)
    assert status == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {text}: invalid_image: ")
    assert errors[1].startswith(f"error: {missing}: unreadable: ")
    documents = json.loads(out)  # stdout stays valid JSON, errors included
    assert documents[0]["error"]["code"] == "invalid_image"
    assert documents[1]["predictions"][0]["index"] == 652  # the good image still answered
    assert documents[2]["error"]["code"] == "unreadable"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
async def test_cli_without_a_server(capsys: pytest.CaptureFixture[str], protocol: str) -> None:
    port = closed_port()
    where = (
        ["--grpc", f"127.0.0.1:{port}"]
        if protocol == "grpc"
        else ["--url", f"http://127.0.0.1:{port}"]
    )
    status, out = await cli(str(GRACE), str(CHELSEA), "--timeout", "5", *where)
    assert status == 1
    assert out == ""
    (error,) = capsys.readouterr().err.splitlines()  # one line, not one per image
    assert error.startswith(f"error: {GRACE}: unreachable: ")


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["classify"], ["classify", "x.jpg", "--grpc", "h:1", "--url", "http://h"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


async def test_python_m_service_client(servers: tuple[str, str]) -> None:
    _, target = servers
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.client", "classify", str(GRACE), "--grpc", target, "--top-k", "1"),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 3
    assert lines[2].split()[:3] == ["1", "652", "military"]


# ---------------------------------------------------------------------------- library


async def test_async_clients_agree_and_raise_the_same_errors(servers: tuple[str, str]) -> None:
    url, target = servers
    image = GRACE.read_bytes()
    async with AsyncGrpcClient(target) as over_grpc, AsyncRestClient(url) as over_rest:
        by_grpc = await over_grpc.classify(image, top_k=2)
        by_rest = await over_rest.classify(image, top_k=2)
        assert by_grpc == by_rest
        assert by_grpc.predictions[0] == Prediction(
            652, "military uniform", by_grpc.predictions[0].score
        )
        assert await over_grpc.model() == await over_rest.model() == by_grpc.model

        with pytest.raises(ClientError) as grpc_error:
            await over_grpc.classify(b"junk")
        with pytest.raises(ClientError) as rest_error:
            await over_rest.classify(b"junk")
        assert grpc_error.value.code == rest_error.value.code == "invalid_image"
        assert (grpc_error.value.status, rest_error.value.status) == ("INVALID_ARGUMENT", 400)
        with pytest.raises(ClientError) as bad_top_k:
            await over_grpc.classify(image, top_k=21)
        assert bad_top_k.value.code == "invalid_argument"

        batch = await over_grpc.classify_batch([image, b"junk", CHELSEA.read_bytes()], top_k=1)
        assert isinstance(batch[0], Classification)
        assert batch[0].predictions == by_grpc.predictions[:1]
        assert isinstance(batch[1], ClientError)
        assert (batch[1].code, batch[1].status) == ("invalid_image", "INVALID_ARGUMENT")
        assert isinstance(batch[2], Classification)


async def test_sync_clients(servers: tuple[str, str]) -> None:
    url, target = servers

    def use_them() -> tuple[Classification, Classification, list[Classification | ClientError]]:
        image = GRACE.read_bytes()
        with GrpcClient(target) as over_grpc, RestClient(url) as over_rest:
            assert over_grpc.model() == over_rest.model()
            return (
                over_grpc.classify(image),
                over_rest.classify(image),
                over_grpc.classify_batch([image, b""]),
            )

    by_grpc, by_rest, batch = await asyncio.to_thread(use_them)
    assert by_grpc == by_rest
    assert by_grpc.predictions[0].index == 652
    assert batch[0] == by_grpc
    assert isinstance(batch[1], ClientError)


def test_content_type_is_sniffed_from_the_bytes() -> None:
    assert content_type(GRACE.read_bytes()) == "image/jpeg"
    assert content_type(CHELSEA.read_bytes()) == "image/png"
    assert content_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert content_type(b"GIF89a...") == "image/gif"
    assert content_type(b"hello") == "application/octet-stream"


def test_rest_client_request_and_error_shapes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.content == b"junk":
            body = {"error": {"code": "invalid_image", "message": "not an image"}}
            return httpx.Response(400, json=body)
        if request.content == b"proxy":
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        return httpx.Response(
            200,
            json={
                "model": {"name": "m"},
                "predictions": [{"index": 1, "label": "goldfish", "score": 0.5}],
            },
        )

    with RestClient("http://mnv3", timeout=2.5, transport=httpx.MockTransport(handler)) as client:
        result = client.classify(CHELSEA.read_bytes(), top_k=1)
        assert result == Classification({"name": "m"}, [Prediction(1, "goldfish", 0.5)])
        request = seen[0]
        assert (request.method, request.url.path) == ("POST", "/v1/classify")
        assert request.url.params["top_k"] == "1"
        assert request.headers["content-type"] == "image/png"
        assert request.headers["x-request-timeout-ms"] == "2500"
        with pytest.raises(ClientError) as refused:
            client.classify(b"junk")
        assert (refused.value.code, refused.value.message, refused.value.status) == (
            "invalid_image",
            "not an image",
            400,
        )
        with pytest.raises(ClientError) as proxy:
            client.classify(b"proxy")
        assert (proxy.value.code, proxy.value.status) == ("http_502", 502)


def test_format_table() -> None:
    result = Classification(
        {"name": "mobilenet_v3_small", "weights": "imagenet", "version": "abc"},
        [Prediction(652, "military uniform", 0.29571), Prediction(457, "bow tie", 0.2289)],
    )
    assert format_table("a.jpg", result) == (
        "a.jpg  (mobilenet_v3_small, weights imagenet, version abc)\n"
        "  rank  index  label              score\n"
        "     1    652  military uniform  0.2957\n"
        "     2    457  bow tie           0.2289"
    )
