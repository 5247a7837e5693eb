"""make-tiny-model: deterministic, loadable by mlx-lm, chat template agrees with our renderer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtok.chat_tokens import ChatTokenizer
from mlxd.tiny_model import PRESETS, main, write_model


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert main([str(tmp_path / "again"), "--seed", "0"]) == 0
    assert _files(tmp_path / "again") == _files(tiny_model_dir)


def test_other_seed_changes_only_the_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = _files(write_model(tmp_path / "s1", "tiny", seed=1))
    same = _files(tiny_model_dir)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert other["tokenizer.json"] == same["tokenizer.json"]


def test_config_matches_the_preset(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tiny = PRESETS["tiny"]
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (tiny.num_hidden_layers, tiny.hidden_size) == (2, 128)
    ct = ChatTokenizer.from_dir(tiny_model_dir)
    assert cfg["vocab_size"] == ct.vocab_size
    assert ct.tokenizer.token_to_id("<|im_end|>") in cfg["eos_token_id"]


def test_unknown_preset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--preset", "huge"])
    assert "invalid choice" in capsys.readouterr().err


def test_loads_with_mlx_lm_and_template_matches_our_renderer(tiny_model_dir: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello there!"}]
    ours = ChatTokenizer.from_dir(tiny_model_dir)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ours.encode_chat(messages)
    assert tokenizer.encode("café 漢字", add_special_tokens=False) == ours.encode_prompt("café 漢字", False)
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)
