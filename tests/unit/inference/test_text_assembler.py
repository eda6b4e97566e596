"""TextAssembler: incremental decoding and stop strings, with a fake byte-level tokenizer."""

from __future__ import annotations

import pytest

from openft.inference.engine import TextAssembler

# Token id -> bytes. 10/11 are the two halves of "é" (0xC3 0xA9).
VOCAB = {
    1: b"Hel",
    2: b"lo",
    3: b" wor",
    4: b"ld",
    5: b"!",
    6: b"\n",
    7: b"EN",
    8: b"D",
    9: b"x",
    10: b"\xc3",
    11: b"\xa9",
    12: b"\xff",
}


def decode(ids: list[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def run(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(decode, stop)
    deltas = [asm.add(i) for i in ids]
    if not asm.stopped:
        deltas.append(asm.finish())
    return deltas, asm


def test_plain_text_streams_token_by_token() -> None:
    deltas, asm = run([1, 2, 3, 4, 5])
    assert deltas == ["Hel", "lo", " wor", "ld", "!", ""]
    assert "".join(deltas) == asm.text == "Hello world!"
    assert not asm.stopped


def test_split_utf8_character_is_held_until_complete() -> None:
    deltas, _ = run([9, 10, 11, 9])
    assert deltas == ["x", "", "é", "x", ""]


def test_unfinished_utf8_at_the_end_is_flushed() -> None:
    deltas, _ = run([9, 10])
    assert "".join(deltas) == "x\ufffd"


def test_invalid_bytes_are_not_held_forever() -> None:
    # 0xFF never starts a valid character: after a few tokens the U+FFFDs are released anyway,
    # so a model emitting junk bytes does not make each step re-decode an ever longer tail.
    deltas, _ = run([9] + [12] * 8)
    assert "".join(deltas) == "x" + "\ufffd" * 8
    assert any("\ufffd" in d for d in deltas[:-1])


def test_stop_string_inside_one_token() -> None:
    deltas, asm = run([1, 2, 3, 4, 5], stop=("wor",))
    assert "".join(deltas) == "Hello "
    assert asm.stopped and asm.text == "Hello "


def test_stop_string_across_tokens_is_never_leaked() -> None:
    # "EN" could be the start of "END": it must be held back, then dropped.
    deltas, asm = run([1, 7, 8, 5], stop=("END",))
    assert deltas == ["Hel", "", "", ""]
    assert asm.stopped and asm.text == "Hel"


def test_held_prefix_is_released_when_it_turns_out_not_to_stop() -> None:
    deltas, asm = run([1, 7, 9], stop=("END",))
    assert deltas == ["Hel", "", "ENx", ""]
    assert not asm.stopped


def test_held_prefix_is_released_at_the_end() -> None:
    deltas, _ = run([1, 7], stop=("END",))
    assert deltas == ["Hel", "", "EN"]


def test_earliest_of_several_stops_wins() -> None:
    deltas, _ = run([1, 2, 3, 4, 6, 5], stop=("!", "ld", "\n"))
    assert "".join(deltas) == "Hello wor"


def test_stop_at_the_very_start_gives_empty_text() -> None:
    deltas, asm = run([1, 2], stop=("Hel",))
    assert deltas == ["", ""] and asm.stopped and asm.text == ""


def test_adding_after_stop_is_ignored() -> None:
    asm = TextAssembler(decode, (" w",))
    assert asm.add(1) == "Hel"
    assert asm.add(2) == "lo"
    assert asm.add(3) == "" and asm.stopped
    assert asm.add(4) == "" and asm.finish() == ""
    assert asm.text == "Hello"


def test_text_that_could_start_a_stop_is_held() -> None:
    asm = TextAssembler(decode, ("lo",))
    assert asm.add(1) == "He"  # the "l" might begin "lo"
    assert asm.add(2) == "l" and asm.stopped and asm.text == "Hel"


@pytest.mark.parametrize("stop", [(), ("o w",), ("ld!",), ("é",), ("zzz", "rl")])
def test_concatenated_deltas_equal_a_one_shot_cut(stop: tuple[str, ...]) -> None:
    ids = [1, 2, 3, 4, 5, 10, 11, 6]
    deltas, _ = run(ids, stop=stop)
    full = decode(ids)
    cuts = [full.find(s) for s in stop if s in full]
    assert "".join(deltas) == (full[: min(cuts)] if cuts else full)
