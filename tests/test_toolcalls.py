"""Gemma 4's tool-call dialect (parse_call), the token router that splits thought, content and
calls (the same result however the tokens arrive), and generate(json_schema=...)."""

from __future__ import annotations

import json

import pytest

from gemma4_mlx.toolcalls import Router, ToolCallError, format_value, parse_call

Q = '<|"|>'


@pytest.mark.parametrize(
    "text, expected",
    [
        (f'call:say{{text:{Q}he said "hi", ok: yes{Q}}}', {"text": 'he said "hi", ok: yes'}),
        (f'call:run{{code:{Q}x = {{"a": 1}} \\n{Q}}}', {"code": 'x = {"a": 1} \\n'}),
        (
            f"call:f{{a:1,b:-2.5e3,c:true,d:null,e:[1,{Q}x{Q},[false]],o:{{k:{{z:{Q}}}{Q}}}}}}}",
            {
                "a": 1,
                "b": -2500.0,
                "c": True,
                "d": None,
                "e": [1, "x", [False]],
                "o": {"k": {"z": "}"}},
            },
        ),
        ('call:get_weather{"city": "Paris", "days": 2}', {"city": "Paris", "days": 2}),
        ("call:noargs{}", {}),
    ],
)
def test_parse_call_reads_the_dialect(text, expected):
    call = parse_call(text)
    assert call["arguments"] == expected


@pytest.mark.parametrize(
    "text",
    [f"call:f{{a:{Q}open}}", "call:f{a:}", "call:f{a:1", "call:{a:1}", "f{a:1}", "call:f{a:1}x"],
)
def test_parse_call_refuses_broken_calls(text):
    with pytest.raises(ToolCallError):
        parse_call(text)


def test_format_value_round_trips_through_parse_call():
    args = {"b": [1, 2.5, None], "a": {"q": 'say "x" {y}'}, "c": False}
    assert parse_call("call:f" + format_value(args))["arguments"] == args


@pytest.fixture(scope="module")
def tokenizer(tool_chat_model):
    from gemma4_mlx.loading import load_tokenizer

    return load_tokenizer(tool_chat_model)


def route(tokenizer, ids, stop=None, chunks=1):
    router = Router(tokenizer, stop)
    out = []
    for token in ids:
        out += router.feed(token)
    out += router.finish()
    return out


def merged(deltas):
    """Deltas with consecutive text of one kind joined: what a client assembles."""
    out = []
    for d in deltas:
        if out and d.kind == out[-1][0] and d.kind in ("content", "reasoning"):
            out[-1] = (d.kind, out[-1][1] + d.text)
        else:
            out.append((d.kind, d.text if d.call is None else json.dumps(d.call)))
    return out


def test_router_splits_thought_content_and_several_calls(tokenizer):
    tok = tokenizer._tokenizer
    text = (
        "<|channel>thought\nlet me think<channel|>the answer"
        f"<|tool_call>call:get_weather{{city:{Q}paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_time{{zone:{Q}utc{Q},n:[1,2]}}<tool_call|>"
    )
    ids = tok.encode(text, add_special_tokens=False)
    got = merged(route(tokenizer, ids))
    assert got == [
        ("reasoning", "let me think"),
        ("content", "the answer"),
        ("tool_call", json.dumps({"name": "get_weather", "arguments": {"city": "paris"}})),
        ("tool_call", json.dumps({"name": "get_time", "arguments": {"zone": "utc", "n": [1, 2]}})),
    ]


def test_router_recovers_a_call_right_after_the_channel(tokenizer):
    ids = tokenizer._tokenizer.encode(
        f"<|channel>thought\nhm<channel|>call:get_time{{zone:{Q}cet{Q}}}<tool_call|>",
        add_special_tokens=False,
    )
    kinds = [(d.kind, d.call) for d in route(tokenizer, ids) if d.kind != "reasoning"]
    assert kinds == [("tool_call", {"name": "get_time", "arguments": {"zone": "cet"}})]


def test_router_reports_an_unparseable_call_instead_of_markup(tokenizer):
    ids = tokenizer._tokenizer.encode("<|tool_call>call:f{a:<tool_call|>", add_special_tokens=False)
    deltas = route(tokenizer, ids)
    assert [d.kind for d in deltas] == ["tool_error"]


def test_router_never_leaks_a_partial_stop_string(tokenizer):
    ids = tokenizer._tokenizer.encode("hello world, the quick brown fox", add_special_tokens=False)
    deltas = route(tokenizer, ids, stop=["quick"])
    text = "".join(d.text for d in deltas)
    assert text == "hello world, the "
    for d in deltas:  # no delta ends with a prefix of the stop string that was later cut
        assert "qu" not in d.text


def test_generate_with_json_schema_gives_valid_json(tool_chat_model):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from gemma4_mlx import SamplingOptions, generate
    from gemma4_mlx.loading import load

    model, tokenizer = load(tool_chat_model)
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    for seed in range(3):
        result = generate(
            model,
            tokenizer,
            "the quick brown fox",
            max_tokens=40,
            sampling=SamplingOptions(temp=0.8, seed=seed),
            json_schema=schema,
        )
        jsonschema.validate(json.loads(result.text), schema)


def test_cli_generate_json_schema(tool_chat_model, tmp_path, capsys):
    pytest.importorskip("llguidance")
    from gemma4_mlx.cli import main

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    schema["additionalProperties"] = False  # a random model must be able to finish
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    args = ["generate", "-m", str(tool_chat_model), "-p", "hello", "--max-tokens", "20"]
    main(args + ["--json-schema", str(path), "--json", "--temp", "0.7", "--seed", "1"])
    result = json.loads(capsys.readouterr().out)
    assert isinstance(json.loads(result["text"])["ok"], bool)
    path.write_text('{"type": "strin"}')
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--json-schema", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --json-schema cannot be enforced")
