"""`kvgate make-tiny-model DIR [--preset tiny|small] [--seed N]`.

Writes, offline and deterministically, a model directory that `mlx_lm.load` (and
sim-vllm, which reads only `tokenizer.json`, `tokenizer_config.json` and
`config.json`) can use: a Llama architecture with random weights drawn from a
seeded generator, and a byte-level BPE tokenizer trained with `tokenizers` on the
text embedded in this package, with a ChatML chat template.

Contract: the same preset and seed give byte-identical files. Nothing here
imports MLX, so building a model costs well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlxd.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer, tokenizer_config


@dataclass(frozen=True, slots=True)
class Preset:
    """Shape of a generated Llama model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 1024
    max_position_embeddings: int = 8192


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=256),
    # Sized for mlx[cpu]'s reference BLAS: a 1000-token prefill takes seconds, decode ~10 ms/token.
    "small": Preset(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=512),
}

WEIGHTS_FILE = "model.safetensors"


def model_config(preset: Preset, vocab_size: int, special_ids: dict[str, int | None]) -> dict[str, object]:
    """The Hugging Face style `config.json` for `preset` (mlx-lm's llama model reads it)."""
    shape = asdict(preset)
    shape["vocab_size"] = vocab_size
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "head_dim": preset.hidden_size // preset.num_attention_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "torch_dtype": "float32",
    }


def weight_shapes(preset: Preset, vocab: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, named as mlx-lm's llama model expects."""
    h, inter = preset.hidden_size, preset.intermediate_size
    head_dim = h // preset.num_attention_heads
    n_heads, n_kv = preset.num_attention_heads, preset.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(preset.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (n_heads * head_dim, h),
            p + "self_attn.k_proj.weight": (n_kv * head_dim, h),
            p + "self_attn.v_proj.weight": (n_kv * head_dim, h),
            p + "self_attn.o_proj.weight": (h, n_heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Norm weights are ones; every matrix is N(0, 0.02) from one seeded generator, in name order."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    return weights


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialize float32 tensors in the safetensors format, deterministically (sorted names)."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def write_model(out_dir: Path, preset_name: str = "tiny", seed: int = 0) -> Path:
    """Write the model directory; returns it. Existing files of the same names are replaced."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.vocab_size)
    special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if any(i is None for i in special_ids.values()):
        raise ValueError(f"tokenizer lost a special token: {special_ids}")
    cfg = model_config(preset, tokenizer.get_vocab_size(), special_ids)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
    cfg_text = json.dumps(tokenizer_config(preset.max_position_embeddings), indent=2, sort_keys=True)
    (out_dir / "tokenizer_config.json").write_text(cfg_text + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = random_weights(weight_shapes(preset, tokenizer.get_vocab_size()), seed)
    (out_dir / WEIGHTS_FILE).write_bytes(safetensors_bytes(weights))
    return out_dir


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate make-tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    try:
        path = write_model(args.dir, args.preset, args.seed)
    except (OSError, ValueError) as exc:
        print(f"make-tiny-model: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.preset} model (seed {args.seed}) to {path}")
    return 0
