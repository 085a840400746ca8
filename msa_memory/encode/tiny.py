"""Tiny random-weight models, a byte-level tokenizer and MSA-format checkpoints, for tests.

Every part's CPU tests (encoder, runtime, jobs, router training) need a real HF model of each
supported family without downloads. This module builds them in milliseconds: 2-4 layers, hidden
64, random weights (seeded), SDPA attention, fp32, and a byte-level tokenizer (one token per UTF-8
byte, plus ``<pad> <eos> <bos> <unk> <|im_start|> <|im_end|>``), so token counts are predictable.

It is product code (used by ``msa_memory.testing`` fixtures and docs), not a mock: the models are
the unmodified transformers classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from msa_memory.errors import ConfigError

__all__ = ["FAMILIES", "Family", "tiny_tokenizer", "tiny_config", "tiny_model", "reference_msa_config",
           "write_tiny_msa_checkpoint"]

Family = Literal["qwen3", "qwen2", "llama", "mistral", "gemma3"]
FAMILIES: tuple[str, ...] = ("qwen3", "qwen2", "llama", "mistral", "gemma3")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: one token per UTF-8 byte; ids 0-5 are specials.

    ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<|im_start|>``=4, ``<|im_end|>``=5.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_config(family: str, **overrides: Any):
    """A small transformers config of ``family`` (vocab 262 = the tiny tokenizer's).

    Gemma 3 gets a 16-token sliding window on 3 of 4 layers (layer 3 global), Mistral a
    24-token window, so packed passages longer than the window are exercised.
    """
    common: dict[str, Any] = dict(
        vocab_size=262, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    )
    if family == "qwen3":
        from transformers import Qwen3Config as C
        common.update(rope_theta=10000.0)
    elif family == "qwen2":
        from transformers import Qwen2Config as C
        common.pop("head_dim")
        common.update(rope_theta=10000.0)
    elif family == "llama":
        from transformers import LlamaConfig as C
        common.update(rope_theta=10000.0, tie_word_embeddings=False)
    elif family == "mistral":
        from transformers import MistralConfig as C
        common.update(rope_theta=10000.0, sliding_window=24, tie_word_embeddings=False)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig as C
        common.update(num_key_value_heads=1, sliding_window=16, query_pre_attn_scalar=16,
                      layer_types=["sliding_attention"] * 3 + ["full_attention"],
                      rope_parameters={
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    else:
        raise ConfigError(f"Unknown tiny model family {family!r}; choose one of {FAMILIES}.")
    common.update(overrides)
    return C(**common)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random-weight ``*ForCausalLM`` of ``family`` in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # HF's default init (std 0.02) makes every token look alike; larger weights make tests sharper
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    return model.eval()


#: transformers version the reference pins (msa-reference.md §9.1); its config classes wrote the checkpoints.
REFERENCE_TRANSFORMERS_VERSION = "4.51.3"


def reference_msa_config(qwen3_config: Any, msa_config: dict[str, Any], *, torch_dtype: str = "bfloat16"
                         ) -> dict[str, Any]:
    """The ``config.json`` dict the reference's ``MSAForCausalLM.save_pretrained`` writes for this backbone.

    What transformers 4.51.3 serialises for ``MSAConfig(Qwen3Config)`` (``to_diff_dict``: every
    Qwen3 field, plus the base-config fields that differ from their defaults) as the reference's
    classes leave it after ``__init__``: its decoder layer sets ``config.sliding_window = False``,
    so ``"sliding_window": false`` is written; RoPE is ``rope_theta`` + ``rope_scaling`` (no
    ``rope_parameters``), there is no ``layer_types``, the dtype key is ``torch_dtype``, and
    ``architectures``/``model_type``/``msa_config`` name the MSA classes. ``qwen3_config`` is a
    transformers ``Qwen3Config`` of the installed version (the backbone's hyper-parameters).
    """
    c = qwen3_config
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)})
    theta = rope.pop("rope_theta", 10000.0)
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    out: dict[str, Any] = {
        # Qwen3Config.__init__ of 4.51.3, field by field
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "use_sliding_window": bool(c.use_sliding_window),
        "sliding_window": False,              # MSADeocoderLayer.__init__: config.sliding_window = False
        "max_window_layers": c.max_window_layers, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "hidden_act": c.hidden_act, "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps, "use_cache": bool(c.use_cache), "rope_theta": theta,
        "rope_scaling": scaling, "attention_bias": bool(c.attention_bias), "attention_dropout": c.attention_dropout,
        # PretrainedConfig fields that differ from their defaults, and the MSA class's own
        "tie_word_embeddings": bool(c.tie_word_embeddings), "torch_dtype": torch_dtype,
        "architectures": ["MSAForCausalLM"], "model_type": "msa", "msa_config": dict(msa_config),
        "transformers_version": REFERENCE_TRANSFORMERS_VERSION,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(c, key, None) is not None:
            out[key] = getattr(c, key)
    return dict(sorted(out.items()))   # to_json_string(sort_keys=True)


def write_tiny_msa_checkpoint(path: str | Path, *, router_layers: str = "2,3", num_hidden_layers: int = 4,
                              aux_loss_method: str = "INFONCE_DECOUPLE", pooling_kernel_size: int = 64,
                              extra_msa_config: dict[str, Any] | None = None, seed: int = 0,
                              config_style: Literal["reference", "transformers"] = "reference",
                              tokenizer: bool = True, **model_overrides: Any) -> Path:
    """Write an MSA-format checkpoint dir (config.json + model.safetensors [+ tokenizer]) at ``path``.

    Laid out as the reference's ``resave_model`` leaves it: ``config.json`` as its classes write it
    (:func:`reference_msa_config`: ``model_type: "msa"``, ``architectures: ["MSAForCausalLM"]``,
    ``"sliding_window": false``, an ``msa_config`` block, ...); ``generation_config.json``; the Qwen3
    weights under their usual names (the tied ``lm_head`` left out) plus
    ``model.layers.{l}.self_attn.router_q_proj.0.weight`` / ``router_k_proj.0.weight`` in the router
    layers and a scalar ``temperature``; the tokenizer files unless ``tokenizer=False`` (a training
    checkpoint saved without them). ``config_style="transformers"`` writes the installed
    transformers' ``Qwen3Config.to_dict()`` instead (same backbone, other spelling). Weights are fp32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model("qwen3", seed=seed, num_hidden_layers=num_hidden_layers, **model_overrides)
    msa = {
        "router_layer_idx": router_layers, "top_k_docs": 16, "pooling_kernel_size": pooling_kernel_size,
        "decouple_router": True, "head_reduce_method": "mean", "query_reduce_method": "max",
        "chunk_reduce_method": "max", "decouple_pooling_mode": "mean", "aux_loss": False,
        "aux_loss_method": aux_loss_method, "infonce_loss_temp": 0.1, **(extra_msa_config or {}),
    }
    if config_style == "reference":
        cfg = reference_msa_config(model.config, msa, torch_dtype="float32")
        gen = {"_from_model_config": True, "transformers_version": REFERENCE_TRANSFORMERS_VERSION,
               **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    elif config_style == "transformers":
        cfg = model.config.to_dict()
        cfg.update(model_type="msa", architectures=["MSAForCausalLM"], msa_config=msa)
    else:
        raise ConfigError(f"config_style {config_style!r} is not 'reference' or 'transformers'.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    layers = range(num_hidden_layers) if router_layers == "all" else [int(x) for x in router_layers.split(",")]
    g = torch.Generator().manual_seed(seed + 1)
    e, hq, hk, d = model.config.hidden_size, model.config.num_attention_heads, \
        model.config.num_key_value_heads, model.config.head_dim
    for layer in layers:
        sd[f"model.layers.{layer}.self_attn.router_q_proj.0.weight"] = torch.randn(hq * d, e, generator=g) * 0.15
        sd[f"model.layers.{layer}.self_attn.router_k_proj.0.weight"] = torch.randn(hk * d, e, generator=g) * 0.15
    sd["temperature"] = torch.tensor(0.1)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return path
