"""A slow, explicit MSA reference (msa-reference.md §2.2-2.5, §3.2–3.6) and a tiny random MSA checkpoint builder.

Written from the spec, independently of ``msa_memory.runtime``: float64 throughout, one decoder
layer at a time, explicit RMSNorm / rotate-half RoPE / GQA repeat / SwiGLU MLP from the raw
weights, explicit concatenation ``[template | memory of ascending doc order | query]`` and a full
(T, P+M+T) boolean mask. Routing is a Python loop over heads of dot/√D or cosine scores. Decoding
re-runs the whole query + generated sequence each step (no cache), with the routing decided once
from the prompt's routing tokens (§3.6: no re-routing while decoding). Stage 1 (``encode_doc``): one
document alone, positions from 0, causal; per router layer the chunk means of K (post k_norm and
RoPE), V and router_k_proj(input_layernorm(h)) (L2-normalised per head for INFONCE).

The checkpoint's config.json is spelled as the reference's classes write it (transformers 4.51.3,
``"sliding_window": false``; ``msa_memory.encode.tiny.reference_msa_config``).

Used by ``test_pooled_equivalence.py`` and by ``benchmarks/bench_runtime.py --gpu``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
            tie_word_embeddings=True)
ROUTER_LAYERS = (2, 3)


def build_tiny_msa_checkpoint(path: Path, seed: int = 0, score: str = "INFONCE_DECOUPLE", chunk_tokens: int = 4,
                              top_k: int = 2) -> Path:
    """Write config.json (model_type "msa", msa_config) + model.safetensors with reference key names."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from msa_memory.encode.tiny import reference_msa_config

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    E, Hq, H, D = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
    g = torch.Generator().manual_seed(seed + 1)
    for li in ROUTER_LAYERS:
        sd[f"model.layers.{li}.self_attn.router_q_proj.0.weight"] = torch.randn(Hq * D, E, generator=g) * 0.3
        sd[f"model.layers.{li}.self_attn.router_k_proj.0.weight"] = torch.randn(H * D, E, generator=g) * 0.3
    sd["temperature"] = torch.tensor(0.1)
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    msa = {"router_layer_idx": ",".join(map(str, ROUTER_LAYERS)), "top_k_docs": top_k,
           "pooling_kernel_size": chunk_tokens, "decouple_router": True,
           "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
           "aux_loss_method": score, "infonce_loss_temp": 0.1}
    cfg = reference_msa_config(model.config, msa, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    sd = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    return sd, json.loads((path / "config.json").read_text())


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (H, T, D) rotated at positions pos (T,), rotate-half convention."""
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos.double()[:, None] * inv[None, :]                    # (T, D/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class SlowMsa:
    """The reference: ``logits(prefix_ids, query_ids, route_rows, memory)`` for a tiny Qwen3 MSA model."""

    def __init__(self, sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
        self.sd, self.cfg = sd, cfg
        self.L = cfg["num_hidden_layers"]
        self.Hq, self.H, self.D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        m = cfg["msa_config"]
        self.router_layers = [int(x) for x in m["router_layer_idx"].split(",")]
        self.cosine = m["aux_loss_method"] == "INFONCE"
        self.top_k = int(m["top_k_docs"])
        self.chunk_tokens = int(m["pooling_kernel_size"])

    def _qkv(self, li: int, x: torch.Tensor, pos: torch.Tensor):
        p, T = f"model.layers.{li}.self_attn.", x.shape[0]
        q = (x @ self.sd[p + "q_proj.weight"].T).view(T, self.Hq, self.D).transpose(0, 1)
        k = (x @ self.sd[p + "k_proj.weight"].T).view(T, self.H, self.D).transpose(0, 1)
        v = (x @ self.sd[p + "v_proj.weight"].T).view(T, self.H, self.D).transpose(0, 1)
        q = _rope(_rms(q, self.sd[p + "q_norm.weight"], self.eps), pos, self.theta)
        k = _rope(_rms(k, self.sd[p + "k_norm.weight"], self.eps), pos, self.theta)
        return q, k, v                                               # (Hq,T,D), (H,T,D), (H,T,D)

    def _mlp(self, li: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{li}."
        x = _rms(h, self.sd[p + "post_attention_layernorm.weight"], self.eps)
        g, u = x @ self.sd[p + "mlp.gate_proj.weight"].T, x @ self.sd[p + "mlp.up_proj.weight"].T
        return h + (torch.nn.functional.silu(g) * u) @ self.sd[p + "mlp.down_proj.weight"].T

    def _attend(self, li: int, h, q, keys, vals, mask):
        rep = self.Hq // self.H
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)   # GQA: head h uses kv h // rep
        w = (q @ keys.transpose(1, 2)) / math.sqrt(self.D)
        w = w.masked_fill(~mask[None], float("-inf")).softmax(-1)
        o = (w @ vals).transpose(0, 1).reshape(q.shape[1], -1)
        return h + o @ self.sd[f"model.layers.{li}.self_attn.o_proj.weight"].T

    def prefix_kv(self, ids: list[int]):
        """Template prefix K/V per layer: positions 0..P-1, causal among themselves."""
        h = self.sd["model.embed_tokens.weight"][ids]
        pos = torch.arange(len(ids))
        out = []
        mask = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
        for li in range(self.L):
            x = _rms(h, self.sd[f"model.layers.{li}.input_layernorm.weight"], self.eps)
            q, k, v = self._qkv(li, x, pos)
            out.append((k, v))
            h = self._mlp(li, self._attend(li, h, q, k, v, mask))
        return out

    def encode_doc(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """§2.2-2.5 for one wrapped document alone: {"k", "v", "k_router"} each (L_r, C, H, D) float64.

        Positions 0..T-1, causal; chunk means over ``pooling_kernel_size`` tokens (the last chunk
        averages what it has); router keys = chunk mean of router_k_proj(input_layernorm(h)).
        """
        T, P = len(ids), self.chunk_tokens
        h = self.sd["model.embed_tokens.weight"][ids]
        pos = torch.arange(T)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        out: dict[str, list[torch.Tensor]] = {"k": [], "v": [], "k_router": []}

        def pool(x: torch.Tensor) -> torch.Tensor:              # (T, ...) -> (C, ...)
            return torch.stack([x[c:c + P].mean(0) for c in range(0, T, P)])

        for li in range(max(self.router_layers) + 1):
            x = _rms(h, self.sd[f"model.layers.{li}.input_layernorm.weight"], self.eps)
            q, k, v = self._qkv(li, x, pos)
            if li in self.router_layers:
                r = (x @ self.sd[f"model.layers.{li}.self_attn.router_k_proj.0.weight"].T).view(T, self.H, self.D)
                kr = pool(r)
                if self.cosine:
                    kr = kr / kr.norm(dim=-1, keepdim=True)
                out["k"].append(pool(k.transpose(0, 1)))
                out["v"].append(pool(v.transpose(0, 1)))
                out["k_router"].append(kr)
            h = self._mlp(li, self._attend(li, h, q, k, v, mask))
        return {name: torch.stack(parts) for name, parts in out.items()}

    def route(self, li: int, x_rows: torch.Tensor, keys: torch.Tensor, chunk_doc: np.ndarray, n_docs: int):
        """§3.3: dot/√D (or cosine), mean over heads, max over tokens, max over chunks; top-k docs."""
        qr = (x_rows @ self.sd[f"model.layers.{li}.self_attn.router_q_proj.0.weight"].T).view(-1, self.Hq, self.D)
        kr = keys.double()
        if self.cosine:
            qr = qr / qr.norm(dim=-1, keepdim=True)
            kr = kr / kr.norm(dim=-1, keepdim=True)
        scale = 1.0 if self.cosine else 1.0 / math.sqrt(self.D)
        rep = self.Hq // self.H
        per_head = torch.stack([qr[:, h] @ kr[:, h // rep].T for h in range(self.Hq)], -1) * scale  # (T, C, Hq)
        chunk = per_head.mean(-1).max(0).values                                                        # (C,)
        doc = torch.tensor([chunk[torch.from_numpy(chunk_doc == d)].max().item() for d in range(n_docs)])
        return torch.topk(doc, min(self.top_k, n_docs)).indices.tolist()

    def logits(self, prefix_ids, query_ids, route_rows, router_keys, chunk_doc, content_kv, n_docs):
        """Last-position logits (V,) and the chosen docs per router layer.

        router_keys[l]: (C, H, D); content_kv: (C, L_r, 2, H, D) in chunk order; chunk_doc: (C,).
        """
        pre = self.prefix_kv(prefix_ids)
        P = len(prefix_ids)
        T = len(query_ids)
        pos = torch.arange(T) + P + self.top_k                       # §3.2: query starts at P + k
        h = self.sd["model.embed_tokens.weight"][query_ids]
        rows = torch.as_tensor(route_rows, dtype=torch.bool)
        chosen = {}
        for li in range(self.L):
            x = _rms(h, self.sd[f"model.layers.{li}.input_layernorm.weight"], self.eps)
            q, k, v = self._qkv(li, x, pos)
            pk, pv = pre[li]
            if li in self.router_layers:
                r = self.router_layers.index(li)
                docs = self.route(li, x[rows], router_keys[r], chunk_doc, n_docs)
                chosen[r] = docs
                sel = np.isin(chunk_doc, sorted(docs))               # ascending doc order (permutation-invariant)
                mem = content_kv[torch.from_numpy(sel)][:, r].double()   # (M, 2, H, D)
                mk, mv = mem[:, 0].transpose(0, 1), mem[:, 1].transpose(0, 1)
            else:
                mk = mv = torch.zeros(self.H, 0, self.D, dtype=torch.float64)
            keys, vals = torch.cat([pk, mk, k], 1), torch.cat([pv, mv, v], 1)
            M = mk.shape[1]
            mask = torch.zeros(T, P + M + T, dtype=torch.bool)
            mask[:, :P + M] = True
            mask[:, P + M:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
            h = self._mlp(li, self._attend(li, h, q, keys, vals, mask))
        h = _rms(h, self.sd["model.norm.weight"], self.eps)
        return (h[-1] @ self.sd["model.embed_tokens.weight"].T), chosen

    def greedy(self, prefix_ids, query_ids, route_rows, router_keys, chunk_doc, content_kv, n_docs, n_new):
        ids = list(query_ids)
        rows = list(route_rows)
        out = []
        for _ in range(n_new):
            lg, _ = self.logits(prefix_ids, ids, rows, router_keys, chunk_doc, content_kv, n_docs)
            tok = int(lg.argmax())
            out.append(tok)
            ids.append(tok)
            rows.append(False)
        return out
