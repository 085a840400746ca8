"""The MSA-4B shape end to end: ``msa-encode`` -> store -> ``Memory`` -> ``ask`` (pooled, interleave).

What runs (every figure beside its baseline, measured in the same run on the machine named in the JSON):

1. A random-weight MSA checkpoint of the real shape is written: Qwen3-4B (36 layers, hidden 2560, 32
   query / 8 KV heads of 128, MLP 9728, vocab 151,936, RoPE θ 5e6, tied embeddings), bf16, with the
   reference's ``router_q_proj.0`` / ``router_k_proj.0`` at layers 18-35 (N(0, 0.02), as HF initialises
   them when the reference converts a Qwen3 checkpoint) and a ``temperature`` scalar; ``config.json`` as
   the reference's MSA classes write it (``reference_msa_config``: model_type ``msa``, ``sliding_window:
   false``, ``rope_theta``, ``torch_dtype``, the ``msa_config`` of ``resave_model.sh``: router layers
   18-35, pooling 64, top-16, ``INFONCE_DECOUPLE`` = dot/√d routing, head mean, query max, chunk max).
   The tokenizer is a byte-level BPE trained here on the synthetic text (no hub download) with Qwen's
   template and interleave special tokens ``<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|>
   <|object_ref_end|>``; ``<End-of-Retrieve>`` stays text, as in the reference.
2. Synthetic text files (a Zipf-distributed lexicon of pseudo-words, sentences and paragraphs; ~450
   tokens a file, so each file is one passage: one MSA document, as the reference's memory file holds
   one string per document) totalling about 1M and 10M tokens are encoded by ``encode_corpus`` (the function behind ``msa-encode``: plan,
   one encode-and-write task per shard on a Dask cluster, one commit) into a fresh store each. The Dask
   cluster is one in-process worker on the GPU, so the model the plan loads is the one the worker
   encodes with (the CLI's default cluster on a GPU host starts a worker process that loads it again).
   * encode tok/s: the whole job (tokens encoded ÷ wall seconds, model already loaded; one round: a
     job cannot be repeated) and the encoder alone (``Encoder.encode``, what each shard task runs,
     storage cast included) on a sample of the store's own passages, against plain HF prefill of the
     same wrapped token ids (length-sorted, right-padded batches of at most ``max_batch_tokens``
     padded tokens: ``logits_to_keep=1`` as ``generate`` does, and the backbone alone); warm-up, then
     ``--rounds`` interleaved rounds, medians.
   * store bytes per token (manifest stats: every file of the version) against the reference's
     layout for the same chunks (K̄, V̄, K̄ᴿ of 18 layers × 8 × 128 in bf16 per 64-token chunk: 1,728
     B/token for full chunks; msa-reference.md §2.6).
3. ``Memory`` opens each store on the GPU (router keys resident on the GPU, content K̄V̄ preloaded in
   pinned host memory, as the reference places them): resident GPU bytes (``torch.cuda
   .memory_allocated`` before/after, the router-key tensors, peak during asks).
   * routing time per layer: ``RouterIndex.route`` (Memory's path) of one router layer for the
     question's routing rows, median over 25 calls per layer, against the HBM floor = that layer's
     router-key bytes ÷ device copy bandwidth (a 1 GiB device copy, read + write bytes, fastest of
     7) and the round-trip floor (one CUDA-graph replay + a pinned copy + sync, ``bench_runtime``).
   * time to first token of ``Memory.ask(mode="pooled")`` (routing at 18 layers + fetch of each
     layer's top-16 documents' K̄V̄ + prefill of the question) against plain HF prefill of the routed
     documents' text + the question (the text-mode prompt of the 16 best-scored documents, HF's own
     forward, last logit, argmax on the host); also the product's text mode.
   * decode ms/token after the pooled prefill (the CUDA-graph step, its capture included; marginal
     = tokens 33-64) against HF greedy decoding with its KV cache after the plain prefill.
   * interleave: ``ask(mode="interleave")`` as the random model runs it (it emits no document ids,
     so one retrieval round, then the answer cue), and a context-expansion round as §5.2 builds it
     (16 routed documents' ``[n]. text`` injected, the routing query = question + that block) with
     its time to first token.
4. ``--gpu-check``: the tiny MSA checkpoint (``write_tiny_msa_checkpoint``, fp32) encoded by the
   ``msa-encode`` CLI on the CPU and on the GPU (fp32 compute, bf16 store): every stored value equal
   within one bf16 rounding step (the store's dtype); then ``Memory`` on CPU and GPU over the CPU
   store: the same top-8 documents with scores within 4 bf16 steps (the GPU keeps keys and query in
   bf16), the same per-layer routes and greedy tokens in pooled and interleave modes.

Latest result (``benchmarks/results/msa4b/``: ``--sizes 1M,10M@1M --gpu-check`` on a lent H100, from commit
b83446a): encoder 36,112 tok/s against HF prefill 44,776 (0.81; the whole job 24,444, plan and 1.9 GB of writes
included); 1,866 B/token, the reference layout's for the same chunks; routing 0.17 ms a layer at 1M (14× the
HBM floor, launch-bound) and 0.22 ms at 10M (1.9×); pooled time to first token 295 ms at 1M and 175 ms at
10M against 174 ms of plain prefill of the routed documents' 7.2K tokens; pooled decode 13.0 / 10.6 ms a
token against HF's cached decode 45 / 29. GPU against CPU: routes, scores and pooled / interleave tokens
equal; the stores' K̄/V̄/K̄ᴿ differ in 50 of 95,616 values by up to 2 bf16 steps of the value, over the
one-step bound that run held them to. One step of the *value* is too tight where a value is far below its
row's scale (a pooled mean that cancels): the check now bounds each value by one step of its row's largest
value (``_bf16_steps_rowwise``, derived in its docstring) and reports both: rerun on an H100 (``--sizes ""``,
``results/msa4b/bench_msa4b_check.json``), the stores are within 1.00 step of the row's scale (2.00 of the
value's, the same 50 values), routes, scores and tokens equal. The command for a lent GPU, with the wheels of the
packages the image lacks carried in ``.whl`` (dask, distributed, crc32c, jsonschema and their pure-Python
needs; about 3.6 MB)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/bench_msa4b.py --device cuda --sizes 1M,10M@1M --gpu-check --work /tmp/msa4b --out $OUT

It took 330 s there (checkpoint, 1M encoded, 10M replicated, the check). ``--sizes ""`` runs the check alone.

A size written ``10M@1M`` is the ``1M`` store replicated (``replicate_store``: every document copied under
fresh ids with the store's own ``write_shard`` + ``commit``, no encoding; the reference scales its memory
the same way for benchmarks, DEBUG_SCALE_MEMORY): the memory figures (3.) are measured on it, the encode
figures only where the size was encoded.

Usage::

    python benchmarks/bench_msa4b.py --cpu-smoke                          # small shape, ~20K tokens, CPU
    python benchmarks/bench_msa4b.py --device cuda --sizes 1M,10M@1M --gpu-check --out $OUT
    python benchmarks/bench_msa4b.py --device cuda --sizes 1M,10M --gpu-check --out $OUT   # 10M encoded too

Prints a table, then one JSON line (device, commit, config, results); ``--out`` gets the JSON and the log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_runtime import copy_bandwidth, round_trip_floor  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]

#: Qwen3-4B(-Instruct-2507), msa-reference.md §1.1
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                max_window_layers=36, hidden_act="silu", attention_bias=False, initializer_range=0.02)
#: a small model of the same family for the CPU smoke run
SMOKE = dict(QWEN3_4B, vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_window_layers=8)
#: resave_model.sh's msa_config (msa-reference.md §1.2); router layers set per shape (the upper half)
MSA_CONFIG = {"top_k_docs": 16, "pooling_kernel_size": 64, "decouple_router": True, "head_reduce_method": "mean",
              "query_reduce_method": "max", "chunk_reduce_method": "max", "decouple_pooling_mode": "mean",
              "aux_loss": False, "aux_loss_method": "INFONCE_DECOUPLE", "infonce_loss_temp": 0.1,
              "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0,
              "rewrite_position": True}

LOG: list[str] = []


def say(*a: Any) -> None:
    s = " ".join(str(x) for x in a)
    LOG.append(s)
    print(s, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, rounds: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all rounds) of ``rounds`` calls after ``warmup`` calls, synchronised."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(rounds):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{model or platform.processor()} x{torch.get_num_threads()} threads"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


# ----------------------------------------------------------------------------- synthetic text + tokenizer
class TextGen:
    """Pseudo-words (1-4 syllables) with Zipf frequencies, in sentences of 6-20 words and paragraphs."""

    def __init__(self, seed: int = 0, n_words: int = 30000) -> None:
        rng = np.random.default_rng(seed)
        cons = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "br", "tr", "st"]
        vows = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
        syl = [c + v for c in cons for v in vows] + vows
        words: set[str] = set()
        while len(words) < n_words:
            k = int(rng.integers(1, 5))
            words.add("".join(syl[i] for i in rng.integers(0, len(syl), k)))
        self.words = np.array(sorted(words))
        rng.shuffle(self.words)
        p = 1.0 / np.arange(1, n_words + 1) ** 1.07
        self.cdf = np.cumsum(p / p.sum())

    def text(self, rng: np.random.Generator, n_words: int) -> str:
        idx = np.minimum(np.searchsorted(self.cdf, rng.random(n_words)), len(self.words) - 1)
        ws = self.words[idx].tolist()
        paras, sent, i = [], [], 0
        while i < n_words:
            n = int(rng.integers(6, 21))
            s = " ".join(ws[i:i + n])
            if rng.random() < 0.15:
                s += f" {int(rng.integers(1, 10000))}"
            sent.append(s[:1].upper() + s[1:] + ".")
            i += n
            if len(sent) >= int(rng.integers(3, 9)):
                paras.append(" ".join(sent))
                sent = []
        if sent:
            paras.append(" ".join(sent))
        return "\n\n".join(paras) + "\n"


def build_tokenizer(gen: TextGen, vocab_size: int):
    """A byte-level BPE (trained here on the synthetic text) with Qwen's template/interleave specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(123)
    sample = [gen.text(rng, 400) for _ in range(600)] + ["[0123456789]. \n" * 4]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[s for s in SPECIALS if s not in ("<|im_end|>", "<|endoftext|>")])


