"""`msa store reindex-router` in place: a trained adapter becomes the router of a new version.

Tiny real Gemma-3-shaped model (4 layers, all router layers) and random adapters. Oracles: the new
version's keys equal the adapter applied to the kept inputs (independent torch computation) and
match a fresh encode with that adapter up to bf16 rounding; the old version keeps its keys and
routes with its own adapter; Memory refuses the wrong adapter and names the version that fits;
appends follow the version's router; bad input changes nothing; a SIGKILLed reindex leaves the
old version readable.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError, IdentityMismatchError

TEXTS = [f"Note {i}: the {['red', 'blue', 'green'][i % 3]} kite number {i} flew over {i * 11} hills near lake {i % 4}. "
         * (1 + i % 3) for i in range(10)]


@pytest.fixture(scope="module")
def tiny():
    from msa_memory.encode import load_model
    from msa_memory.encode.tiny import tiny_model, tiny_tokenizer

    with pytest.warns(Warning):
        return load_model(tiny_model("gemma3"), tokenizer=tiny_tokenizer(), router_layers="all", chunk_tokens=16,
                          dtype=torch.float32)


def with_router(loaded, adapter):
    return loaded.with_router(adapter)


def random_adapter(loaded, seed, layers=None, extra=None):
    from msa_memory.train.recipe import adapter_from_projections
    from msa_memory.train.trainer import RouterProjections

    rc = loaded.router.config
    layers = tuple(layers or rc.router_layers)
    g = torch.Generator().manual_seed(seed)
    proj = RouterProjections(layers, [torch.randn(rc.n_q_heads * rc.head_dim, rc.hidden_size, generator=g)
                                      for _ in layers],
                             [torch.randn(rc.n_kv_heads * rc.head_dim, rc.hidden_size, generator=g) for _ in layers],
                             rc.n_q_heads, rc.n_kv_heads, rc.head_dim)
    return adapter_from_projections(proj, rc, layers=layers, extra=extra or {"seed": seed})


def make_store(root, loaded, texts, keep=True, shards=2):
    from msa_memory.encode import Encoder
    from msa_memory.schemas.records import Passage
    from msa_memory.store import create_store, write_shard

    enc = Encoder(loaded, keep_router_inputs=keep, store_dtype="bfloat16", max_batch_tokens=400)
    st = create_store(root, enc.identity(), exist_ok=True)
    ids = st.reserve_ids(len(texts))
    ps = [Passage(t, f"doc{i}.txt", 0) for i, t in enumerate(texts)]
    cut = len(texts) // shards
    recs = [write_shard(root, f"s{st.version}-{j}", ps[j * cut:(j + 1) * cut if j < shards - 1 else None],
                        enc.encode(ids[j * cut:(j + 1) * cut if j < shards - 1 else None],
                                   ps[j * cut:(j + 1) * cut if j < shards - 1 else None])) for j in range(shards)]
    return st.commit(add=recs), ids


def test_reindex_into_new_version_of_same_store(tiny, tmp_path):
    from msa_memory.runtime import Memory
    from msa_memory.schemas.records import from_float32, to_float32
    from msa_memory.store import open_store
    from msa_memory.train.reindex import reindex_router

    s1, ids = make_store(tmp_path / "a.msa", tiny, TEXTS)
    old_keys = [s1.router_keys(p)[0].copy() for p in range(s1.identity.n_layers)]
    ad = random_adapter(tiny, 7)
    s2, stats = reindex_router(s1, ad, adapter_path="router/")
    assert s2.root == s1.root and s2.version == s1.version + 1 and not stats["unchanged"]
    assert stats["docs"] == len(TEXTS) and stats["shards"] == 2 and stats["router_id"] == ad.fingerprint()
    assert s2.identity.router_id == ad.fingerprint() and s2.router["adapter_path"] == "router/"
    # keys = the adapter applied to the kept inputs (fp32 matmul here, narrowed to bf16): bit-identical
    for p, layer in enumerate(s2.identity.router_layers):
        x, d = s2.router_inputs(p)
        with torch.no_grad():
            want = ad.keys_from_pooled(layer, torch.from_numpy(to_float32(x, "bfloat16"))).numpy()
        k, dk = s2.router_keys(p)
        assert np.array_equal(d, dk) and k.tobytes() == from_float32(want, "bfloat16").tobytes()
    # ... and match a fresh encode with the new adapter up to bf16 rounding of the inputs
    new_model = with_router(tiny, ad)
    fresh, _ = make_store(tmp_path / "fresh.msa", new_model, TEXTS)
    for p in range(s2.identity.n_layers):
        np.testing.assert_allclose(to_float32(s2.router_keys(p)[0], "bfloat16"),
                                   to_float32(fresh.router_keys(p)[0], "bfloat16"), atol=3e-2, rtol=3e-2)
    # the old version still has its keys and routes with its own adapter; the new one with the new adapter
    v1 = open_store(s1.root, version=s1.version)
    assert all(np.array_equal(v1.router_keys(p)[0], old_keys[p]) for p in range(v1.identity.n_layers))
    q = TEXTS[4][:50]
    h1, sc1, _ = Memory(v1, model=tiny).route(q, k=3)
    h1_ref, sc1_ref, _ = Memory(s1, model=tiny).route(q, k=3)
    assert np.array_equal(h1, h1_ref) and np.array_equal(sc1, sc1_ref)
    h2, sc2, _ = Memory(s2, model=new_model).route(q, k=len(TEXTS))
    hf, scf, _ = Memory(fresh, model=new_model).route(q, k=len(TEXTS))
    by_id = dict(zip(hf.tolist(), scf.tolist()))
    np.testing.assert_allclose(sc2, [by_id[int(i)] for i in h2], atol=5e-2)
    # the wrong adapter for a version is refused, naming the version that fits
    with pytest.raises(IdentityMismatchError, match=rf"versions \[{s2.version}\]"):
        Memory(v1, model=new_model)
    with pytest.raises(IdentityMismatchError, match=rf"version={s1.version}"):
        Memory(s2, model=tiny)
    # appends follow the version's router: the new adapter may append, the old one may not
    s3, new_ids = make_store(s1.root, new_model, ["A late note about kites and hills."], shards=1)
    assert s3.router["router_id"] == ad.fingerprint()
    hits, _, _ = Memory(s3, model=new_model).route("late note about kites", k=len(TEXTS) + 1)
    assert int(new_ids[0]) in hits.tolist()
    with pytest.raises(IdentityMismatchError):
        make_store(s1.root, tiny, ["An append with the old router."], shards=1)
    # reindexing with the adapter the version already has: nothing to do
    same, st2 = reindex_router(s3, ad)
    assert st2["unchanged"] and same.version == s3.version


def test_reindex_bad_input_changes_nothing(tiny, tmp_path):
    from msa_memory.encode import RouterAdapter
    from msa_memory.store import open_store
    from msa_memory.train.reindex import reindex_router

    s1, _ = make_store(tmp_path / "a.msa", tiny, TEXTS[:4])

    def unchanged(s):
        assert open_store(s.root).version == s.version and not (s.root / "router_keys").exists()

    plain, _ = make_store(tmp_path / "plain.msa", tiny, TEXTS[:4], keep=False)
    with pytest.raises(ConfigError, match="keeps no router inputs.*--keep-router-inputs"):
        reindex_router(plain, random_adapter(tiny, 1))
    unchanged(plain)
    rc = tiny.router.config
    other = RouterAdapter(dataclasses.replace(rc, hidden_size=rc.hidden_size * 2))  # another backbone's shape
    with pytest.raises(IdentityMismatchError, match="hidden_size.*another backbone"):
        reindex_router(s1, other)
    unchanged(s1)
    foreign = random_adapter(tiny, 2, extra={"model_fingerprint": "0" * 64})
    with pytest.raises(IdentityMismatchError, match="trained on backbone 0000"):
        reindex_router(s1, foreign)
    unchanged(s1)
    fewer = random_adapter(tiny, 3, layers=rc.router_layers[1:])
    with pytest.raises(IdentityMismatchError, match="--dest"):
        reindex_router(s1, fewer)
    unchanged(s1)
    # an adapter recording this store's backbone fingerprint is accepted
    mine = random_adapter(tiny, 4, extra={"model_fingerprint": s1.identity.model_fingerprint})
    assert reindex_router(s1, mine)[0].version == s1.version + 1


def test_cli_reindex_in_place_and_dest(tiny, tmp_path):
    from typer.testing import CliRunner

    from msa_memory.cli import app
    from msa_memory.store import open_store

    s1, _ = make_store(tmp_path / "a.msa", tiny, TEXTS[:5])
    ad = random_adapter(tiny, 5)
    ad.save(tmp_path / "router")
    r = CliRunner().invoke(app, ["store", "reindex-router", str(s1.root), "--adapter", str(tmp_path / "router"),
                                 "--message", "new router", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["version"] == s1.version + 1 and res["router_id"] == ad.fingerprint() and res["docs"] == 5
    new = open_store(s1.root)
    assert new.manifest["message"] == "new router" and new.identity.router_id == ad.fingerprint()
    r = CliRunner().invoke(app, ["store", "reindex-router", str(s1.root), "--adapter", str(tmp_path / "router")])
    assert r.exit_code == 0 and "nothing to do" in r.output
    r = CliRunner().invoke(app, ["store", "versions", str(s1.root)])
    lines = r.output.strip().splitlines()
    assert s1.identity.router_id[:16] in lines[-2] and ad.fingerprint() in lines[-1] and "reindex" in lines[-1]
    # a layer subset needs --dest (a new store restricted to the adapter's layers)
    random_adapter(tiny, 6, layers=(1, 3)).save(tmp_path / "sub")
    r = CliRunner().invoke(app, ["store", "reindex-router", str(s1.root), "--adapter", str(tmp_path / "sub"), "--json"])
    assert r.exit_code != 0 and "--dest" in r.output and open_store(s1.root).version == new.version
    r = CliRunner().invoke(app, ["store", "reindex-router", str(s1.root), "--adapter", str(tmp_path / "sub"),
                                 "--dest", str(tmp_path / "sub.msa"), "--json"])
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "sub.msa").identity.router_layers == (1, 3)


def test_sigkill_mid_reindex_leaves_old_version(tiny, tmp_path):
    from msa_memory.store import open_store
    from msa_memory.testing.faults import kill_when_paused, spawn_paused_writer

    s1, _ = make_store(tmp_path / "a.msa", tiny, TEXTS[:6])
    before = [s1.router_keys(p)[0].tobytes() for p in range(s1.identity.n_layers)]
    random_adapter(tiny, 8).save(tmp_path / "router")
    script = ("from msa_memory.encode import RouterAdapter\nfrom msa_memory.store import open_store\n"
              "from msa_memory.train.reindex import reindex_router\n"
              f"reindex_router(open_store({str(s1.root)!r}), RouterAdapter.load({str(tmp_path / 'router')!r}))\n"
              "print('PUBLISHED')\n")
    marker = tmp_path / "paused"
    proc = spawn_paused_writer(script, "rekey:written", marker)
    assert kill_when_paused(proc, marker, timeout=120), proc.stderr.read().decode()[-2000:]
    after = open_store(s1.root)
    assert after.version == s1.version and after.identity.router_id == s1.identity.router_id
    assert [after.router_keys(p)[0].tobytes() for p in range(after.identity.n_layers)] == before
    assert {o["kind"] for o in after.gc(dry_run=True, grace_s=0)["orphans"]} == {"router_keys"}
