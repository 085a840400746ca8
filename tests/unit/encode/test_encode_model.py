"""Model loading: MSA checkpoints, plain HF dirs/objects, router adapters, fingerprints, identity, errors.

Covers ``msa_memory.encode.model`` and ``msa_memory.routing.adapter`` on tiny random models (no
downloads): an MSA-format checkpoint (config.json with msa_config + safetensors with the reference
key names) loads with its config honoured and its router keys equal the formula
K̄ᵣ = mean_t(router_k_proj(input_layernorm(h_t))) (normalised only for aux_loss_method "INFONCE");
adapters round-trip; fingerprints are stable and sensitive; bad inputs raise the documented errors.

Run: ``.venv/bin/python -m pytest tests/unit/encode/test_encode_model.py -q``
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from msa_memory.encode import Encoder, RouterAdapter, RouterConfig, UntrainedRouterWarning, load_model, pool_naive
from msa_memory.encode.model import default_dtype
from msa_memory.encode.tiny import tiny_model, tiny_tokenizer, write_tiny_msa_checkpoint
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.schemas.records import Passage, StoreIdentity

TEXTS = ["The blue door code is 4471.", "Apples grow on trees in the northern orchard every autumn. " * 3]


def _quiet_load(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        return load_model(*a, **kw)


@pytest.fixture(scope="module")
def msa_dir(tmp_path_factory):
    return write_tiny_msa_checkpoint(tmp_path_factory.mktemp("msa") / "ckpt", router_layers="1,3",
                                     pooling_kernel_size=16, extra_msa_config={"doc_top_k": 8, "top_k_docs": 4})


@pytest.fixture(scope="module")
def msa_model(msa_dir):
    return load_model(str(msa_dir), dtype=torch.float32)


def _file_tensors(path):
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            out[k] = fh.get_tensor(k)
    return out


def test_msa_checkpoint_loads_with_its_config(msa_model, msa_dir):
    m = msa_model
    rc = m.router.config
    assert m.wrap == "msa" and m.source["kind"] == "msa"
    assert m.router_layers == (1, 3) and m.chunk_tokens == 16
    assert rc.top_k == 8  # doc_top_k wins over top_k_docs
    assert rc.score == "dot"  # INFONCE_DECOUPLE -> raw dot / sqrt(d)
    assert (rc.head_reduce, rc.query_reduce, rc.chunk_reduce) == ("mean", "max", "max")
    assert (m.n_q_heads, m.n_kv_heads, m.head_dim) == (4, 2, 16)
    files = _file_tensors(msa_dir)
    for layer in (1, 3):
        torch.testing.assert_close(m.router.q_proj[str(layer)].weight,
                                   files[f"model.layers.{layer}.self_attn.router_q_proj.0.weight"])
        torch.testing.assert_close(m.router.k_proj[str(layer)].weight,
                                   files[f"model.layers.{layer}.self_attn.router_k_proj.0.weight"])
    torch.testing.assert_close(m.hf_model.model.layers[2].self_attn.k_proj.weight,
                               files["model.layers.2.self_attn.k_proj.weight"])
    assert type(m.hf_model).__name__ == "Qwen3ForCausalLM"


def test_msa_wrapping_and_template_prefix_are_the_reference_ones(msa_model):
    tok = msa_model.tokenizer
    assert msa_model.wrap_ids("hi there", 17) == tok("<|im_start|>[17]. hi there[17]<|im_end|>",
                                                      add_special_tokens=False)["input_ids"]
    assert msa_model.template_prefix_ids() == tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert msa_model.wrap_ids("x", 3)[0] == tok.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("method", ["INFONCE_DECOUPLE", "INFONCE"])
def test_msa_router_keys_match_the_formula(tmp_path, method):
    d = write_tiny_msa_checkpoint(tmp_path / "c", router_layers="2,3", pooling_kernel_size=16, aux_loss_method=method)
    m = load_model(str(d), dtype=torch.float32)
    assert m.router.config.score == ("cosine" if method == "INFONCE" else "dot")
    ids = np.array([5, 900])
    ps = [Passage(t, "a.txt") for t in TEXTS]
    out = Encoder(m, store_dtype="float32").encode(ids, ps)
    files = _file_tensors(d)
    want = []
    with torch.no_grad():
        for doc_id, p in zip(ids, ps):
            toks = m.tokenizer(f"<|im_start|>[{doc_id}]. {p.text}[{doc_id}]<|im_end|>", add_special_tokens=False)["input_ids"]
            hs = m.hf_model(input_ids=torch.tensor([toks]), output_hidden_states=True).hidden_states
            per_layer = []
            for layer in (2, 3):
                x = m.hf_model.model.layers[layer].input_layernorm(hs[layer][0]).double()
                w = files[f"model.layers.{layer}.self_attn.router_k_proj.0.weight"].double()
                r = pool_naive((x @ w.T).view(len(toks), 2, 16).numpy(), [len(toks)], 16)
                if method == "INFONCE":
                    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
                per_layer.append(r)
            want.append(np.stack(per_layer))
    want = np.concatenate(want, axis=1)
    err = np.abs(out.k_router - want).max()
    assert err <= 1e-5, f"router keys max abs err {err:.3g}"
    if method == "INFONCE":
        np.testing.assert_allclose(np.linalg.norm(out.k_router, axis=-1), 1.0, atol=1e-5)


def test_msa_router_layer_all_and_top_k_default(tmp_path):
    d = write_tiny_msa_checkpoint(tmp_path / "c", router_layers="all")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["msa_config"]["top_k_docs"]
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d), dtype=torch.float32)
    assert m.router_layers == (0, 1, 2, 3) and m.router.config.top_k == 16 and m.chunk_tokens == 64


def test_msa_checkpoint_missing_router_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file

    d = write_tiny_msa_checkpoint(tmp_path / "c", router_layers="2,3")
    sd = _file_tensors(d)
    del sd["model.layers.3.self_attn.router_k_proj.0.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="router_k_proj"):
        load_model(str(d), dtype=torch.float32)


def test_msa_checkpoint_without_msa_config_is_refused(tmp_path):
    d = write_tiny_msa_checkpoint(tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["msa_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="msa_config"):
        load_model(str(d), dtype=torch.float32)


def test_no_adapter_copies_qk_with_a_warning():
    hf = tiny_model("llama")
    with pytest.warns(UntrainedRouterWarning, match="weak"):
        m = load_model(hf, tokenizer=tiny_tokenizer(), dtype=torch.float32)
    assert m.router_layers == (2, 3)  # upper half of 4 layers
    assert m.router.config.source == "init-from-qk" and m.router.config.score == "cosine"
    torch.testing.assert_close(m.router.q_proj["3"].weight, hf.model.layers[3].self_attn.q_proj.weight)
    torch.testing.assert_close(m.router.k_proj["2"].weight, hf.model.layers[2].self_attn.k_proj.weight)


def test_adapter_save_load_roundtrip_and_use(tmp_path):
    cfg = RouterConfig((1, 2), n_q_heads=4, n_kv_heads=1, head_dim=16, hidden_size=64, chunk_tokens=8,
                       score="dot", query_reduce="last", top_k=3)
    torch.manual_seed(0)
    a = RouterAdapter(cfg)
    a.save(tmp_path / "ad")
    b = RouterAdapter.load(tmp_path / "ad")
    assert b.config == cfg and a.fingerprint() == b.fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedRouterWarning)
        m = load_model(tiny_model("gemma3"), tokenizer=tiny_tokenizer(), adapter=tmp_path / "ad", dtype=torch.float32)
    assert m.router_layers == (1, 2) and m.chunk_tokens == 8 and m.router.config.query_reduce == "last"
    assert m.identity().router_id == a.fingerprint()
    with torch.no_grad():
        a.k_proj["1"].weight.add_(1e-3)
    assert a.fingerprint() != b.fingerprint()


def test_adapter_that_does_not_fit_the_model_is_refused(tmp_path):
    cfg = RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=16, hidden_size=64)
    RouterAdapter(cfg).save(tmp_path / "ad")
    with pytest.raises(ModelLoadError, match="does not fit"):  # gemma3 tiny has 1 KV head
        load_model(tiny_model("gemma3"), tokenizer=tiny_tokenizer(), adapter=tmp_path / "ad", dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="No router adapter"):
        RouterAdapter.load(tmp_path / "missing")
    cfg_json = json.loads((tmp_path / "ad" / "router_adapter.json").read_text())
    cfg_json["bogus"] = 1
    (tmp_path / "ad" / "router_adapter.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ModelLoadError, match="bogus"):
        RouterAdapter.load(tmp_path / "ad")


def test_shipped_adapters_load_by_name_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    """The three shipped adapters load by name with the router ids stores record (RECIPE.md has their
    commands): the default (both grids at every layer, a suffix query at layer 13), aligned (the same
    weights, aligned grid alone, no suffix query) and shallow (its layers 1, 5); a folder of the name wins."""
    import json

    from msa_memory.data import ALIGNED_ROUTER_ADAPTER, DEFAULT_ROUTER_ADAPTER, SHALLOW_ROUTER_ADAPTER, SHIPPED_ADAPTERS
    from msa_memory.routing.files import shipped_adapter
    from msa_memory.routing.registry import shipped_adapter_for_router

    names = ("default", "aligned", "shallow")
    folders = (DEFAULT_ROUTER_ADAPTER, ALIGNED_ROUTER_ADAPTER, SHALLOW_ROUTER_ADAPTER)
    ids = ("0bd2cbf054be9ce9", "a33595931c4c316b", "4b77c12b13a94f8c")
    assert sorted(SHIPPED_ADAPTERS) == sorted(names)
    adapters = [RouterAdapter.load(n) for n in names]
    default, aligned, shallow = adapters
    for a, name, folder, rid in zip(adapters, names, folders, ids):
        assert shipped_adapter(name) == folder
        assert a.fingerprint() == RouterAdapter.load(folder).fingerprint() == rid, folder
        assert shipped_adapter_for_router(rid) == folder    # a store built with any of them keeps its router
    # the default: router keys also over 32-token windows at a stride of 16 at every layer, and a suffix
    # query at layer 13; aligned is the same router without both, shallow its layers 1 and 5
    assert default.config.router_layers == (1, 5, 8, 11, 13, 16, 17)
    assert default.config.shifted_layers == default.config.router_layers and default.config.shifted_window == 32
    assert default.config.suffix_layers == (13,) and default.config.query_suffix == "\nThis passage is about"
    assert aligned.config.shifted_layers == () and aligned.config.suffix_layers == ()
    assert aligned.with_shifted_layers(aligned.config.router_layers, 32).fingerprint() == \
        default.without_suffix_queries().fingerprint()
    assert default.subset([1, 5]).with_shifted_layers([]).fingerprint() == shallow.fingerprint()
    assert max(shallow.config.router_layers) < max(default.config.router_layers)   # the faster encode
    for layer in default.config.router_layers:                                    # the weights ship once
        assert torch.equal(aligned.k_proj[str(layer)].weight, default.k_proj[str(layer)].weight)
    # the subset folders name the default's folder; aligned drops its suffix query
    spec = json.loads((ALIGNED_ROUTER_ADAPTER / "router_subset.json").read_text())
    assert spec["of"] == "../gemma3-270m-router" and spec["suffix_queries"] is False
    # provenance: the training commands of the default's three parts and of its suffix query
    assert len(default.config.extra["merged_from"]) == 3
    assert "--freeze-keys" in default.config.extra["suffix_query_from"]["extra"]["command"]
    assert shallow.config.extra["trained_by"] == "msa train-router"
    cfg = RouterConfig((1,), n_q_heads=4, n_kv_heads=1, head_dim=16, hidden_size=64)
    RouterAdapter(cfg).save(tmp_path / "shallow")
    monkeypatch.chdir(tmp_path)
    assert RouterAdapter.load("shallow").config == cfg                 # the user's folder, not the shipped one
    with pytest.raises(ModelLoadError, match=r"shipped adapter of the default model: aligned, default, shallow\."):
        RouterAdapter.load("deeper")


def test_a_subset_folder_can_drop_the_suffix_queries_of_the_folder_it_names(tmp_path):
    """router_subset.json with "suffix_queries": false gives the named folder's router without its suffix
    queries (checked by router id); a value other than true or false is refused in one line."""
    from msa_memory.data import DEFAULT_ROUTER_ADAPTER

    full = RouterAdapter.load("default")
    plain = full.without_suffix_queries()
    (tmp_path / "sub").mkdir()
    spec = {"of": str(DEFAULT_ROUTER_ADAPTER), "router_layers": list(full.config.router_layers),
            "shifted_layers": list(full.config.shifted_layers), "shifted_window": 32,
            "suffix_queries": False, "router_id": plain.fingerprint()}
    (tmp_path / "sub" / "router_subset.json").write_text(json.dumps(spec))
    got = RouterAdapter.load(tmp_path / "sub")
    assert got.fingerprint() == plain.fingerprint() and got.config.suffix_layers == ()
    spec["suffix_queries"] = "no"
    (tmp_path / "sub" / "router_subset.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="suffix_queries"):
        RouterAdapter.load(tmp_path / "sub")


def _adapter(layers, seed, **kw):
    torch.manual_seed(seed)
    a = RouterAdapter(RouterConfig(tuple(layers), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32, **kw))
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    return a


def test_merge_and_subset_roundtrip_and_refuse_bad_inputs(tmp_path):
    a, b = _adapter((1, 4), 0, extra={"model_fingerprint": "m1"}), _adapter((2,), 1, extra={"model_fingerprint": "m1"})
    m = RouterAdapter.merge([a, b])
    assert m.config.router_layers == (1, 2, 4) and m.config.extra["model_fingerprint"] == "m1"
    x = torch.randn(3, 32)
    for part in (a, b):
        for l in part.config.router_layers:       # each layer's maths is its part's
            assert torch.equal(m.router_q(l, x), part.router_q(l, x)) and torch.equal(m.router_k(l, x), part.router_k(l, x))
    assert m.subset((1, 4)).fingerprint() == a.fingerprint() and m.subset([2]).fingerprint() == b.fingerprint()
    with pytest.raises(ConfigError, match="Layer 1 is in adapters 0 and 1"):
        RouterAdapter.merge([a, _adapter((1,), 2)])
    with pytest.raises(ConfigError, match="differs from adapter 0 in \\['score'\\]"):
        RouterAdapter.merge([a, _adapter((3,), 2, score="dot")])
    with pytest.raises(ConfigError, match="at least two"):
        RouterAdapter.merge([a])
    with pytest.raises(ConfigError, match="not a subset"):
        m.subset((3,))
    # a subset folder: rebuilt from the folder it names, fingerprint checked
    m.save(tmp_path / "full")
    sub = tmp_path / "part"
    sub.mkdir()
    spec = {"of": "../full", "router_layers": [2], "router_id": b.fingerprint(), "extra": {"note": "b"}}
    (sub / "router_subset.json").write_text(json.dumps(spec))
    got = RouterAdapter.load(sub)
    assert got.fingerprint() == b.fingerprint() and got.config.extra == {"note": "b"}
    (sub / "router_subset.json").write_text(json.dumps(spec | {"router_id": a.fingerprint()}))
    with pytest.raises(ModelLoadError, match="not the ones this subset was made from"):
        RouterAdapter.load(sub)
    (sub / "router_subset.json").write_text(json.dumps(spec | {"router_layers": [3]}))
    with pytest.raises(ModelLoadError, match="not a subset"):
        RouterAdapter.load(sub)
    (sub / "router_subset.json").write_text(json.dumps(spec | {"router_layers": ["two"]}))
    with pytest.raises(ModelLoadError, match="router_subset.json"):
        RouterAdapter.load(sub)
    (sub / "router_subset.json").write_text(json.dumps({"of": "../full"}))
    with pytest.raises(ModelLoadError, match="needs 'of' \\(or 'parts'"):
        RouterAdapter.load(sub)
    # a subset folder of several folders' layers: their merge, fingerprint checked
    c = _adapter((2, 3), 3, extra={"model_fingerprint": "m1"})
    c.save(tmp_path / "other")
    spec = {"parts": [{"of": "../full", "router_layers": [1, 4]}, {"of": "../other", "router_layers": [3]}],
            "router_layers": [1, 3, 4], "router_id": RouterAdapter.merge([a, c.subset([3])]).fingerprint()}
    (sub / "router_subset.json").write_text(json.dumps(spec))
    got = RouterAdapter.load(sub)
    assert got.config.router_layers == (1, 3, 4) and got.fingerprint() == spec["router_id"]
    assert torch.equal(got.k_proj["3"].weight, c.k_proj["3"].weight) and torch.equal(got.q_proj["1"].weight, a.q_proj["1"].weight)
    for bad, match in (({"router_layers": [1, 3]}, "are not its router_layers"),
                       ({"router_id": a.fingerprint()}, "layers \\[1, 4\\] of .*full.* \\+ layers \\[3\\] of .*other"),
                       ({"parts": [{"of": "../full", "router_layers": [1, 2]}, {"of": "../other", "router_layers": [2]}],
                         "router_layers": [1, 2, 2]}, "must not overlap"),
                       ({"parts": [{"of": "../part", "router_layers": [1, 3, 4]}]}, "itself a subset"),
                       ({"parts": [], "router_layers": []}, "are not its router_layers"),
                       ({"parts": [{"of": "../full"}]}, "needs 'of' \\(or 'parts'")):
        (sub / "router_subset.json").write_text(json.dumps(spec | bad))
        with pytest.raises(ModelLoadError, match=match):
            RouterAdapter.load(sub)


def test_router_config_validation():
    with pytest.raises(ConfigError, match="router_layers"):
        RouterConfig((3, 1), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=8)
    with pytest.raises(ConfigError, match="multiple"):
        RouterConfig((1,), n_q_heads=3, n_kv_heads=2, head_dim=8, hidden_size=8)
    with pytest.raises(ConfigError, match="score"):
        RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=8, score="l2")  # type: ignore[arg-type]
    r = RouterAdapter(RouterConfig((1,), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=8))
    with pytest.raises(ConfigError, match="not a router layer"):
        r.router_q(2, torch.zeros(1, 8))
    assert r.router_q(1, torch.zeros(3, 5, 8)).shape == (3, 5, 4, 8)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    tok = tiny_tokenizer()
    a = _quiet_load(tiny_model("qwen2", seed=1), tokenizer=tok, dtype=torch.float32)
    b = _quiet_load(tiny_model("qwen2", seed=1), tokenizer=tok, dtype=torch.float32)
    c = _quiet_load(tiny_model("qwen2", seed=2), tokenizer=tok, dtype=torch.float32)
    d = _quiet_load(tiny_model("qwen2", seed=1, rope_theta=5000.0), tokenizer=tok, dtype=torch.float32)
    assert a.model_fingerprint == b.model_fingerprint
    assert len({a.model_fingerprint, c.model_fingerprint, d.model_fingerprint}) == 3
    # a saved directory: hashed from its files, same on every load
    path = tmp_path / "m"
    tiny_model("mistral").save_pretrained(path)
    tok.save_pretrained(path)
    m1 = _quiet_load(str(path), dtype=torch.float32)
    m2 = _quiet_load(str(path), dtype=torch.float32)
    assert m1.model_fingerprint == m2.model_fingerprint and m1.source["kind"] == "hf-dir"
    assert m1.identity().model_fingerprint == m1.model_fingerprint


def test_identity_record(msa_model):
    ident = msa_model.identity(store_dtype="float32")
    assert isinstance(ident, StoreIdentity)
    assert ident.router_layers == (1, 3) and ident.chunk_tokens == 16 and ident.wrap == "msa"
    assert (ident.n_kv_heads, ident.head_dim, ident.dtype, ident.hidden_size) == (2, 16, "float32", 0)
    assert msa_model.identity(keep_router_inputs=True).hidden_size == 64
    assert ident.extra["router"]["score"] == "dot"
    assert StoreIdentity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident
    assert Encoder(msa_model, keep_router_inputs=True).identity().hidden_size == 64


def test_load_model_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ModelLoadError, match="No model at"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ConfigError, match="tokenizer"):
        load_model(tiny_model("qwen3"))
    with pytest.raises(ConfigError, match="out of range"):
        load_model(tiny_model("qwen3"), tokenizer=tiny_tokenizer(), router_layers=[2, 9], dtype=torch.float32)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=262))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(gpt2, tokenizer=tiny_tokenizer(), dtype=torch.float32)


def test_default_dtype_follows_the_cpu():
    flags = open("/proc/cpuinfo").read()
    want = torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32
    assert default_dtype("cpu") == want
    assert default_dtype("cuda") == torch.bfloat16


def test_shifted_layers_of_adapters(tmp_path):
    """shifted_layers: a subset of the router layers, part of the router id only when set (adapters saved
    before it keep their ids), kept by save/load, subset (its share), merge (the union) and subset folders
    (theirs, whatever the folder they name has)."""
    a = _adapter((1, 4), 0)
    rid = a.fingerprint()
    assert "shifted_layers" not in a.config.to_dict()
    s = a.with_shifted_layers([4])
    assert s.config.shifted_layers == (4,) and s.fingerprint() != rid
    assert s.with_shifted_layers([]).fingerprint() == rid
    assert torch.equal(s.k_proj["4"].weight, a.k_proj["4"].weight)
    s.save(tmp_path / "s")
    assert RouterAdapter.load(tmp_path / "s").fingerprint() == s.fingerprint()
    assert s.subset([1]).config.shifted_layers == () and s.subset([4]).config.shifted_layers == (4,)
    b = _adapter((2,), 1).with_shifted_layers([2])
    assert RouterAdapter.merge([s, b]).config.shifted_layers == (2, 4)
    assert RouterAdapter.merge([a, b]).config.shifted_layers == (2,)
    with pytest.raises(ConfigError, match="shifted_layers must be ascending distinct router layers"):
        a.with_shifted_layers([3])
    with pytest.raises(ConfigError, match="shifted_layers"):
        RouterConfig((1, 4), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32, shifted_layers=(4, 1))
    # subset folders: the file says which layers shift
    sub = tmp_path / "part"
    sub.mkdir()
    spec = {"of": "../s", "router_layers": [1, 4], "router_id": rid}
    (sub / "router_subset.json").write_text(json.dumps(spec))
    assert RouterAdapter.load(sub).config.shifted_layers == ()            # the named folder's grid is not inherited
    (sub / "router_subset.json").write_text(json.dumps(spec | {"shifted_layers": [1, 4],
                                                               "router_id": a.with_shifted_layers([1, 4]).fingerprint()}))
    assert RouterAdapter.load(sub).config.shifted_layers == (1, 4)
    (sub / "router_subset.json").write_text(json.dumps(spec | {"shifted_layers": [2]}))
    with pytest.raises(ModelLoadError, match="shifted_layers must be"):
        RouterAdapter.load(sub)


def test_shifted_window_of_adapters(tmp_path):
    """shifted_window (a grid finer than the chunks): in the router id only when set, kept by save/load,
    with_shifted_layers (unless given), subset (dropped with the last shifted layer), merge (parts must agree)
    and subset folders; validated."""
    a = _adapter((1, 4), 0)
    s = a.with_shifted_layers([4])
    f = a.with_shifted_layers([4], 8)
    assert "shifted_window" not in s.config.to_dict() and f.config.to_dict()["shifted_window"] == 8
    assert len({a.fingerprint(), s.fingerprint(), f.fingerprint()}) == 3
    assert f.with_shifted_layers([4], None).fingerprint() == s.fingerprint()
    assert f.with_shifted_layers([4], 64).fingerprint() == s.fingerprint()           # P itself: the default grid
    assert f.with_shifted_layers([1, 4]).config.shifted_window == 8                  # kept unless given
    assert f.with_shifted_layers([]).fingerprint() == a.fingerprint()
    f.save(tmp_path / "f")
    assert RouterAdapter.load(tmp_path / "f").config.shifted_window == 8
    assert f.subset([1]).config.shifted_window is None and f.subset([4]).config.shifted_window == 8
    b = _adapter((2,), 1)
    assert RouterAdapter.merge([f, b]).config.shifted_window == 8
    assert RouterAdapter.merge([f, b.with_shifted_layers([2], 8)]).config.shifted_layers == (2, 4)
    with pytest.raises(ConfigError, match="different windows"):
        RouterAdapter.merge([f, b.with_shifted_layers([2])])
    with pytest.raises(ConfigError, match="shifted_window must be an even number of tokens from 2 to 62"):
        a.with_shifted_layers([4], 7)
    with pytest.raises(ConfigError, match="needs shifted_layers"):
        RouterConfig((1, 4), n_q_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32, shifted_window=32)
    sub = tmp_path / "part"
    sub.mkdir()
    spec = {"of": "../f", "router_layers": [1, 4], "shifted_layers": [4], "shifted_window": 8,
            "router_id": f.fingerprint()}
    (sub / "router_subset.json").write_text(json.dumps(spec))
    assert RouterAdapter.load(sub).config.shifted_window == 8
