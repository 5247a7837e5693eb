"""The MLX side of the engine: model loading, the BatchGenerator, inserting requests.

Everything here runs on the engine thread (MLX streams belong to the thread that
made them); the engine imports this module lazily so that importing `mlxd.engine`
stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.utils import load_model

from mlxd.engine_types import GenParams
from mlxd.kv_codec import LayerKV, from_mlx_caches, to_mlx_caches
from mlxd.sampling import make_sampler

log = logging.getLogger(__name__)
Extracted = list[tuple[list[int], list[Any]]]  # (tokens, per-layer mlx-lm caches) per request


class MlxRuntime:
    """A loaded model plus the stream its BatchGenerators run on."""

    def __init__(self, model_dir: Path) -> None:
        self.stream = mx.default_stream(mx.default_device())
        self.model, _ = load_model(Path(model_dir))
        self.num_layers = len(self.model.layers)

    def supports_prefix_cache(self) -> bool:
        """True when every layer uses a plain KVCache (sliceable, prefix-reusable)."""
        return all(isinstance(c, KVCache) for c in make_prompt_cache(self.model))

    def new_batch_generator(self, max_running: int, prefill_step: int) -> Any:
        return BatchGenerator(self.model, completion_batch_size=max_running,
                              prefill_batch_size=min(8, max_running),
                              prefill_step_size=prefill_step, stream=self.stream)

    @staticmethod
    def warm_up(bg: Any) -> None:
        """One tiny generation so the first real request does not pay for lazy setup."""
        bg.insert([[0, 1]], max_tokens=[1])
        while not bg.next_generated():
            pass

    def insert(self, bg: Any, prompt: list[int], cached: int, kv: list[LayerKV] | None,
               params: GenParams, eos_token_ids: tuple[int, ...]) -> int:
        """Add a request whose first `cached` prompt tokens have KV `kv`; returns its uid."""
        stops = [] if params.ignore_eos else [[t] for t in eos_token_ids]
        stops += [[t] for t in params.stop_token_ids]
        (uid,) = bg.insert(
            [prompt[cached:]], max_tokens=[params.max_tokens],
            caches=[to_mlx_caches(kv, self.num_layers)], all_tokens=[prompt[:cached]],
            samplers=[make_sampler(params.temperature, params.top_p, params.seed)],
            stop_sequences=[StopSequences(stops or None)])
        return int(uid)

    @staticmethod
    def kv_of(caches: list[Any]) -> list[LayerKV]:
        return from_mlx_caches(caches)

    @staticmethod
    def extract(bg: Any, uids: list[int]) -> Extracted:
        """The KV computed so far for requests still in the batch (empty on failure)."""
        try:
            return [(tokens, caches) for caches, tokens in bg.extract_cache(uids).values()]
        except Exception:  # noqa: BLE001 - caching is best effort
            log.exception("could not extract KV")
            return []

    @staticmethod
    def remove(bg: Any, uids: list[int], keep_kv: bool) -> Extracted:
        """Remove requests from the batch; with `keep_kv`, return the KV they computed."""
        if keep_kv:
            try:
                return [(tokens, caches) for caches, tokens in
                        bg.remove(uids, return_prompt_caches=True).values()]
            except Exception:  # noqa: BLE001 - keeping the KV is optional; freeing the slot is not
                log.exception("could not extract KV of removed requests")
        bg.remove(uids)
        return []
