"""A fresh store against docs/store-format.md: every file matches the spec's layout, the spec's
example manifest validates against manifest.schema.json, array metadata is what section 3 says.
Run: .venv/bin/python -m pytest tests/unit/store/test_format.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from msa_memory.store._manifest import manifest_validator
from msa_memory.testing.store_kit import add_docs

SPEC = Path(__file__).resolve().parents[3] / "docs" / "store-format.md"


def _layout_patterns() -> list[re.Pattern[str]]:
    text = SPEC.read_text()
    block = text.split("```text", 1)[1].split("```", 1)[0]
    pats = []
    for line in block.strip().splitlines():
        path = line.split()[0].removeprefix("ROOT/")
        rx = re.escape(path).replace("SHARD", "[A-Za-z0-9][A-Za-z0-9._-]*").replace("NAME", "[A-Za-z0-9._-]+")
        rx = rx.replace("HEX", "[0-9a-f]+").replace("00000000", r"\d{8}").replace("00000002", r"\d{8}")
        pats.append(re.compile(rx + ("(/.*)?" if path.endswith("/") else "") + "$"))
    return pats


@pytest.mark.parametrize("shifted,window", [((), None), ((1, 3), None), ((1, 3), 2)])
def test_fresh_store_matches_layout(tmp_path, shifted, window):
    from msa_memory.store import create_store
    from msa_memory.testing.store_kit import tiny_identity

    store = create_store(tmp_path / "mem.msa", tiny_identity(hidden_size=3, shifted_layers=shifted,
                                                             shifted_window=window))
    rng = np.random.default_rng(0)
    store, *_ = add_docs(store, [5, 9], rng, "job1-000")
    store.tag("first")
    store = store.commit(delete_ids=[0])
    pats = _layout_patterns()
    files = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    unmatched = [f for f in files if not any(p.match(f) for p in pats)]
    assert unmatched == []
    # every non-optional entry of the spec exists
    for must in ("msa_store.json", "_ids.json", "versions/00000002.json", "tags/first.json",
                 "shards/job1-000/kv/c.0.0.0.0.0", "shards/job1-000/x_router/c.0.0.0",
                 "shards/job1-000/chunk_doc/c.0", "shards/job1-000/docs.parquet", "shards/job1-000/_record.json"):
        assert must in files
    grid = ("shards/job1-000/k_router_s/c.0.0.0.0", "shards/job1-000/x_router_s/c.0.0.0")
    assert all((g in files) == bool(shifted) for g in grid)
    if shifted:   # P = 4: documents of 5 and 9 tokens have 1 and 2 windows from token 2 (window 2: 3 + 2, 5 + 4)
        assert json.loads((store.root / "shards/job1-000/k_router_s/zarr.json").read_text())["shape"] == \
            [2, 14 if window else 3, 2, 8]
    # the identity record names the grid, and says format 2 (releases before the grid refuse it as newer), 3
    # for a grid finer than the chunks (releases before that refuse it too)
    rec = json.loads((store.root / "msa_store.json").read_text())
    assert rec["identity"].get("shifted_layers") == (list(shifted) or None)
    assert rec["identity"].get("shifted_window") == window
    assert rec["format_version"] == (3 if window else 2 if shifted else 1)
    assert all(json.loads(p.read_text())["format_version"] == 1 for p in (store.root / "versions").glob("0*.json"))
    meta = json.loads((store.root / "shards/job1-000/kv/zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "uint16" and meta["shape"] == [5, 2, 2, 2, 8]
    [codec] = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [1, 2, 2, 2, 8]
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "crc32c"]
    assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert codec["configuration"]["index_location"] == "end"
    assert meta["attributes"]["msa_logical_dtype"] == "bfloat16"
    rec = json.loads((store.root / "shards/job1-000/_record.json").read_text())
    assert set(rec["files"]) == {f.removeprefix("shards/job1-000/") for f in files
                                 if f.startswith("shards/job1-000/") and not f.endswith("_record.json")}


def test_spec_example_manifest_validates():
    text = SPEC.read_text()
    section = text.split("## 5. Version manifests", 1)[1]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    jsonschema.validate(example, manifest_validator().schema)
    bad = dict(example, operation="rename")
    assert list(manifest_validator().iter_errors(bad))
