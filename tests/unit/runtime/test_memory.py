"""Memory (notebook API) on a tiny random MSA checkpoint and a real store built for it.

Covers: identity refusal, search == brute-force routing over HF's own hidden states, pooled ask ==
the slow spec reference (tests/equivalence/msa_reference.py) on the store's numbers, text-mode
prompt and streaming, host vs store content tier, interleave round cap, error messages, reprs.
Run: .venv/bin/python -m pytest tests/unit/runtime -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError, IdentityMismatchError, RuntimeMemoryError
from msa_memory.runtime import Memory
from msa_memory.testing.runtime_kit import PASSAGES, build_store

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "equivalence"))
from msa_reference import SlowMsa  # noqa: E402

Q = "What is the blue door code?"


def _store_arrays(mem):
    """Router keys per layer, chunk→dense-doc map and content K̄V̄ in chunk order, straight from the store."""
    st = mem.store
    keys, docs = [], None
    for pos in range(st.identity.n_layers):
        k, docs = st.router_keys(pos)
        keys.append(torch.from_numpy(k.astype(np.float32)))
    dense = np.searchsorted(mem.doc_ids, docs)
    kv_docs = {int(d): a for d, a in zip(mem.doc_ids, st.load_kv(mem.doc_ids))}
    seen: dict[int, int] = {}
    rows = []
    for d in docs.tolist():
        j = seen.get(d, 0)
        rows.append(kv_docs[d][j])
        seen[d] = j + 1
    return keys, dense, torch.from_numpy(np.stack(rows).astype(np.float32))


def test_memory_refuses_a_model_with_another_identity(tiny_store, tmp_path):
    from msa_memory.encode.model import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint

    other = load_model(str(write_tiny_msa_checkpoint(tmp_path / "other", pooling_kernel_size=16, seed=7)),
                       dtype=torch.float32)
    with pytest.raises(IdentityMismatchError, match="model_fingerprint"):
        Memory(tiny_store, model=other)


def test_search_equals_bruteforce_routing_over_hf_hidden_states(tiny_memory):
    mem = tiny_memory
    tab = mem.search(Q, k=4)
    assert tab.column_names == ["rank", "doc_id", "score", "source_path", "passage_index", "text"]
    assert tab.num_rows == 4
    # independent path: the unmodified HF forward over [template head | question] at MSA positions
    head, q = mem.layout.head_ids(), mem.layout.question(Q)
    P, k = len(head), mem.routing.top_k
    ids = torch.tensor([head + q.ids])
    pos = torch.tensor([list(range(P)) + list(range(P + k, P + k + len(q.ids)))])
    hf = mem.model.hf_model
    with torch.no_grad():
        hs = hf(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
        rows = torch.tensor([False] * P + q.route_rows)
        keys, dense, _ = _store_arrays(mem)
        total = np.zeros(len(mem.doc_ids))
        for r, li in enumerate(mem.identity.router_layers):
            x = hf.model.layers[li].input_layernorm(hs[li][0])[rows].double()
            qr = (x @ mem.model.router.q_proj[str(li)].weight.double().T).view(len(x), -1, mem.identity.head_dim)
            Hq, H = qr.shape[1], keys[r].shape[1]
            S = torch.stack([qr[:, h] @ keys[r][:, h // (Hq // H)].double().T for h in range(Hq)], -1)
            chunk = (S.mean(-1) / np.sqrt(mem.identity.head_dim)).max(0).values.numpy()
            total += np.array([chunk[dense == d].max() for d in range(len(mem.doc_ids))])
    want = mem.doc_ids[np.argsort(-total, kind="stable")[:4]]
    assert tab.column("doc_id").to_pylist() == want.tolist()
    np.testing.assert_allclose(tab.column("score").to_numpy(), np.sort(total)[::-1][:4], rtol=1e-4)


def test_pooled_ask_equals_slow_reference_on_store_numbers(tiny_memory):
    mem = tiny_memory
    path = Path(mem.model.source["path"])
    from msa_reference import load_weights

    sd, cfg = load_weights(path)
    slow = SlowMsa(sd, cfg)
    keys, dense, kv = _store_arrays(mem)
    head, q = mem.layout.head_ids(), mem.layout.question(Q)
    ref_tokens = slow.greedy(head, q.ids, q.route_rows, keys, dense, kv, len(mem.doc_ids), 5)
    _, chosen = slow.logits(head, q.ids, q.route_rows, keys, dense, kv, len(mem.doc_ids))
    ans = mem.ask(Q, mode="pooled", max_new_tokens=5, stop_strings=())
    assert ans.tokens == ref_tokens
    assert ans.answer == mem.tokenizer.decode(ref_tokens, skip_special_tokens=True).strip()
    for r, docs in chosen.items():
        assert sorted(ans.rounds[0].per_layer[r]) == sorted(mem.doc_ids[docs].tolist())
    assert set(ans.timings) >= {"routing_s", "fetch_s", "prefill_s", "decode_s", "total_s"}


def test_text_mode_injects_routed_passages_and_streams(tiny_memory):
    mem = tiny_memory
    pieces: list[str] = []
    ans = mem.ask(Q, mode="text", k=2, max_new_tokens=6, on_token=pieces.append)
    top = mem.search(Q, k=2).column("doc_id").to_pylist()
    assert [d.doc_id for d in ans.rounds[0].docs] == top
    assert "".join(pieces).strip() == ans.answer
    assert ans.n_prompt_tokens == len(mem.layout.head_ids()) + len(
        mem.layout.with_passages(Q, list(zip(top, mem.store.texts(top)))).ids)
    assert all(d.source_path.startswith("notes/") for d in ans.docs)


def test_store_tier_gives_the_same_answer_and_caches(tiny_store, tiny_msa_model, tiny_memory):
    on_demand = Memory(tiny_store, model=tiny_msa_model, source="store", cache_bytes="1MiB")
    assert on_demand.content.source == "store"
    a = on_demand.ask(Q, mode="pooled", max_new_tokens=4)
    b = tiny_memory.ask(Q, mode="pooled", max_new_tokens=4)
    assert a.answer == b.answer and a.rounds[0].per_layer == b.rounds[0].per_layer
    fetched = on_demand.content.stats["docs_fetched"]
    on_demand.ask(Q, mode="pooled", max_new_tokens=1)
    assert on_demand.content.stats["docs_fetched"] == fetched          # second ask: all from the cache
    assert on_demand.content.stats["cache_hits"] > 0


def test_interleave_respects_round_cap(tiny_memory):
    ans = tiny_memory.ask(Q, mode="interleave", max_rounds=1, max_new_tokens=4)
    assert len(ans.rounds) == 1 and ans.mode == "interleave"
    assert ans.n_new_tokens >= 1


def test_bad_requests_get_clear_errors(tiny_store, tiny_msa_model, tiny_memory):
    with pytest.raises(ConfigError, match="mode='fast'"):
        tiny_memory.ask(Q, mode="fast")
    with pytest.raises(ConfigError, match="empty"):
        tiny_memory.search("  ")
    with pytest.raises(RuntimeMemoryError, match="memory_budget"):
        Memory(tiny_store, model=tiny_msa_model, source="host", memory_budget=100)
    with pytest.raises(ConfigError, match="byte size"):
        Memory(tiny_store, model=tiny_msa_model, memory_budget="lots")


def test_reprs_show_store_and_answer_sources(tiny_memory):
    assert "docs=6" in repr(tiny_memory) and "<table>" in tiny_memory._repr_html_()
    ans = tiny_memory.ask(Q, mode="text", k=2, max_new_tokens=2)
    html = ans._repr_html_()
    assert "notes/" in html and str(ans.rounds[0].docs[0].doc_id) in html
    assert ans.to_dict()["mode"] == "text"


def test_stop_strings_cut_the_answer_and_streaming_holds_them_back():
    from msa_memory.runtime.generation import holds_stop_prefix, stop_at

    assert stop_at("4471.\n\nPassage 4: more", ("\n\nPassage ", "\nQuestion:")) == "4471."
    assert stop_at("no stop here", ("\nQuestion:",)) == "no stop here"
    assert holds_stop_prefix("4471.\n\nPas", ("\n\nPassage ",)) and not holds_stop_prefix("4471.", ("\n\nPassage ",))


def test_stop_string_from_the_model_output_ends_generation(tiny_memory):
    kw = dict(mode="text", k=2, max_new_tokens=12, temperature=3.0, seed=5)   # sampled: printable bytes
    free = tiny_memory.ask(Q, stop_strings=(), **kw)
    assert len(free.answer) >= 4 and free.stop_reason == "length"
    stop = free.answer[2:4]                    # a string the model is known to produce at step ~3
    pieces: list[str] = []
    cut = tiny_memory.ask(Q, stop_strings=(stop,), on_token=pieces.append, **kw)
    assert cut.stop_reason == "stop" and stop not in cut.answer and cut.n_new_tokens < free.n_new_tokens
    assert "".join(pieces).strip() == cut.answer


def test_interleave_injection_routes_only_the_latest_block(tiny_memory):
    from msa_memory.runtime.interleave import ROUND_END, inject, requested_ids
    from msa_memory.runtime.prompts import PromptIds

    known = set(tiny_memory.doc_ids.tolist())
    assert requested_ids("[3]<|object_ref_end|> and [1] [3] [999]", known) == [1, 3]
    lay = tiny_memory.layout
    base = lay.question(Q)
    h1 = inject(lay, PromptIds([7, 8], [False, False]), [(3, "alpha")])
    h2 = inject(lay, h1 + PromptIds([9], [False]), [(1, "beta")])
    assert not any(h2.route_rows[: len(h1.ids) + 1])                      # older block no longer routes
    block = lay.encode([("[1]. beta\n", True)]).ids
    tail = len(lay.encode([(ROUND_END, False)]).ids)
    assert h2.ids[-len(block) - tail:-tail] == block and all(h2.route_rows[-len(block) - tail:-tail])
    assert not any(h2.route_rows[-tail:])                                 # the delimiter never routes
    assert sum((base + h2).route_rows) == sum(base.route_rows) + len(block)


def test_memory_refuses_model_on_another_device(tiny_store, tiny_msa_model):
    with pytest.raises(ConfigError, match="device"):
        Memory(tiny_store, model=tiny_msa_model, device="meta")


def test_empty_store_search_says_how_to_fill_it(tiny_msa_model, tmp_path):
    from msa_memory.store import create_store

    empty = create_store(tmp_path / "empty.msa", tiny_msa_model.identity(store_dtype="float32"))
    mem = Memory(empty, model=tiny_msa_model)
    with pytest.raises(RuntimeMemoryError, match="no documents"):
        mem.search(Q)
    with pytest.raises(RuntimeMemoryError, match="no documents"):
        mem.ask(Q, mode="pooled")


@pytest.mark.parametrize("window", [None, 4])
def test_shifted_grid_routing_equals_bruteforce_max_over_both_grids(tiny_msa_model, tmp_path, window):
    """A store whose adapter shifts a router layer (P-token windows from P/2, or 4-token windows at a stride
    of 2): Memory routes that layer by each document's max over its aligned and shifted chunks (brute force
    over HF's own hidden states and the store's two key arrays); pooled mode's per-layer choices are the
    top-k of those same layer scores; the other layers are MSA's."""
    from msa_memory.encode.model import load_model

    base_passages = PASSAGES
    layers = tiny_msa_model.router_layers
    router = tiny_msa_model.router.with_shifted_layers([layers[-1]], window)
    loaded = load_model(str(tiny_msa_model.source["path"]), adapter=router, dtype=torch.float32)
    passages = [p * 3 for p in base_passages]                           # several chunks each at P = 16
    store = build_store(tmp_path / "s.msa", loaded, passages=passages)
    assert store.identity.shifted_layers == (layers[-1],) and store.identity.shifted_window == window
    mem = Memory(store, model=loaded)
    assert "shifted_layers" in repr(mem) and mem.n_chunks == store.stats()["n_chunks"]
    assert mem.index.layer_chunks(len(layers) - 1) == mem.n_chunks + len(store.router_keys_shifted(0)[0])
    head, q = mem.layout.head_ids(), mem.layout.question(Q)
    P, k = len(head), mem.routing.top_k
    ids = torch.tensor([head + q.ids])
    pos = torch.tensor([list(range(P)) + list(range(P + k, P + k + len(q.ids)))])
    hf = mem.model.hf_model
    per_layer, total = [], np.zeros(len(mem.doc_ids))
    with torch.no_grad():
        hs = hf(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
        rows = torch.tensor([False] * P + q.route_rows)
        for r, li in enumerate(layers):
            x = hf.model.layers[li].input_layernorm(hs[li][0])[rows].double()
            qr = (x @ router.q_proj[str(li)].weight.double().T).view(len(x), -1, mem.identity.head_dim)
            grids = [store.router_keys(r)] + ([store.router_keys_shifted(0)] if li == layers[-1] else [])
            best = np.full(len(mem.doc_ids), -np.inf)
            for g, (k_np, docs) in enumerate(grids):
                if g == 1:
                    aligned_only = best.copy()
                keys = torch.from_numpy(k_np.astype(np.float32)).double()
                Hq, H = qr.shape[1], keys.shape[1]
                S = torch.stack([qr[:, h] @ keys[:, h // (Hq // H)].T for h in range(Hq)], -1)
                chunk = (S.mean(-1) / np.sqrt(mem.identity.head_dim)).max(0).values.numpy()
                dense = np.searchsorted(mem.doc_ids, docs)
                best = np.maximum(best, [chunk[dense == d].max() for d in range(len(mem.doc_ids))])
            per_layer.append(best)
            total += best
    tab = mem.search(Q, k=4)
    assert tab.column("doc_id").to_pylist() == mem.doc_ids[np.argsort(-total, kind="stable")[:4]].tolist()
    np.testing.assert_allclose(tab.column("score").to_numpy(), np.sort(total)[::-1][:4], rtol=1e-4)
    assert (per_layer[-1] > aligned_only).any()          # the shifted grid decides some documents' scores here
    ans = mem.ask(Q, mode="pooled", max_new_tokens=2, stop_strings=())
    for r, best in enumerate(per_layer):
        want = mem.doc_ids[np.argsort(-best, kind="stable")[:k]]
        assert sorted(ans.rounds[0].per_layer[r]) == sorted(want.tolist())


@pytest.mark.parametrize("window", [None, 4])
def test_router_keys_that_cannot_fit_are_refused_before_loading(tiny_msa_model, tmp_path, window,
                                                                monkeypatch):
    """Memory keeps every router key resident (with the default's fine grid 5x MSA's aligned keys). It counts
    them from the store's live documents before loading anything (oracle: the bytes of the key arrays the
    store hands out, after a delete), and refuses, naming the sizes and the cheaper grids, when they exceed
    the memory free on the host; exactly the free bytes still open."""
    import msa_memory.routing.resident as resident_mod
    from msa_memory.encode.model import load_model

    base_passages = PASSAGES
    layers = tiny_msa_model.router_layers
    router = tiny_msa_model.router.with_shifted_layers(layers[1:], window)
    loaded = load_model(str(tiny_msa_model.source["path"]), adapter=router, dtype=torch.float32)
    store = build_store(tmp_path / "s.msa", loaded, passages=[p * 3 for p in base_passages])
    doc_ids = store.documents(["doc_id"]).column("doc_id").to_pylist()
    store = store.commit(delete_ids=doc_ids[1:2])                     # deleted chunks are not loaded
    want = (sum(store.router_keys(r)[0].nbytes for r in range(len(layers)))
            + sum(store.router_keys_shifted(j)[0].nbytes for j in range(len(layers) - 1)))
    assert store.router_key_bytes() == want and Memory(store, model=loaded).router_key_bytes == want
    free = resident_mod.free_bytes("cpu")
    assert free is None or free > 0
    monkeypatch.setattr(resident_mod, "free_bytes", lambda device: want - 1)
    with pytest.raises(RuntimeMemoryError, match=r"router keys of store .* take 0\.00 GiB \(2 router layers, 1 of them "
                                                 r"also over a shifted grid .*free on the host") as e:
        Memory(store, model=loaded)
    assert "--adapter aligned" in str(e.value) and "reindex-router" in str(e.value)
    monkeypatch.setattr(resident_mod, "free_bytes", lambda device: want)
    assert Memory(store, model=loaded).index.n_docs == len(doc_ids) - 1
