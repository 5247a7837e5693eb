"""chat_tokens: the gateway-reusable prompt -> ids logic (no MLX)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvtok.chat_tokens import ChatTokenizer, PromptError, chat_ids, completion_ids, encode_ids
from tests.conftest import CHAT


@pytest.fixture(scope="module")
def ct(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_dir(tiny_model_dir)


@pytest.mark.parametrize("text", ["", "plain words and more words", "  leading spaces, tabs\tand\nnewlines\n\n",
                                  "unicode: é ü 漢字 🙂", "<|im_start|>user\nhi<|im_end|>", "'s 'll 123 4.5"])
@pytest.mark.parametrize("special", [True, False])
def test_encode_ids_are_the_ids_of_encode(ct: ChatTokenizer, text: str, special: bool) -> None:
    assert encode_ids(ct.tokenizer, text, special) == ct.tokenizer.encode(text, add_special_tokens=special).ids


def test_chatml_rendering(ct: ChatTokenizer) -> None:
    text = ct.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not ct.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith(
        "assistant\n")


def test_special_tokens_in_the_template_become_single_ids(ct: ChatTokenizer) -> None:
    ids = ct.encode_chat([{"role": "user", "content": "Hi"}])
    start = ct.tokenizer.token_to_id("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 2


def test_content_parts_are_joined_with_newlines(ct: ChatTokenizer) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]
    assert ct.encode_chat([{"role": "user", "content": parts}]) == ct.encode_chat([{"role": "user", "content": "a\nb"}])


def test_tools_render_as_json_without_html_escaping(ct: ChatTokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "lt<gt>&", "parameters": {}}}]
    text = ct.render_chat([{"role": "user", "content": "x"}], tools=tools)
    assert '"name": "lt<gt>&"' in text
    request = {"messages": [{"role": "user", "content": "x"}], "tools": tools}
    assert chat_ids(ct, request) == ct.encode_prompt(text, False)


def test_chat_template_kwargs_reach_the_template(tiny_model_dir: Path) -> None:
    ct = ChatTokenizer.from_dir(tiny_model_dir)
    custom = ChatTokenizer(ct.tokenizer, "{{ greeting }} {{ messages[0]['content'] }}{{ eos_token }}",
                           ct.special_tokens)
    assert custom.render_chat([{"role": "user", "content": "x"}], chat_template_kwargs={"greeting": "hey"}) \
        == "hey x<|im_end|>"


@pytest.mark.parametrize("body", [
    {"messages": "hi"}, {"messages": []}, {"messages": [{"role": 1}]},
    {"messages": [{"role": "user", "content": 3}]}, {"messages": [{"role": "user"}], "tools": "x"},
])
def test_bad_messages_raise_prompt_error(ct: ChatTokenizer, body: dict[str, object]) -> None:
    with pytest.raises(PromptError):
        chat_ids(ct, body)


def test_completion_ids_accept_text_or_token_ids(ct: ChatTokenizer) -> None:
    assert completion_ids(ct, {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert completion_ids(ct, {"prompt": "abc"}) == ct.encode_prompt("abc")
    with pytest.raises(PromptError):
        completion_ids(ct, {"prompt": [ct.vocab_size]})
    with pytest.raises(PromptError):
        completion_ids(ct, {"prompt": ["a", "b"]})


def test_template_raise_exception_is_a_prompt_error(ct: ChatTokenizer) -> None:
    strict = ChatTokenizer(ct.tokenizer, "{{ raise_exception('no system role') }}")
    with pytest.raises(PromptError, match="no system role"):
        strict.render_chat([{"role": "user", "content": "x"}])


def test_module_does_not_import_mlx() -> None:
    code = ("import sys, kvtok.chat_tokens; "
            "print(any(m.startswith(('mlx.', 'mlx_lm')) or m == 'mlx' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_continue_final_message_ends_the_text_at_the_final_content(bos_model: Path) -> None:
    ct = ChatTokenizer.from_dir(bos_model)
    text = ct.render_chat(CHAT, add_generation_prompt=False, continue_final_message=True)
    assert text == "<|user|> hello world <|end|>\n<|assistant|> the answer is"
    with pytest.raises(PromptError, match="both"):
        ct.render_chat(CHAT, add_generation_prompt=True, continue_final_message=True)
