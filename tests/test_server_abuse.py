"""`medlora serve` under abuse: schema fuzzing, slow and vanishing clients, and path traversal through `model`.

One server (tiny-qwen2 + a quick adapter served as `tuned`, API key on, small bounds) on a free loopback port
serves the module. Every test ends by checking the server still answers and holds no request (`/health` queue 0).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse

import httpx
import pytest

from tests.conftest import running_medlora
from tests.test_atomic_outputs import quick_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "abuse-key-7"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CAP = 8
MAX_BODY = 16 * 1024
SERVED = {"tiny-qwen2", "tuned"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    return quick_adapter(tmp_path_factory.mktemp("abuse") / "tuned", seed=3)


@pytest.fixture(scope="module")
def server(adapter_dir, tmp_path_factory):
    """(base URL, log path) of a running `medlora serve`."""
    log_path = tmp_path_factory.mktemp("serve-abuse") / "server.log"
    args = ["serve", "--base_model", "tiny-qwen2", "--lora_weights", f"tuned={adapter_dir}", "--api-key", API_KEY,
            "--dtype", "fp32", "--max_tokens_cap", str(CAP), "--max_prompt_tokens", "200",
            "--max_body_bytes", str(MAX_BODY), "--max_batch_size", "8"]
    with running_medlora(args, log_path, seconds=180) as url:
        yield url, log_path


def chat(model: str = "tuned", content: str = "感冒怎么办？", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": CAP, **fields}


def assert_healthy(url: str, seconds: float = 30) -> None:
    """The server answers a real request and, soon, has no request queued or running."""
    response = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + seconds
    while (queue := httpx.get(f"{url}/health", timeout=10).json()["queue"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue == 0, f"{queue} requests still held"


# --- schemathesis: the server's own OpenAPI schema ----------------------------------------------------------------

def steer(case, model: str | None, max_tokens: int | None, user_last: bool) -> None:
    """Point some generated requests at served models, within the cap, ending with a user turn: so that fuzzed
    values reach prompt building and generation, not only the 404/400 guards."""
    if model is None:
        return
    if "model_id" in (case.path_parameters or {}):
        case.path_parameters["model_id"] = model
    if isinstance(case.body, dict):
        case.body["model"] = model
        if max_tokens is not None:
            case.body["max_tokens"] = max_tokens
            case.body.pop("max_completion_tokens", None)
        messages = case.body.get("messages")
        if user_last and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            messages[-1]["role"] = "user"


@pytest.mark.slow  # ~11 s of fuzzing: make test-slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis import checks as generic
    from schemathesis.specs.openapi import checks as openapi

    url = server[0]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [generic.not_a_server_error, openapi.status_code_conformance, openapi.content_type_conformance,
              openapi.response_schema_conformance, openapi.response_headers_conformance,
              openapi.negative_data_rejection, generic.ignored_auth]
    failures, statuses = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode),
                   model=st.sampled_from(["tuned", "base", "tiny-qwen2", None]),
                   max_tokens=st.one_of(st.none(), st.integers(1, CAP)), user_last=st.booleans())
            def fuzz(case, model, max_tokens, user_last):
                if case.meta.generation.mode == GenerationMode.POSITIVE:  # steering a negative case could make
                    steer(case, model, max_tokens, user_last)  # it valid (a missing `model` filled in): then served
                response = case.call(headers=AUTH, timeout=60)
                statuses.setdefault(response.status_code, 0)
                statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=checks)
                except Exception as exc:  # collect them all rather than shrink one
                    failures.append(f"{operation.label} [{mode.value}] {response.status_code}: "
                                    f"{str(exc).splitlines()[:6]}")
            try:
                fuzz()
            except Unsatisfiable:  # nothing to make negative (GET /health has no input)
                pass
    print(f"schemathesis: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert 200 in statuses and not any(status >= 500 for status in statuses), statuses
    assert_healthy(url)


# --- slow and vanishing clients ---------------------------------------------------------------------------------

def raw_connection(url: str) -> socket.socket:
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    return socket.create_connection((host, port), timeout=10)


def request_bytes(body: dict, path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def test_slow_clients_do_not_block_others(server):
    url = server[0]
    stalled = []
    for i in range(20):
        sock = raw_connection(url)
        whole = request_bytes(chat(stream=bool(i % 2)))
        sock.sendall(whole[: 40 + i * 7])  # headers or body cut short: the server waits on this client only
        stalled.append(sock)
    readers = []
    for _ in range(4):  # streams whose client never reads a byte of the answer
        sock = raw_connection(url)
        sock.sendall(request_bytes(chat(stream=True)))
        readers.append(sock)
    try:
        started = time.monotonic()
        for i in range(5):
            response = httpx.post(f"{url}/v1/chat/completions", json=chat(content=f"第{i}个问题"), headers=AUTH,
                                  timeout=30)
            assert response.status_code == 200, response.text
        assert time.monotonic() - started < 30
    finally:
        for sock in stalled + readers:
            sock.close()
    assert_healthy(url)


def test_clients_that_drop_mid_stream_or_while_queued_leave_nothing_behind(server):
    url = server[0]
    from concurrent.futures import ThreadPoolExecutor

    def drop_mid_stream(i):
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", headers=AUTH,
                               json=chat(content=f"头痛{i}", stream=True)) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():  # one event, then hang up
                    break

    def give_up_while_queued(i):
        try:
            httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=0.05,
                       json={"model": "base", "prompt": f"发热{i}", "max_tokens": CAP})
        except httpx.TimeoutException:
            pass

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(drop_mid_stream, range(24)))
        list(pool.map(give_up_while_queued, range(24)))
    sock = raw_connection(url)  # a client that resets the connection (RST) mid-stream
    sock.sendall(request_bytes(chat(stream=True)))
    sock.recv(64)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert_healthy(url)
    assert "Traceback" not in server[1].read_text()


# --- model names are names, never paths --------------------------------------------------------------------------

def traversal_names(adapter_dir) -> list[str]:
    real = str(adapter_dir)
    return ["../tuned", "./tuned", "tuned/", "tuned/../tuned", "../../../../etc/passwd", "/etc/passwd", real,
            real + "/", f"..{os.sep}{os.path.basename(real)}", "file:///etc/passwd", "..%2F..%2Fetc%2Fpasswd",
            urllib.parse.quote(real, safe=""), "%2e%2e%2ftuned", "tuned\x00", "tuned%00", "~/.ssh/id_rsa",
            "\\..\\..\\windows\\win.ini", "base/../tuned", "TUNED"]


def test_model_names_cannot_reach_files(server, adapter_dir, tmp_path):
    url = server[0]
    twin = tmp_path / "twin"  # a valid adapter that is not configured: reachable by no name
    import shutil

    shutil.copytree(adapter_dir, twin)
    names = [*traversal_names(adapter_dir), str(twin), "../twin", os.path.relpath(twin, REPO)]
    for name in names:
        for path, body in (("/v1/chat/completions", chat(model=name)),
                           ("/v1/completions", {"model": name, "prompt": "发热", "max_tokens": 2})):
            response = httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=30)
            assert response.status_code == 404, (name, response.text)
            error = response.json()["error"]
            assert error["code"] == "model_not_found" and "root:" not in error["message"], (name, error)
        response = httpx.get(f"{url}/v1/models/{urllib.parse.quote(name, safe='')}", headers=AUTH, timeout=10,
                             follow_redirects=True)  # "tuned/" is redirected to "tuned", a served name
        assert response.status_code == 404 or response.json()["id"] in SERVED, (name, response.text)
    for raw_path in ("/v1/models/../../etc/passwd", "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/%2Fetc%2Fpasswd",
                     f"/v1/models/{adapter_dir}", "/v1/models/tuned/../../../etc/passwd"):
        sock = raw_connection(url)  # unnormalised paths, as httpx would clean them up
        sock.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        status = int(answer.split(b" ", 2)[1])
        assert status == 404 and b"root:" not in answer, (raw_path, answer[:300])
    assert {m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]} == SERVED
    assert_healthy(url)
