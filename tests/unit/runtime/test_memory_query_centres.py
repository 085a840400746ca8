"""``Memory.centre_queries`` (``runtime/centre.py``) on the tiny MSA checkpoint (dot scores: the prepared
query is the raw router query).

- the calibration forward (``MsaEngine.query_sums``) sums exactly the router queries the routing forward
  makes (captured by wrapping the engine's ``router_q``);
- the index's chunk offsets are the head mean of those queries' mean against every chunk's key
  (float64 reference; tolerance: the stored offset is a float32 rounding (half an ulp) of a float64 sum
  over float32 router queries, which the two forwards give to an ulp: 2^-21 relative covers both);
- ``"store"``: reference questions from the store's passages, cached per store version and router id
  (a second call loads them; a damaged cache file is recomputed), None turns centring off and gives
  back the plain scores bit for bit; bad sources are refused before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError
from msa_memory.runtime import centre

TEXTS = ["Where is the summit hut?", "How many days ahead must a visitor book?", "What does the ranger carry?"]


def _captured_router_queries(mem, texts):
    """{router position: (sum of raw router queries, rows)} captured from the routing forwards of ``texts``."""
    eng, out = mem.engine, {}
    orig = eng.router_q

    def grab(pos, x):
        q = orig(pos, x)
        s, n = out.get(pos, (0, 0))
        out[pos] = (s + q.detach().double().reshape(q.shape[0], -1, eng.head_dim).sum(0), n + q.shape[0])
        return q

    eng.router_q = grab
    try:
        for t in texts:
            mem.route(t, k=1)
    finally:
        eng.router_q = orig
    return out


def test_centres_are_the_mean_router_query_and_come_off_every_chunk(tiny_memory):
    mem = tiny_memory
    assert mem.routing.score == "dot"
    plain = mem.route(TEXTS[0], k=len(mem.doc_ids))
    try:
        info = mem.centre_queries(TEXTS)
        assert info["centred"] and info["source"] == "texts" and info["reference_questions"] == 3 and not info["cached"]
        want = _captured_router_queries(mem, TEXTS)
        D = mem.engine.head_dim
        for pos, (s, n) in want.items():
            mu = s / n                                                           # (Hq, D) float64
            k = mem.index.keys[pos].double()                                     # (C, H, D)
            H = k.shape[1]
            ref = (k * mu.view(H, -1, D).sum(1)).sum((1, 2)) * D ** -0.5 / mu.shape[0]
            got = mem.index._offsets[(False, pos)].double()
            assert torch.allclose(got, ref, rtol=2.0 ** -21, atol=0)
        centred = mem.route(TEXTS[0], k=len(mem.doc_ids))
        assert not np.array_equal(np.sort(centred[1]), np.sort(plain[1]))
    finally:
        assert mem.centre_queries(None) == {"centred": False}
    again = mem.route(TEXTS[0], k=len(mem.doc_ids))
    assert again[0].tolist() == plain[0].tolist() and np.array_equal(again[1], plain[1])


def test_store_centres_are_cached_per_version(tiny_memory, tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path))
    mem = tiny_memory
    try:
        first = mem.centre_queries("store", n=4)
        assert first["source"] == "store" and not first["cached"] and first["reference_questions"] >= 1
        offsets = {k: v.clone() for k, v in mem.index._offsets.items()}
        path = centre.cache_path(mem.store, mem.identity.router_id, 4)
        assert path.is_file() and path.parent.parent == tmp_path
        second = mem.centre_queries("store", n=4)
        assert second["reference_questions"] == first["reference_questions"]
        assert second["cached"] and all(torch.equal(offsets[k], v) for k, v in mem.index._offsets.items())
        path.write_bytes(b"not a safetensors file")                             # damaged: recomputed, rewritten
        third = mem.centre_queries("store", n=4)
        assert not third["cached"] and all(torch.equal(offsets[k], v) for k, v in mem.index._offsets.items())
        assert centre.load_cached(path) is not None
        assert centre.cache_path(mem.store, mem.identity.router_id, 5) != path
    finally:
        mem.centre_queries(None)


@pytest.mark.parametrize("bad", ["stor", [], [""], ["ok", 3], 7])
def test_bad_sources_are_refused(tiny_memory, bad):
    with pytest.raises(ConfigError, match="centre_queries takes"):
        tiny_memory.centre_queries(bad)
    assert not tiny_memory.index.centred


def test_reference_texts_are_first_sentences_of_a_seeded_sample(tiny_memory):
    mem = tiny_memory
    a = centre.reference_texts(mem.store, mem.doc_ids, 3)
    assert a == centre.reference_texts(mem.store, mem.doc_ids, 3) and 1 <= len(a) <= 3
    assert all(len(t) <= centre.MAX_CHARS and t == " ".join(t.split()) for t in a)
    assert centre.first_sentence("One two.  Three four? Five") == "One two."
    with pytest.raises(ConfigError, match="at least one reference question"):
        centre.reference_texts(mem.store, mem.doc_ids, 0)
