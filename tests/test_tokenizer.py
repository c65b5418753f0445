"""Chat prompts, thinking/answer separation and Gemma 4 tool-call parsing."""

from gemma4_mlx.tokenizer import parse_output


def test_thinking_is_separated_from_the_answer():
    out = parse_output("<|channel>thought\nThe user wants a number.<channel|>The answer is 4.")
    assert out.thinking == "The user wants a number."
    assert out.text == "The answer is 4."
    assert out.tool_calls == []


def test_unfinished_thought_is_still_thinking():
    out = parse_output("<|channel>thought\nstill going")
    assert out.thinking == "still going" and out.text == ""


def test_tool_calls_are_parsed_to_json():
    text = (
        'Let me check.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
        '<|tool_call>call:search{"q": "mlx"}<tool_call|>'
    )
    out = parse_output(text)
    assert out.text == "Let me check."
    assert out.tool_calls == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
        {"name": "search", "arguments": {"q": "mlx"}},
    ]


def test_unparseable_tool_arguments_are_kept_raw():
    out = parse_output("<|tool_call>call:f{not json at all}<tool_call|>")
    assert out.tool_calls == [{"name": "f", "arguments": {"_raw": "{not json at all}"}}]


def test_turn_markers_are_stripped_from_the_answer():
    assert parse_output("Hello there<turn|>").text == "Hello there"
