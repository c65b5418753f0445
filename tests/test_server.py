"""`gemma4-mlx serve` driven by the real `openai` client on loopback, on a tiny model.

The tiny model's weights are random, so its text is gibberish; what these tests check is the
protocol: streaming equals non-streaming, constraints hold on every sample, tool calls parse,
the prompt cache is reused and reuse does not change greedy output.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from serving import start  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["paris", "tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "hot": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {
                "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                "tag": {"type": "string", "maxLength": 3},
            },
            "required": ["lat", "tag"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "days", "hot", "where"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["paris", "tokyo"]},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
            "required": ["zone"],
        },
    },
}
USER = [{"role": "user", "content": "hello world, the quick brown fox"}]


@pytest.fixture(scope="module")
def server(tool_chat_model):
    srv = start(tool_chat_model)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def collect_stream(stream):
    """(content, reasoning, tool calls by index, finish_reason, usage) from a chunk stream."""
    content, reasoning, calls, finish, usage = [], [], {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            assert not (delta.content and getattr(delta, "reasoning_content", None))
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), calls, finish, usage


def test_streaming_equals_non_streaming_text(client):
    args = dict(model="anything", messages=USER, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**args)
    content, _, _, finish, usage = collect_stream(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert whole.model == "tiny"  # the `model` field names nothing to load
    assert content == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason in ("stop", "length")
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_endpoint_streams_the_same_text(client):
    whole = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=16)
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="the quick brown", max_tokens=16, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == whole.choices[0].text
    assert whole.usage.completion_tokens >= 1


def test_models_list_and_card(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = client.models.retrieve("tiny")
    assert card.context_length == 1024 and card.kv_cache == "exact"
    assert "tool_use" in card.capabilities and "json_schema" in card.capabilities


def test_bad_request_maps_to_openai_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, n=2)
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "n"
    assert "n must be 1" in info.value.message


def test_stop_string_is_never_leaked(client):
    whole = client.chat.completions.create(model="t", messages=USER, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    if len(text) < 6:
        pytest.skip("the tiny model stopped too early to pick a stop string")
    stop = text[3:6]
    cut = text[: text.find(stop)]
    stopped = client.chat.completions.create(
        model="t", messages=USER, max_tokens=24, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    content, *_ = collect_stream(
        client.chat.completions.create(
            model="t", messages=USER, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert content == cut


def test_json_schema_answers_all_validate(client):
    """50 sampled answers at temperature 0.7 all validate against the schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    for seed in range(50):
        r = client.chat.completions.create(
            model="t", messages=USER, max_tokens=80, temperature=0.7, seed=seed, response_format=fmt
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_parse_with_nested_pydantic_model(client):
    pydantic = pytest.importorskip("pydantic")

    class Where(pydantic.BaseModel):  # bounded fields: a random model must be able to finish
        lat: int = pydantic.Field(ge=-90, le=90)
        ok: bool

    class Answer(pydantic.BaseModel):
        count: int = pydantic.Field(ge=0, le=9)
        where: Where
        tags: list[bool] = pydantic.Field(max_length=3)

    r = client.chat.completions.parse(
        model="t", messages=USER, max_tokens=120, temperature=0.7, seed=1, response_format=Answer
    )
    assert isinstance(r.choices[0].message.parsed, Answer)


def test_json_object_cut_by_max_tokens_says_length(client):
    r = client.chat.completions.create(
        model="t",
        messages=USER,
        max_tokens=3,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "required": ["a"],
                },
            },
        },
    )
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_are_valid(client, choice):
    tool_choice = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(10):
        r = client.chat.completions.create(
            model="t",
            messages=USER,
            tools=[WEATHER, TIME],
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=60,
            temperature=0.7,
            seed=seed,
        )
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(message.tool_calls) == 1
        call = message.tool_calls[0].function
        if choice == "named":
            assert call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_tool_choice_none_makes_no_call(client):
    for seed in range(5):
        r = client.chat.completions.create(
            model="t",
            messages=USER,
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=20,
            temperature=1.0,
            seed=seed,
        )
        assert not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_equal_non_streamed(client):
    args = dict(
        model="t",
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=80,
        temperature=0.7,
        seed=3,
    )
    whole = client.chat.completions.create(**args)
    _, _, calls, finish, _ = collect_stream(client.chat.completions.create(**args, stream=True))
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.choices[0].message.tool_calls or []
    ]
    assert [calls[i] for i in sorted(calls)] == expected
    assert finish == whole.choices[0].finish_reason


def test_tool_cycle_replays_history(client):
    """A tool result replayed in the conversation renders and is answered."""
    messages = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model="t", messages=messages, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


SYSTEM = "the quick brown fox jumps over the lazy dog. " * 8


def _turns(client, max_tokens=12):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello world"}]
    r1 = client.chat.completions.create(
        model="t", messages=first, max_tokens=max_tokens, temperature=0
    )
    # The replayed answer differs from the generated one (as when a template strips thoughts).
    second = first + [
        {"role": "assistant", "content": "tokyo answer"},
        {"role": "user", "content": "and paris?"},
    ]
    r2 = client.chat.completions.create(
        model="t", messages=second, max_tokens=max_tokens, temperature=0
    )
    return r1, r2, second


