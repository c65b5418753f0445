"""The server's bad-input matrix and safety defaults: every case gets its documented status and
an OpenAI-shaped error object, the server stays alive (/health 200) after each, disconnects
cancel generation, and a dead worker turns /health to 503."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

pytest.importorskip("llguidance")

from serving import start  # noqa: E402

from gemma4_mlx.errors import BadArgument  # noqa: E402
from gemma4_mlx.server import Server, ServerConfig  # noqa: E402

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hello"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server(tool_chat_model):
    srv = start(
        tool_chat_model,
        max_messages=8,
        max_tools=2,
        max_tokens_cap=512,
        max_body_bytes=1 << 16,
        max_schema_bytes=2048,
        cors_origins=["http://localhost:3000"],
    )
    yield srv
    srv.close()


def request(server, method, path, body=None, headers=None, raw=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(
        method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response, payload


def chat(**fields):
    return {"model": "tiny", "messages": OK_MESSAGES, "max_tokens": 4, **fields}


def deep(n):
    return "[" * n + "]" * n


# (name, method, path, body (dict, or bytes sent raw), extra headers, status, error code or param)
CASES = [
    ("invalid json", "POST", CHAT, b'{"messages": [', {}, 400, "invalid_json"),
    ("not json at all", "POST", CHAT, b"hello", {}, 400, "invalid_json"),
    ("invalid utf-8", "POST", CHAT, b'{"messages": "\xff\xfe"}', {}, 400, "invalid_utf8"),
    ("body is a list", "POST", CHAT, b"[1, 2]", {}, 400, "invalid_json"),
    ("body is a string", "POST", CHAT, b'"hi"', {}, 400, "invalid_json"),
    ("nested too deeply", "POST", CHAT, deep(20000).encode(), {}, 400, "invalid_json"),
    ("unknown path", "GET", "/v1/nothing", None, {}, 404, "not_found"),
    ("embeddings", "POST", "/v1/embeddings", {"input": "x"}, {}, 404, "not_found"),
    ("GET on chat", "GET", CHAT, None, {}, 405, "method_not_allowed"),
    ("DELETE on models", "DELETE", "/v1/models", None, {}, 405, "method_not_allowed"),
    ("unknown model card", "GET", "/v1/models/other", None, {}, 404, "model_not_found"),
    ("messages missing", "POST", CHAT, {"model": "x"}, {}, 400, "messages"),
    ("messages empty", "POST", CHAT, chat(messages=[]), {}, 400, "messages"),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), {}, 400, "messages"),
    ("message not an object", "POST", CHAT, chat(messages=["hi"]), {}, 400, "messages[0]"),
    (
        "bad role",
        "POST",
        CHAT,
        chat(messages=[{"role": "bot", "content": "x"}]),
        {},
        400,
        "messages[0].role",
    ),
    (
        "system not first",
        "POST",
        CHAT,
        chat(messages=OK_MESSAGES + [{"role": "system", "content": "x"}]),
        {},
        400,
        "messages[1]",
    ),
    (
        "image part",
        "POST",
        CHAT,
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        {},
        400,
        "unsupported_parameter",
    ),
    ("too many messages", "POST", CHAT, chat(messages=OK_MESSAGES * 9), {}, 400, "messages"),
    ("n = 2", "POST", CHAT, chat(n=2), {}, 400, "unsupported_parameter"),
    ("audio field", "POST", CHAT, chat(audio={"voice": "x"}), {}, 400, "unsupported_parameter"),
    ("unknown field", "POST", CHAT, chat(frobnicate=1), {}, 400, "unsupported_parameter"),
    ("logprobs on", "POST", CHAT, chat(logprobs=True), {}, 400, "unsupported_parameter"),
    ("penalty set", "POST", CHAT, chat(presence_penalty=0.5), {}, 400, "unsupported_parameter"),
    ("temperature a string", "POST", CHAT, chat(temperature="hot"), {}, 400, "temperature"),
    ("temperature too high", "POST", CHAT, chat(temperature=5), {}, 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), {}, 400, "top_p"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens a float", "POST", CHAT, chat(max_tokens=2.5), {}, 400, "max_tokens"),
    ("max_tokens over the cap", "POST", CHAT, chat(max_tokens=1000), {}, 400, "max_tokens"),
    (
        "max_tokens disagree",
        "POST",
        CHAT,
        chat(max_tokens=4, max_completion_tokens=5),
        {},
        400,
        "max_completion_tokens",
    ),
    (
        "context exceeded",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "fox " * 600}], max_tokens=500),
        {},
        400,
        "context_length_exceeded",
    ),
    ("stop not strings", "POST", CHAT, chat(stop=[1, 2]), {}, 400, "stop"),
    (
        "stream_options without stream",
        "POST",
        CHAT,
        chat(stream_options={"include_usage": True}),
        {},
        400,
        "stream_options",
    ),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), {}, 400, "stream"),
    (
        "response_format xml",
        "POST",
        CHAT,
        chat(response_format={"type": "xml"}),
        {},
        400,
        "response_format",
    ),
    (
        "invalid schema",
        "POST",
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strin"}},
            }
        ),
        {},
        400,
        "response_format",
    ),
    (
        "schema too large",
        "POST",
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"description": "x" * 4000}},
            }
        ),
        {},
        400,
        "response_format",
    ),
    ("required without tools", "POST", CHAT, chat(tool_choice="required"), {}, 400, "tool_choice"),
    (
        "named tool not declared",
        "POST",
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        {},
        400,
        "tool_choice",
    ),
    ("tools not a list", "POST", CHAT, chat(tools={"a": 1}), {}, 400, "tools"),
    ("too many tools", "POST", CHAT, chat(tools=[TOOL] * 3), {}, 400, "tools"),
    (
        "bad tool name",
        "POST",
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
        {},
        400,
        "tools[0].function.name",
    ),
    (
        "replayed arguments not JSON",
        "POST",
        CHAT,
        chat(
            messages=OK_MESSAGES
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                }
            ]
        ),
        {},
        400,
        "messages[1].tool_calls[0]",
    ),
    (
        "tool result for no call",
        "POST",
        CHAT,
        chat(messages=OK_MESSAGES + [{"role": "tool", "tool_call_id": "zz", "content": "x"}]),
        {},
        400,
        "messages[1].tool_call_id",
    ),
    (
        "thinking switches disagree",
        "POST",
        CHAT,
        chat(think=True, reasoning_effort="none"),
        {},
        400,
        "reasoning_effort",
    ),
    (
        "unknown template kwarg",
        "POST",
        CHAT,
        chat(chat_template_kwargs={"foo": 1}),
        {},
        400,
        "unsupported_parameter",
    ),
    (
        "completion token out of vocab",
        "POST",
        "/v1/completions",
        {"prompt": [1, 99999], "max_tokens": 2},
        {},
        400,
        "prompt",
    ),
    (
        "completion prompt empty",
        "POST",
        "/v1/completions",
        {"prompt": "", "max_tokens": 2},
        {},
        400,
        "prompt",
    ),
    ("body too large", "POST", CHAT, b"{" + b" " * 70000 + b"}", {}, 413, "body_too_large"),
    (
        "foreign Host header",
        "GET",
        "/v1/models",
        None,
        {"Host": "evil.example"},
        403,
        "forbidden_host",
    ),
    (
        "foreign CORS preflight",
        "OPTIONS",
        CHAT,
        None,
        {"Origin": "https://evil.example"},
        403,
        "cors_forbidden",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_matrix(server, case):
    name, method, path, body, headers, status, expect = case
    raw = body if isinstance(body, bytes) else None
    response, payload = request(server, method, path, None if raw else body, headers, raw)
    assert response.status == status, payload
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert expect in (error["code"], error["param"]), error
    assert response.getheader("Access-Control-Allow-Origin") is None
    health, _ = request(server, "GET", "/health")
    assert health.status == 200


def test_missing_content_length_is_411(server):
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):  # the server closes after the error
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 411") and '"error"' in reply
    assert request(server, "GET", "/health")[0].status == 200


def test_listed_cors_origin_gets_headers_and_others_none(server):
    ok, _ = request(server, "OPTIONS", CHAT, headers={"Origin": "http://localhost:3000"})
    assert ok.status == 204
    assert ok.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    plain, _ = request(server, "GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert plain.status == 200 and plain.getheader("Access-Control-Allow-Origin") is None


def test_unsafe_bind_refused_without_a_key():
    with pytest.raises(BadArgument, match="api-key"):
        Server(ServerConfig(host="0.0.0.0", port=0))
    with pytest.raises(BadArgument, match="origin"):
        Server(ServerConfig(port=0, cors_origins=["*"]))


def test_api_key_is_required_when_set(tool_chat_model):
    srv = Server(ServerConfig(port=0, api_key="sekret"))
    try:
        response, payload = request(srv, "GET", "/v1/models")
        assert response.status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"
        loading, _ = request(srv, "GET", "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert loading.status == 503  # no model attached yet: loading
        assert request(srv, "GET", "/health")[0].status == 503
    finally:
        srv.close()


def _engine(server):
    return server.state.api.engine


def _wait_idle(engine, cancelled_before, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if engine.cancelled > cancelled_before and engine.busy_since is None:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_generation(server, stream):
    engine = _engine(server)
    before, stops = engine.cancelled, engine.stop_ids
    engine.stop_ids = set()  # no stop token: only the disconnect can end this generation
    try:
        body = json.dumps(chat(max_tokens=500, stream=stream, temperature=1.0)).encode()
        host, port = server.httpd.server_address[:2]
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:
            s.recv(200)  # a malformed SSE consumer: reads a little, then goes away
        else:
            time.sleep(0.3)
        s.close()
        assert _wait_idle(engine, before), "generation outlived its client"
    finally:
        engine.stop_ids = stops
    assert request(server, "GET", "/health")[0].status == 200


def test_disconnect_during_prefill_cancels(server):
    engine = _engine(server)
    before, step = engine.cancelled, engine.prefill_step
    engine.prefill_step = 4  # many small chunks: the disconnect lands inside the prefill
    try:
        body = json.dumps(
            chat(
                messages=[{"role": "user", "content": "brown fox " * 200}],
                max_tokens=2,
                stream=True,
            )
        ).encode()
        host, port = server.httpd.server_address[:2]
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert s.recv(100).startswith(b"HTTP/1.1 200")  # headers and a keepalive come first
        s.close()
        assert _wait_idle(engine, before, seconds=5.0)
    finally:
        engine.prefill_step = step
    assert request(server, "GET", "/health")[0].status == 200


def test_a_failing_request_fails_alone(server):
    engine = _engine(server)
    original = engine.model

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Metal failure")

    engine.model = broken
    try:
        response, payload = request(server, "POST", CHAT, chat())
    finally:
        engine.model = original
    assert response.status == 500 and json.loads(payload)["error"]["type"] == "server_error"
    response, _ = request(server, "POST", CHAT, chat())
    assert response.status == 200


def test_full_queue_answers_429(tool_chat_model):
    srv = start(tool_chat_model, max_queue=1)
    try:
        engine = _engine(srv)
        import threading

        gate = threading.Event()
        original = engine.run
        engine.run = lambda job: (gate.wait(10), original(job))[1]  # hold the worker
        from gemma4_mlx.engine.worker import Job

        engine.submit(Job(prompt=[2, 5], max_tokens=1))  # taken by the worker, which waits
        time.sleep(0.2)
        engine.submit(Job(prompt=[2, 5], max_tokens=1))  # fills the queue
        response, payload = request(srv, "POST", CHAT, chat())
        assert response.status == 429 and response.getheader("Retry-After")
        gate.set()
    finally:
        srv.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_worker_turns_health_503(tool_chat_model):
    srv = start(tool_chat_model)
    try:
        engine = _engine(srv)
        assert request(srv, "GET", "/health")[0].status == 200

        def die(job):
            raise SystemExit  # not an Exception: the worker thread ends

        engine.run = die
        from gemma4_mlx.engine.worker import Job

        engine.submit(Job(prompt=[2, 5], max_tokens=1))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and request(srv, "GET", "/health")[0].status == 200:
            time.sleep(0.1)
        response, payload = request(srv, "GET", "/health")
        assert response.status == 503 and json.loads(payload)["error"]["code"] == "worker_dead"
    finally:
        srv.close()


def test_cli_serve_refuses_an_open_bind_without_a_key(capsys):
    from gemma4_mlx.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "-m", "no-such-model", "--host", "0.0.0.0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api-key" in err[0] and err[0].startswith("error: --host")


def test_a_kv_cache_that_would_not_fit_is_refused_before_prefill(server):
    info = server.state.api.info
    per_token = info["kv_bytes_per_token"]
    info["kv_bytes_per_token"] = 1 << 40  # pretend each token needs a TiB
    try:
        response, payload = request(server, "POST", CHAT, chat())
    finally:
        info["kv_bytes_per_token"] = per_token
    assert response.status == 400
    assert json.loads(payload)["error"]["code"] == "insufficient_memory"
