"""Request validation and response shapes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from mlxd.engine_types import Usage
from mlxd.openai_api import BadRequest, ResponseShaper, gen_params


@pytest.mark.parametrize(("body", "chat", "expected"), [
    ({}, False, 16),
    ({}, True, 90),
    ({"max_tokens": 5}, True, 5),
    ({"max_completion_tokens": 7}, True, 7),
])
def test_max_tokens_defaults(body: dict[str, Any], chat: bool, expected: int) -> None:
    assert gen_params(body, prompt_len=10, max_model_len=100, chat=chat).max_tokens == expected


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 91}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "3"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"stop": 3}, "stop"), ({"seed": 1.5}, "seed"), ({"n": 3}, "n"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
])
def test_invalid_fields_name_their_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        gen_params(body, prompt_len=10, max_model_len=100, chat=False)
    assert info.value.param == param


def test_prompt_longer_than_context_is_rejected() -> None:
    with pytest.raises(BadRequest, match="maximum context length"):
        gen_params({}, prompt_len=100, max_model_len=100, chat=True)


def test_sampling_fields_are_carried() -> None:
    p = gen_params({"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "x", "ignore_eos": True,
                    "stop_token_ids": [3]}, 1, 100, False)
    assert (p.temperature, p.top_p, p.seed, p.stop, p.ignore_eos, p.stop_token_ids) == (0.5, 0.9, 7, ("x",), True, (3,))


def test_usage_reports_cached_tokens() -> None:
    body = ResponseShaper("m", chat=True).full("hi", "stop", Usage(10, 2, 8))
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 8}}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1, 0])
def test_int64_seeds_are_accepted(seed: int) -> None:
    assert gen_params({"seed": seed}, prompt_len=3, max_model_len=100, chat=False).seed == seed


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64])
def test_seeds_beyond_int64_name_the_param(seed: int) -> None:
    with pytest.raises(BadRequest) as info:
        gen_params({"seed": seed}, prompt_len=3, max_model_len=100, chat=False)
    assert info.value.param == "seed"


def test_explicit_nulls_mean_the_default_n_included() -> None:
    """Clients that serialise unset fields send `"n": null`; vLLM takes it as 1, we used to 400."""
    body = {"n": None, "seed": None, "stop": None, "max_tokens": None, "temperature": None, "top_p": None}
    params = gen_params(body, prompt_len=3, max_model_len=100, chat=False)
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.seed is None
