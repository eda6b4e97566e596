"""Grammars for forced tool calls and structured output, checked token by token with llguidance
on the tiny model's tokenizer: every format accepts its own rendering, a function's arguments
follow that function's schema, and features the engine cannot enforce are named in a 400."""

from __future__ import annotations

import llguidance
import pytest

from openft.errors import InvalidRequest
from openft.inference import constrain
from openft.models.tool_calls import FORMATS, ParsedCall

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
LAMP = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "blue"]}},
    "required": ["colour"],
    "additionalProperties": False,
}
TOOLS = [("get_weather", WEATHER, True), ("set_lamp", LAMP, False)]


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.tokenizer


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(
        constrain.ll_tokenizer(tokenizer, [tokenizer.eos_token_id]), grammar, log_level=0
    )
    return (
        matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        and matcher.is_accepting()
    )


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_forced_calls_follow_the_named_functions_schema(tokenizer, name: str) -> None:
    fmt = FORMATS[name]
    grammar = constrain.tool_grammar(fmt, TOOLS, parallel=True, marker_token_id=None, param="tools")
    one = ParsedCall("set_lamp", '{"colour": "red"}')
    two = ParsedCall("get_weather", '{"city": "Oslo"}')
    assert _accepts(tokenizer, grammar, fmt.render([one]))
    assert _accepts(tokenizer, grammar, fmt.render([one, two]))
    assert not _accepts(tokenizer, grammar, fmt.render([ParsedCall("set_lamp", '{"city": "Oslo"}')]))
    assert not _accepts(tokenizer, grammar, fmt.render([ParsedCall("get_weather", '{"city": "Rome"}')]))
    assert not _accepts(tokenizer, grammar, "Sure! " + fmt.render([one]))
    single = constrain.tool_grammar(fmt, TOOLS, parallel=False, marker_token_id=None, param="tools")
    assert _accepts(tokenizer, single, fmt.render([one]))
    assert not _accepts(tokenizer, single, fmt.render([one, two]))


def test_json_schema_grammar_and_unsupported_features(tokenizer) -> None:
    grammar = constrain.json_grammar(WEATHER, strict=True, param="response_format")
    assert _accepts(tokenizer, grammar, '{"city": "Paris"}')
    assert not _accepts(tokenizer, grammar, '{"city": "Rome"}')
    bad = {"type": "object", "properties": {"a": {"type": "string"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(InvalidRequest) as info:
        constrain.json_grammar(bad, strict=True, param="response_format.json_schema.schema")
    assert (
        info.value.param == "response_format.json_schema.schema" and "dependentSchemas" in info.value.message
    )
    # Not strict: the keyword is skipped, the reply is still an object of the right shape.
    lenient = constrain.json_grammar(bad, strict=False, param="response_format")
    assert _accepts(tokenizer, lenient, '{"a": "x"}')
