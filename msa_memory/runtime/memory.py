"""``Memory``: the notebook / CLI entry point — a store version opened for a model, ready to search and ask.

Design note. ``Memory(store, model=...)`` checks the model's identity against the store's (refusing
a different model or router with ``IdentityMismatchError``), makes the router keys of every router
layer resident on the device (``RouterIndex``), sets up the content tier (``ContentMemory``: host
copy if it fits ``memory_budget``, else reads from the store on demand, both with an LRU cache) and
wraps the HF model in an ``MsaEngine``. Then:

- :meth:`Memory.search` routes the question (document scores summed over all router layers, the
  way router training scores) and returns a ``pyarrow.Table`` (``.to_pandas()`` away);
- :meth:`Memory.ask` (its verbs in ``asking.py``) answers in ``pooled`` (faithful MSA: each router layer attends to its own top-k
  documents' pooled K̄V̄), ``text`` (route, then the passages' raw text before the question) or
  ``interleave`` (multi-round; ``interleave.py``) mode, optionally streaming text pieces.

What it does not do: write to the store, or encode. Invariant: dense document index i ↔ store id
``doc_ids[i]`` is fixed for the lifetime of a ``Memory`` (a snapshot of one store version).
"""

from __future__ import annotations

import html
import os
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.runtime.asking import DEFAULT_STOPS, AskVerbs, Mode
from msa_memory.runtime.engine import MsaEngine
from msa_memory.runtime.hybrid import Retriever, check_retriever, fuse_rrf
from msa_memory.runtime.memory_tier import content_for_store
from msa_memory.runtime.prompts import layout_for
from msa_memory.runtime.results import DocHit
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.query import fold_shouted, query_tokens
from msa_memory.routing.resident import load_resident_index

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_STOPS", "Memory", "Mode"]


def _open(store: Any, model: Any, adapter: Any, tokenizer: Any, device: str | None, devices: list[str] | None,
          distributed: Any) -> tuple[Any, Any, str]:
    """(store, loaded model, device) for ``Memory``: the store opened and the model loaded (by name: with the
    adapter that routes the store, :func:`~msa_memory.routing.registry.adapter_for_store`) on the device asked."""
    import torch

    if devices is not None and distributed:
        raise ConfigError("devices= and distributed= both shard the router keys; give one of them.",
                          hint="devices= for several devices in this process, distributed=True for one shard "
                               "per torch.distributed rank.")
    if device is None:
        device = devices[0] if devices else "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(store, (str, os.PathLike)):
        from msa_memory.store import open_store

        store = open_store(store)
    if isinstance(model, (str, os.PathLike)):
        from msa_memory.encode import load_model
        from msa_memory.routing.registry import adapter_for_store

        # the default model keeps the shipped adapter the store was built with, should the default have changed
        adapter = adapter_for_store(store.identity.router_id, model, adapter)
        model = load_model(str(model), adapter=adapter, device=device, tokenizer=tokenizer)
    elif tokenizer is not None:
        raise ConfigError("tokenizer= was given with a loaded model, which has its tokenizer already.",
                          hint="Pass it to load_model(..., tokenizer=...) instead, or pass the model by name.")
    model_dev = next(model.hf_model.parameters()).device
    if model_dev.type != torch.device(device).type:
        raise ConfigError(f"The model is on {model_dev} but Memory was asked for device={device!r}.",
                          hint="Load the model with load_model(..., device=...) on the same device, or pass "
                               "the model by name so Memory loads it there.")
    return store, model, device


