"""`msa train-router` on a lent GPU that cannot install the model package (issue 6 tooling).

The lent GPU machine has no PyPI and takes ~64 MB of files a call, less than the 253 MB GGUF, so
``msa train-router --device cuda`` cannot load the default model there. Router training needs the
backbone only to extract the frozen router inputs (``train.features``), and those need only the
blocks up to the last candidate layer and the embedding rows of the tokens actually fed. So:

1. ``prepare`` (here, CPU): builds the train / dev pairs exactly as ``msa train-router`` does for
   the same options (``cli_support.train_router_from_cli`` → ``recipe.builtin_pairs``), mines
   the BM25 hard negatives (``bm25_negatives.bm25_hard_negatives``), tokenizes the passages
   (``LoadedModel.wrap_ids``) and the queries (``features.query_tokens``), and writes into
   ``--carry``: the device pack (``device_pack.make_pack``: the GGUF's own blocks
   0..max candidate layer, bit-identical once de-quantised, + the embedding rows of every token
   used), ``data.npz`` (compact token ids, positives, kinds, hard negatives) and ``meta.json`` (the
   equivalent ``msa train-router`` command, the router config, the model fingerprint, the
   installed-package list the ``packages`` source read).
2. ``gpu`` (there, with ``--carry`` carried and the ``gguf`` wheel installed): loads the pack,
   builds the untrained template adapter from the pack's own q/k projections
   (``encode.router_from_model_qk``, as ``load_model`` does), extracts the features with the
   encoder's own forward (``features.extract_passage_tokens`` / ``extract_query_tokens``, bf16),
   and runs ``recipe.run_training`` on CUDA with them (``features=``): same trainer, same layer
   selection, same saved adapter files, into ``$OUT/adapter``.

3. ``eval`` (there, same carry): held-out recall of given adapters (shipped names or folders) on
   the carry's dev queries against its dev + training passages, per layer and summed, with no
   training; ``--greedy-base B --greedy-extra X`` adds X's layers to B's one at a time while dev
   recall@16 (then MRR) rises. Writes ``$OUT/eval.json``.

The result is what ``msa train-router ... --device cuda`` gives on a CUDA machine with the
package installed, up to GPU arithmetic order; ``meta.json`` → ``command`` is that line.
Benchmark tooling, not product code.

Usage::

    python benchmarks/device_train.py prepare --carry .devcarry/train --builtin stdlib,man,packages \\
        --layers 1,2,3,4,5 --max-layers 2 --epochs 6 ...          # the msa train-router options
    # there:
    python benchmarks/device_train.py gpu --carry .devcarry/train     # writes $OUT/adapter
    python benchmarks/device_train.py gpu --carry .devcarry/train --feature-cache /tmp/feats \
        --set-negatives 2048                                         # a 2nd trial, features reused
    # here: the same data for deeper candidate layers, the pack cut into carry-sized parts
    python benchmarks/device_train.py repack --from .devcarry/train --carry .devcarry/deep \
        --layers 5,8,11,14,17 --max-layers 3 --split-mb 56
    # there: the shipped adapter's dev recall and which trained layers would add to it (the carry's
    # pack must hold every layer named: repack with --layers 1,2,5,8,11,12,13,14,15,16,17, say)
    python benchmarks/device_train.py eval --carry .devcarry/all --adapter default \
        --greedy-base default --greedy-extra $OUT/adapter/candidates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msa_memory.train.pairs import FACT_NAMES  # noqa: E402

_KINDS = ("ict", "fact", "user")


def _flat(seqs) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
    return flat, np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)


def _split(flat: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    return [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def train_command(a, init_adapter: str | None = None) -> str:
    """The ``msa train-router`` line these options stand for (what a CUDA host with the package runs)."""
    from msa_memory.train.cli_support import train_router_command

    return train_router_command(a.out_name, None, None, None, "default", a.layers, a.max_layers, a.epochs,
                                a.batch_size, a.lr, a.n_train, a.n_dev, a.max_chars, a.seed, None, "cuda",
                                a.hard_negatives, a.mine_every, a.builtin, a.negatives, a.cloze_remove,
                                a.dev_distractors, a.bf16, a.layer_loss, a.query_reduce, a.head_reduce, init_adapter,
                                a.freeze_layers, a.fact_names, query_suffix=a.query_suffix, freeze_keys=a.freeze_keys)


def train_config(a, device: str = "cuda"):
    """The ``TrainConfig`` these options stand for (``msa train-router``'s own builder)."""
    from msa_memory.train.cli_support import train_config as from_options

    return from_options(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=device,
                        hard_negatives=a.hard_negatives, mine_every=a.mine_every, negatives=a.negatives, bf16=a.bf16,
                        layer_loss=a.layer_loss, query_reduce=a.query_reduce, head_reduce=a.head_reduce,
                        freeze_layers=a.freeze_layers, query_suffix=a.query_suffix, freeze_keys=a.freeze_keys)


def prepare(a) -> None:
    import device_pack
    import torch

    from msa_memory.train.cli_support import parse_layers
    from msa_memory.encode import load_model
    from msa_memory.train.texts import installed_packages
    from msa_memory.routing.query import query_tokens
    from msa_memory.train.bm25_negatives import bm25_hard_negatives
    from msa_memory.train.recipe import builtin_pairs

    t0 = time.perf_counter()
    if a.query_template is not None and a.query_template.count("{q}") != 1:
        raise SystemExit(f"--query-template {a.query_template!r}: put {{q}} (the question) in it exactly once")
    if a.query_template is not None and a.query_suffix:
        raise SystemExit("--query-template (a trial's joint tokenization) or --query-suffix (msa train-router's), "
                         "not both")
    cfg = train_config(a)
    layers = parse_layers(a.layers)
    train, dev = builtin_pairs(a.n_train, a.n_dev, seed=a.seed, max_chars=a.max_chars,
                               sources=tuple(s.strip() for s in a.builtin.split(",") if s.strip()),
                               p_remove=a.cloze_remove, fact_names=a.fact_names)
    print(f"pairs: train {train.counts()}, dev {dev.counts()} ({time.perf_counter() - t0:.0f}s)", flush=True)
    hard = bm25_hard_negatives(train.passages, train.queries, cfg.n_hard) if cfg.n_hard else []  # also for
    # --hard-negatives routing|both runs of the gpu step (``--hard-negatives`` there), which add or replace them
    print(f"bm25 hard negatives ({time.perf_counter() - t0:.0f}s)", flush=True)
    loaded = load_model("default", router_layers=layers, dtype=torch.float32)
    tok = loaded.tokenizer
    sets = {}
    for name, ps in (("train", train), ("dev", dev)):
        seqs = [loaded.wrap_ids(p, i) for i, p in enumerate(ps.passages)]
        qt = [query_tokens(tok, a.query_template.replace("{q}", q.text)) if a.query_template else
              query_tokens(tok, q.text, a.query_suffix) for q in ps.queries]
        sets[name] = (seqs, qt, ps)
    used = np.unique(np.concatenate([np.concatenate([np.asarray(s) for s in seqs] + [np.asarray(t) for t, _ in qt])
                                     for seqs, qt, _ in sets.values()]))
    carry = Path(a.carry)
    carry.mkdir(parents=True, exist_ok=True)
    info = device_pack.make_pack(carry / "pack", max(layers), used, last_norm_only=True, last_keep_qk=True)
    dt = np.uint16 if len(used) <= 1 << 16 else np.int32
    arrays = {}
    for name, (seqs, qt, ps) in sets.items():
        p_flat, p_off = _flat(seqs)
        q_flat, q_off = _flat([t for t, _ in qt])
        pos_flat, pos_off = _flat([q.positives for q in ps.queries])
        arrays |= {f"{name}_p": device_pack.remap(p_flat, used).astype(dt), f"{name}_p_off": p_off,
                   f"{name}_q": device_pack.remap(q_flat, used).astype(dt), f"{name}_q_off": q_off,
                   f"{name}_q_skip": np.array([s for _, s in qt], dtype=np.int8),
                   f"{name}_pos": pos_flat.astype(np.int32), f"{name}_pos_off": pos_off,
                   f"{name}_kind": np.array([_KINDS.index(q.kind) for q in ps.queries], dtype=np.int8)}
    if hard:
        arrays["train_hard"] = np.array([list(h) + [-1] * (cfg.n_hard - len(h)) for h in hard], dtype=np.int32)
    np.savez_compressed(carry / "data.npz", **arrays)
    meta = {"command": train_command(a), "prepared_by": "benchmarks/device_train.py prepare " + " ".join(
                shlex.quote(x) for x in sys.argv[2:]),
            "layers": list(layers), "max_layers": a.max_layers, "dev_distractors": a.dev_distractors,
            "router_config": loaded.router.config.to_dict(), "model_name": loaded.name,
            "model_fingerprint": loaded.model_fingerprint, "train": train.counts(), "dev": dev.counts(),
            "python": platform.python_version(), "packages": installed_packages(), "pack": info}
    if a.query_template:   # a trial: msa train-router has no such option, so "command" does not reproduce it
        meta["query_template"] = a.query_template
    (carry / "meta.json").write_text(json.dumps(meta, indent=1))
    sizes = {str(p.relative_to(carry)): p.stat().st_size for p in carry.rglob("*") if p.is_file()}
    print(json.dumps({"prepare_seconds": round(time.perf_counter() - t0), "files": sizes,
                      "vocab": int(len(used)), "train": train.counts(), "dev": dev.counts()}))


def repack(a) -> None:
    """A prepared carry (``--from``) for other candidate layers, without re-mining or re-tokenizing.

    ``data.npz`` does not depend on the layers: it is copied, the pack is rebuilt for blocks
    0..max(``--layers``) over the same compact vocabulary, and ``meta.json`` records the recipe with
    the new ``--layers`` / ``--max-layers``. ``--split-mb`` cuts the pack's tensors into parts
    (``device_pack.split_blob``) for carries smaller than the pack.
    """
    import shutil

    import device_pack

    from msa_memory.train.cli_support import parse_layers

    src, carry = Path(a.source), Path(a.carry)
    if src.resolve() == carry.resolve():
        raise SystemExit("repack: --from and --carry must differ")
    meta = json.loads((src / "meta.json").read_text())
    argv = shlex.split(meta["prepared_by"].split(" prepare ", 1)[1])
    opts = _parser().parse_args(["prepare", *argv])
    opts.layers, opts.max_layers, opts.carry = a.layers, a.max_layers, str(carry)
    layers = parse_layers(a.layers)
    vocab = np.asarray(json.loads((src / "pack" / "pack.json").read_text())["vocab"], dtype=np.int64)
    carry.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "data.npz", carry / "data.npz")
    if (carry / "pack").exists():
        shutil.rmtree(carry / "pack")
    info = device_pack.make_pack(carry / "pack", max(layers), vocab, last_norm_only=True, last_keep_qk=True)
    parts = device_pack.split_blob(carry / "pack", a.split_mb << 20) if a.split_mb else []
    argv = _replace_option(_replace_option(argv, "--layers", a.layers), "--max-layers", str(a.max_layers))
    argv = _replace_option(argv, "--carry", str(carry))
    meta |= {"command": train_command(opts), "layers": list(layers), "max_layers": a.max_layers, "pack": info,
             "prepared_by": "benchmarks/device_train.py prepare " + " ".join(shlex.quote(x) for x in argv),
             "repacked_from": str(src)}
    (carry / "meta.json").write_text(json.dumps(meta, indent=1))
    sizes = {str(p.relative_to(carry)): p.stat().st_size for p in carry.rglob("*") if p.is_file()}
    print(json.dumps({"files": sizes, "parts": [str(p) for p in parts], "pack": info}))


