from __future__ import annotations

from typing import Any

import pytest

from filters.prompt import PromptError, extract_prompt


@pytest.mark.parametrize("prompt,expected", [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_shapes(prompt: Any, expected: list[Any]) -> None:
    found = extract_prompt("/v1/completions", {"model": "m", "prompt": prompt, "stream": True})
    assert found is not None
    parsed, stream = found
    assert parsed.kind == "completion" and parsed.prompts == expected and parsed.model == "m" and stream


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "stream": 1}, "stream"),
])
def test_completion_type_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(PromptError) as err:
        extract_prompt("/v1/completions", body)
    assert err.value.param == param


def test_chat_keeps_every_message_multipart_content_and_tools() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    found = extract_prompt("/v1/chat/completions", {"model": "m", "messages": messages, "tools": tools})
    assert found is not None
    prompt, stream = found
    assert prompt.kind == "chat" and prompt.messages == messages and prompt.tools == tools and not stream
    assert prompt.text_chars == len("You are terse.") + len("look") + len("42")


def test_digest_depends_on_model_prompt_and_tools_only() -> None:
    def digest(body: dict[str, Any]) -> str:
        found = extract_prompt("/v1/chat/completions", body)
        assert found is not None
        return found[0].digest

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert digest(base) == digest({**base, "temperature": 0.3, "stream": True})
    assert digest(base) != digest({**base, "model": "n"})
    assert digest(base) != digest({**base, "tools": [{"type": "function"}]})


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    (["x"], "messages[0]"),
])
def test_chat_type_errors_name_the_field(messages: Any, param: str) -> None:
    with pytest.raises(PromptError) as err:
        extract_prompt("/v1/chat/completions", {"messages": messages})
    assert err.value.param == param


def test_other_paths_are_ignored() -> None:
    assert extract_prompt("/v1/embeddings", {"input": "x"}) is None
