"""Grammars for forced tool calls and structured output, checked token by token with llguidance
on the tiny model's tokenizer: every format accepts its own rendering, a function's arguments
follow that function's schema, and features the engine cannot enforce are named in a 400."""

from __future__ import annotations

import llguidance
import pytest
from transformers import AutoTokenizer

from openft.errors import InvalidRequest
from openft.inference import constrain
from openft.models.tiny_text import ensure_tiny_text
from openft.models.tool_calls import FORMATS, ParsedCall
from tests.conftest import model_cache

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


def _tokens(tokenizer) -> dict[str, tuple[int, bool]]:
    special = set(tokenizer.all_special_ids)
    return {t: (i, i in special) for t, i in tokenizer.get_added_vocab().items()}


JSON_FORMATS = sorted(f for f in FORMATS if f != "pythonic")


@pytest.mark.parametrize("name", JSON_FORMATS)
def test_forced_calls_follow_the_named_functions_schema(tokenizer, name: str) -> None:
    fmt = FORMATS[name]
    grammar = constrain.tool_grammar(fmt, TOOLS, parallel=True, tokens=_tokens(tokenizer), param="tools")
    one = ParsedCall("set_lamp", '{"colour": "red"}')
    two = ParsedCall("get_weather", '{"city": "Oslo"}')
    assert _accepts(tokenizer, grammar, fmt.render([one]))
    assert _accepts(tokenizer, grammar, fmt.render([one, two]))
    assert not _accepts(tokenizer, grammar, fmt.render([ParsedCall("set_lamp", '{"city": "Oslo"}')]))
    assert not _accepts(tokenizer, grammar, fmt.render([ParsedCall("get_weather", '{"city": "Rome"}')]))
    assert not _accepts(tokenizer, grammar, "Sure! " + fmt.render([one]))
    single = constrain.tool_grammar(fmt, TOOLS, parallel=False, tokens=_tokens(tokenizer), param="tools")
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


def test_the_format_s_added_tokens_are_allowed_as_the_fine_tuned_model_writes_them() -> None:
    # Qwen's <tool_call> is one added token: a model fine-tuned on the template writes that token,
    # so the grammar must allow it (not only the same text spelled in pieces).
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_text("chatml", model_cache() / "text"))
    fmt = FORMATS["hermes"]
    grammar = constrain.tool_grammar(fmt, TOOLS, parallel=True, tokens=_tokens(tokenizer), param="tools")
    ids = tokenizer(fmt.render([ParsedCall("set_lamp", '{"colour": "red"}')]), add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids["input_ids"]
    matcher = llguidance.LLMatcher(
        constrain.ll_tokenizer(tokenizer, [tokenizer.eos_token_id]), grammar, log_level=0
    )
    assert matcher.consume_tokens(ids["input_ids"]) and matcher.is_accepting()


@pytest.mark.parametrize("name", JSON_FORMATS)
def test_auto_with_strict_tools_allows_text_or_calls_that_follow_the_schema(tokenizer, name: str) -> None:
    fmt = FORMATS[name]
    grammar = constrain.tool_grammar(
        fmt, TOOLS, parallel=True, tokens=_tokens(tokenizer), lazy=True, param="tools"
    )
    good = fmt.render([ParsedCall("get_weather", '{"city": "Oslo"}')])
    assert _accepts(tokenizer, grammar, "It is sunny today.")
    assert _accepts(tokenizer, grammar, good)
    assert not _accepts(tokenizer, grammar, fmt.render([ParsedCall("get_weather", '{"city": "Rome"}')]))
    if fmt.marker:  # text, then a call; the marker never appears in text outside a valid call
        assert _accepts(tokenizer, grammar, "Let me check. " + good)
        assert not _accepts(tokenizer, grammar, "Let me check. " + fmt.marker + " nothing")
    if not fmt.marker:  # a bare JSON call and JSON content could not be told apart: refused
        with pytest.raises(InvalidRequest):
            constrain.tool_grammar(
                fmt, TOOLS, parallel=True, tokens={}, lazy=True, content_schema=LAMP, param="t"
            )
        return
    with_json = constrain.tool_grammar(
        fmt, TOOLS, parallel=True, tokens=_tokens(tokenizer), lazy=True, content_schema=LAMP, param="tools"
    )
    assert _accepts(tokenizer, with_json, '{"colour": "blue"}') and _accepts(tokenizer, with_json, good)
    assert not _accepts(tokenizer, with_json, "It is sunny today.")


def test_pythonic_calls_cannot_be_forced_and_say_so(tokenizer) -> None:
    with pytest.raises(InvalidRequest) as info:
        constrain.tool_grammar(FORMATS["pythonic"], TOOLS, parallel=True, tokens={}, param="tools")
    assert info.value.param == "tool_choice" and "pythonic" in info.value.message
