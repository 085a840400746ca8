"""Train a reader adapter: a question-side LoRA that answers from pooled K̄V̄ (issue 39).

Design note. The objective is MSA's answer loss (msa-reference §6.2, ``L_ans``) with the memory attended
the way the runtime attends it: the training forward *is* the runtime's pooled forward
(:meth:`MsaEngine.forward` with ``grad=True``), so the prompt layout, the positions (§3.2: the question
starts at P + k), the [prefix | memory | local] attention and the per-layer routes are the ones
``Memory.ask(mode="pooled")`` uses. Each training question is routed once by the frozen model (reader off,
the routes ``Memory`` answers with too); where a router layer's top-k misses the gold passage, the gold
passage replaces its last route (teacher forcing, §6.4), so the loss never asks for an answer the memory
does not hold. The store is a real store, encoded by ``encode_corpus`` from passages of the training
sources only (stdlib and package docstrings, ``msa_memory.train.texts``), with a fact from
:class:`~msa_memory.train.pairs.FactMaker` (split "train") planted at a sentence boundary of each passage;
the answer span is the fact's value, which occurs in its passage only. Questions of a held-out fraction of
the facts never reach the optimizer and give the dev figures.

The routing loss (``L_aux``) is not here: routing is the router adapter's (``msa train-router``), and a
reader never changes routes (:mod:`msa_memory.runtime.reader`).

End-to-end variant (``writer=``): a second LoRA of the same form, active only while the routed documents are
encoded, and the documents encoded in the training graph (:func:`pooled_kv`, the encoder's pooled forward with
autograd), so the answer loss reaches the K̄V̄ themselves. A store would have to be encoded with the writer to
answer from it; the runtime does not do that (``msa-encode`` encodes with the base model), so the variant is a
measurement (``benchmarks/bench_reader_e2e.py``), not a shipped path.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from msa_memory.errors import ConfigError

__all__ = ["ALL_TARGETS", "ReaderQuestion", "make_reader_corpus", "load_questions", "ReaderTrainer", "run_reader_training",
           "normalize_answer", "pooled_kv", "new_reader"]


@dataclass
class ReaderQuestion:
    question: str
    answer: str
    files: list[str]          # corpus-relative paths of the gold passages
    fact: int                 # fact index (questions of one fact share it)
    split: str                # "train" or "dev"


def make_reader_corpus(out_dir: str | Path, n_passages: int = 400, *, seed: int = 0, dev_fraction: float = 0.1,
                       sources: str = "stdlib,packages", min_chars: int = 250, max_chars: int = 600) -> dict[str, Any]:
    """Write ``out_dir/corpus/*.txt`` (one passage each, a planted fact in each) and ``out_dir/questions.jsonl``.

    Passages come from the training sources (``stdlib``: standard-library docstrings, ``packages``: installed
    packages' docstrings), packed to ``min_chars``–``max_chars`` characters and shuffled by ``seed``.
    """
    from msa_memory.train.pairs import FactMaker, insert_sentence
    from msa_memory.train.texts import pack_paragraphs, package_docstrings, stdlib_docstrings

    out = Path(out_dir)
    corpus = out / "corpus"
    if corpus.exists() and any(corpus.iterdir()):
        raise ConfigError(f"{str(corpus)!r} is not empty.", hint="Pass a new --data folder.")
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    for s in sources.split(","):
        if s == "stdlib":
            docs += stdlib_docstrings()
        elif s == "packages":
            docs += package_docstrings()
        else:
            raise ConfigError(f"Unknown reader-corpus source {s!r}; use stdlib and/or packages.")
    passages = [p for _, text in docs for p in pack_paragraphs(text, max_chars=max_chars, min_chars=min_chars)]
    rng.shuffle(passages)
    if len(passages) < n_passages:
        raise ConfigError(f"The sources give {len(passages)} passages, fewer than the {n_passages} asked for.")
    facts = FactMaker("train", seed=seed, names="varied")
    corpus.mkdir(parents=True, exist_ok=True)
    questions: list[dict[str, Any]] = []
    for i, passage in enumerate(passages[:n_passages]):
        statement, qs, value = facts.make()
        name = f"p{i:06d}.txt"
        (corpus / name).write_text(insert_sentence(passage, statement, rng) + "\n")
        split = "dev" if rng.random() < dev_fraction else "train"
        questions += [asdict(ReaderQuestion(q, value, [name], i, split)) for q in qs]
    with open(out / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    return {"passages": n_passages, "questions": len(questions),
            "dev_questions": sum(q["split"] == "dev" for q in questions)}


def load_questions(path: str | Path) -> list[ReaderQuestion]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append(ReaderQuestion(str(r["question"]), str(r["answer"]), [str(x) for x in r["files"]],
                                          int(r.get("fact", n)), str(r.get("split", "train"))))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n}: not a reader question ({e}).",
                                  hint='Each line: {"question": ..., "answer": ..., "files": [...]}.') from e
    return out


class ReaderTrainer:
    """Trains a :class:`~msa_memory.runtime.reader.ReaderAdapter` on one store's questions.

    ``memory``: an open :class:`~msa_memory.runtime.Memory` on the training store (its engine runs every
    forward). ``k``: documents per router layer, as ``Memory.ask(k=...)``.
    """

    def __init__(self, memory: Any, reader: Any, *, k: int = 4, lr: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, writer: Any = None) -> None:
        import torch

        self.mem, self.reader, self.writer, self.k = memory, reader, writer, int(k)
        hf = memory.model.hf_model
        for p in hf.parameters():
            p.requires_grad_(False)
        reader.attach(hf, memory.model.model_fingerprint)
        if writer is not None:
            if writer is reader:
                raise ConfigError("The writer must be an adapter of its own, not the reader.")
            writer.attach(hf, memory.model.model_fingerprint)
        for p in self.params():
            p.requires_grad_(True)
        memory.engine.reader = memory.reader = reader
        self.opt = torch.optim.AdamW(self.params(), lr=lr, weight_decay=weight_decay)
        self._doc_tokens: dict[int, list[int]] = {}
        self.rng = random.Random(seed)
        self._routes: dict[str, Any] = {}
        self._file_doc: dict[str, list[int]] | None = None
        self.P = len(memory.layout.head_ids())

    def params(self) -> list[Any]:
        """The trained parameters: the reader's, then the writer's (if any)."""
        out = list(self.reader.params.values())
        return out + (list(self.writer.params.values()) if self.writer is not None else [])

    # ------------------------------------------------------------------ pieces
    def doc_tokens(self, index: int) -> list[int]:
        """Wrapped token ids of the store's document at dense ``index``, as the encoder wrapped them."""
        import numpy as np

        if index not in self._doc_tokens:
            doc_id = int(np.asarray(self.mem.doc_ids)[index])
            text = self.mem.store.texts([doc_id])[0]
            self._doc_tokens[index] = self.mem.model.wrap_ids(text, doc_id)
        return self._doc_tokens[index]

    def memory(self, routes: dict[int, Any]) -> dict[int, tuple[Any, Any]]:
        """Each router position's (K̄, V̄), (H, M, D), of its routed documents, encoded now with the writer
        active (autograd on): what :attr:`ForwardState.preset_memory` takes."""
        import torch

        docs = sorted({int(i) for r in routes.values() for i in r.doc_index.tolist()})
        with self.writer.active(True), torch.enable_grad():
            ks, vs, n_chunks = pooled_kv(self.mem.model, [self.doc_tokens(i) for i in docs])
        span, row = {}, 0                  # each document's rows [first, last + 1) in the packed chunks
        for d, n in zip(docs, n_chunks):
            span[d] = (row, row + n)
            row += n
        out = {}
        for pos, r in routes.items():
            rows = torch.cat([torch.arange(*span[int(i)]) for i in r.doc_index.tolist()]).to(ks[pos].device)
            out[pos] = (ks[pos].index_select(0, rows).transpose(0, 1), vs[pos].index_select(0, rows).transpose(0, 1))
        return out

    def gold_docs(self, q: ReaderQuestion) -> list[int]:
        """Dense document indices of ``q``'s gold passages (every passage of each gold file, matched by the
        file's path relative to the corpus folder or by its name)."""
        import numpy as np

        if self._file_doc is None:
            tab = self.mem.store.documents(columns=["doc_id", "source_path"])
            dense = {int(d): i for i, d in enumerate(np.asarray(self.mem.doc_ids).tolist())}
            self._file_doc = {}
            for d, p in zip(tab.column("doc_id").to_pylist(), tab.column("source_path").to_pylist()):
                for key in {str(p), Path(str(p)).name}:
                    self._file_doc.setdefault(key, []).append(dense[int(d)])
        out: list[int] = []
        for f in q.files:
            hit = self._file_doc.get(f) or self._file_doc.get(Path(f).name)
            if not hit:
                raise ConfigError(f"Gold passage {f!r} of question {q.question!r} is not in the store.",
                                  hint="Questions name their passages' files as the store records them.")
            out += [i for i in hit if i not in out]
        return out

    def routes(self, q: ReaderQuestion, force_gold: bool = True, drop_gold: bool = False) -> dict[int, Any]:
        """The per-layer routes ``Memory.ask(mode="pooled")`` answers ``q`` with (reader off), gold forced in
        (``drop_gold``: every gold passage replaced by a random other passage instead)."""
        import numpy as np

        from msa_memory.routing.index import RouteResult

        key = q.question
        if key not in self._routes:
            self._routes[key] = self.mem.pooled_routes(q.question, self.k)
        routes = self._routes[key]
        if not force_gold and not drop_gold:
            return routes
        gold = self.gold_docs(q)
        out = {}
        if drop_gold:
            n = len(np.asarray(self.mem.doc_ids))
            others = [i for i in range(n) if i not in gold]
            for pos, r in routes.items():
                idx = [i if i not in gold else self.rng.choice(others) for i in r.doc_index.tolist()]
                out[pos] = RouteResult(np.asarray(idx, dtype=np.int64), np.asarray(self.mem.doc_ids)[idx],
                                       np.zeros(len(idx), dtype=np.float32), r.layer)
            return out
        for pos, r in routes.items():
            idx = r.doc_index.tolist()
            missing = [g for g in gold if g not in idx]
            if missing:     # the gold passages, then the best others while the route has room
                others = [i for i in idx if i not in gold][:max(0, len(idx) - len(gold))]
                idx = [g for g in gold if g in idx] + missing + others
                self.rng.shuffle(idx)
                ids = np.asarray(self.mem.doc_ids)[idx]
                r = RouteResult(np.asarray(idx, dtype=np.int64), np.asarray(ids, dtype=np.int64),
                                np.zeros(len(idx), dtype=np.float32), r.layer)
            out[pos] = r
        return out

    def target_ids(self, answer: str) -> list[int]:
        tok = self.mem.tokenizer
        return tok(" " + answer.strip(), add_special_tokens=False)["input_ids"] + \
            tok("\n", add_special_tokens=False)["input_ids"]

    def loss(self, q: ReaderQuestion, drop_gold: bool = False, exact: list[bool] | None = None) -> Any:
        """Answer loss (mean token cross-entropy of `` answer\\n``) of one question, graph attached
        (``drop_gold``: with the gold passages swapped for random others, :meth:`routes`). ``exact``: gets
        whether every answer token is the argmax after the ones before it, i.e. whether greedy decoding
        from this memory writes exactly `` answer\\n``."""
        import torch

        mem, eng = self.mem, self.mem.engine
        prompt = mem.layout.question(q.question)
        tgt = self.target_ids(q.answer)
        ids = prompt.ids + tgt
        start = self.P + self.k
        pos = list(range(start, start + len(ids)))
        prefix = eng.compute_prefix(mem.layout.head_ids(), reader=True)   # inference mode: a constant here
        st = eng.new_state(len(ids), prefix, top_k=self.k, reader=True)
        st.preset_routes = self.routes(q, drop_gold=drop_gold)
        if self.writer is not None:
            st.preset_memory = self.memory(st.preset_routes)
        h = eng.forward(st, ids, pos, route_rows=prompt.route_rows + [False] * len(tgt), grad=True)
        n = len(prompt.ids)
        logits = lm_logits(mem.model.hf_model, h[n - 1:n - 1 + len(tgt)])
        target = torch.as_tensor(tgt, device=logits.device)
        if exact is not None:
            exact.append(bool((logits.argmax(-1) == target).all()))
        return torch.nn.functional.cross_entropy(logits.float(), target)

    def step(self, batch: Sequence[ReaderQuestion], clip: float = 1.0) -> float:
        import torch

        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for q in batch:
            loss = self.loss(q) / len(batch)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params(), clip)
        self.opt.step()
        return total

    def answer(self, q: ReaderQuestion, reader: bool = True, max_new_tokens: int = 16) -> str:
        """Greedy pooled answer (``Memory.ask(mode="pooled")``: the routes it takes, gold not forced)."""
        self.mem._reader_prefix = None            # the reader changed since the prefix was cached
        ans = self.mem.ask(q.question, mode="pooled", k=self.k, reader=reader, max_new_tokens=max_new_tokens,
                           stop_strings=("\n",))
        return ans.answer.strip()

    def memory_gain(self, questions: Sequence[ReaderQuestion]) -> dict[str, float]:
        """Mean answer loss with the gold passages in memory and with them swapped for random passages: how
        much the answers depend on reading the right memory (equal losses: the memory is not read). Beside
        each, the share of questions whose greedy answer from that memory is exactly right (``exact_*``)."""
        import torch

        eg: list[bool] = []
        en: list[bool] = []
        with torch.no_grad():
            gold = [float(self.loss(q, exact=eg)) for q in questions]
            none = [float(self.loss(q, drop_gold=True, exact=en)) for q in questions]
        n = max(1, len(questions))
        return {"loss_gold": sum(gold) / n, "loss_without_gold": sum(none) / n, "exact_gold": sum(eg) / n,
                "exact_without_gold": sum(en) / n, "n": len(questions)}

    def evaluate(self, questions: Sequence[ReaderQuestion], reader: bool = True) -> dict[str, float]:
        """Exact match (normalised) and gold-read rate of pooled answers."""
        import numpy as np

        em = read = 0
        for q in questions:
            em += normalize_answer(self.answer(q, reader)) == normalize_answer(q.answer)
            gold = set(self.gold_docs(q))
            read += any(gold <= set(np.asarray(r.doc_index).tolist()) for r in self.routes(q, False).values())
        n = max(1, len(questions))
        return {"em": em / n, "gold_read": read / n, "n": len(questions)}

    def train(self, questions: Sequence[ReaderQuestion], *, steps: int, batch_size: int = 4, warmup: int = 20,
              log: Callable[[str], None] = print, eval_every: int = 0, dev: Sequence[ReaderQuestion] = (),
              on_eval: Callable[[int, dict[str, float]], None] | None = None,
              first_step: int = 1) -> list[dict[str, float]]:
        """``steps`` optimizer steps over shuffled ``questions``; cosine decay after a linear warm-up."""
        qs = list(questions)
        if not qs:
            raise ConfigError("No training questions.")
        base = [g["lr"] for g in self.opt.param_groups]
        history = []
        order: list[ReaderQuestion] = []
        t0 = time.perf_counter()
        run = 0.0
        for s in range(first_step, steps + 1):
            f = s / warmup if s <= warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
            for g, b in zip(self.opt.param_groups, base):
                g["lr"] = b * f
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = qs[:]
                    self.rng.shuffle(order)
                batch.append(order.pop())
            loss = self.step(batch)
            run = loss if s == first_step else 0.95 * run + 0.05 * loss
            if s % 10 == 0 or s == steps:
                log(f"step {s}/{steps} loss {run:.3f} ({time.perf_counter() - t0:.0f}s)")
            if eval_every and dev and (s % eval_every == 0 or s == steps):
                r = self.evaluate(dev)
                r["step"] = s
                history.append(r)
                log(f"  dev EM {r['em']:.3f} (gold read {r['gold_read']:.2f}, n {r['n']})")
                if on_eval is not None:
                    on_eval(s, r)
        for p in self.params():
            p.requires_grad_(False)
        return history


def pooled_kv(model: Any, seqs: Sequence[Sequence[int]]) -> tuple[list[Any], list[Any], list[int]]:
    """The encoder's pooled forward (:meth:`~msa_memory.encode.encoder.Encoder.encode_tokens`) with autograd on:
    per router layer, K̄ and V̄ (C, H, D) of the wrapped token sequences ``seqs`` packed in one forward (each
    its own document: positions from 0, attention within it, 64-token chunk means), and each sequence's chunk
    count. Whatever adapters are active in ``model`` apply."""
    import torch

    from msa_memory.encode.attention import PackedCausalAttention
    from msa_memory.encode.pooling import chunk_layout, chunk_mean_pool

    dev = model.device
    lens = [len(x) for x in seqs]
    if not lens or min(lens) < 1:
        raise ConfigError(f"pooled_kv needs non-empty sequences, got lengths {lens!r}.")
    ids = torch.as_tensor([t for x in seqs for t in x], dtype=torch.long, device=dev)[None]
    pos = torch.as_tensor([i for n in lens for i in range(n)], dtype=torch.long, device=dev)[None]
    layout = chunk_layout(lens, model.chunk_tokens, device=dev)
    slot = {l: i for i, l in enumerate(model.router_layers)}
    ks: list[Any] = [None] * len(slot)
    vs: list[Any] = [None] * len(slot)
    packed = PackedCausalAttention(lens, dev)

    def attention(call: Any) -> Any:
        out = packed(call)
        i = slot.get(call.layer)
        if i is not None:
            ks[i] = chunk_mean_pool(call.k[0].transpose(0, 1), layout)
            vs[i] = chunk_mean_pool(call.v[0].transpose(0, 1), layout)
        return out

    model.backbone.run(ids, pos, attention, stop_after=max(slot) + 1, kv_only_last=True)
    return ks, vs, list(layout.n_chunks)


def lm_logits(hf_model: Any, hidden: Any) -> Any:
    """The LM head (with the model's final logit soft-capping, if any) on hidden states (T, E)."""
    import torch

    logits = hf_model.lm_head(hidden)
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, punctuation and the articles a/an/the dropped, whitespace
    collapsed (exact match compares these)."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


# ----------------------------------------------------------------------------- the whole run (msa train-reader)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def new_reader(memory: Any, *, rank: int = 16, alpha: float = 32.0, layers: str = "all", targets: str = "all") -> Any:
    """A fresh (B = 0: the base model) :class:`~msa_memory.runtime.reader.ReaderAdapter` for ``memory``'s model:
    ``layers`` "all" or a comma list of decoder layers, ``targets`` "all" (:data:`ALL_TARGETS`) or a comma list."""
    from msa_memory.runtime.reader import ReaderAdapter, ReaderConfig

    hf = memory.model.hf_model
    lay = list(range(len(hf.model.layers))) if layers == "all" else [int(x) for x in layers.split(",")]
    tg = list(ALL_TARGETS) if targets == "all" else targets.split(",")
    cfg = ReaderConfig(rank=rank, alpha=alpha, targets=tg, layers=lay, model_fingerprint=memory.model.model_fingerprint)
    return ReaderAdapter.for_model(hf, cfg)


def run_reader_training(*, data: str | Path, out: str | Path, passages: int = 1500, steps: int = 800,
                        batch_size: int = 4, rank: int = 16, alpha: float = 32.0, lr: float = 1e-3, k: int = 4,
                        layers: str = "all", targets: str = "all", seed: int = 0, device: str = "cpu",
                        eval_every: int = 200, n_dev: int = 40, resume: bool = False, command: str = "",
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or reuse) the training store under ``data``, train a reader, save it to ``out``.

    ``data/corpus`` + ``data/questions.jsonl`` (:func:`make_reader_corpus`) and ``data/mem.msa`` (encoded by
    ``encode_corpus`` with the default model) are made when missing. ``out/checkpoint.pt`` (reader factors,
    optimizer state, step) is written at every evaluation; ``resume=True`` continues from it. The adapter
    files (:class:`~msa_memory.runtime.reader.ReaderAdapter`) record the command, the data recipe and the
    dev exact match with and without the reader.
    """
    import torch

    from msa_memory.jobs.encode_job import encode_corpus
    from msa_memory.runtime.memory import Memory

    data, out = Path(data), Path(out)
    if not (data / "questions.jsonl").is_file():
        log(f"making {passages} training passages under {data}")
        make_reader_corpus(data, passages, seed=seed)
    qs = load_questions(data / "questions.jsonl")
    train_q = [q for q in qs if q.split == "train"]
    dev_q = [q for q in qs if q.split == "dev"]
    if not train_q or not dev_q:       # checked before the store is encoded: a run must have both splits
        which = "training" if not train_q else "dev (held-out)"
        raise ConfigError(f"{data / 'questions.jsonl'} has no {which} questions ({len(train_q)} training, "
                          f"{len(dev_q)} dev): a reader trained without held-out facts cannot be measured.",
                          hint="Make the data with more passages (--passages 200 or more, in a new --data folder).")
    dev_q = random.Random(seed).sample(dev_q, min(n_dev, len(dev_q)))
    store = data / "mem.msa"
    t0 = time.perf_counter()
    res = encode_corpus([str(data / "corpus")], str(store), device=device)
    log(f"training store {store}: {getattr(res, 'summary', res)} ({time.perf_counter() - t0:.0f}s)")
    mem = Memory(str(store), device=device, cpu_gemv=False)
    torch.manual_seed(seed)
    reader = new_reader(mem, rank=rank, alpha=alpha, layers=layers, targets=targets)
    trainer = ReaderTrainer(mem, reader, k=k, lr=lr, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint.pt"
    start = 0
    base = None
    if resume and ck.is_file():
        state = torch.load(ck, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, v in state["reader"].items():
                reader.params[name].copy_(v)
        trainer.opt.load_state_dict(state["opt"])
        start, base = int(state["step"]), state.get("base")
        trainer.rng.setstate(state["rng"])
        log(f"resumed from {ck} at step {start}")
    if base is None:
        base = trainer.evaluate(dev_q, reader=False)
        log(f"dev EM without the reader: {base['em']:.3f} (gold read {base['gold_read']:.2f}, n {base['n']})")
    history: list[dict[str, float]] = []

    def save(step: int, r: dict[str, float]) -> None:
        torch.save({"reader": {n: p.detach().cpu() for n, p in reader.params.items()}, "opt": trainer.opt.state_dict(),
                    "step": step, "base": base, "rng": trainer.rng.getstate()}, ck)
        reader.config.extra = {"trained_by": "msa train-reader", "command": command, "step": step,
                               "dev": r, "dev_without_reader": base,
                               "data": {"passages": passages, "seed": seed, "sources": "stdlib,packages",
                                        "facts": "train.pairs.FactMaker('train', names='varied')",
                                        "train_questions": len(train_q), "dev_questions": len(dev_q)},
                               "objective": "answer cross-entropy, pooled K̄V̄ of the routed top-k, gold forced in"}
        reader.save(out)

    remaining = steps - start
    if remaining > 0:
        # the cosine schedule spans the whole run: a resumed run skips the steps already done
        history = trainer.train(train_q, steps=steps, batch_size=batch_size, eval_every=eval_every, dev=dev_q,
                                log=log, on_eval=save, first_step=start + 1)
    final = history[-1] if history else (base or {})
    gain = trainer.memory_gain(dev_q)
    log(f"dev answer loss with the gold passages {gain['loss_gold']:.3f}, with random passages instead "
        f"{gain['loss_without_gold']:.3f}")
    if remaining > 0:
        reader.config.extra["dev_memory_gain"] = gain
        reader.save(out)
    return {"out": str(out), "dev": final, "dev_without_reader": base, "history": history,
            "dev_memory_gain": gain, "params": reader.n_params()}
