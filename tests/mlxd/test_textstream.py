"""TextStream: incremental decoding and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtok.chat_tokens import ChatTokenizer
from mlxd.textstream import TextStream


@pytest.fixture(scope="module")
def ct(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_dir(tiny_model_dir)


def _run(ct: ChatTokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(ct.decode, stop)
    deltas = [stream.push(t) for t in ct.encode_prompt(text, False)]
    deltas.append(stream.flush())
    return deltas, stream


def test_deltas_rebuild_the_text_and_never_split_characters(ct: ChatTokenizer) -> None:
    text = "naïve café: 漢字 and 🙂 emoji"
    deltas, stream = _run(ct, text, [])
    assert "".join(deltas) == text == stream.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_the_text_even_across_tokens(ct: ChatTokenizer) -> None:
    deltas, stream = _run(ct, "the answer is STOPHERE and more", ["OPHE"])
    assert stream.stopped
    assert "".join(deltas) == "the answer is ST"


def test_partial_stop_prefix_is_held_then_released(ct: ChatTokenizer) -> None:
    deltas, stream = _run(ct, "abc END? no, ENDING is fine", ["END!"])
    assert not stream.stopped
    assert "".join(deltas) == "abc END? no, ENDING is fine"


def test_invalid_utf8_at_the_end_is_flushed_as_replacement(ct: ChatTokenizer) -> None:
    lone = ct.encode_prompt("é", False)
    assert len(lone) == 2, "é should be two byte tokens in this vocabulary"
    stream = TextStream(ct.decode)
    assert stream.push(lone[0]) == ""  # half a character: held
    assert stream.flush() == "\ufffd"