@pytest.mark.parametrize("policy", ["exact", "turboquant"])
def test_second_turn_reuses_the_prompt_and_matches_a_cold_run(tool_chat_model, policy):
    warm = start(tool_chat_model, kv_policy=policy)
    try:
        c = openai.OpenAI(base_url=warm.url + "/v1", api_key="x", max_retries=0)
        r1, r2, second = _turns(c)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        print(f"{policy}: turn 1 prompt {r1.usage.prompt_tokens}, turn 2 cached {cached}")
        assert cached >= r1.usage.prompt_tokens - 1
        # A new conversation with the same system prompt reuses the system checkpoint.
        other = c.chat.completions.create(
            model="t",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "paris"}],
            max_tokens=4,
        )
        assert other.usage.prompt_tokens_details.cached_tokens >= len(SYSTEM.split())
    finally:
        warm.close()
    cold = start(tool_chat_model, kv_policy=policy)
    try:
        c = openai.OpenAI(base_url=cold.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="t", messages=second, max_tokens=12, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        assert r.choices[0].message.content == r2.choices[0].message.content
    finally:
        cold.close()


def canned(server, text):
    """Make the worker 'generate' ``text`` (as tokens) instead of sampling: protocol tests of
    outputs a random tiny model would never write."""
    from gemma4_mlx.engine.worker import Outcome

    engine = server.state.api.engine
    ids = engine.tokenizer._tokenizer.encode(text, add_special_tokens=False)

    def run(job):
        for token in ids:
            job.events.put(("token", token))
        return Outcome("stop", len(job.prompt), 0, len(ids) + 1, 0.0, 0.0, "miss")

    engine.run = run


@pytest.fixture
def canned_server(tool_chat_model):
    srv = start(tool_chat_model)
    yield srv
    srv.close()


def test_thought_goes_to_reasoning_fields_never_content(canned_server):
    canned(canned_server, "<|channel>thought\nweigh it up<channel|>the answer")
    c = openai.OpenAI(base_url=canned_server.url + "/v1", api_key="x", max_retries=0)
    args = dict(model="t", messages=USER, reasoning_effort="high", max_tokens=50)
    r = c.chat.completions.create(**args)
    message = r.choices[0].message.model_dump()
    assert message["content"] == "the answer"
    assert message["reasoning_content"] == message["reasoning"] == "weigh it up"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    content, reasoning, _, finish, _ = collect_stream(
        c.chat.completions.create(**args, stream=True)  # collect_stream: never both in a delta
    )
    assert (content, reasoning, finish) == ("the answer", "weigh it up", "stop")


def test_tool_calls_after_thought_stream_like_whole(canned_server):
    q = '<|"|>'
    canned(
        canned_server,
        f'<|channel>thought\nx<channel|>call:get_weather{{city:{q}pa"ris{q}}}<tool_call|>'
        f"<|tool_call>call:get_time{{zone:{q}utc{q}}}<tool_call|>",
    )
    c = openai.OpenAI(base_url=canned_server.url + "/v1", api_key="x", max_retries=0)
    args = dict(model="t", messages=USER, tools=[WEATHER, TIME], max_tokens=50)
    r = c.chat.completions.create(**args)
    calls = [
        (t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls
    ]
    assert calls == [("get_weather", {"city": 'pa"ris'}), ("get_time", {"zone": "utc"})]
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    _, _, streamed, finish, _ = collect_stream(c.chat.completions.create(**args, stream=True))
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(streamed.items())] == calls
    assert finish == "tool_calls"


def test_unparseable_tool_call_is_an_error_not_markup(canned_server):
    canned(canned_server, "<|tool_call>call:get_time{zone:<tool_call|>")
    c = openai.OpenAI(base_url=canned_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="t", messages=USER, tools=[TIME], max_tokens=50)
    assert info.value.code == "tool_call_parse_error"


def test_thinking_switches_are_one_switch(client):
    """enable_thinking, reasoning_effort and think all turn the template's thinking mode on
    (the prompt gains the <|think|> marker); none/minimal and false leave it off."""

    def prompt_tokens(**switch):
        r = client.chat.completions.create(model="t", messages=USER, max_tokens=1, **switch)
        return r.usage.prompt_tokens

    off = prompt_tokens()
    on = [
        prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}),
        prompt_tokens(reasoning_effort="high"),
        prompt_tokens(extra_body={"think": True}),
    ]
    assert all(n > off for n in on) and len(set(on)) == 1
    assert prompt_tokens(reasoning_effort="minimal") == off
    assert prompt_tokens(extra_body={"think": False}) == off


def test_demo_model_serves_completions_and_schema_answers(demo_cache):
    """The real demo weights (Gemma 3 270M, a base model) behind the server: raw completions,
    and chat through the minimal Gemma 4 turn template with JSON-schema answers that validate."""
    from gemma4_mlx.demo import ensure_demo_model
    from gemma4_mlx.loading import load
    from gemma4_mlx.server import Server, ServerConfig
    from gemma4_mlx.tokenizer import GEMMA4_TEMPLATE

    model_dir = ensure_demo_model(demo_cache)
    model, tokenizer = load(model_dir)
    srv = Server(ServerConfig(port=0, model_id="demo"))
    try:
        srv.attach(model, tokenizer, model_dir, chat_template=GEMMA4_TEMPLATE)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        text = c.completions.create(model="demo", prompt="The GNU General Public", max_tokens=6)
        assert text.choices[0].text and text.usage.completion_tokens >= 1
        schema = {
            "type": "object",
            "properties": {
                "license": {"type": "string", "maxLength": 12},
                "free": {"type": "boolean"},
            },
            "required": ["license", "free"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        for seed in range(3):
            r = c.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": "Is the GPL a free license?"}],
                max_tokens=40,
                temperature=0.7,
                seed=seed,
                response_format=fmt,
            )
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    finally:
        srv.close()