def _replace_option(argv: list[str], name: str, value: str) -> list[str]:
    """``argv`` with option ``name``'s value set to ``value`` (appended when absent)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == name:
            i += 2
            continue
        if argv[i].startswith(name + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + [name, value]


def gpu(a) -> None:
    import dataclasses

    import device_pack
    import torch

    from msa_memory.encode import RouterAdapter, RouterConfig, router_from_model_qk
    from msa_memory.encode.model import LoadedModel
    from msa_memory.train.features import extract_passage_tokens, extract_query_tokens
    from msa_memory.train.cli_support import parse_layers
    from msa_memory.train.recipe import run_training
    from msa_memory.train.trainer import Features

    if a.extract_only and not a.feature_cache:
        raise SystemExit("--extract-only needs --feature-cache")
    t0 = time.perf_counter()
    carry = Path(a.carry)
    meta = json.loads((carry / "meta.json").read_text())
    # the prepare step's options, with this step's overrides (options that do not change data.npz)
    opts = _parser().parse_args(["prepare", *shlex.split(meta["prepared_by"].split(" prepare ", 1)[1])])
    for k in _OVERRIDES:
        if getattr(a, "set_" + k) is not None:
            setattr(opts, k, getattr(a, "set_" + k))
    layers = parse_layers(opts.layers)
    if not set(layers) <= set(meta["layers"]):
        raise SystemExit(f"--set-layers {opts.layers}: the pack holds layers up to {max(meta['layers'])} only")
    if opts.freeze_keys and not a.init_adapter:
        raise SystemExit("--freeze-keys keeps the keys of the adapter training starts from: give --init-adapter")
    cfg, command = train_config(opts, a.device), train_command(opts, a.init_adapter)
    d = np.load(carry / "data.npz")
    dev = torch.device(a.device)
    model, _ = device_pack.load_pack(carry / "pack", a.device)
    fcache = Path(a.feature_cache) if a.feature_cache else None
    # with a feature cache, every layer the pack holds is extracted, so later calls may choose other layers
    extract = tuple(meta["layers"]) if fcache is not None else tuple(layers)
    rc = dataclasses.replace(RouterConfig.from_dict(meta["router_config"]), router_layers=extract)
    if a.init_adapter:   # start from a trained adapter: its layers are the candidates (and what is extracted)
        init = RouterAdapter.load(a.init_adapter)
        if not set(layers) <= set(init.config.router_layers):
            raise SystemExit(f"--init-adapter {a.init_adapter} has layers {list(init.config.router_layers)}, "
                             f"not all of {list(layers)}")
        if fcache is not None and tuple(layers) != tuple(meta["layers"]):
            raise SystemExit("--init-adapter with --feature-cache needs --set-layers = all the pack's layers "
                             f"{meta['layers']} (the cache holds every pack layer)")
        # its candidate layers, their shifted grids and suffix queries with them (as msa train-router's recipe
        # takes the subset of an init adapter)
        template = init.subset(layers).to(dev)
        rc = template.config
    else:
        template = router_from_model_qk(model, rc, warn=False).to(dev)
    loaded = LoadedModel(name=meta["model_name"] + " (device pack)", hf_model=model, tokenizer=None,
                         router=template, wrap="plain", model_fingerprint=meta["model_fingerprint"])
    feats = {}
    if fcache is not None and all((fcache / f"{n}.pt").exists() for n in ("train", "dev")):
        # an earlier call's features on this machine (same carry: checked by the data digest)
        from msa_memory.train.features import load_features

        if (fcache / "digest").read_text() != _digest(carry):
            raise SystemExit(f"--feature-cache {fcache}: made from other data; remove it")
        feats = {n: load_features(str(fcache / f"{n}.pt")) for n in ("train", "dev")}
        print(f"features: loaded from {fcache} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for name in ("train", "dev"):
        if name in feats:
            continue
        seqs = [s.astype(np.int64).tolist() for s in _split(d[f"{name}_p"], d[f"{name}_p_off"])]
        qt = [(q.astype(np.int64).tolist(), int(s)) for q, s in
              zip(_split(d[f"{name}_q"], d[f"{name}_q_off"]), d[f"{name}_q_skip"])]
        x, chunk_doc = extract_passage_tokens(loaded, seqs, max_batch_tokens=a.batch_tokens,
                                              progress=_progress(f"{name} passages", t0))
        qx, qoff = extract_query_tokens(loaded, qt, max_batch_tokens=a.batch_tokens)
        pos = [tuple(int(v) for v in p) for p in _split(d[f"{name}_pos"], d[f"{name}_pos_off"])]
        hard = ([tuple(int(v) for v in row if v >= 0) for row in d["train_hard"]]
                if name == "train" and "train_hard" in d else [])
        feats[name] = Features(tuple(rc.router_layers), x, chunk_doc, len(seqs), qx, qoff, pos,
                               [_KINDS[k] for k in d[f"{name}_kind"]], hard, query_suffix=opts.query_suffix)
        print(f"features {name}: {len(seqs)} passages, {x.shape[1]} chunks, {len(qt)} queries "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if fcache is not None and not (fcache / "digest").exists():
        from msa_memory.train.features import save_features

        fcache.mkdir(parents=True, exist_ok=True)
        for n in ("train", "dev"):
            save_features(feats[n], str(fcache / f"{n}.pt"))
        (fcache / "digest").write_text(_digest(carry))
    t_feat = time.perf_counter() - t0
    if a.extract_only:
        print(json.dumps({"feature_cache": str(fcache), "feature_seconds": round(t_feat, 1),
                          "layers": list(rc.router_layers)}))
        return
    out = Path(os.environ.get("OUT", ".")) / "adapter"
    summary = run_training(out=out, candidate_layers=tuple(layers), max_layers=opts.max_layers,
                           config=cfg, device=a.device, command=command, log=lambda s: print(s, flush=True),
                           loaded=loaded, dev_distractors=opts.dev_distractors,
                           features=(feats["train"], feats["dev"]))
    rec = json.loads((out / "training.json").read_text())
    rec |= {"ran_as": "benchmarks/device_train.py gpu (features from the device pack, pre-tokenized here)",
            "prepared_by": meta["prepared_by"], "gpu_step_overrides": {k: getattr(a, "set_" + k) for k in _OVERRIDES
                                                        if getattr(a, "set_" + k) is not None},
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda"
            else "cpu", "torch": torch.__version__, "feature_seconds": round(t_feat, 1),
            "python_of_data": meta["python"], "packages_of_data": meta["packages"]}
    (out / "training.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    print(json.dumps({"router_id": summary["router_id"], "router_layers": summary["router_layers"],
                      "dev_recall": summary["dev_recall"], "seconds": summary["seconds"],
                      "feature_seconds": round(t_feat, 1)}, default=str))


def evaluate_adapters(a) -> None:
    """``eval``: held-out recall of trained adapters on the carry's dev memory (no training).

    Extracts the dev passages, the training passages (as distractors, the ``--dev-distractors``
    memory) and the dev queries for the union of the adapters' layers, then for every ``--adapter``
    reports dev recall@1/5/16 of its layers summed (overall, per kind, per layer); with
    ``--greedy-base B --greedy-extra X`` it also grows B's layers by X's, one layer at a time, while
    recall@16 (then MRR) rises, the selection ``run_training`` makes, started from B. Writes
    ``$OUT/eval.json``.
    """
    import dataclasses

    import device_pack
    import torch

    from msa_memory.encode import RouterAdapter, RouterConfig, router_from_model_qk
    from msa_memory.encode.model import LoadedModel
    from msa_memory.train.features import extract_passage_tokens, extract_query_tokens
    from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, evaluate, select_layers

    t0 = time.perf_counter()
    carry = Path(a.carry)
    meta = json.loads((carry / "meta.json").read_text())
    names = list(a.adapter or [])
    if a.greedy_base or a.greedy_extra:
        if not (a.greedy_base and a.greedy_extra):
            raise SystemExit("eval: --greedy-base and --greedy-extra go together")
        names += [x for x in (a.greedy_base, a.greedy_extra) if x not in names]
    if not names:
        raise SystemExit("eval: give at least one --adapter (a shipped name or a folder)")
    adapters = {n: RouterAdapter.load(n) for n in names}
    union = tuple(sorted({l for ad in adapters.values() for l in ad.config.router_layers}))
    if not set(union) <= set(meta["layers"]):
        raise SystemExit(f"eval: adapters use layers {list(union)}; the carry's pack holds {meta['layers']} "
                         "(repack it with those layers)")
    dev = torch.device(a.device)
    model, _ = device_pack.load_pack(carry / "pack", a.device)
    rc = dataclasses.replace(RouterConfig.from_dict(meta["router_config"]), router_layers=union)
    loaded = LoadedModel(name=meta["model_name"] + " (device pack)", hf_model=model, tokenizer=None,
                         router=router_from_model_qk(model, rc, warn=False).to(dev), wrap="plain",
                         model_fingerprint=meta["model_fingerprint"])
    d = np.load(carry / "data.npz")
    xs = {}
    for name in ("dev", "train"):
        seqs = [s.astype(np.int64).tolist() for s in _split(d[f"{name}_p"], d[f"{name}_p_off"])]
        xs[name] = (*extract_passage_tokens(loaded, seqs, max_batch_tokens=a.batch_tokens,
                                            progress=_progress(f"{name} passages", t0)), len(seqs))
    qt = [(q.astype(np.int64).tolist(), int(s)) for q, s in zip(_split(d["dev_q"], d["dev_q_off"]), d["dev_q_skip"])]
    qx, qoff = extract_query_tokens(loaded, qt, max_batch_tokens=a.batch_tokens)
    pos = [tuple(int(v) for v in p) for p in _split(d["dev_pos"], d["dev_pos_off"])]
    kinds = [_KINDS[k] for k in d["dev_kind"]]
    x_t, cd_t, n_t = xs["train"]
    none = torch.zeros(0, len(union), qx.shape[-1], dtype=qx.dtype)
    train_p = Features(union, x_t, cd_t, n_t, none, torch.zeros(1, dtype=torch.int64), [])
    dev_f = Features(union, *xs["dev"], qx, qoff, pos, kinds).with_distractors(train_p)
    t_feat = time.perf_counter() - t0
    print(f"features: {dev_f.n_queries} dev queries against {dev_f.n_docs} passages, layers {list(union)} "
          f"({t_feat:.0f}s)", flush=True)

    def projections(ad):
        return RouterProjections.from_adapter(ad).to(dev)

    def scoring(ad):
        c = ad.config
        return TrainConfig(device=a.device, score=c.score, head_reduce=c.head_reduce, query_reduce=c.query_reduce,
                           chunk_reduce=c.chunk_reduce)

    def fmt(r):
        return {str(k): round(float(v), 4) for k, v in r.items()}

    res: dict = {"carry": str(carry), "data_digest": _digest(carry), "dev_queries": dev_f.n_queries,
                 "dev_memory_passages": dev_f.n_docs, "layers_extracted": list(union),
                 "feature_seconds": round(t_feat, 1), "adapters": {}}
    with torch.no_grad():
        for n, ad in adapters.items():
            ev = evaluate(projections(ad), dev_f, scoring(ad))
            res["adapters"][n] = {"router_id": ad.fingerprint(), "layers": list(ad.config.router_layers),
                                  "recall": fmt(ev["recall"]),
                                  "by_kind": {k[7:]: fmt(v) for k, v in ev.items() if k.startswith("recall_")},
                                  "per_layer": {str(l): fmt(r) for l, r in ev["per_layer"].items()}}
            print(n, json.dumps(res["adapters"][n]), flush=True)
        if a.greedy_base:
            base, extra = adapters[a.greedy_base], adapters[a.greedy_extra]
            both = RouterAdapter.merge([base, extra])     # refuses parts that score differently
            ev = evaluate(projections(both), dev_f, scoring(base))
            layers = tuple(both.config.router_layers)
            keep = [layers.index(l) for l in base.config.router_layers]
            _, added = select_layers(ev["layer_scores"], ev["positive"], layers, max_layers=len(layers), start=keep)
            trace, before = [], set(base.config.router_layers)
            for t in added:
                trace.append({"added": next(l for l in t["layers"] if l not in before), "layers": t["layers"],
                              "recall@16": round(t["recall@16"], 4), "mrr": round(t["mrr"], 4)})
                before = set(t["layers"])
                print("greedy", json.dumps(trace[-1]), flush=True)
            from msa_memory.train.scores import recall_at_k

            base_r = recall_at_k(ev["layer_scores"][keep].sum(0), ev["positive"], (1, 5, 16))
            res["greedy"] = {"base": a.greedy_base, "extra": a.greedy_extra, "base_recall": fmt(base_r),
                             "all_recall": fmt(ev["recall"]), "trace": trace}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(os.environ.get("OUT", "."))
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "adapters"}))


def _progress(what: str, t0: float, parts: int = 8):
    """A ``progress(done, total)`` callback that prints about ``parts`` times."""
    nxt = [0]

    def report(done: int, total: int) -> None:
        if done >= nxt[0] or done == total:
            print(f"  {what} {done}/{total} ({time.perf_counter() - t0:.0f}s)", flush=True)
            nxt[0] = done + max(1, total // parts)
    return report


def _digest(carry: Path) -> str:
    """sha256 of the carry's data.npz and meta.json (what the features are made from)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("data.npz", "meta.json"):
        h.update((carry / name).read_bytes())
    return h.hexdigest()


