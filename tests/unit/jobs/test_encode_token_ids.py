"""``encode_token_ids``: documents given as token ids go through the msa-encode job like text files.

On an MSA checkpoint saved without a tokenizer (``tokenizer=`` a folder, through the job's workers)
and on a plain HF model folder: a folder of one-passage text files encoded with ``encode_corpus``
and the same passages' token ids (``tokenizer(text, add_special_tokens=False)``) encoded with
``encode_token_ids`` give stores with the same document ids, texts, token and chunk counts and
bit-identical router keys and content K̄V̄. A rerun with the same ids commits nothing; changed ids
replace only their key's document; a dry run writes nothing; bad input is refused before any
store is created.

Run: ``.venv/bin/python -m pytest tests/unit/jobs/test_encode_token_ids.py -q``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msa_memory.encode.tiny import tiny_tokenizer, write_tiny_msa_checkpoint
from msa_memory.errors import ConfigError
from msa_memory.jobs import encode_corpus, encode_token_ids, token_ids_sha256
from msa_memory.store import open_store

SMALL = dict(shard_tokens=120, workers=1, torch_threads=1)   # several shards for a handful of documents
TEXTS = ["The blue door code is 4471.", "Apples grow on trees in the northern orchard.",
         "Cats sleep all day in the barn and hunt at night.", "Rivers flow downhill to the wide green delta."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from jobkit import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    msa = write_tiny_msa_checkpoint(root / "msa", tokenizer=False, pooling_kernel_size=16)
    return {"msa": dict(model=str(msa), tokenizer=str(root / "tokenizer")),
            "plain": dict(model=str(write_tiny_model(root / "plain")))}


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, t in enumerate(TEXTS):
        (root / f"{i}.txt").write_text(t)
    return root


def _docs(store):
    return open_store(store).documents(columns=["doc_id", "source_path", "passage_index", "text", "n_tokens",
                                                "n_chunks"]).to_pylist()


@pytest.mark.parametrize("kind", ["msa", "plain"])
def test_token_id_store_is_bit_identical_to_text_store(tmp_path, models, kind):
    res_text = encode_corpus([_corpus(tmp_path / "notes")], tmp_path / "text.msa", **models[kind], **SMALL)
    rows = _docs(tmp_path / "text.msa")
    assert len(rows) == len(TEXTS) and res_text.shards_written > 1
    tok = tiny_tokenizer()
    docs = {r["source_path"]: tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows}
    res_ids = encode_token_ids(docs, tmp_path / "ids.msa", **models[kind], **SMALL)
    assert res_ids.committed and res_ids.docs_added == len(TEXTS) and sorted(res_ids.files_added) == sorted(docs)
    assert _docs(tmp_path / "ids.msa") == rows
    a, b = open_store(tmp_path / "text.msa"), open_store(tmp_path / "ids.msa")
    assert a.identity.to_dict() == b.identity.to_dict()
    for pos in range(a.identity.n_layers):
        (ka, da), (kb, db) = a.router_keys(pos), b.router_keys(pos)
        assert np.array_equal(da, db) and ka.dtype == kb.dtype and np.array_equal(ka, kb)
    ids = [r["doc_id"] for r in rows]
    for x, y in zip(a.load_kv(ids), b.load_kv(ids)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    sha = dict(zip(*b.documents(columns=["source_path", "file_sha256"]).to_pydict().values()))
    assert all(sha[k] == token_ids_sha256(v) for k, v in docs.items())


def test_token_ids_rerun_and_update_are_incremental(tmp_path, models):
    tok = tiny_tokenizer()
    docs = {f"doc-{i}": tok(t, add_special_tokens=False)["input_ids"] for i, t in enumerate(TEXTS)}
    store = tmp_path / "m.msa"
    first = encode_token_ids(docs, store, **models["msa"], **SMALL)
    again = encode_token_ids(list(docs.items()), store, **models["msa"], **SMALL)
    assert not again.committed and again.files_unchanged == len(docs) and again.version == first.version
    before = {r["source_path"]: r for r in _docs(store)}
    changed = dict(docs, **{"doc-1": tok("Pears grow on trees.", add_special_tokens=False)["input_ids"]})
    upd = encode_token_ids(changed, store, **models["msa"], **SMALL)
    assert upd.committed and upd.version == first.version + 1
    assert upd.files_replaced == ["doc-1"] and upd.files_unchanged == 3 and upd.docs_deleted == 1
    after = {r["source_path"]: r for r in _docs(store)}
    assert after["doc-1"]["text"] == "Pears grow on trees." and after["doc-1"]["doc_id"] != before["doc-1"]["doc_id"]
    assert all(after[k] == before[k] for k in docs if k != "doc-1")
    only_new = encode_token_ids({"extra": [70, 71, 72]}, store, **models["msa"], **SMALL)   # other keys are kept
    assert only_new.files_added == ["extra"] and len(_docs(store)) == 5


def test_token_ids_dry_run_writes_nothing(tmp_path, models):
    res = encode_token_ids({"a": [70, 71], "b": [72]}, tmp_path / "m.msa", dry_run=True, **models["msa"], **SMALL)
    assert res.dry_run and not res.committed and res.docs_added == 2 and res.tokens_planned == 3
    assert not (tmp_path / "m.msa").exists()


@pytest.mark.parametrize("docs, match", [
    ({}, "No token-id documents"),
    ({"a": []}, "non-empty 1-D"),
    ({"a": [[1, 2]]}, "non-empty 1-D"),
    ({"a": [1.5, 2.0]}, "integer"),
    ({"": [1]}, "keys are non-empty strings"),
    ([("a", [1]), ("a", [2])], "given twice"),
    ([("a", [1], "x")], "not a \\(key, ids\\) pair"),
    ({"a": [70, 262]}, "token id 262, outside the model's vocabulary 0..261"),
])
def test_token_ids_bad_input_is_refused_before_writing(tmp_path, models, docs, match):
    with pytest.raises(ConfigError, match=match):
        encode_token_ids(docs, tmp_path / "m.msa", **models["msa"], **SMALL)
    assert not (tmp_path / "m.msa").exists()
