"""Prompt -> token ids, exactly as the MLX daemon prefills them (no MLX import).

Used by the daemon for generation *and* `/tokenize`, and importable by the gateway
(it needs only `tokenizers` and `jinja2`), so both compute bit-identical ids:

- completion style: ``tokenizer.encode(prompt, add_special_tokens=flag)`` with
  the `tokenizers` library on the model's ``tokenizer.json`` (flag defaults to true);
- chat style: render the model's chat template with jinja2 in a sandbox set up the
  way Hugging Face transformers does it (``trim_blocks``, ``lstrip_blocks``,
  ``loopcontrols``, a ``tojson`` filter that does not HTML-escape, globals
  ``raise_exception`` and ``strftime_now``), with variables ``messages``,
  ``tools``, ``add_generation_prompt``, the tokenizer's special-token strings
  (``bos_token``, ``eos_token``, ...) and then ``chat_template_kwargs`` on top;
  then encode the text with ``add_special_tokens`` false unless asked otherwise.
  With ``continue_final_message`` (vLLM's request field; needs
  ``add_generation_prompt`` false) the text ends where the final message's
  content does — its end-of-turn markup is cut off — as transformers does it.

Message content given as a list of parts is flattened to its text parts joined
with a newline before rendering (vLLM's "string" content format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

# One prompt at a time is encoded here, never a batch worth splitting across threads:
# without this, `tokenizers` hands even a batch of one to its thread pool (~10 µs more
# CPU per prompt). Set at import, while the process has a single thread; an operator's
# own setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PromptError(ValueError):
    """The request's prompt or messages cannot be turned into tokens (a client error)."""


def _raise_exception(message: str) -> None:
    raise PromptError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a transformers-compatible sandbox (cached by source)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages; flatten list-of-parts content to text."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PromptError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise PromptError(f"messages[{i}].content: a text part's 'text' must be a string")
            message = {**message, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string, a list of parts or null")
        out.append(message)
    return out


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tagged_final(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, str):
        raise PromptError("continue_final_message is set but the final message has no content to continue")
    return {**message, "content": content + _CONTINUE_TAG}


def _cut_at_tag(text: str) -> str:
    """Cut the rendered chat where the final message's content ended (transformers' rule)."""
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise PromptError("continue_final_message is set but the chat template drops the final message")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def encode_ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """The ids of one text. `encode_batch_fast` (tokenizers >= 0.21) runs the same
    pipeline as `encode` without tracking character offsets, which nothing here reads:
    the same ids for ~25% less CPU."""
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is None:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(fast([text], add_special_tokens=add_special_tokens)[0].ids)


class ChatTokenizer:
    """A model's tokenizer plus its chat template; thread-safe for encode/decode."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None,
                 special_tokens: Mapping[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTokenizer:
        """Load ``tokenizer.json`` and the template from ``tokenizer_config.json``'s
        ``chat_template`` (or, failing that, a ``chat_template.jinja`` file)."""
        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (not a model directory?)")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(tokenizer, template, specials)

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Completion style ids."""
        if not isinstance(prompt, str):
            raise PromptError("'prompt' must be a string")
        return encode_ids(self.tokenizer, prompt, add_special_tokens)

    def render_chat(self, messages: Any, add_generation_prompt: bool = True,
                    tools: Sequence[Any] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None,
                    continue_final_message: bool = False) -> str:
        """The chat template rendered to text (see the module docstring for the variables).
        `continue_final_message`: the text ends where the final message's content does
        (its end-of-turn markup cut off), as transformers/vLLM do."""
        if self.chat_template is None:
            raise PromptError("this model has no chat template; use /v1/completions")
        if continue_final_message and add_generation_prompt:
            raise PromptError("cannot set both 'continue_final_message' and 'add_generation_prompt' to true")
        normalized = normalize_messages(messages)
        if continue_final_message:
            normalized[-1] = _tagged_final(normalized[-1])
        context: dict[str, Any] = {**self.special_tokens, "messages": normalized,
                                   "tools": tools, "add_generation_prompt": add_generation_prompt}
        context.update(chat_template_kwargs or {})
        try:
            text = compile_template(self.chat_template).render(**context)
        except PromptError:
            raise
        except jinja2.TemplateError as exc:
            raise PromptError(f"chat template error: {exc}") from exc
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            # The template is the model's; these come from request data it cannot render
            # (e.g. chat_template_kwargs replacing `messages` with a number).
            raise PromptError(f"chat template error: {type(exc).__name__}: {exc}") from exc
        return _cut_at_tag(text) if continue_final_message else text

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True,
                    tools: Sequence[Any] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None,
                    add_special_tokens: bool = False, continue_final_message: bool = False) -> list[int]:
        """Chat style ids: the rendered template encoded (no special tokens added by default)."""
        text = self.render_chat(messages, add_generation_prompt, tools, chat_template_kwargs, continue_final_message)
        return encode_ids(self.tokenizer, text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())


def completion_ids(ct: ChatTokenizer, body: Mapping[str, Any]) -> list[int]:
    """Ids for a completion-style body: ``prompt`` is a string or a list of token ids."""
    prompt = body.get("prompt")
    add_special = body.get("add_special_tokens", True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= ct.vocab_size for t in prompt):
            raise PromptError(f"token ids must be in [0, {ct.vocab_size})")
        return list(prompt)
    if not isinstance(prompt, str):
        raise PromptError("'prompt' must be a string or a non-empty list of token ids")
    return ct.encode_prompt(prompt, add_special_tokens=bool(add_special))


def chat_ids(ct: ChatTokenizer, body: Mapping[str, Any]) -> list[int]:
    """Ids for a chat-style body (``messages``, ``add_generation_prompt`` default true,
    ``tools``, ``chat_template_kwargs``, ``add_special_tokens`` and
    ``continue_final_message`` default false)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise PromptError("'chat_template_kwargs' must be an object")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise PromptError("'tools' must be a list")
    return ct.encode_chat(body.get("messages"), bool(body.get("add_generation_prompt", True)), tools,
                          kwargs, add_special_tokens=bool(body.get("add_special_tokens", False)),
                          continue_final_message=bool(body.get("continue_final_message", False)))
