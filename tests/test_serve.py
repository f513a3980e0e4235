"""`medlora serve`: the real server in a subprocess, driven by the official `openai` client and by httpx.

One server (tiny-qwen2 + the memorising tiny adapter as `tuned`, API key on, small bounds) serves the module; the
test of a batch with a failing row runs the app in process, where generation can be made to fail.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import NotFoundError, OpenAI

from medlora import DISCLAIMER
from medlora.errors import ConfigError
from medlora.loader import template_for
from medlora.serve.engine import APIError, split_conversation
from medlora.templates.cutting import Cutter, strip_pieces
from tests.conftest import TINY_RECORDS, run_medlora, running_medlora

API_KEY = "test-key-123"
CAP = 32
MAX_PROMPT_TOKENS = 200
MAX_BODY = 32 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model, tiny_adapter, tmp_path_factory):
    """(base URL, log path) of a running `medlora serve`; its output is shown if it fails to start."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["serve", "--base_model", tiny_model, "--lora_weights", f"tuned={tiny_adapter}", "--api-key", API_KEY,
            "--dtype", "fp32", "--max_tokens_cap", str(CAP), "--max_prompt_tokens", str(MAX_PROMPT_TOKENS),
            "--max_body_bytes", str(MAX_BODY), "--max_batch_size", "8"]
    with running_medlora(args, log_path, seconds=120) as url:
        yield url, log_path


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def ask(client: OpenAI, model: str, question: str, **kwargs):
    kwargs = {"max_tokens": 16, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)


# --- pure helpers --------------------------------------------------------------------------------------------

def test_split_conversation_returns_the_system_text_and_pairs_turns():
    messages = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛"},
                {"role": "assistant", "content": "多久了？"},
                {"role": "user", "content": [{"type": "text", "text": "三天"}]}]
    assert split_conversation(messages) == ("你是医生。", "三天", [("头痛", "多久了？")])
    assert split_conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]) == ("S", "Q", [])
    assert split_conversation([{"role": "user", "content": "Q"}]) == (None, "Q", [])
    for bad in ([{"role": "assistant", "content": "hi"}], [{"role": "tool", "content": "x"}],
                [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]):
        with pytest.raises(APIError) as caught:
            split_conversation(bad)
        assert caught.value.status == 400


def test_stream_helpers_add_up_to_the_stripped_text():
    assert "".join(strip_pieces(["  ", "\nab", " ", "c  ", "\n"])) == "ab c"
    assert Cutter(("Q:", "zz")).cut("answer. Q: next") == ("answer.", True)
    assert Cutter(("Q:",)).cut("answer") == ("answer", False)


# --- the running server --------------------------------------------------------------------------------------

def test_models_lists_base_and_adapter_and_the_disclaimer_is_printed(server, client):
    assert {model.id for model in client.models.list()} == {"tiny-qwen2", "tuned"}
    assert DISCLAIMER in server[1].read_text()


def test_adapter_chosen_by_name_gives_the_memorised_answer(client, tiny_adapter):
    record = TINY_RECORDS[0]
    tuned = ask(client, "tuned", record["instruction"])
    assert tuned.choices[0].message.content == record["output"]
    assert tuned.choices[0].finish_reason == "stop" and tuned.model == "tuned"
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    base = ask(client, "base", record["instruction"])  # the same base with the adapter switched off
    assert base.model == "tiny-qwen2" and base.choices[0].message.content != record["output"]
    prompt = template_for(None, tiny_adapter).build_prompt(record["instruction"])  # as the server builds it
    completion = client.completions.create(model="tuned", prompt=prompt, max_tokens=16, temperature=0)
    assert completion.choices[0].text == record["output"]
    assert completion.usage.prompt_tokens == tuned.usage.prompt_tokens


@pytest.mark.parametrize("model", ["tuned", "base"])
def test_streamed_chunks_add_up_to_the_non_streamed_answer(client, model):
    question = "头痛三天，伴有发热，应该怎么办？"
    whole = ask(client, model, question)
    chunks = list(ask(client, model, question, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model=model, prompt="发热", max_tokens=8, temperature=0, stream=True)
    plain = client.completions.create(model=model, prompt="发热", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_sampling_and_stop_strings(client):
    sampled = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "你好"}], max_tokens=8, temperature=0.8, top_p=0.9)
    assert sampled.usage.completion_tokens <= 8
    record = TINY_RECORDS[1]
    cut = ask(client, "tuned", record["instruction"], stop=["科"])
    assert cut.choices[0].message.content == record["output"].split("科")[0]
    assert cut.choices[0].finish_reason == "stop"


