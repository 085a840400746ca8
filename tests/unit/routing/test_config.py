"""The routing configurations: one set of score / reduce fields and defaults (``ScoreChoices``) that both
``RouterConfig`` (an adapter's, saved) and ``RoutingConfig`` (a runtime's) derive from, and the adapter file
format they keep (every shipped adapter's JSON reads back to the same dict and router id).
Run: .venv/bin/python -m pytest tests/unit/routing/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from msa_memory.data import SHIPPED_ADAPTERS
from msa_memory.errors import ConfigError
from msa_memory.routing.config import SCORE_FIELDS, RouterConfig, RoutingConfig, ScoreChoices
from msa_memory.routing.files import ADAPTER_JSON, shipped_adapter


def own_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(SCORE_FIELDS)


def test_configs_share_score_fields_once_with_one_set_of_defaults():
    assert SCORE_FIELDS == ("score", "head_reduce", "query_reduce", "chunk_reduce", "top_k")
    assert not own_fields(RouterConfig) & own_fields(RoutingConfig)
    for cls in (RouterConfig, RoutingConfig):
        assert issubclass(cls, ScoreChoices)
        for name in SCORE_FIELDS:
            assert cls.__dataclass_fields__[name] is not None
    router = RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=16)
    assert router.score_choices() == RoutingConfig().score_choices() == ScoreChoices().score_choices()


def test_routing_config_for_router_takes_the_adapters_choices():
    router = RouterConfig((1, 2), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=16, score="dot",
                          head_reduce="max", query_reduce="mean", chunk_reduce="mean", top_k=5)
    routing = RoutingConfig.for_router(router, {"tile_chunks": 7})
    assert routing.score_choices() == router.score_choices() and routing.tile_chunks == 7
    assert RoutingConfig.for_router(router, {"top_k": 3}).top_k == 3
    assert RoutingConfig.for_router(None).score_choices() == ScoreChoices().score_choices()


def test_both_configs_check_the_choices():
    with pytest.raises(ConfigError, match="Routing head_reduce='median'"):
        RoutingConfig(head_reduce="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="RouterConfig score='l2'"):
        RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=8, score="l2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=8, top_k=0)


@pytest.mark.parametrize("name", list(SHIPPED_ADAPTERS))
def test_shipped_adapter_files_read_back_unchanged(name):
    folder = shipped_adapter(name)
    if folder is None or not (folder / ADAPTER_JSON).is_file():
        pytest.skip(f"shipped adapter {name!r} is a subset folder (its JSON names the full adapter)")
    saved = json.loads((folder / ADAPTER_JSON).read_text())
    cfg = RouterConfig.from_dict(saved)
    assert json.loads(json.dumps(cfg.to_dict())) == saved
