"""`kvgate check-config` rejects a chain that would silently disable cache-aware routing:
typed state consumed before any filter produced it, or a picker whose needs no filter meets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.plan import plan_gateway
from gateway.serve import check_config_main
from kvkernel.decode import ConfigError


def config(tmp: Path, model_dir: Path, filters: list[str], cluster: str = "lb_policy: cache_aware") -> str:
    blocks = {
        "prompt": "  - type: prompt",
        "tokenizer": f'  - type: tokenizer\n    config: {{backend: local, model_dir: "{model_dir}"}}',
        "kvcache": "  - type: kvcache",
        "access-log": f'  - type: access-log\n    config: {{path: "{tmp / "a.jsonl"}"}}',
    }
    chain = "\n".join(blocks[f] for f in filters)
    return f"""
clusters:
  - name: llm
    {cluster}
    endpoints: [{{id: a, url: "http://127.0.0.1:9001"}}]
routes: [{{match: {{prefix: /v1/}}, cluster: llm}}]
filters:
{chain}
"""


@pytest.mark.parametrize("filters,path,words", [
    (["prompt", "kvcache", "tokenizer"], "filters[1](kvcache)",
     "'tokens' but a filter that produces it (tokenizer) comes later"),
    (["tokenizer", "kvcache"], "filters[0](tokenizer)", "'prompt' but no filter in the chain produces it"),
    (["prompt", "access-log"], "clusters[0].lb_policy", "needs 'cache_hints' from the filter chain"),
])
def test_chains_that_would_disable_cache_aware_routing_are_rejected(
        tmp_path: Path, tiny_model_dir: Path, filters: list[str], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_gateway(load_config_text(config(tmp_path, tiny_model_dir, filters)))
    assert err.value.path == path and words in str(err.value)


def test_the_full_chain_passes_and_plain_pickers_need_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    plan_gateway(load_config_text(config(tmp_path, tiny_model_dir, ["prompt", "tokenizer", "kvcache", "access-log"])))
    plan_gateway(load_config_text(config(tmp_path, tiny_model_dir, ["access-log"], "lb_policy: round_robin")))


def test_check_config_exits_1_naming_the_path(tmp_path: Path, tiny_model_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(config(tmp_path, tiny_model_dir, ["prompt", "kvcache", "tokenizer"]))
    assert check_config_main([str(path)]) == 1
    assert "filters[1](kvcache)" in capsys.readouterr().err