def write_corpus(gen: TextGen, tok, root: Path, n_tokens: int, file_words: int, seed: int) -> dict:
    """Text files under ``root`` with about ``n_tokens`` tokens in all (counted with ``tok``)."""
    rng = np.random.default_rng(seed)
    probe = gen.text(np.random.default_rng(seed + 1), 20000)
    per_word = len(tok(probe, add_special_tokens=False)["input_ids"]) / 20000
    n_files = max(1, math.ceil(n_tokens / (per_word * file_words)))
    root.mkdir(parents=True, exist_ok=True)
    total, texts = 0, []
    for i in range(n_files):
        t = gen.text(rng, file_words)
        (root / f"doc{i:06d}.txt").write_text(t)
        texts.append(t)
        if len(texts) == 256 or i == n_files - 1:
            total += sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
            texts = []
    return {"files": n_files, "text_tokens": total, "tokens_per_word": per_word}


# ----------------------------------------------------------------------------- checkpoint
def write_msa_checkpoint(path: Path, shape: dict, tok, dev: torch.device, seed: int = 0) -> dict:
    """Random bf16 weights of ``shape`` + router projections in the upper half, as an MSA checkpoint dir."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3Config

    from msa_memory.encode.tiny import REFERENCE_TRANSFORMERS_VERSION, reference_msa_config

    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    cfg = Qwen3Config(**shape, eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=None)
    n = cfg.num_hidden_layers
    layers = list(range(n // 2, n))
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    msa = {"router_layer_idx": ",".join(map(str, layers)), **MSA_CONFIG}
    raw = reference_msa_config(model.config, msa, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    gen_cfg = {"_from_model_config": True, "transformers_version": REFERENCE_TRANSFORMERS_VERSION,
               "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    e, hq, hk, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for li in layers:   # HF's _init_weights for the missing projectors: N(0, initializer_range)
        for w, rows in (("q", hq * d), ("k", hk * d)):
            sd[f"model.layers.{li}.self_attn.router_{w}_proj.0.weight"] = (
                torch.randn(rows, e, generator=g, device=dev) * cfg.initializer_range).to(torch.bfloat16).cpu()
    sd["temperature"] = torch.tensor(0.1)
    n_params = sum(v.numel() for v in sd.values())
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(path))
    return {"params": int(n_params), "router_layers": layers, "bytes": (path / "model.safetensors").stat().st_size,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- encode
def encode_store(ckpt: Path, corpus: Path, store: Path, dev: torch.device) -> tuple[dict, Any, Any]:
    """encode_corpus into a fresh store with an in-process Dask worker; (figures, LoadedModel, Encoder)."""
    from distributed import Client, LocalCluster

    from msa_memory.jobs.encode_job import encode_corpus
    from msa_memory.jobs.worker import ModelSpec, get_encoder

    dstr = "cuda" if dev.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    model, enc, _ = get_encoder(ModelSpec(name=str(ckpt), device=dstr))   # the job's own model cache
    _sync(dev)
    load_s = time.perf_counter() - t0
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    client = Client(cluster)
    shards: list[dict] = []
    planned: list[float] = []

    def progress(ev: dict) -> None:
        if ev.get("event") == "shard":
            shards.append(ev)
        elif ev.get("event") == "planned":
            planned.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        res = encode_corpus([str(corpus)], str(store), model=str(ckpt), device=dstr, client=client, progress=progress)
        _sync(dev)
        job_s = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    shard_s = sum(s["seconds"] for s in shards)
    out = {"model_load_s": load_s, "job_s": job_s, "version": res.version, "docs": res.docs_added,
           "tokens_encoded": res.tokens_encoded, "tokens_planned_text": res.tokens_planned,
           "shards": res.shards_written, "bytes_written": res.bytes_written,
           "job_tok_s": res.tokens_encoded / job_s, "plan_s": planned[0] if planned else None, "shard_tasks_s": shard_s,
           "shard_tasks_tok_s": res.tokens_encoded / shard_s if shard_s else None}
    return out, model, enc


def replicate_store(src, root: Path, copies: int) -> dict:
    """A store holding ``copies`` copies of every document of ``src`` under fresh ids (the reference scales
    its memory this way for benchmarks, DEBUG_SCALE_MEMORY, msa-reference §8): the source's pooled arrays
    and texts written with the store's own ``write_shard`` + one ``commit``; no encoding. The copies keep
    the K̄V̄ the encoder computed with the source id in the ``[i].`` wrap: routing, fetch and attention cost
    what a store of that size costs."""
    from msa_memory.schemas.records import EncodedChunks, Passage
    from msa_memory.store import create_store, write_shard

    t0 = time.perf_counter()
    ident = src.identity
    parts = [src.router_keys(p) for p in range(ident.n_layers)]
    chunk_doc = parts[0][1]
    k_router = np.stack([k for k, _ in parts])                                  # (L, C, H, D), chunk order
    starts = np.r_[0, np.flatnonzero(np.diff(chunk_doc)) + 1]
    order = chunk_doc[starts]                                                   # documents in chunk order
    n_chunks = np.diff(np.r_[starts, len(chunk_doc)]).astype(np.int64)
    kv = np.concatenate(src.load_kv(order))                                     # (C, L, 2, H, D)
    tab = src.documents(columns=["doc_id", "source_path", "passage_index", "byte_start", "byte_end",
                                 "file_sha256", "n_tokens"]).to_pydict()
    row = {d: i for i, d in enumerate(tab["doc_id"])}
    idx = [row[int(d)] for d in order]
    texts = src.texts(order.tolist())
    n_tokens = np.array([tab["n_tokens"][i] for i in idx], dtype=np.int64)
    dst = create_store(root, ident, message=f"{copies} copies of {src.root} version {src.version}")
    records = []
    for r in range(copies):
        ids = dst.reserve_ids(len(order))
        passages = [Passage(t, f"copy{r:02d}/{tab['source_path'][i]}", tab["passage_index"][i], tab["byte_start"][i],
                            tab["byte_end"][i], tab["file_sha256"][i]) for t, i in zip(texts, idx)]
        enc = EncodedChunks(doc_ids=ids, n_tokens=n_tokens, n_chunks=n_chunks, k_router=k_router, kv=kv,
                            dtype=ident.dtype)
        records.append(write_shard(root, f"copy-{r:02d}", passages, enc))
    dst.commit(add=records, message=f"{copies} copies of {len(order)} documents")
    return {"copies": copies, "source_docs": len(order), "source_tokens": int(n_tokens.sum()),
            "seconds": time.perf_counter() - t0}


def encode_vs_prefill(model, enc, store, dev: torch.device, sample_tokens: int, rounds: int) -> dict:
    """Encoder.encode vs plain HF prefill on the same passages (a sample of the store's own)."""
    from msa_memory.schemas.records import Passage

    docs = store.documents(columns=["doc_id", "n_tokens"])
    ids_all = docs.column("doc_id").to_numpy()
    ntok = docs.column("n_tokens").to_numpy()
    step = max(1, int(round(ntok.sum() / sample_tokens)))
    ids = ids_all[::step]
    ids = ids[np.cumsum(ntok[::step]) <= max(sample_tokens, int(ntok[0]))]
    texts = store.texts(ids.tolist())
    passages = [Passage(t, "sample") for t in texts]
    seqs = [model.wrap_ids(t, int(d)) for t, d in zip(texts, ids.tolist())]
    n_real = sum(len(s) for s in seqs)
    hf = model.hf_model
    pad = int(model.tokenizer.pad_token_id)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches, cur = [], []
    for i in order:   # padded batch (B x longest) within max_batch_tokens, as the encoder's budget
        if cur and (len(cur) + 1) * len(seqs[i]) > enc.max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    tensors = []
    for b in batches:
        ln = max(len(seqs[i]) for i in b)
        x = torch.full((len(b), ln), pad, dtype=torch.long)
        m = torch.zeros((len(b), ln), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            m[r, :len(seqs[i])] = 1
        tensors.append((x.to(dev), m.to(dev)))
    padded = sum(x.numel() for x, _ in tensors)

    @torch.inference_mode()
    def hf_last():
        for x, m in tensors:
            hf(input_ids=x, attention_mask=m, logits_to_keep=1, use_cache=False).logits.argmax(-1)

    @torch.inference_mode()
    def hf_backbone():
        for x, m in tensors:
            hf.model(input_ids=x, attention_mask=m, use_cache=False)

    def ours():
        enc.encode(ids, passages)

    methods = {"ours_encoder": ours, "hf_prefill_last_logit": hf_last, "hf_backbone_only": hf_backbone}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for f in methods.values():   # warm-up
        f()
    for _ in range(rounds):      # interleaved rounds
        for k, f in methods.items():
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            times[k].append(time.perf_counter() - t0)
    out = {"sample_docs": len(seqs), "sample_tokens": n_real, "hf_padded_tokens": padded, "rounds": rounds}
    for k, ts in times.items():
        out[k] = {"median_s": statistics.median(ts), "rounds_s": ts, "tok_s": n_real / statistics.median(ts)}
    out["ours_vs_prefill"] = out["ours_encoder"]["tok_s"] / out["hf_prefill_last_logit"]["tok_s"]
    out["ours_vs_backbone"] = out["ours_encoder"]["tok_s"] / out["hf_backbone_only"]["tok_s"]
    return out


# ----------------------------------------------------------------------------- memory figures
def store_figures(store) -> dict:
    st = store.stats()
    ident = store.identity
    L, H, D = ident.n_layers, ident.n_kv_heads, ident.head_dim
    chunks, toks = int(st["n_chunks"]), int(st["n_tokens"])
    ref_bytes = chunks * L * 3 * H * D * 2    # K̄, V̄, K̄ᴿ per chunk per layer, bf16 (msa-reference §2.6)
    files = sum(f.stat().st_size for f in Path(store.root).rglob("*") if f.is_file())
    return {"n_docs": int(st.get("n_docs", 0)), "n_chunks": chunks, "n_tokens": toks,
            "store_bytes": int(st["n_bytes"]), "bytes_per_token": st["n_bytes"] / toks,
            "dir_bytes": files, "dir_bytes_per_token": files / toks,
            "router_key_bytes": store.router_key_bytes(), "router_key_bytes_per_token": store.router_key_bytes() / toks,
            "reference_bytes_same_chunks": ref_bytes, "reference_bytes_per_token_same_chunks": ref_bytes / toks,
            "reference_bytes_per_token_full_chunks": L * 3 * H * D * 2 / ident.chunk_tokens,
            "tokens_per_chunk": toks / chunks}


def _answer_timings(a) -> dict:
    t = dict(a.timings)
    return {k: t.get(k) for k in ("routing_s", "fetch_s", "prefill_s", "first_token_s", "decode_s", "total_s")} | {
        "n_new": a.n_new_tokens, "rounds": len(a.rounds), "stop": a.stop_reason}


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def memory_figures(store, model, question: str, dev: torch.device, rounds: int, bw: float, rt: float) -> dict:
    from msa_memory.runtime import Memory
    from msa_memory.runtime.interleave import ROUND_END, inject
    from msa_memory.runtime.prompts import PromptIds

    out: dict[str, Any] = {}
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        a0 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    mem = Memory(store, model=model, device=str(dev), memory_budget=None)
    _sync(dev)
    out["open_s"] = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    out["gpu"] = {"model_weight_bytes": weights, "router_key_bytes": mem.index.nbytes(),
                  "host_kv_bytes": mem.content.host_nbytes(), "content_source": mem.content.source}
    if cuda:
        out["gpu"]["memory_resident_bytes"] = torch.cuda.memory_allocated() - a0   # what Memory added
        torch.cuda.reset_peak_memory_stats()
    lay = mem.layout
    q = lay.question(question)
    out["question_tokens"], out["routing_rows"] = len(q.ids), int(sum(q.route_rows))
    kw = dict(stop_strings=())

    # -- pooled: TTFT + decode (32 and 64 tokens)
    pooled = []
    for i in range(rounds + 1):
        a = mem.ask(question, mode="pooled", max_new_tokens=32, **kw)
        if i:
            pooled.append(_answer_timings(a))
    long_ = []
    for i in range(rounds + 1):
        a64 = mem.ask(question, mode="pooled", max_new_tokens=64, **kw)
        if i:
            long_.append(_answer_timings(a64))
    n32 = len(a.rounds[0].per_layer)
    hits = a.rounds[0].docs
    dec32, dec64 = _med(pooled, "decode_s"), _med(long_, "decode_s")
    n32_, n64_ = _med(pooled, "n_new"), _med(long_, "n_new")
    out["pooled"] = {"rounds": pooled, "ttft_s": _med(pooled, "first_token_s"), "routing_s": _med(pooled, "routing_s"),
                     "fetch_s": _med(pooled, "fetch_s"), "prefill_s": _med(pooled, "prefill_s"),
                     "decode_ms_per_token": dec32 / (n32_ - 1) * 1e3, "decode_tokens": n32_,
                     "decode_marginal_ms_per_token": (dec64 - dec32) / max(1, n64_ - n32_) * 1e3,
                     "router_positions_routed": n32, "distinct_docs_routed": len(hits), "answer_preview": a.answer[:80]}

    # -- baseline: plain HF prefill of the routed documents' text (text-mode prompt of the 16 best) + decode
    top = [h.doc_id for h in hits[:16]]
    texts = store.texts(top)
    full = lay.head_ids() + lay.with_passages(question, list(zip(top, texts))).ids
    hf = model.hf_model
    x = torch.tensor([full], device=dev)

    @torch.inference_mode()
    def plain_ttft():
        return int(hf(input_ids=x, logits_to_keep=1).logits[0, -1].argmax())

    @torch.inference_mode()
    def plain_decode(n=32):
        o = hf(input_ids=x, use_cache=True, logits_to_keep=1)
        for _ in range(n - 1):
            t = int(o.logits[0, -1].argmax())
            o = hf(input_ids=torch.tensor([[t]], device=dev), past_key_values=o.past_key_values, use_cache=True)
        return int(o.logits[0, -1].argmax())

    t_plain, r_plain = timed(plain_ttft, dev, rounds)
    t_pd, _ = timed(plain_decode, dev, rounds)
    t_pc, _ = timed(lambda: plain_decode(1), dev, rounds)   # the same prefill with its cache kept
    out["plain_prefill"] = {"tokens": len(full), "docs": len(top), "ttft_s": t_plain, "rounds_s": r_plain,
                            "hf_cache_decode_ms_per_token": (t_pd - t_pc) / 31 * 1e3}
    out["pooled"]["ttft_speedup_vs_plain"] = t_plain / out["pooled"]["ttft_s"]
    out["pooled"]["decode_vs_hf_cache"] = out["plain_prefill"]["hf_cache_decode_ms_per_token"] / out["pooled"]["decode_ms_per_token"]
    text_rows = []
    for i in range(rounds + 1):
        at = mem.ask(question, mode="text", k=16, max_new_tokens=8, **kw)
        if i:
            text_rows.append(_answer_timings(at))
    out["text_mode"] = {"ttft_s": _med(text_rows, "first_token_s"), "routing_s": _med(text_rows, "routing_s"),
                        "prompt_tokens": at.n_prompt_tokens}

    # -- interleave as the random model runs it, and a §5.2 context-expansion round with 16 documents
    inter = []
    for i in range(rounds + 1):
        ai = mem.ask(question, mode="interleave", max_rounds=3, max_new_tokens=32, **kw)
        if i:
            inter.append(_answer_timings(ai))
    out["interleave"] = {"rounds": inter, "total_s": _med(inter, "total_s"), "first_round_ttft_s": _med(inter, "first_token_s"),
                         "retrieval_rounds": len(ai.rounds), "generated_preview": ai.rounds[0].generated[:80]}
    base = lay.question(question)
    asked = lay.encode([("".join(f"[{d}]" for d in top) + ROUND_END, False)])
    prompt = inject(lay, base + PromptIds(asked.ids, [False] * len(asked.ids)), list(zip(top, texts)))
    P, kk = len(lay.head_ids()), mem.routing.top_k
    pos = list(range(P + kk, P + kk + len(prompt.ids)))

    def expansion() -> dict:
        st = mem.engine.new_state(len(prompt.ids) + 4, mem.prefix, top_k=kk)
        tm: dict[str, float] = {}
        mem._generate(st, prompt, pos, route=True, max_new_tokens=1, temperature=0.0, top_p=1.0, seed=None,
                      on_token=None, timings=tm, stop_strings=())
        return tm | dict(st.timings)

    exp = [expansion() for _ in range(rounds + 1)][1:]
    out["interleave"]["expansion_round"] = {
        "prompt_tokens": len(prompt.ids), "routing_rows": int(sum(prompt.route_rows)),
        "ttft_s": _med(exp, "first_token_s"), "routing_s": _med(exp, "routing_s"), "fetch_s": _med(exp, "fetch_s")}
    out["interleave"]["expansion_vs_plain"] = t_plain / out["interleave"]["expansion_round"]["ttft_s"]
    if cuda:
        out["gpu"]["peak_allocated_during_asks"] = torch.cuda.max_memory_allocated()
        out["gpu"]["reserved"] = torch.cuda.memory_reserved()

    # -- routing per layer vs the HBM floor, with the question's number of routing rows
    g = torch.Generator().manual_seed(0)
    T = out["routing_rows"]
    Hq, D = model.n_q_heads, model.head_dim
    qr = torch.randn(T, Hq, D, generator=g).to(dev)
    per_key = mem.index.nbytes() / mem.index.n_layers
    rows = []
    for pos_ in range(mem.index.n_layers):
        t, _ = timed(lambda p=pos_: mem.index.route(p, qr, k=16), dev, rounds=25, warmup=5)
        rows.append(t)
    floor = per_key / bw
    out["routing_per_layer"] = {"q_rows": T, "key_bytes_per_layer": per_key, "median_ms": statistics.median(rows) * 1e3,
                                "max_ms": max(rows) * 1e3, "all_ms": [r * 1e3 for r in rows], "hbm_floor_ms": floor * 1e3,
                                "round_trip_floor_ms": rt * 1e3, "x_hbm_floor": statistics.median(rows) / floor,
                                "x_larger_floor": statistics.median(rows) / max(floor, rt),
                                "in_ask_ms_per_layer": out["pooled"]["routing_s"] / mem.index.n_layers * 1e3}
    mem = None   # release the keys and pinned K̄V̄ before the next size
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- GPU vs CPU (tiny checkpoint)
def _cli_encode(corpus: Path, store: Path, ckpt: Path, device: str) -> dict:
    code = ("import sys; sys.path.insert(0, %r); from msa_memory.cli import encode_main; "
            "sys.argv[0] = 'msa-encode'; encode_main()" % str(ROOT))
    cmd = [sys.executable, "-c", code, str(corpus), "--store", str(store), "--model", str(ckpt),
           "--device", device, "--dtype", "float32", "--json"]
    env = dict(os.environ, MSA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"msa-encode --device {device} failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t0}


def _as_f32(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if t.dtype in (torch.uint16, torch.int16) else t).float()


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| in units of one bf16 rounding step (ulp) at max(|a|, |b|); 0 for equal arrays."""
    m = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(m)) - 7)
    return float(((a - b).abs() / ulp).max()) if a.numel() else 0.0


def _bf16_steps_rowwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| in units of one bf16 step at the largest |value| of its row (last dimension).

    The bound the check holds stores to: each side rounds its fp32 value x to bf16 with an error of at most
    half a step at |x| <= half a step at the row's largest |value|, and the two devices' fp32 values differ
    by reordered fp32 sums (relative ~1e-6 of the row's scale, far below 2^-8), so two stores of the same
    forward differ by at most one such step. Element-wise steps (``_bf16_steps``) can exceed one where a
    pooled mean cancels to far below its row's scale, and are reported beside it."""
    if not a.numel():
        return 0.0
    m = torch.maximum(a.abs(), b.abs()).amax(-1, keepdim=True).clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(m)) - 7)
    return float(((a - b).abs() / ulp).max())


def gpu_check(work: Path, other: str) -> dict:
    """The tiny checkpoint end to end on the CPU and on ``other``: stores, routes, greedy tokens."""
    from msa_memory.encode import load_model
    from msa_memory.encode.tiny import write_tiny_msa_checkpoint
    from msa_memory.runtime import Memory
    from msa_memory.store import open_store

    ck = write_tiny_msa_checkpoint(work / "tiny_ckpt")
    gen = TextGen(seed=7, n_words=2000)
    rng = np.random.default_rng(7)
    corpus = work / "tiny_corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(10):   # byte-level tokenizer: ~2,000 tokens a file, 20K in all
        (corpus / f"t{i:02d}.txt").write_text(gen.text(rng, 330))
    res: dict[str, Any] = {}
    stores = {}
    for role, d in (("cpu", "cpu"), ("dev", other)):
        stores[role] = work / f"tiny_store_{role}"
        shutil.rmtree(stores[role], ignore_errors=True)
        r = _cli_encode(corpus, stores[role], ck, d)
        res[f"encode_{role}"] = {k: r.get(k) for k in ("version", "tokens_encoded", "docs_added", "wall_s")} | {"device": d}
    a, b = open_store(stores["cpu"]), open_store(stores["dev"])
    steps, rows, n_diff, n_all = 0.0, 0.0, 0, 0
    same_docs = a.documents(columns=["doc_id", "text"]).equals(b.documents(columns=["doc_id", "text"]))
    for pos in range(a.identity.n_layers):
        ka, da = a.router_keys(pos)
        kb, db = b.router_keys(pos)
        same_docs &= bool(np.array_equal(da, db))
        x, y = _as_f32(ka), _as_f32(kb)
        steps, n_diff, n_all = max(steps, _bf16_steps(x, y)), n_diff + int((x != y).sum()), n_all + x.numel()
        rows = max(rows, _bf16_steps_rowwise(x, y))
    ids = a.documents(columns=["doc_id"]).column("doc_id").to_numpy()
    for ka, kb in zip(a.load_kv(ids), b.load_kv(ids)):
        x, y = _as_f32(ka), _as_f32(kb)
        steps, n_diff, n_all = max(steps, _bf16_steps(x, y)), n_diff + int((x != y).sum()), n_all + x.numel()
        rows = max(rows, _bf16_steps_rowwise(x, y))
    res["store"] = {"same_docs_and_chunks": bool(same_docs), "max_bf16_steps": steps,
                    "max_bf16_steps_of_row_scale": rows, "values_differing": n_diff, "values": n_all,
                    "ok": bool(same_docs) and rows <= 1.0}
    question = " ".join(a.texts([int(ids[3])])[0].split()[5:20])
    outs = {}
    for role, d in (("cpu", "cpu"), ("dev", other)):
        m = load_model(str(ck), device=d, dtype=torch.float32)
        mem = Memory(open_store(stores["cpu"]), model=m, device=d)
        hit_ids, scores, _ = mem.route(question, 8)
        ap = mem.ask(question, mode="pooled", max_new_tokens=16, stop_strings=())
        ai = mem.ask(question, mode="interleave", max_new_tokens=16, max_rounds=2, stop_strings=())
        outs[role] = {"ids": hit_ids.tolist(), "scores": np.asarray(scores, dtype=np.float64),
                   "per_layer": ap.rounds[0].per_layer, "pooled": ap.answer, "pooled_toks": list(ap.tokens),
                   "interleave": [r.generated for r in ai.rounds] + [ai.answer]}
    c, g = outs["cpu"], outs["dev"]
    smax = float(np.abs(c["scores"]).max()) or 1.0
    sdiff = float(np.abs(c["scores"] - g["scores"]).max()) / smax
    res["memory"] = {"top8_equal": c["ids"] == g["ids"], "score_max_rel_diff": sdiff, "score_bound": 4 * 2.0**-8,
                     "per_layer_routes_equal": c["per_layer"] == g["per_layer"],
                     "pooled_answer_equal": c["pooled"] == g["pooled"] and c["pooled_toks"] == g["pooled_toks"],
                     "interleave_equal": c["interleave"] == g["interleave"]}
    res["memory"]["ok"] = bool(res["memory"]["top8_equal"] and sdiff <= 4 * 2.0**-8 and res["memory"]["per_layer_routes_equal"]
                               and res["memory"]["pooled_answer_equal"] and res["memory"]["interleave_equal"])
    res["device"] = other
    return res


# ----------------------------------------------------------------------------- main
def run_size(entry: dict, n_tokens: int, args, gen: TextGen, tok, ckpt: Path, dev: torch.device,
             bw: float, rt: float, work: Path, dump) -> None:
    """Fill ``entry`` (already in the results, dumped after each stage) with one memory size's figures."""
    from msa_memory.store import open_store

    label = entry["label"]
    if "@" in label:   # "10M@1M": the 1M store replicated to 10M tokens (no encoding), see replicate_store
        from msa_memory.jobs.worker import ModelSpec, get_encoder

        name, base = label.split("@")
        copies = max(1, round(parse_size(name) / parse_size(base)))
        store_dir = work / f"store_{name}"
        shutil.rmtree(store_dir, ignore_errors=True)
        entry["replicated"] = replicate_store(open_store(work / f"store_{base}"), store_dir, copies)
        say(f"[{label}] {copies} copies of the {base} store in {entry['replicated']['seconds']:.1f} s")
        model, _, _ = get_encoder(ModelSpec(name=str(ckpt), device="cuda" if dev.type == "cuda" else "cpu"))
        store = open_store(store_dir)
        entry["store"] = store_figures(store)
        dump()
    else:
        model, store = _encode_size(entry, label, n_tokens, args, gen, tok, ckpt, dev, work, dump)
    # the question: a sentence from the middle of one stored passage
    ids = store.documents(columns=["doc_id"]).column("doc_id").to_numpy()
    src = store.texts([int(ids[len(ids) // 2])])[0]
    question = "What is said about " + " ".join(src.split(". ")[1].split()[:12]) + "?"
    entry["question"] = question
    mfig = entry["memory"] = memory_figures(store, model, question, dev, args.rounds, bw, rt)
    say(f"[{label}] pooled TTFT {mfig['pooled']['ttft_s'] * 1e3:.1f} ms vs plain prefill of {mfig['plain_prefill']['tokens']} "
        f"tokens {mfig['plain_prefill']['ttft_s'] * 1e3:.1f} ms")
    if not args.keep_stores and not entry.get("keep"):
        shutil.rmtree(Path(store.root), ignore_errors=True)


def _encode_size(entry: dict, label: str, n_tokens: int, args, gen: TextGen, tok, ckpt: Path, dev: torch.device,
                 work: Path, dump) -> tuple[Any, Any]:
    """Corpus -> encode_corpus -> store figures -> encoder vs HF prefill; (LoadedModel, opened store)."""
    from msa_memory.store import open_store

    corpus = work / f"corpus_{label}"
    store_dir = work / f"store_{label}"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(store_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cinfo = write_corpus(gen, tok, corpus, n_tokens, args.file_words, seed=zlib.crc32(label.encode()) % 1000 + 11)
    cinfo["write_s"] = time.perf_counter() - t0
    entry["corpus"] = cinfo
    say(f"[{label}] corpus: {cinfo['files']} files, {cinfo['text_tokens']:,} text tokens ({cinfo['write_s']:.1f} s)")
    enc_fig, model, enc = encode_store(ckpt, corpus, store_dir, dev)
    entry["encode"] = enc_fig
    dump()
    say(f"[{label}] encode job: {enc_fig['tokens_encoded']:,} tokens in {enc_fig['job_s']:.1f} s "
        f"= {enc_fig['job_tok_s']:,.0f} tok/s ({enc_fig['docs']} docs, {enc_fig['shards']} shards)")
    store = open_store(store_dir)
    sfig = entry["store"] = store_figures(store)
    say(f"[{label}] store: {sfig['bytes_per_token']:.1f} B/token vs reference layout {sfig['reference_bytes_per_token_same_chunks']:.1f}")
    cmp_ = entry["encode_vs_hf"] = encode_vs_prefill(model, enc, store, dev, args.sample_tokens, args.rounds)
    dump()
    say(f"[{label}] encoder {cmp_['ours_encoder']['tok_s']:,.0f} tok/s vs HF prefill {cmp_['hf_prefill_last_logit']['tok_s']:,.0f}"
        f" / backbone {cmp_['hf_backbone_only']['tok_s']:,.0f} on {cmp_['sample_tokens']:,} tokens")
    shutil.rmtree(corpus, ignore_errors=True)
    return model, store


def _encode_rows(row, e: dict, c: dict) -> None:
    hfp = c["hf_prefill_last_logit"]["tok_s"]
    row("encode job tok/s (msa-encode, 1 round)", f"{e['job_tok_s']:,.0f}", f"{hfp:,.0f}", f"{e['job_tok_s'] / hfp:.2f}",
        f"HF prefill, same passages (sample); job {e['job_s']:.1f} s, plan {e['plan_s'] or 0:.1f} s")
    row(f"encoder tok/s ({c['sample_tokens']:,}-token sample)", f"{c['ours_encoder']['tok_s']:,.0f}", f"{hfp:,.0f}",
        f"{c['ours_vs_prefill']:.2f}", "HF prefill (last logit)")
    row("", "", f"{c['hf_backbone_only']['tok_s']:,.0f}", f"{c['ours_vs_backbone']:.2f}", "HF backbone only")


def _memory_rows(row, st: dict, m: dict) -> None:
    row("store bytes / token", f"{st['bytes_per_token']:,.1f}", f"{st['reference_bytes_per_token_same_chunks']:,.1f}",
        f"{st['bytes_per_token'] / st['reference_bytes_per_token_same_chunks']:.3f}",
        f"reference layout, same chunks ({st['reference_bytes_per_token_full_chunks']:.0f} full)")
    g = m["gpu"]
    if "memory_resident_bytes" in g:
        row("resident GPU GiB (Memory)", f"{g['memory_resident_bytes'] / 2**30:.2f}",
            f"{g['router_key_bytes'] / 2**30:.2f}", f"{g['memory_resident_bytes'] / max(1, g['router_key_bytes']):.2f}",
            f"router keys alone; + weights {g['model_weight_bytes'] / 2**30:.2f}; peak in asks "
            f"{g.get('peak_allocated_during_asks', 0) / 2**30:.2f}")
    r = m["routing_per_layer"]
    row("routing ms / layer (route call)", f"{r['median_ms']:.3f}", f"{r['hbm_floor_ms']:.3f}", f"{r['x_hbm_floor']:.1f}",
        f"HBM floor ({r['key_bytes_per_layer'] / 1e6:.0f} MB keys); round trip {r['round_trip_floor_ms']:.3f}")
    row("routing ms / layer (inside ask)", f"{r['in_ask_ms_per_layer']:.3f}", f"{r['hbm_floor_ms']:.3f}",
        f"{r['in_ask_ms_per_layer'] / r['hbm_floor_ms']:.1f}", "HBM floor")
    p, pl = m["pooled"], m["plain_prefill"]
    row("TTFT ms, pooled", f"{p['ttft_s'] * 1e3:.1f}", f"{pl['ttft_s'] * 1e3:.1f}", f"{p['ttft_speedup_vs_plain']:.2f}",
        f"plain prefill of the routed docs' text ({pl['tokens']:,} tokens)")
    row("TTFT ms, text mode (product)", f"{m['text_mode']['ttft_s'] * 1e3:.1f}", f"{pl['ttft_s'] * 1e3:.1f}",
        f"{pl['ttft_s'] / m['text_mode']['ttft_s']:.2f}", "plain prefill")
    row("decode ms/token, pooled (graph)", f"{p['decode_ms_per_token']:.2f}", f"{pl['hf_cache_decode_ms_per_token']:.2f}",
        f"{p['decode_vs_hf_cache']:.2f}", f"HF KV-cache decode after the plain prefill; marginal {p['decode_marginal_ms_per_token']:.2f}")
    i = m["interleave"]
    row("interleave ask total s (random weights)", f"{i['total_s']:.3f}", "", "", f"{i['retrieval_rounds']} round(s)")
    ex = i["expansion_round"]
    row("interleave expansion round TTFT ms", f"{ex['ttft_s'] * 1e3:.1f}", f"{pl['ttft_s'] * 1e3:.1f}",
        f"{i['expansion_vs_plain']:.2f}", f"plain prefill; {ex['prompt_tokens']:,} prompt / {ex['routing_rows']:,} routing rows")


def table(res: dict) -> str:
    lines = [f"device: {res['device']}   commit {res['commit']}   torch {res['config']['torch']}   "
             f"transformers {res['config']['transformers']}",
             f"{'figure':44s} {'ours':>14s} {'baseline':>14s}  {'ratio':>7s}  baseline"]

    def row(name, ours, base, ratio, what):
        lines.append(f"{name:44s} {ours:>14s} {base:>14s}  {ratio:>7s}  {what}")

    for s in res["sizes"]:
        st, m = s["store"], s["memory"]
        lab = f"[{s['label']}: {st['n_tokens']:,} tokens, {st['n_docs']:,} docs]"
        if "replicated" in s:
            lab += f" = {s['replicated']['copies']} copies of the {s['label'].split('@')[1]} store (not encoded)"
        lines.append(lab)
        if "encode" in s:
            _encode_rows(row, s["encode"], s["encode_vs_hf"])
        _memory_rows(row, st, m)
    if res.get("gpu_check"):
        gc = res["gpu_check"]
        lines.append(f"GPU vs CPU (tiny checkpoint, {gc['device']}): store ok={gc['store']['ok']} "
                     f"(max {gc['store'].get('max_bf16_steps_of_row_scale', float('nan')):.2f} bf16 steps of the row's scale, "
                     f"{gc['store']['max_bf16_steps']:.2f} of the value's, {gc['store']['values_differing']}/{gc['store']['values']} differ); "
                     f"Memory ok={gc['memory']['ok']} (top-8 equal {gc['memory']['top8_equal']}, score rel diff "
                     f"{gc['memory']['score_max_rel_diff']:.2e}, routes {gc['memory']['per_layer_routes_equal']}, pooled "
                     f"{gc['memory']['pooled_answer_equal']}, interleave {gc['memory']['interleave_equal']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1M,10M", help="memory sizes in tokens, e.g. 1M,10M")
    ap.add_argument("--cpu-smoke", action="store_true", help="small Qwen3 shape, ~20K tokens, CPU, 1 round")
    ap.add_argument("--gpu-check", action="store_true", help="tiny checkpoint: GPU (--device) against CPU")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-tokens", type=int, default=131072, help="tokens of the encode-vs-HF sample")
    ap.add_argument("--file-words", type=int, default=360,
                    help="words per synthetic file (360: ~450 tokens, one passage: a file is one MSA document)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--keep-stores", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="dir for bench_msa4b.json and bench_msa4b.log")
    ap.add_argument("--name", default="bench_msa4b")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("MSA_DISABLE_PROGRESS_BARS", "1")
    if args.cpu_smoke:
        args.device, args.sizes = "cpu", args.sizes if args.sizes != "1M,10M" else "20K"
        args.rounds, args.sample_tokens = min(args.rounds, 1), min(args.sample_tokens, 4096)
    dev = torch.device(args.device)
    shape = SMOKE if args.cpu_smoke else QWEN3_4B
    work = Path(args.work or tempfile.mkdtemp(prefix="msa4b."))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MSA_CACHE_DIR", str(work / "cache"))
    import transformers

    res: dict[str, Any] = {"bench": "bench_msa4b", "device": _device_name(dev), "commit": _commit(),
                           "config": {"shape": "smoke" if args.cpu_smoke else "qwen3-4b", "model": shape,
                                      "msa_config": MSA_CONFIG, "rounds": args.rounds, "sample_tokens": args.sample_tokens,
                                      "torch": torch.__version__, "transformers": transformers.__version__,
                                      "python": platform.python_version(), "host": platform.node()},
                           "sizes": []}
    say(f"device {res['device']}, work dir {work}")
    t_all = time.perf_counter()

    def dump() -> None:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            (out / f"{args.name}.log").write_text("\n".join(LOG) + "\n")

    bw = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (256 << 20))
    rt = round_trip_floor(dev)
    res["floors"] = {"copy_bandwidth_GBps": bw / 1e9, "round_trip_ms": rt * 1e3}
    say(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write), round trip {rt * 1e3:.3f} ms")
    gen = TextGen(seed=0)
    t0 = time.perf_counter()
    ckpt = work / "msa_ckpt"
    done = ckpt / "bench_checkpoint.json"
    if done.is_file() and json.loads(done.read_text()).get("model") == shape:   # a warm machine's earlier call
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        res["checkpoint"] = json.loads(done.read_text())["checkpoint"] | {"reused": True}
    else:
        tok = build_tokenizer(gen, 4096 if args.cpu_smoke else 32768)
        res["checkpoint"] = write_msa_checkpoint(ckpt, shape, tok, dev) | {"tokenizer_vocab": len(tok),
                                                                          "tokenizer_s": time.perf_counter() - t0}
        done.write_text(json.dumps({"model": shape, "checkpoint": res["checkpoint"]}))
    say(f"checkpoint: {res['checkpoint']['params'] / 1e9:.3f}B params, {res['checkpoint']['bytes'] / 2**30:.2f} GiB, "
        f"{res['checkpoint']['seconds']:.1f} s")
    dump()
    labels = [x for x in args.sizes.split(",") if x]   # --sizes "": the GPU check alone
    for j, label in enumerate(labels):
        entry = {"label": label, "target_tokens": parse_size(label.split("@")[0]),
                 "keep": any(x.endswith("@" + label) for x in labels[j + 1:])}   # a later size replicates it
        res["sizes"].append(entry)
        run_size(entry, entry["target_tokens"], args, gen, tok, ckpt, dev, bw, rt, work, dump)
        dump()
    if args.gpu_check:   # last: the sizes' figures come back even should the check fail
        t0 = time.perf_counter()
        try:
            res["gpu_check"] = gpu_check(work / "check", args.device if not args.cpu_smoke else "cpu")
            say(f"gpu check ({time.perf_counter() - t0:.1f} s): store ok {res['gpu_check']['store']['ok']}, "
                f"memory ok {res['gpu_check']['memory']['ok']}")
        except Exception as e:  # noqa: BLE001 - reported in the results, not hidden
            import traceback

            res["gpu_check_error"] = traceback.format_exc()
            say(f"gpu check FAILED: {type(e).__name__}: {e}")
        dump()
    res["wall_s"] = time.perf_counter() - t_all
    say(table(res))
    dump()
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
