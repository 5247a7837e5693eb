"""Tokenizers for the simulated engine.

Two implementations of one small interface:

- `HashTokenizer` (default): deterministic in every process and on every machine.
  Text is split into pieces (an optional leading space plus a word, one
  punctuation mark, a whitespace run, or a `<|special|>` token); a piece's id is a
  stable hash of its bytes. No vocabulary file is needed, so a fleet of simulated
  backends and the gateway agree on ids without sharing anything.
- `FileTokenizer`: a model directory's `tokenizer.json` (via `tokenizers`) and the
  chat template from its `tokenizer_config.json`, e.g. the tiny model made by
  `kvgate make-tiny-model`, so ids match the MLX daemons'.

Chat prompts are rendered with the chat template (ChatML unless the model dir has
its own) in the transformers-compatible sandbox of `kvtok.chat_tokens` (which
imports no MLX) and then encoded without adding special tokens, as vLLM does.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2

from kvtok.chat_tokens import ChatTokenizer, PromptError, compile_template

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PIECE_RE = re.compile(r"<\|[^|<>\s]{1,40}\|>| ?\w+| ?[^\w\s]|\s+")
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_OUTPUT_WORDS = (
    "the cache holds a prefix of tokens and the router sends each request where its "
    "blocks already live so prefill work shrinks while decode keeps a steady pace"
).split()


class SimTokenizer(Protocol):
    """What the engine and the HTTP layer need from a tokenizer."""

    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Any] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str: ...

    def sample(self, rng: random.Random, n: int) -> list[int]:
        """`n` output token ids drawn from `rng` (the simulated model's "generation")."""
        ...


class HashTokenizer:
    """Deterministic hash-of-piece tokenizer; see the module docstring."""

    eos_token_id = 0

    def __init__(self, vocab_size: int = 1 << 17, max_remembered: int = 200_000) -> None:
        if vocab_size < 1024:
            raise ValueError(f"vocab_size must be >= 1024, got {vocab_size}")
        self._vocab_size = vocab_size
        self._max_remembered = max_remembered
        self._ids: dict[str, int] = {piece: i for i, piece in enumerate(_SPECIALS)}
        self._pieces: dict[int, str] = dict(enumerate(_SPECIALS))
        self._output_ids = [self._piece_id(" " + word) for word in _OUTPUT_WORDS]

    def _piece_id(self, piece: str) -> int:
        known = self._ids.get(piece)
        if known is not None:
            return known
        digest = hashlib.blake2b(piece.encode(), digest_size=8).digest()
        token_id = len(_SPECIALS) + int.from_bytes(digest, "big") % (self._vocab_size - len(_SPECIALS))
        if len(self._ids) < self._max_remembered:
            self._ids[piece] = token_id
            self._pieces.setdefault(token_id, piece)
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`'s pieces. Like ChatML models, no BOS is added either way."""
        return [self._piece_id(piece) for piece in _PIECE_RE.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids this process has seen; an unseen id decodes as `<|id|>`."""
        return "".join(self._pieces.get(i, f"<|{i}|>") for i in ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Any] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        context: dict[str, Any] = {"messages": list(messages), "tools": tools,
                                   "add_generation_prompt": add_generation_prompt, **(chat_template_kwargs or {})}
        try:
            return compile_template(CHATML_TEMPLATE).render(**context)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc
        except (TypeError, LookupError, AttributeError) as exc:  # request data the template cannot render
            raise ValueError(f"chat template error: {type(exc).__name__}: {exc}") from exc

    def sample(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self._output_ids) for _ in range(n)]


class FileTokenizer:
    """A model directory's tokenizer, through `kvtok.chat_tokens` so ids equal the MLX daemon's."""

    def __init__(self, model_dir: Path) -> None:
        if not (model_dir / "tokenizer.json").is_file():
            raise ValueError(f"{model_dir}/tokenizer.json not found: --model must be a model directory")
        self._ct = ChatTokenizer.from_dir(model_dir)
        if self._ct.chat_template is None:
            self._ct.chat_template = CHATML_TEMPLATE
        tok = self._ct.tokenizer
        self.eos_token_id = tok.token_to_id(self._ct.special_tokens.get("eos_token") or "<|im_end|>") or 0
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        self._sample_ids = [i for i in range(tok.get_vocab_size()) if tok.id_to_token(i) not in specials]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._ct.encode_prompt(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self._ct.decode(ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Any] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        try:
            return self._ct.render_chat(list(messages), add_generation_prompt, tools, chat_template_kwargs)
        except PromptError as exc:
            raise ValueError(str(exc)) from exc

    def sample(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self._sample_ids) for _ in range(n)]


def load_tokenizer(model_dir: Path | None, vocab_size: int = 1 << 17) -> SimTokenizer:
    """The model dir's tokenizer when given, else the deterministic hash tokenizer."""
    return FileTokenizer(model_dir) if model_dir is not None else HashTokenizer(vocab_size)
