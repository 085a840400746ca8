"""MSA checkpoints as the reference saves them, and checkpoints without a tokenizer.

Covers ``msa_memory.encode.model``'s config normalisation and ``tokenizer=``: a checkpoint written
the way the reference's ``MSAForCausalLM.save_pretrained`` writes it (transformers 4.51.3 keys,
``"sliding_window": false`` set by its decoder layer, ``rope_theta``/``rope_scaling``,
``torch_dtype``; ``msa_memory.encode.tiny.reference_msa_config``) loads, with the same fingerprint
and bit-identical encodings as the same weights under the installed transformers' spelling; each
config key the loader normalises, one by one; values still refused name their key; msa_config
spellings; a directory without tokenizer files refuses with a message naming ``tokenizer=`` and
loads with ``tokenizer=`` a folder (same fingerprint as the bundled files) or an object.

Run: ``.venv/bin/python -m pytest tests/unit/encode/test_reference_checkpoint.py -q``
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from msa_memory.encode import Encoder, UntrainedRouterWarning, load_model
from msa_memory.encode.checkpoints import backbone_kwargs
from msa_memory.encode.tiny import tiny_model, tiny_tokenizer, write_tiny_msa_checkpoint
from msa_memory.errors import ConfigError, ModelLoadError
from msa_memory.schemas.records import Passage

TEXTS = ["The blue door code is 4471.", "Apples grow on trees in the northern orchard every autumn. " * 3]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    kw = dict(router_layers="1,3", pooling_kernel_size=16)
    tok_dir = root / "tokenizer"
    tiny_tokenizer().save_pretrained(str(tok_dir))
    return {"reference": write_tiny_msa_checkpoint(root / "reference", **kw),
            "transformers": write_tiny_msa_checkpoint(root / "transformers", config_style="transformers", **kw),
            "no_tokenizer": write_tiny_msa_checkpoint(root / "bare", tokenizer=False, **kw),
            "tokenizer_dir": tok_dir}


def _encode(m):
    return Encoder(m, store_dtype="float32").encode(np.array([3, 8]), [Passage(t, "a.txt") for t in TEXTS])


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_reference_config_json_is_spelled_as_transformers_4_51_writes_it(ckpts):
    cfg = json.loads((ckpts["reference"] / "config.json").read_text())
    assert cfg["sliding_window"] is False and cfg["use_sliding_window"] is False
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None and "rope_parameters" not in cfg
    assert "layer_types" not in cfg and "dtype" not in cfg and cfg["torch_dtype"] == "float32"
    assert cfg["transformers_version"] == "4.51.3" and cfg["architectures"] == ["MSAForCausalLM"]
    assert cfg["model_type"] == "msa" and cfg["msa_config"]["router_layer_idx"] == "1,3"
    assert list(cfg) == sorted(cfg)
    assert (ckpts["reference"] / "generation_config.json").is_file()


def test_reference_checkpoint_loads_same_model_as_transformers_spelling(ckpts):
    """Failed before: Qwen3Config refused "sliding_window": false (StrictDataclassFieldValidationError)."""
    ref = load_model(str(ckpts["reference"]), dtype=torch.float32)
    new = load_model(str(ckpts["transformers"]), dtype=torch.float32)
    assert ref.hf_model.config.sliding_window is None
    assert ref.hf_model.config.layer_types == ["full_attention"] * 4
    assert ref.hf_model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert ref.model_fingerprint == new.model_fingerprint
    assert ref.router.fingerprint() == new.router.fingerprint()
    a, b = _encode(ref), _encode(new)
    for name in ("kv", "k_router", "n_tokens", "n_chunks"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("key, value, want", [
    ("sliding_window", False, {"sliding_window": None}),
    ("use_sliding_window", None, {"use_sliding_window": False}),
    ("max_window_layers", None, {"max_window_layers": 4}),
    ("head_dim", None, {"head_dim": 16}),
    ("rms_norm_eps", 1, {"rms_norm_eps": 1.0}),
    ("initializer_range", 0, {"initializer_range": 0.0}),
    ("use_cache", None, {"use_cache": False}),
    ("attention_bias", None, {"attention_bias": False}),
    ("tie_word_embeddings", None, {"tie_word_embeddings": False}),
    ("rope_scaling", {"type": "linear", "factor": 2.0},
     {"rope_parameters": {"type": "linear", "factor": 2.0}}),
    ("torch_dtype", "bfloat16", {}),
    ("auto_map", {"AutoConfig": "configuration_msa.MSAConfig"}, {}),
    ("_attn_implementation_autoset", True, {}),
    ("_name_or_path", "/ckpt/MSA-4B", {}),
])
def test_backbone_kwargs_normalise_each_key(key, value, want):
    from transformers import Qwen3Config

    raw = dict(vocab_size=262, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
               rope_theta=10000.0, model_type="msa", msa_config={}, architectures=["MSAForCausalLM"])
    raw[key] = value
    got = backbone_kwargs(raw, "test")
    assert {k: got[k] for k in want if k in got} == want and set(want) <= set(got)
    assert not {"model_type", "msa_config", "architectures", "torch_dtype", "auto_map"} & set(got)
    assert not any(k.startswith("_") for k in got)
    Qwen3Config(**got)                                      # transformers accepts the result


def test_backbone_kwargs_leave_accepted_configs_alone(ckpts):
    from transformers import Qwen3Config

    raw = json.loads((ckpts["transformers"] / "config.json").read_text())
    plain = {k: v for k, v in raw.items() if k not in ("msa_config", "model_type", "architectures", "dtype",
                                                       "transformers_version") and not k.startswith("_")}
    assert backbone_kwargs(raw, "test") == plain
    assert Qwen3Config(**backbone_kwargs(raw, "test")).to_dict() == Qwen3Config(**plain).to_dict()


def test_reference_checkpoint_with_every_variant_loads(tmp_path, ckpts):
    d = write_tiny_msa_checkpoint(tmp_path / "c", router_layers="1,3", pooling_kernel_size=16)
    _edit_config(d, use_sliding_window=None, max_window_layers=None, auto_map={"AutoModel": "x.MSA"},
                 _name_or_path="/train/out", _attn_implementation_autoset=True, torch_dtype="bfloat16")
    m = load_model(str(d), dtype=torch.float32)
    assert m.hf_model.config.max_window_layers == 4 and m.hf_model.config.use_sliding_window is False
    a, b = _encode(m), _encode(load_model(str(ckpts["reference"]), dtype=torch.float32))
    assert np.array_equal(a.kv, b.kv) and np.array_equal(a.k_router, b.k_router)


@pytest.mark.parametrize("changes, match", [
    ({"sliding_window": True}, "sliding_window"),
    ({"num_hidden_layers": "four"}, "num_hidden_layers"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
])
def test_config_values_still_refused_name_their_key(tmp_path, changes, match):
    d = _edit_config(write_tiny_msa_checkpoint(tmp_path / "c"), **changes)
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(str(d), dtype=torch.float32)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("msa, want", [
    ({"router_layer_idx": [1, 3]}, ((1, 3), 16, 16)),
    ({"router_layer_idx": 2}, ((2,), 16, 16)),
    ({"pooling_kernel_size": "32", "top_k_docs": "4"}, ((1, 3), 32, 4)),
    ({"doc_top_k": 8, "top_k_docs": 2}, ((1, 3), 16, 8)),
    ({"decouple_router": "true"}, ((1, 3), 16, 16)),
])
def test_msa_config_spellings(tmp_path, msa, want):
    d = write_tiny_msa_checkpoint(tmp_path / "c", router_layers="1,2,3", pooling_kernel_size=16)
    cfg = json.loads((d / "config.json").read_text())
    cfg["msa_config"].update({"router_layer_idx": "1,3", **msa})
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d), dtype=torch.float32)
    assert (m.router_layers, m.chunk_tokens, m.router.config.top_k) == want


@pytest.mark.parametrize("msa, match", [
    ({"decouple_router": "false"}, "decouple_router"),
    ({"decouple_router": "maybe"}, "decouple_router"),
    ({"pooling_kernel_size": "wide"}, "pooling_kernel_size"),
    ({"doc_top_k": 0}, "doc_top_k"),
])
def test_msa_config_bad_values_are_refused(tmp_path, msa, match):
    d = write_tiny_msa_checkpoint(tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["msa_config"].update(msa)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(d), dtype=torch.float32)


def test_checkpoint_without_tokenizer_says_to_pass_one(ckpts):
    """Failed before: AutoTokenizer raised a ValueError about slow tokenizers, naming neither the folder nor a fix."""
    with pytest.raises(ModelLoadError) as e:
        load_model(str(ckpts["no_tokenizer"]), dtype=torch.float32)
    msg = str(e.value)
    assert str(ckpts["no_tokenizer"]) in msg and "tokenizer=" in msg and "--tokenizer" in msg and "\n" not in msg


def test_checkpoint_without_tokenizer_loads_with_tokenizer_folder_or_object(ckpts):
    bundled = load_model(str(ckpts["reference"]), dtype=torch.float32)
    by_dir = load_model(str(ckpts["no_tokenizer"]), tokenizer=str(ckpts["tokenizer_dir"]), dtype=torch.float32)
    by_obj = load_model(str(ckpts["no_tokenizer"]), tokenizer=tiny_tokenizer(), dtype=torch.float32)
    assert by_dir.model_fingerprint == bundled.model_fingerprint      # the same files, beside or inside
    assert by_dir.source["tokenizer"] == str(ckpts["tokenizer_dir"])
    assert by_obj.wrap_ids("hi", 3) == bundled.wrap_ids("hi", 3)
    for m in (by_dir, by_obj):
        a, b = _encode(m), _encode(bundled)
        assert np.array_equal(a.kv, b.kv) and np.array_equal(a.k_router, b.k_router)


def test_tokenizer_argument_errors(tmp_path, ckpts):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(str(ckpts["no_tokenizer"]), tokenizer=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(str(ckpts["no_tokenizer"]), tokenizer=str(tmp_path / "missing"))
    small = write_tiny_msa_checkpoint(tmp_path / "small", tokenizer=False, vocab_size=200)
    with pytest.raises(ModelLoadError, match="262 tokens, more than the model's 200"):
        load_model(str(small), tokenizer=str(ckpts["tokenizer_dir"]))
    with pytest.raises(ConfigError, match="carries its own tokenizer"):
        load_model(str(tmp_path / "model.gguf"), tokenizer=str(ckpts["tokenizer_dir"]))


def test_plain_hf_folder_without_tokenizer_takes_tokenizer_argument(tmp_path, ckpts):
    tiny_model("qwen3").save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="tokenizer="):
        load_model(str(tmp_path / "plain"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        m = load_model(str(tmp_path / "plain"), tokenizer=str(ckpts["tokenizer_dir"]), dtype=torch.float32)
    assert m.source["kind"] == "hf-dir" and len(m.tokenizer) == 262


def test_models_load_without_hub_kernels_even_when_the_kernels_package_is_unusable(ckpts, tmp_path, monkeypatch):
    """Failed before on a host with the ``kernels`` package at a version transformers does not support:
    every ``from_pretrained`` raised "Kernels are not available" (transformers defaults to use_kernels=True).
    Loads pass use_kernels=False, so the installed ``kernels`` (usable or not) plays no part."""
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "is_kernels_available", lambda *a, **k: False)   # an unsupported kernels version
    msa = load_model(str(ckpts["reference"]), dtype=torch.float32)
    assert not msa.hf_model.use_kernels
    plain = tmp_path / "plain"
    tiny_model("qwen3").save_pretrained(str(plain))
    tiny_tokenizer().save_pretrained(str(plain))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedRouterWarning)
        hf_dir = load_model(str(plain), dtype=torch.float32)
    assert not hf_dir.hf_model.use_kernels