class Memory(AskVerbs):
    """A store version opened for a model: route questions to documents and answer from them.

    Parameters
    ----------
    store : MemoryStore or path
        An opened store (``open_store``) or its path (the latest version is opened).
    model : LoadedModel or str, default "default"
        What ``msa_memory.encode.load_model`` returns, or a name/path for it. Must be the model
        (and router adapter) the store was built with.
    adapter : str or path, optional
        Router adapter directory, passed to ``load_model`` when ``model`` is a name. None with
        ``model="default"``: the shipped adapter whose router built the store, if one did
        (``msa_memory.routing.registry.adapter_for_store``), else the default adapter.
    tokenizer : str, path or tokenizer object, optional
        Passed to ``load_model`` when ``model`` is a name: the tokenizer of a checkpoint saved
        without tokenizer files. Default None: the checkpoint's own.
    device : str, default "cpu"
        ``"auto"`` picks CUDA when available.
    source : {"auto", "host", "store"}, default "auto"
        Where content K̄V̄ comes from: ``host`` preloads every document (one tensor, pinned on
        GPU hosts), ``store`` reads chosen documents on demand, ``auto`` picks ``host`` if it fits
        ``memory_budget``.
    memory_budget : int or str, default "4GiB"
        Host bytes the preloaded K̄V̄ may take (``source="host"`` raises beyond it).
    cache_bytes : int or str, default "256MiB"
        Device-side cache of fetched documents.
    routing : RoutingConfig or dict, optional
        Overrides of the router's score / reducers / top_k (defaults: the model's router config).
    devices : sequence of str, optional
        Memory Parallel in one process: the router keys sharded by document over these devices (e.g.
        ``["cuda:0", "cuda:1"]``), each scoring its shard, one merge per router layer
        (``routing.parallel``); the model runs on ``device``, which defaults to ``devices[0]``. Routes equal
        one device's.
    distributed : bool or process group, default False
        Memory Parallel over processes: this process keeps only its rank's shard of the router keys (of
        the default ``torch.distributed`` group, or the group given) on ``device``; every rank must run the
        same calls in lockstep (e.g. one question per ``torchrun`` job step), each routing merge being one
        ``all_gather``.
    cpu_gemv : bool or "auto", default "auto"
        On a CPU with AVX512-BF16 and a bf16 model, run one-row linears (decode steps, the LM head)
        through an AVX512-BF16 GEMV over the weights as they are (``runtime.cpu_linear``; no copy):
        about 2× faster decoding of Gemma 3 270M on a 2-core VM. False keeps torch's own; True insists.
    reader : None, bool, str, Path or ReaderAdapter, default None
        The question-side LoRA that pooled answers read memory with (:mod:`msa_memory.runtime.reader`,
        ``msa train-reader``). None: the shipped reader when it was trained on this model, else none; False:
        none; True: the shipped reader or an error; a folder or an adapter: that one. Routing never uses it.

    Examples
    --------
    >>> mem = Memory("mem.msa", model="default")            # doctest: +SKIP
    >>> mem.search("Who wrote the report?", k=5).to_pandas()  # doctest: +SKIP
    >>> mem.ask("Who wrote the report?", mode="text")         # doctest: +SKIP
    >>> mem.search(tok("Who wrote the report?", add_special_tokens=False)["input_ids"])  # doctest: +SKIP
    """

    #: Longest question, in tokens, that route/search/ask take (``question_token_limit``: never more than the
    #: model's context). A question's forward takes time and memory that grow with its length (the default
    #: model spent 4.2 GB and 41 s on a 119 KB one), so longer ones are refused with ConfigError before any
    #: forward. 2048 tokens is about 1,500 English words; set it on an instance to take longer questions.
    max_question_tokens: int = 2048

    #: Route and answer a text question written in capitals only ("MEASUREMENT OF DIELECTRIC CONSTANT") as
    #: the same words in lower case (``routing.query.fold_shouted``); mixed-case questions are untouched. The
    #: model is case-sensitive and stores hold prose: on NPL, whose questions are all capitals, routing's
    #: nDCG@10 goes from 0.115 to 0.204 (``benchmarks/bench_retrieval.py``). Set False on an instance whose
    #: documents are themselves written in capitals.
    fold_shouted_questions: bool = True

    def __init__(self, store: Any, model: Any = "default", *, adapter: Any = None, tokenizer: Any = None,
                 device: str | None = None, devices: Sequence[str] | None = None, distributed: Any = False,
                 source: str = "auto", memory_budget: int | str | None = "4GiB",
                 cache_bytes: int | str = "256MiB", routing: RoutingConfig | dict[str, Any] | None = None,
                 use_chat_template: bool | None = None, cpu_gemv: bool | str = "auto", reader: Any = None) -> None:
        import torch

        devices = [str(d) for d in devices] if devices else None
        store, model, device = _open(store, model, adapter, tokenizer, device, devices, distributed)
        self.store, self.model = store, model
        ident = store.identity
        # NOTE(train): a store that kept router inputs (x_router, e.g. from reindex-router) records hidden_size
        store.check_identity(model.identity(store_dtype=ident.dtype, keep_router_inputs=ident.hidden_size > 0))
        self.identity = ident
        self.device = torch.device(device)
        self.tokenizer = model.tokenizer
        self.layout = layout_for(self.tokenizer, ident.wrap, use_chat_template)
        if self.layout.msa and self.query_suffix:
            raise ConfigError(f"The router of store {str(store.root)!r} appends a query suffix "
                              f"({self.query_suffix!r}), which MSA's own prompt layout (wrap 'msa') has no place for.",
                              hint="Use a router adapter without --query-suffix for MSA-wrapped stores.")
        self.routing = RoutingConfig.for_router(getattr(getattr(model, "router", None), "config", None), routing)
        t0 = time.perf_counter()
        # 1. router keys: the store's resident index (one tensor per router layer, sharded if asked)
        resident = load_resident_index(store, self.routing, self.device, devices, distributed)
        self.router_key_bytes = resident.key_bytes   #: all shards'
        self.index: Any = resident.index
        self.doc_ids = resident.doc_ids
        chunk_doc = resident.chunk_doc
        self.n_chunks = int(chunk_doc.shape[0])      #: aligned chunks (the shifted grid's are routing-only)
        # 2. content tier
        self.content = content_for_store(store, self.doc_ids, chunk_doc, self.device, source=source,
                                         memory_budget=memory_budget, cache_bytes=cache_bytes)
        from msa_memory.routing.query import suffix_tokens

        sfx_layers = self._suffix_layers
        #: trailing routing tokens that only the suffix queries read (the query suffix's, with suffix queries)
        self.suffix_rows = len(suffix_tokens(self.tokenizer, self.query_suffix)) if sfx_layers else 0
        from msa_memory.runtime.reader import resolve_reader

        #: the question-side reader adapter of pooled answers (runtime.reader), or None
        self.reader = resolve_reader(reader, model.hf_model, model.model_fingerprint)
        self.engine = MsaEngine(model.hf_model, ident.router_layers, self._router_q, self.index, self.content,
                                cpu_gemv=cpu_gemv, suffix_q=self._suffix_q if sfx_layers else None,
                                suffix_positions=[ident.router_layers.index(l) for l in sfx_layers], reader=self.reader)
        self._prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._reader_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._sources: dict[int, tuple[str, int]] | None = None
        self._lexical: Any = None
        self.open_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ setup helpers
    def _router_q(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.router.router_q(self.identity.router_layers[pos], x).flatten(-2)

    def _suffix_q(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.router.router_sq(self.identity.router_layers[pos], x).flatten(-2)

    @property
    def prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer K/V of the template head (computed once)."""
        if self._prefix is None:
            self._prefix = self.engine.compute_prefix(self.layout.head_ids())
        return self._prefix

    @property
    def reader_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer K/V of the template head with the reader adapter applied (computed once)."""
        if self._reader_prefix is None:
            self._reader_prefix = self.engine.compute_prefix(self.layout.head_ids(), reader=True)
        return self._reader_prefix

    def _source_of(self, doc_id: int) -> tuple[str, int]:
        if self._sources is None:
            tab = self.store.documents(columns=["doc_id", "source_path", "passage_index"])
            self._sources = {int(d): (str(p), int(i)) for d, p, i in zip(tab.column("doc_id").to_pylist(),
                             tab.column("source_path").to_pylist(), tab.column("passage_index").to_pylist())}
        return self._sources.get(int(doc_id), ("", 0))

    def layer_hits(self, routes: dict[int, Any]) -> tuple[list[DocHit], dict[int, list[int]]]:
        """Pooled mode routes per layer: the docs any layer chose (best score first) and each layer's choice."""
        per_layer = {p: r.doc_ids.tolist() for p, r in sorted(routes.items())}
        best: dict[int, float] = {}
        for r in routes.values():
            for d, s in zip(r.doc_ids.tolist(), r.scores.tolist()):
                best[d] = max(best.get(d, -np.inf), s)
        ids = sorted(best, key=lambda d: -best[d])
        return self.hits(ids, [best[d] for d in ids], per_layer), per_layer

    def hits(self, doc_ids: Any, scores: Any, layers: dict[int, list[int]] | None = None,
             preview: int = 160) -> list[DocHit]:
        ids = [int(d) for d in doc_ids]
        texts = self.store.texts(ids) if ids else []
        out = []
        for d, s, t in zip(ids, scores, texts):
            path, pidx = self._source_of(d)
            ls = sorted(p for p, docs in (layers or {}).items() if d in docs)
            out.append(DocHit(d, float(s), path, pidx, ls, " ".join(t.split())[:preview]))
        return out

    # ------------------------------------------------------------------ routing
    def _routing_query(self, question: str | list[int]) -> tuple[list[int], list[int], list[bool], Any]:
        """(ids, positions, route_rows, prefix) of the routing forward of a question."""
        if self.layout.msa:
            q = self.layout.question(question)
            P, k = len(self.layout.head_ids()), self.routing.top_k
            return q.ids, list(range(P + k, P + k + len(q.ids))), q.route_rows, self.prefix
        ids, skip = query_tokens(self.tokenizer, question, self.query_suffix)   # what router training sees
        return ids, list(range(len(ids))), [i >= skip for i in range(len(ids))], None

    @property
    def _suffix_layers(self) -> tuple[int, ...]:
        return tuple(getattr(getattr(self.model.router, "config", None), "suffix_layers", ()))

    @property
    def query_suffix(self) -> str:
        """The router's query suffix (``RouterConfig.query_suffix``; "" for none), appended to every question
        before it is routed."""
        from msa_memory.routing.query import router_suffix

        return router_suffix(self.model)

    def _question(self, question: Any) -> str | list[int]:
        """A question as the prompt layouts take it: non-blank text (folded when shouted:
        ``fold_shouted_questions``), or token ids checked against the vocabulary; ConfigError, before any
        forward, when it is longer than ``question_token_limit`` tokens."""
        # route/search/ask all normalise the question here first, so the limit holds for text and ids alike
        if isinstance(question, str):
            if not question.strip():
                raise ConfigError("The question is empty; pass some text (or token ids) to ask or route with.")
            if self.fold_shouted_questions:
                question = fold_shouted(question)
            n = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        else:
            question = self.model.check_token_ids(question, "The question")
            n = len(question)
        if n > self.question_token_limit:
            ctx = self._model_context()
            raise ConfigError(
                f"The question is {n:,} tokens long; Memory takes at most {self.question_token_limit:,} "
                f"(max_question_tokens={self.max_question_tokens:,}"
                + (f", the model's context {ctx:,})." if ctx else ")."),
                hint="Ask with the question alone, a few words to a few sentences (routing reads the question, not a "
                     "document); from Python, set mem.max_question_tokens higher (up to the model's context) to "
                     "take longer ones, at the cost of time and memory.")
        return question

    def _model_context(self) -> int | None:
        ctx = getattr(getattr(self.model.hf_model, "config", None), "max_position_embeddings", None)
        return int(ctx) if ctx else None

    @property
    def question_token_limit(self) -> int:
        """Longest question in tokens: ``max_question_tokens``, or the model's context where that is shorter."""
        ctx = self._model_context()
        return min(int(self.max_question_tokens), ctx) if ctx else int(self.max_question_tokens)

    def question_text(self, question: str | list[int]) -> str:
        """The question as an Answer records it: the text, or the decoded token ids."""
        return question if isinstance(question, str) else str(self.tokenizer.decode(question))

    def route(self, question: str | Sequence[int], k: int | None = None, *, retriever: Retriever = "routing"
              ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(doc ids, scores, timings) of the top-k documents, scores summed over router layers.

        ``question``: text, or token ids (list of ints, 1-D integer array or tensor) made by the model's
        tokenizer without special tokens; the ids take the text's tokens' place in the same prompt layout,
        so ``tokenizer(text, add_special_tokens=False)["input_ids"]`` routes as ``text`` does wherever the
        tokenizer splits the layout's strings apart at the question's edges (a byte-level one always does).

        ``retriever="hybrid"``: the documents and scores of the reciprocal-rank fusion of routing's ranking
        with BM25's over the store's lexical index (``runtime/hybrid.py``; token ids are decoded for BM25);
        ConfigError when the store has no lexical index (``msa store reindex-lexical STORE`` adds one).
        """
        retriever = check_retriever(retriever)
        question = self._question(question)
        k = min(int(k or self.routing.top_k), self.index.n_docs)
        if k <= 0:
            raise RuntimeMemoryError(f"Store {str(self.store.root)!r} (version {self.store.version}) has no "
                                     "documents.", hint="Encode some with `msa-encode PATH --store STORE`.")
        ids, pos, rows, prefix = self._routing_query(question)
        t0 = time.perf_counter()
        scores, timings = self.engine.route_only(ids, pos, rows, prefix, suffix_rows=self.suffix_rows)
        if retriever == "hybrid":
            t1 = time.perf_counter()
            order, scores = fuse_rrf(scores, self.lexical_index().scores(self.question_text(question)))
            timings = dict(timings, lexical_s=time.perf_counter() - t1)
        else:
            order = np.argsort(-scores, kind="stable")
        order = order[:k]
        timings = dict(timings, route_total_s=time.perf_counter() - t0)
        return self.doc_ids[order], scores[order], timings

    def centre_queries(self, source: str | Sequence[str] | None = "store", *, n: int = 256) -> dict[str, Any]:
        """Query centring, a hubness correction (``runtime/centre.py``): every later route scores each chunk
        by its score minus its mean score against reference questions. ``source``: ``"store"`` (the first
        sentences of ``n`` of the store's own passages, cached per store version), a list of texts, or None
        (centring off). Returns what was set (source, number of reference questions, cached or computed)."""
        from msa_memory.runtime import centre

        source = centre.check_source(source)
        if source is None:
            self.index.set_query_centres(None)
            return {"centred": False}
        path = centre.cache_path(self.store, self.identity.router_id, n) if source == "store" else None
        hit = centre.load_cached(path) if path is not None else None
        if hit is not None:                       # the store version's centres: no passage is read
            got, n_texts = hit
        else:
            texts = centre.reference_texts(self.store, self.doc_ids, n) if source == "store" else list(source)
            sums: dict = {}
            for text in texts:
                ids, pos, rows, prefix = self._routing_query(self._question(text))
                centre.add_sums(sums, self.engine.query_sums(ids, pos, rows, prefix, suffix_rows=self.suffix_rows))
            got, n_texts = centre.centres_of(sums), len(texts)
            if path is not None:
                centre.save_cached(path, got, n_texts)
        self.index.set_query_centres(got["q"], got["sq"])
        return centre.describe(got, "store" if source == "store" else "texts", n_texts, hit is not None)

    def lexical_index(self) -> Any:
        """BM25 over this store version's live documents (``store.lexical.LexicalIndex``, rows in the order of
        ``doc_ids``), built from the store's postings at the first call; ConfigError when the store has none."""
        if self._lexical is None:
            self._lexical = self.store.lexical_index(self.doc_ids)
        return self._lexical

    def search(self, question: str | Sequence[int], k: int = 10, *, retriever: Retriever = "routing") -> Any:
        """Top-k documents as a ``pyarrow.Table``: rank, doc_id, score, source_path, passage_index, text.

        ``question``: text or token ids, and ``retriever`` ("routing" or "hybrid": ``score`` is then the
        fused score), as in :meth:`route`.
        """
        import pyarrow as pa

        ids, scores, _ = self.route(question, k, retriever=retriever)
        hits = self.hits(ids, scores, preview=10**9)
        return pa.table({"rank": list(range(1, len(hits) + 1)), "doc_id": [h.doc_id for h in hits],
                         "score": [h.score for h in hits], "source_path": [h.source_path for h in hits],
                         "passage_index": [h.passage_index for h in hits], "text": [h.preview for h in hits]})

    def stats(self) -> dict[str, Any]:
        """What this Memory read from its store: the backend's requests and bytes (counted on remote stores
        such as ``s3://``; the local backend counts nothing), the local router-key cache's hits, misses and
        bytes (``None`` on a local store), and the bytes of router keys held resident."""
        return {**self.store.io_stats(), "router_key_bytes_resident": int(self.index.nbytes())}

    # ------------------------------------------------------------------ reprs
    def __repr__(self) -> str:
        i = self.identity
        return (f"Memory(store={str(self.store.root)!r}, version={self.store.version}, docs={self.index.n_docs}, "
                f"chunks={self.n_chunks}, router_layers={list(i.router_layers)}, "
                + (f"shifted_layers={list(i.shifted_layers)}, " if i.shifted_layers else "")
                + (f"suffix_layers={list(self._suffix_layers)}, " if self._suffix_layers else "")
                + f"score={self.routing.score}, "
                f"top_k={self.routing.top_k}, device={self.device}, content={self.content.source}"
                + (f", store_read={self.store.backend.stats['bytes_read']}B" if getattr(self.store.backend, "remote",
                                                                                     False) else "") + ")")

    def _repr_html_(self) -> str:
        i = self.identity
        rows = {"store": str(self.store.root), "version": self.store.version, "model": i.model_name,
                "documents": self.index.n_docs, "chunks": self.n_chunks,
                "router layers": list(i.router_layers), "shifted grid at": list(i.shifted_layers) or "none",
                "query suffix": (f"{self.query_suffix!r}, read by suffix queries at {list(self._suffix_layers)}"
                                 if self._suffix_layers else repr(self.query_suffix) if self.query_suffix else "none"),
                "routing": f"{self.routing.score}, heads {self.routing.head_reduce}, "
                f"tokens {self.routing.query_reduce}, chunks {self.routing.chunk_reduce}, top-{self.routing.top_k}",
                "router keys resident": f"{self.index.nbytes() / 2**20:.1f} MiB on {self.device}",
                "content K̄V̄": f"{self.content.source} ({self.content.host_nbytes() / 2**20:.1f} MiB preloaded)"}
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows.items())
        return f"<table><caption>msa_memory.Memory</caption>{body}</table>"
