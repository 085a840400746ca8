"""A checkpoint saved the reference's way, used the reference's way: token ids in, numbers equal the slow reference.

The whole product path on a tiny random MSA checkpoint whose config.json is spelled as the
reference's ``MSAForCausalLM.save_pretrained`` writes it (``"sliding_window": false``, transformers
4.51.3 keys) and which has no tokenizer files: ``load_model`` refuses it naming ``tokenizer=``;
documents given as token ids go through ``encode_token_ids(..., tokenizer=FOLDER)``; a question
given as token ids goes through ``Memory(..., tokenizer=FOLDER)``. Checked against ``SlowMsa``
(msa_reference.py: float64, written from the spec): pooled K̄/V̄/K̄ᵣ of every stored document
(within bf16 storage rounding), the template prefix K/V (1e-5), per-layer routed documents and the
prefill logits on the store's numbers (1e-4), and greedy answer tokens (identical). The model is loaded in
fp32 (``dtype=torch.float32``): these bounds are fp32's, and a CPU with AVX512-BF16/AMX loads bf16 by default.

Run: ``.venv/bin/python -m pytest tests/equivalence/test_reference_checkpoint_equivalence.py -q``
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msa_memory.encode import load_model
from msa_memory.encode.tiny import tiny_tokenizer, write_tiny_msa_checkpoint
from msa_memory.errors import ModelLoadError
from msa_memory.jobs import encode_token_ids
from msa_memory.runtime import Memory
from msa_memory.schemas.records import to_float32

from msa_reference import SlowMsa, load_weights

DOCS = ["The blue door code is 4471. Nobody else knows it.", "Apples grow on trees in the northern orchard.",
        "The red door code is 9302, written on the back of the map.", "Rivers flow downhill to the sea.",
        "Our meeting moved to Thursday at noon.", "Cats sleep most of the day and hunt mice at night."]
QUESTION = "What is the blue door code?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refck")
    ckpt = write_tiny_msa_checkpoint(root / "ckpt", tokenizer=False, pooling_kernel_size=16,
                                     extra_msa_config={"top_k_docs": 2})
    tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    tok = tiny_tokenizer()
    docs = {f"doc-{i}": tok(t, add_special_tokens=False)["input_ids"] for i, t in enumerate(DOCS)}
    res = encode_token_ids(docs, root / "mem.msa", model=str(ckpt), tokenizer=str(root / "tokenizer"),
                           device="cpu", dtype="float32", workers=1, torch_threads=1)
    # the runtime in fp32: these tolerances are fp32's (a CPU with AVX512-BF16/AMX loads bf16 by default)
    model = load_model(str(ckpt), tokenizer=str(root / "tokenizer"), dtype=torch.float32)
    mem = Memory(str(root / "mem.msa"), model=model)
    sd, cfg = load_weights(ckpt)
    return ckpt, docs, res, mem, SlowMsa(sd, cfg)


def _store_arrays(mem):
    """Router keys per layer (C, H, D), chunk → dense-doc map and content K̄V̄ (C, L, 2, H, D), from the store."""
    keys, docs = [], None
    for pos in range(mem.store.identity.n_layers):
        k, docs = mem.store.router_keys(pos)
        keys.append(torch.from_numpy(to_float32(k, mem.store.identity.dtype)))
    kv = {int(d): to_float32(a, mem.store.identity.dtype) for d, a in zip(mem.doc_ids, mem.store.load_kv(mem.doc_ids))}
    rows, seen = [], {}
    for d in docs.tolist():
        rows.append(kv[d][seen.get(d, 0)])
        seen[d] = seen.get(d, 0) + 1
    return keys, np.searchsorted(mem.doc_ids, docs), torch.from_numpy(np.stack(rows))


def test_checkpoint_is_the_reference_spelling_without_tokenizer(setup):
    ckpt = setup[0]
    assert json.loads((ckpt / "config.json").read_text())["sliding_window"] is False
    with pytest.raises(ModelLoadError, match="tokenizer="):
        load_model(str(ckpt))


def test_stored_documents_equal_slow_stage1(setup):
    _, docs, res, mem, slow = setup
    assert res.committed and res.docs_added == len(DOCS)
    rows = mem.store.documents(columns=["doc_id", "source_path"]).to_pylist()
    dt = mem.store.identity.dtype
    for row in rows:
        d, ids = int(row["doc_id"]), docs[row["source_path"]]
        wrapped = mem.model.wrap_token_ids(ids, d)
        assert wrapped == mem.tokenizer(f"<|im_start|>[{d}]. {mem.tokenizer.decode(ids)}[{d}]<|im_end|>",
                                        add_special_tokens=False)["input_ids"]
        ref = slow.encode_doc(wrapped)                                   # (L, C, H, D) float64
        kv = torch.from_numpy(to_float32(mem.store.load_kv([d])[0], dt)).double()   # (C, L, 2, H, D)
        got = {"k": kv[:, :, 0].transpose(0, 1), "v": kv[:, :, 1].transpose(0, 1)}
        pos = [int(np.flatnonzero(mem.store.router_keys(p)[1] == d)[0]) for p in range(len(slow.router_layers))]
        got["k_router"] = torch.stack([torch.from_numpy(to_float32(mem.store.router_keys(p)[0], dt)).double()
                                       [pos[p]:pos[p] + ref["k"].shape[1]] for p in range(len(pos))])
        for name, want in ref.items():
            err = (got[name] - want).abs()
            tol = 2.0 ** -8 * want.abs() + 1e-6                          # bf16 storage rounding
            assert got[name].shape == want.shape and bool((err <= tol).all()), \
                f"doc {d} {name}: max |Δ| {err.max():.3g}, mean {err.mean():.3g}"


def test_template_prefix_equals_slow_reference(setup):
    mem, slow = setup[3], setup[4]
    head = mem.layout.head_ids()
    assert head == mem.tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    for (k, v), (rk, rv) in zip(mem.prefix, slow.prefix_kv(head)):
        assert (k.double() - rk).abs().max() < 1e-5 and (v.double() - rv).abs().max() < 1e-5


def test_routes_logits_and_answer_from_question_ids_equal_slow_reference(setup):
    _, _, _, mem, slow = setup
    ids = mem.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    keys, dense, kv = _store_arrays(mem)
    head, q = mem.layout.head_ids(), mem.layout.question(ids)
    assert q.ids == mem.layout.question(QUESTION).ids
    ref_logits, ref_chosen = slow.logits(head, q.ids, q.route_rows, keys, dense, kv, len(mem.doc_ids))
    k = slow.top_k
    st = mem.engine.new_state(len(q.ids) + 1, mem.prefix, top_k=k)
    P = len(head)
    got = mem.engine.forward(st, q.ids, list(range(P + k, P + k + len(q.ids))), route_rows=q.route_rows)
    diff = (got.double() - ref_logits).abs()
    assert diff.max() < 1e-4, f"max |Δlogit| {diff.max():.3g}, mean {diff.mean():.3g}"
    ans = mem.ask(ids, mode="pooled", max_new_tokens=4, stop_strings=())
    for r, docs in ref_chosen.items():
        assert sorted(st.routes[r].doc_ids.tolist()) == sorted(mem.doc_ids[docs].tolist())
        assert sorted(ans.rounds[0].per_layer[r]) == sorted(mem.doc_ids[docs].tolist())
    assert ans.tokens == slow.greedy(head, q.ids, q.route_rows, keys, dense, kv, len(mem.doc_ids), 4)
