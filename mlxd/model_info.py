"""Facts about a model directory that the server needs without importing MLX."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtok.chat_tokens import ChatTokenizer

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: Path
    name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def read_model_info(model_dir: str | Path, tokenizer: ChatTokenizer, name: str | None = None) -> ModelInfo:
    """EOS ids come from config.json, generation_config.json and the tokenizer's eos_token;
    the context length from ``max_position_embeddings`` (else tokenizer ``model_max_length``)."""
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (not a model directory)")
    config = json.loads((path / "config.json").read_text())
    eos = _ids(config.get("eos_token_id"))
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        eos += _ids(json.loads(gen_path.read_text()).get("eos_token_id"))
    eos_text = tokenizer.special_tokens.get("eos_token")
    if eos_text is not None and (tid := tokenizer.tokenizer.token_to_id(eos_text)) is not None:
        eos.append(int(tid))
    max_len = config.get("max_position_embeddings")
    if not isinstance(max_len, int):
        tcfg = path / "tokenizer_config.json"
        limit = json.loads(tcfg.read_text()).get("model_max_length") if tcfg.exists() else None
        max_len = limit if isinstance(limit, int) and limit < 10**7 else DEFAULT_MAX_MODEL_LEN
    return ModelInfo(path, name or path.resolve().name, int(max_len), tuple(dict.fromkeys(eos)))