def test_penalties_reach_the_generation_settings():
    from medlora.serve.api import generation_args
    from medlora.serve.engine import ServeSettings
    from medlora.serve.schemas import ChatCompletionRequest as ChatRequest

    greedy = generation_args(ChatRequest(**_chat(frequency_penalty=0.5, presence_penalty=-0.25)), ServeSettings())
    sampled = generation_args(ChatRequest(**_chat(frequency_penalty=1, temperature=0.7)), ServeSettings())
    plain = generation_args(ChatRequest(**_chat()), ServeSettings())
    assert (greedy.frequency_penalty, greedy.presence_penalty, greedy.do_sample) == (0.5, -0.25, False)
    assert (sampled.frequency_penalty, sampled.do_sample) == (1, True)
    assert (plain.frequency_penalty, plain.presence_penalty) == (0.0, 0.0)
    dial = ServeSettings(urgent_threshold=0.2)  # the operator's --urgent_threshold reaches every greedy answer
    assert generation_args(ChatRequest(**_chat()), dial).urgent_threshold == 0.2 and plain.urgent_threshold == 0.0
    with pytest.raises(ConfigError, match="--urgent_threshold must be at least 0 and below 1"):
        ServeSettings(urgent_threshold=1.5)


def test_requests_without_the_key_get_401(server):
    url = server[0]
    assert_openai_error(httpx.get(f"{url}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 401)
    assert httpx.get(f"{url}/health").status_code == 200


def _chat(question: str = "hi", **fields) -> dict:
    return {"model": "tuned", "messages": [{"role": "user", "content": question}], "max_tokens": 8, **fields}


BAD_REQUESTS = {
    "prompt too long": (_chat("发烧" * 400), 400),
    "max_tokens over cap": (_chat(max_tokens=CAP + 1), 400),
    "max_tokens zero": (_chat(max_tokens=0), 400),
    "n above one": (_chat(n=2), 400),
    "frequency_penalty out of range": (_chat(frequency_penalty=2.5), 400),
    "temperature not a number": ('{"model": "tuned", "messages": [{"role": "user", "content": "hi"}], '
                                 '"temperature": NaN}', 400),
    "wrong types": ({"model": "tuned", "messages": "hi"}, 400),
    "missing messages": ({"model": "tuned"}, 400),
    "unknown model": (_chat(model="gpt-4"), 404),
    "path traversal": (_chat(model="../../etc/passwd"), 404),
    "adapter folder path": (_chat(model="/tmp"), 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_never_500(server, case):
    body, status = BAD_REQUESTS[case]
    raw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, str) else \
        {"json": body, "headers": AUTH}
    error = assert_openai_error(httpx.post(f"{server[0]}/v1/chat/completions", timeout=30, **raw), status)
    if case == "temperature not a number":
        assert "finite number" in error["message"] and "temperature" in error["message"], error


def test_bad_bodies_get_openai_errors_and_the_server_stays_up(server, client):
    url, headers = f"{server[0]}/v1/chat/completions", {**AUTH, "Content-Type": "application/json"}
    assert_openai_error(httpx.post(url, content=b'{"model": "tuned", "messages": [', headers=headers), 400)
    big = json.dumps(_chat("x" * (MAX_BODY + 10))).encode()
    assert_openai_error(httpx.post(url, content=big, headers=headers), 413)
    chunked = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: counted as it arrives
    assert_openai_error(httpx.post(url, content=chunked, headers=headers), 413)
    with pytest.raises(NotFoundError):
        ask(client, "no-such-model", "hi")
    assert ask(client, "tuned", TINY_RECORDS[3]["instruction"]).choices[0].message.content == TINY_RECORDS[3]["output"]


def test_a_dropped_stream_does_not_wedge_the_server(server, client):
    body = _chat("头痛怎么办？", max_tokens=CAP, stream=True)
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    assert ask(client, "tuned", TINY_RECORDS[2]["instruction"]).choices[0].message.content == TINY_RECORDS[2]["output"]


def test_32_requests_from_8_concurrent_clients_all_succeed_in_batches(server, client):
    before = httpx.get(f"{server[0]}/health").json()

    def one(i: int):
        record = TINY_RECORDS[i % len(TINY_RECORDS)]
        model = "base" if i % 8 == 7 else "tuned"
        settings = {"max_tokens": 16 + i % 3, "frequency_penalty": 0.5 if model == "base" else 0.0}  # rows' own
        if i % 4 == 1:  # streamed rows share the batch with the others
            chunks = ask(client, model, record["instruction"], stream=True, **settings)
            return model, record, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return model, record, ask(client, model, record["instruction"], **settings).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(32)))
    for model, record, text in results:  # batched with left padding, answers are those of a lone request
        if model == "tuned" and not record["input"]:
            assert text == record["output"]
    after = httpx.get(f"{server[0]}/health").json()
    served, calls = after["served"] - before["served"], after["generate_calls"] - before["generate_calls"]
    assert served == 32 and calls < served  # requests that arrived together shared batch loops
    assert after["queue"] == 0


def test_health_and_openapi_schema(server):
    health = httpx.get(f"{server[0]}/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny-qwen2", "tuned"]
    schema = httpx.get(f"{server[0]}/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(schema["paths"])
    assert {"ChatCompletionRequest", "ChatCompletion", "CompletionRequest", "ErrorResponse"} <= set(
        schema["components"]["schemas"])
    assert httpx.get(f"{server[0]}/docs").status_code == 200


@pytest.mark.parametrize("command", ["serve", "webui"])
def test_a_taken_or_impossible_port_is_refused_in_one_line_before_any_model_loads(command):
    """The model named cannot load: the port's message proves the address is checked first, not after a long load."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_medlora(command, "--base_model", "no/such-model", "--port", str(port), check=False)
    out_of_range = run_medlora(command, "--base_model", "no/such-model", "--port", "99999", check=False)
    for proc in (busy, out_of_range):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert busy.stderr.strip().splitlines()[-1] == (f"medlora {command}: error: cannot serve on 127.0.0.1:{port} "
                                                    f"(Address already in use); pass another --port or --host")
    assert "--port: expected a port number from 1 to 65535, got '99999'" in out_of_range.stderr


def test_bounds_below_one_are_refused_before_the_model_loads():
    proc = run_medlora("serve", "--base_model", "no/such-model", "--max_queue", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--max_queue: expected a whole number of at least 1, got '0'")


def test_an_empty_api_key_is_refused_rather_than_serving_open(monkeypatch, capsys):
    from medlora.cli import main

    for env, flags in (({}, ["--api-key", ""]), ({"MEDLORA_API_KEY": " "}, [])):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["serve", "--base_model", "no/such-model", *flags]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "medlora serve: error: --api-key (or $MEDLORA_API_KEY) is empty, which would leave the server open: "
            "give a key, or leave both unset to serve without one")


@pytest.mark.parametrize("key", ["秘密钥匙", "key-with-trailing-space ", "two words"])
def test_a_key_no_client_can_send_is_refused_at_start_up(capsys, key):
    from medlora.cli import main

    assert main(["serve", "--base_model", "no/such-model", "--api-key", key]) == 2
    assert "which no client can send in an Authorization header" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_lone_surrogate_in_a_request_is_a_400_not_a_500(server):
    for body in ('{"model": "tuned", "messages": [{"role": "user", "content": "\\ud800"}]}',
                 '{"model": "tuned", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
                 '{"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}'):
        response = httpx.post(f"{server[0]}/v1/chat/completions", content=body.encode("ascii"),
                              headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        error = assert_openai_error(response, 400)
        assert "unpaired surrogate" in error["message"], error
    response = httpx.post(f"{server[0]}/v1/completions", content=b'{"model": "tuned", "prompt": "\\ud83d"}',
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert "unpaired surrogate" in assert_openai_error(response, 400)["message"]


def test_a_temperature_too_small_to_sample_decodes_greedily_and_fails_no_other_request(client):
    """`temperature: 1e-40` once made the sampler divide by ~0: inf/nan logits failed every job of the batch. Below
    medlora.config.MIN_TEMPERATURE sampling is greedy decoding (as vLLM does), so the request is answered too."""
    record = TINY_RECORDS[0]

    def one(i: int):
        hostile = i == 5
        return hostile, ask(client, "tuned", record["instruction"], **({"temperature": 1e-40} if hostile else {}))

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(answer.choices[0].message.content == record["output"] for _, answer in results)


HOSTILE = "<hostile-row>"


def test_a_row_that_breaks_its_batch_fails_alone_and_the_others_are_answered(tiny_model, tiny_adapter, monkeypatch):
    """An exception while generating a batch once failed every request in it. Now each of its requests is answered
    again on its own, resuming where its answer had got to: the 5 plain requests (one streamed, already under way)
    get their whole answers, and only the 2 whose prompt breaks generation (a marker here) get an error."""
    import medlora.batching as batching
    from fastapi.testclient import TestClient

    from medlora.config import ModelArgs
    from medlora.loader import load
    from medlora.serve.api import create_app
    from medlora.serve.engine import Engine, ServeSettings

    widths, penalised = [], batching.penalised

    def breaks_on_the_marker(scores, rows):  # every step of every row passes here
        widths.append(len(rows))
        if any(HOSTILE in row.request.tag.request.prompt and len(row.tokens) >= 2 for row in rows):
            raise RuntimeError("a hostile row")
        return penalised(scores, rows)

    monkeypatch.setattr(batching, "penalised", breaks_on_the_marker)
    loaded = load(ModelArgs(tiny_model, "fp32"), {"tuned": str(tiny_adapter)}, merge=False)
    # Engine.load's second tokenizer (2 s) is for counting while the worker runs; here all are counted before it starts
    engine = Engine(loaded.model, loaded.tokenizer, loaded.templates, tiny_model)
    monkeypatch.setattr(engine, "start", lambda: None)  # the worker starts once all 7 are queued: one batch
    questions = [(TINY_RECORDS[i]["instruction"], i == 1) for i in range(5)] + [(HOSTILE, False), (HOSTILE, True)]
    with TestClient(create_app(engine, ServeSettings(max_tokens_cap=CAP)), raise_server_exceptions=False) as http:
        def one(question: str, stream: bool):
            return http.post("/v1/chat/completions", json=_chat(question, max_tokens=16, stream=stream))

        with ThreadPoolExecutor(max_workers=7) as pool:
            futures = [pool.submit(one, *question) for question in questions]
            deadline = time.monotonic() + 30
            while len(engine._pending) < len(questions) and time.monotonic() < deadline:
                time.sleep(0.01)
            Engine.start(engine)
            responses = [future.result(timeout=60) for future in futures]
    assert max(widths) == 7  # they shared one batch
    streamed = [json.loads(line[5:]) for line in responses[1].text.splitlines() if line.startswith("data: {")]
    assert "".join(event["choices"][0]["delta"].get("content") or "" for event in streamed if event["choices"]) \
        == TINY_RECORDS[1]["output"]
    for i in (0, 2, 3, 4):
        assert responses[i].json()["choices"][0]["message"]["content"] == TINY_RECORDS[i]["output"]
    assert "internal error (RuntimeError)" in assert_openai_error(responses[5], 500)["message"]
    last = [line for line in responses[6].text.splitlines() if line.startswith("data: ")][-2:]
    assert "internal error (RuntimeError)" in json.loads(last[0][5:])["error"]["message"] and last[1] == "data: [DONE]"


def test_a_seed_gives_the_same_sampled_answer_whatever_else_is_in_the_batch(client):
    """Rows draw their samples in turn from one random generator, so a seeded request is answered alone."""
    def one(seed):
        return ask(client, "base", "你好", max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, [7, None, 7, None, 8, None]))
    assert answers[0] == answers[2] != answers[4]


NOT_HONOURED = [("chat/completions", "n", 2), ("chat/completions", "logprobs", True),
                ("chat/completions", "top_logprobs", 3), ("completions", "logprobs", 1),
                ("completions", "echo", True), ("completions", "suffix", "。"), ("completions", "best_of", 2)]


@pytest.mark.parametrize("endpoint, field, value", NOT_HONOURED)
def test_a_field_the_server_does_not_honour_is_refused_naming_it(server, endpoint, field, value):
    body = _chat(**{field: value}) if endpoint == "chat/completions" else \
        {"model": "tuned", "prompt": "发热", "max_tokens": 2, field: value}
    error = assert_openai_error(httpx.post(f"{server[0]}/v1/{endpoint}", json=body, headers=AUTH, timeout=30), 400)
    assert error["param"] == field and error["code"] == "unsupported_value" and f"{field}=" in error["message"]


def test_those_fields_at_their_defaults_are_accepted(client):
    ask(client, "tuned", "hi", max_tokens=2, n=1, logprobs=False, top_logprobs=0, seed=1)
    client.completions.create(model="tuned", prompt="发热", max_tokens=2, n=1, logprobs=0, echo=False, suffix="",
                              best_of=1, seed=1)


def test_an_empty_or_blank_question_is_refused_by_both_endpoints(server):
    """One rule: a chat's last user message and a completion's prompt must hold more than whitespace."""
    blank_parts = [{"type": "text", "text": " "}, {"type": "text", "text": ""}]
    bodies = [("chat/completions", _chat(text)) for text in ("", " \n\t", blank_parts)] + \
        [("completions", {"model": "tuned", "prompt": prompt}) for prompt in ("", "\n ", [" "])]
    for endpoint, body in bodies:
        response = httpx.post(f"{server[0]}/v1/{endpoint}", json=body, headers=AUTH, timeout=30)
        assert assert_openai_error(response, 400)["code"] == "empty_prompt", (endpoint, body)