_OVERRIDES = ("layers", "epochs", "hard_negatives", "mine_every", "query_reduce", "head_reduce", "negatives",
              "lr", "batch_size", "layer_loss", "freeze_layers")
"""Options of the prepared recipe that data.npz does not depend on: the gpu step's --set-* overrides."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("prepare", "repack", "gpu", "eval"))
    ap.add_argument("--carry", default=str(ROOT / ".devcarry" / "train"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--init-adapter", default=None,
                    help="gpu: start from this adapter's weights (its layers must cover the layers trained)")
    ap.add_argument("--feature-cache", default=None,
                    help="gpu: keep the extracted features in this folder and reuse them in later calls on the "
                         "same machine (e.g. /tmp/feats)")
    ap.add_argument("--extract-only", action="store_true",
                    help="gpu: stop once the features are in --feature-cache (a later call trains from them)")
    ap.add_argument("--adapter", action="append", default=None,
                    help="eval: an adapter to measure (shipped name or folder); repeatable")
    ap.add_argument("--greedy-base", default=None, help="eval: grow this adapter's layers ...")
    ap.add_argument("--greedy-extra", default=None, help="eval: ... by this adapter's, greedily on dev recall@16")
    ap.add_argument("--from", dest="source", default=None, help="repack: the prepared carry to start from")
    ap.add_argument("--split-mb", type=int, default=0, help="repack: cut the pack into parts of this many MiB")
    # the msa train-router options (prepare)
    ap.add_argument("--out-name", default="gemma3-270m-router", help="the --out the recorded command names")
    ap.add_argument("--builtin", default="stdlib")
    ap.add_argument("--layers", default="1,5")
    ap.add_argument("--max-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--n-train", type=int, default=0)
    ap.add_argument("--n-dev", type=int, default=400)
    ap.add_argument("--max-chars", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", type=int, default=256)
    ap.add_argument("--cloze-remove", type=float, default=0.9)
    ap.add_argument("--fact-names", default="syllables", choices=FACT_NAMES)
    ap.add_argument("--dev-distractors", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--layer-loss", default="each")
    ap.add_argument("--query-reduce", default="max", choices=("max", "mean", "last"))
    ap.add_argument("--head-reduce", default="mean", choices=("mean", "max"))
    ap.add_argument("--hard-negatives", default="bm25", choices=("bm25", "routing", "both"))
    ap.add_argument("--mine-every", type=int, default=1)
    ap.add_argument("--freeze-layers", default=None)
    ap.add_argument("--query-suffix", default="",
                    help="msa train-router --query-suffix: append this to every question (tokenized alone, as the "
                         "product routes it); with --query-reduce last")
    ap.add_argument("--freeze-keys", action="store_true",
                    help="msa train-router --freeze-keys: only the query projections learn (with the gpu step's "
                         "--init-adapter)")
    ap.add_argument("--query-template", default=None,
                    help="prepare (a trial, not a msa train-router option): tokenize every question put into this "
                         "text at {q}, e.g. '{q}\nThis passage is about'; route "
                         "the trained adapter with the same text (probe_last_layers.py --template)")
    # gpu step: override options of the prepared recipe that data.npz does not depend on
    for k, typ in (("layers", str), ("epochs", int), ("hard-negatives", str), ("mine-every", int),
                   ("query-reduce", str), ("head-reduce", str), ("negatives", int), ("lr", float),
                   ("batch-size", int), ("layer-loss", str), ("freeze-layers", str)):
        ap.add_argument(f"--set-{k}", type=typ, default=None, help=f"gpu: override the prepared --{k}")
    return ap


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    {"prepare": prepare, "repack": repack, "gpu": gpu, "eval": evaluate_adapters}[a.step](a)


if __name__ == "__main__":
    main()
