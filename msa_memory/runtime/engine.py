"""The MSA forward: a HF causal LM whose attention sees [template prefix | routed pooled K̄V̄ | local tokens].

Design note. We keep HF's own decoder layers (projections, norms, RoPE, MLP) and replace only the
attention *core*: a function registered in transformers' ``AttentionInterface`` receives post-RoPE
q (1, Hq, T, D) and pre-GQA k/v (1, H, T, D) of the new tokens. It writes k/v into a per-layer
buffer preallocated once per request as

    [ prefix K/V (P) | memory K̄/V̄ (M, router layers only) | local tokens (capacity) ]

and runs SDPA over the filled part with a causal mask on the local part (bottom-right aligned:
token i sees the prefix, all memory, local tokens 0..i). Decoding writes into the same buffer, so
nothing is re-concatenated per step (the reference ``torch.cat``s, §9.9). Injected multi-token
text is masked causally too (the reference is bidirectional there).

Routing happens in a forward hook on each router layer's ``input_layernorm``: the normed hidden
state of the routing tokens goes through the router-Q projection, the router picks that layer's
top-k documents, and their K̄V̄ are fetched before the layer's attention runs — so every router
layer routes on its own hidden state, which already saw lower router layers' memory (§3.3).
HF's KV cache is off (``use_cache=False``); the LM head runs on the last position only.

Decoding on CUDA replays a CUDA graph of one fixed-shape step (``StaticStep``): the step attends the
whole preallocated buffer under a mask built on the device from a device-side token counter, writes
its k/v with ``index_copy_`` at that counter, and leaves the argmax, the logits and the incremented
counter and position in static tensors; the host only copies the token back. One token costs one graph
replay instead of ~300 kernel launches from Python. The same step runs eagerly on any device
(``path="static"``; the tests compare it with the dynamic path on CPU); buffers are zeroed beyond the
written part so masked slots hold finite values.

On a CPU with AVX512-BF16 and a bf16 model, one-row linears (every projection and the LM head of a
decode step) run an AVX512-BF16 GEMV inside sessions (``runtime.cpu_linear``; ``cpu_gemv``).

The attention core and the per-request state are in :mod:`msa_memory.runtime.attention`.

What it does not do: tokenize, choose modes, or know about stores (``memory.py`` does). The hooks,
the attention switch and the GEMV overrides exist only inside :meth:`MsaEngine.session`, so the
shared HF model behaves normally elsewhere. Gemma-style sliding windows are honoured on prefix and local keys;
memory keys carry no position and are always visible (as in MSA).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from msa_memory.errors import ConfigError, RuntimeMemoryError
from msa_memory.runtime.attention import ATTN_NAME, CURRENT_STATE, ForwardState, StaticStep, register_attention

if TYPE_CHECKING:
    import torch

    from msa_memory.runtime.memory_tier import ContentMemory
    from msa_memory.routing.index import RouteResult, RouterIndex

__all__ = ["MsaEngine", "ForwardState", "ATTN_NAME", "GRAPH_MIN_TOKENS"]

GRAPH_MIN_TOKENS = 8
"""``decode(path="auto")`` captures a CUDA graph of the step from this many new tokens on (capture costs
about three eager steps)."""


def sync_device(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def _add_query_sum(sums: dict[tuple[bool, int], tuple[torch.Tensor, int]], key: tuple[bool, int], q: torch.Tensor,
                   score: str) -> None:
    """Add the prepared router queries ``q`` (T, Hq, D) to ``sums[key]`` (see :meth:`MsaEngine.query_sums`)."""
    import torch

    q = q.detach().to("cpu", torch.float64)
    if score == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
    total, n = sums.get(key, (torch.zeros(q.shape[1:], dtype=torch.float64), 0))
    sums[key] = (total + q.sum(0), n + q.shape[0])


class MsaEngine:
    """Runs a HF causal LM with MSA memory attention.

    Parameters
    ----------
    hf_model : transformers PreTrainedModel (causal LM with ``.model.layers[i].input_layernorm``)
    router_layers : sequence of int
        Decoder layer indices that route (ascending); position i uses ``index`` layer i.
    router_q : callable
        ``router_q(position, x) -> (T, Hq·D)`` router queries from the normed hidden ``x`` (T, E).
    index : RouterIndex or None
        Resident router keys; None means the model runs without memory.
    content : ContentMemory or None
        Content K̄V̄ (needed for pooled mode).
    suffix_q : callable, optional
        ``suffix_q(position, x) -> (1, Hq·D)`` the suffix query of a router position in ``suffix_positions``
        (``RouterConfig.suffix_layers``), from the normed hidden of the suffix's last token.
    reader : ReaderAdapter, optional
        A question-side LoRA (:mod:`msa_memory.runtime.reader`), attached to ``hf_model``; it is applied to
        the forwards of states with ``reader=True`` only.
    """

    def __init__(self, hf_model: Any, router_layers: Sequence[int], router_q: Callable[[int, torch.Tensor], torch.Tensor],
                 index: RouterIndex | None = None, content: ContentMemory | None = None, *,
                 cpu_gemv: bool | str = "auto", suffix_q: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 suffix_positions: Sequence[int] = (), reader: Any = None) -> None:
        register_attention()
        self.model = hf_model
        self.backbone = hf_model.model
        self.router_layers = [int(x) for x in router_layers]
        self.router_q = router_q
        self.suffix_q = suffix_q
        self.suffix_positions = frozenset(int(p) for p in suffix_positions)
        if self.suffix_positions and suffix_q is None:
            raise ConfigError("Suffix positions need suffix_q, the suffix queries' projection.")
        self.index = index
        self.content = content
        self.reader = reader
        n_layers = len(self.backbone.layers)
        bad = [x for x in self.router_layers if not 0 <= x < n_layers]
        if bad:
            raise ConfigError(f"Router layers {bad!r} do not exist in a model with {n_layers} decoder layers.")
        cfg = hf_model.config
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.n_q_heads = int(cfg.num_attention_heads)
        self.device = next(hf_model.parameters()).device
        self._mask_dict = {"full_attention": None, "sliding_attention": None, "chunked_attention": None}
        if cpu_gemv not in (True, False, "auto"):
            raise ConfigError(f"cpu_gemv={cpu_gemv!r} is not True, False or 'auto'.")
        # one-row (decode) linears through the AVX512-BF16 kernel inside sessions (runtime.cpu_linear)
        from msa_memory.runtime.cpu_linear import CpuGemv

        use = self.device.type == "cpu" and cpu_gemv is not False and CpuGemv.available(hf_model)
        if cpu_gemv is True and not use:
            raise ConfigError("cpu_gemv=True needs the model on the CPU in bf16 and a CPU with AVX512-BF16 "
                              "(and MSA_CPU_KERNEL not 0); use cpu_gemv='auto'.")
        self.gemv = CpuGemv.for_model(hf_model) if use else None

    # ------------------------------------------------------------------ session
    @contextmanager
    def session(self, state: ForwardState) -> Iterator[ForwardState]:
        """Activate ``state``: custom attention + router hooks on, restored on exit."""
        if state.reader and self.reader is None:
            raise ConfigError("This request asks for the reader adapter, but the engine has none.")
        cfg = self.model.config
        old = cfg._attn_implementation
        token = CURRENT_STATE.set(state)
        hooks = []
        for pos, li in enumerate(self.router_layers):
            norm = self.backbone.layers[li].input_layernorm
            hooks.append(norm.register_forward_hook(self._make_hook(pos, li)))
        cfg._attn_implementation = ATTN_NAME
        try:
            with ExitStack() as stack:
                if self.reader is not None:
                    stack.enter_context(self.reader.active(state.reader))
                if self.gemv is not None:
                    stack.enter_context(self.gemv.active())
                yield state
        finally:
            cfg._attn_implementation = old
            for h in hooks:
                h.remove()
            CURRENT_STATE.reset(token)

    def _make_hook(self, pos: int, layer_idx: int) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, output: torch.Tensor) -> None:
            st = CURRENT_STATE.get()
            if st is None or not st.route or self.index is None:
                return
            t0 = time.perf_counter()
            if st.preset_routes is not None:
                self._attach(st, pos, layer_idx, st.preset_routes[pos])
                return
            x = output[0] if st.route_rows is None else output[0, st.route_rows]            # (T_r, E)
            sq = None
            if st.suffix_rows:   # the suffix's last token feeds this position's suffix query, if it has one
                if pos in self.suffix_positions:
                    sq = self.suffix_q(pos, x[-1:]).reshape(1, -1, self.head_dim)             # (1, Hq, D)
                x = x[:-st.suffix_rows]                                                       # the question's rows
            q = self.router_q(pos, x).reshape(x.shape[0], -1, self.head_dim)                  # (T_r, Hq, D)
            if st.query_sums is not None:   # calibration pass: sum the queries, route nothing
                _add_query_sum(st.query_sums, (False, pos), q, self.index.config.score)
                if sq is not None:
                    _add_query_sum(st.query_sums, (True, pos), sq, self.index.config.score)
                return

            def summed() -> torch.Tensor:   # (N,) the position's document scores, its suffix query's added
                ds = self.index.doc_scores(pos, q)
                return ds if sq is None else self.index.add(ds, self.index.doc_scores(pos, sq, suffix=True))

            if st.collect_only:
                ds = summed()
                st.doc_score_sum = self.index.add(st.doc_score_sum, ds)
                sync_device(self.device)
                st.timings["routing_s"] += time.perf_counter() - t0
                return
            res = self.index.route(pos, q, k=st.top_k) if sq is None else self.index.route_scores(pos, summed(), st.top_k)
            sync_device(self.device)
            st.timings["routing_s"] += time.perf_counter() - t0
            self._attach(st, pos, layer_idx, res)

        return hook

    def _attach(self, st: ForwardState, pos: int, layer_idx: int, res: RouteResult) -> None:
        """Record router position ``pos``'s route and fetch its documents' K̄V̄ for layer ``layer_idx``."""
        t1 = time.perf_counter()
        st.routes[pos] = res
        if st.preset_memory is not None:
            mk, mv = st.preset_memory[pos]
        elif self.content is None:
            raise RuntimeMemoryError("Pooled attention needs content K̄V̄, but this engine has none.")
        else:
            mk, mv = self.content.layer_kv(res.doc_index, pos)                            # (H, M, D) each
        dt = self.model.dtype
        st.pending_memory[layer_idx] = (mk.to(self.device, dt), mv.to(self.device, dt))
        sync_device(self.device)
        st.timings["fetch_s"] += time.perf_counter() - t1

    # ------------------------------------------------------------------ forwards
    def forward(self, state: ForwardState, ids: Sequence[int] | torch.Tensor, positions: Sequence[int] | torch.Tensor,
                *, route_rows: Any = None, logits: bool = True, backbone_only: bool = False,
                grad: bool = False) -> torch.Tensor | None:
        """One forward of new local tokens; returns last-position logits (V,) float32 or None.

        ``route_rows`` (T,) bool marks routing-query tokens; when given, this forward routes.
        ``grad=True`` (training a reader): autograd on, and the final hidden states of all T tokens
        (T, E) are returned instead of logits (the caller applies the LM head where it needs it).
        """
        import torch

        ids_t = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        pos_t = torch.as_tensor(positions, dtype=torch.long, device=self.device).reshape(1, -1)
        T = ids_t.shape[1]
        if state.local_pos is None:
            state.local_pos = torch.empty(state.capacity, dtype=torch.long, device=self.device)
        if state.n_written + T > state.capacity:
            raise RuntimeMemoryError(f"Request needs more than its {state.capacity} local-token slots.")
        state.local_pos[state.n_written:state.n_written + T] = pos_t[0]
        if route_rows is not None:
            rr = torch.as_tensor(route_rows, dtype=torch.bool, device=self.device).reshape(-1)
            if rr.shape[0] != T or not bool(rr.any()):
                raise ConfigError(f"route_rows must be a ({T},) bool mask with at least one True.")
            state.route, state.route_rows = True, rr
        with self.session(state), (torch.enable_grad() if grad else torch.inference_mode()):
            try:
                if grad:
                    res = self.backbone(input_ids=ids_t, position_ids=pos_t, attention_mask=self._mask_dict,
                                        use_cache=False)
                    out = res.last_hidden_state[0]
                elif backbone_only:
                    self.backbone(input_ids=ids_t, position_ids=pos_t, attention_mask=self._mask_dict, use_cache=False)
                    out = None
                else:
                    res = self.model(input_ids=ids_t, position_ids=pos_t, attention_mask=self._mask_dict,
                                     use_cache=False, logits_to_keep=1)
                    out = res.logits[0, -1].float() if logits else None
            finally:
                state.route, state.route_rows = False, None
                state.masks.clear()      # a long prompt's (T, total) masks must not outlive its forward
        state.n_written += T
        return out

    def compute_prefix(self, template_ids: Sequence[int], reader: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) of the template head at positions 0..P-1, causal among themselves (with the reader
        adapter applied when ``reader``)."""
        n = len(template_ids)
        if n == 0:
            return []
        st = ForwardState(capacity=n, reader=bool(reader))
        self.forward(st, list(template_ids), list(range(n)), backbone_only=True)
        return [(st.layers[i].k[:, :n].clone(), st.layers[i].v[:, :n].clone()) for i in range(len(self.backbone.layers))]

    def new_state(self, capacity: int, prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  top_k: int | None = None, reader: bool = False) -> ForwardState:
        p = list(prefix) if prefix else None
        return ForwardState(capacity=int(capacity), prefix=p, prefix_len=(p[0][0].shape[1] if p else 0), top_k=top_k,
                            reader=bool(reader))

    def route_only(self, ids: Sequence[int], positions: Sequence[int], route_rows: Any,
                   prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   suffix_rows: int = 0) -> tuple[np.ndarray, dict[str, float]]:
        """Document scores summed over all router layers (no memory attached): (N,) float32.

        ``suffix_rows``: the last that many routing rows are the query suffix (:attr:`ForwardState.suffix_rows`)."""
        if self.index is None:
            raise RuntimeMemoryError("Routing needs router keys, but this engine has none.")
        st = self.new_state(len(ids), prefix)
        st.collect_only = True
        st.suffix_rows = int(suffix_rows)
        self.forward(st, ids, positions, route_rows=route_rows, backbone_only=True)
        assert st.doc_score_sum is not None
        return self.index.gather_scores(st.doc_score_sum), st.timings

    def query_sums(self, ids: Sequence[int], positions: Sequence[int], route_rows: Any,
                   prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   suffix_rows: int = 0) -> dict[tuple[bool, int], tuple[torch.Tensor, int]]:
        """One routing forward of ``ids`` that scores nothing: {(suffix?, router position): (sum over the
        routing rows of the prepared router queries (Hq, D) float64 on the CPU, rows)}, the prepared query
        being what the index scores (L2-normalised per head under ``score="cosine"``, raw under ``"dot"``).
        What :meth:`~msa_memory.routing.index.RouterIndex.set_query_centres` takes is their mean."""
        if self.index is None:
            raise RuntimeMemoryError("Query centres need router keys, but this engine has none.")
        st = self.new_state(len(ids), prefix)
        st.collect_only = True
        st.suffix_rows = int(suffix_rows)
        st.query_sums = {}
        self.forward(st, ids, positions, route_rows=route_rows, backbone_only=True)
        return st.query_sums

    def pooled_routes(self, ids: Sequence[int], positions: Sequence[int], route_rows: Any,
                      prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None, top_k: int,
                      timings: dict[str, float] | None = None, suffix_rows: int = 0) -> dict[int, RouteResult]:
        """Every router position's top-k from a pooled routing forward of ``ids`` (memory attached layer by
        layer as it routes, as in a pooled prefill), for a later forward to use (``preset_routes``)."""
        if self.index is None:
            raise RuntimeMemoryError("Routing needs router keys, but this engine has none.")
        st = self.new_state(len(ids), prefix, top_k=top_k)
        st.suffix_rows = int(suffix_rows)
        self.forward(st, ids, positions, route_rows=route_rows, backbone_only=True)
        if timings is not None:
            for k in ("routing_s", "fetch_s"):
                timings[k] = timings.get(k, 0.0) + st.timings[k]
        return dict(st.routes)

    # ------------------------------------------------------------------ decoding
    def decode(self, state: ForwardState, first_logits: torch.Tensor, next_pos: int, *, max_new_tokens: int,
               eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None,
               stop: Callable[[list[int]], bool] | None = None, path: str = "auto") -> Iterator[int]:
        """Yield generated token ids (greedy when temperature == 0), one forward per token.

        ``path``: ``"dynamic"`` (each step attends the filled part of the buffers; shapes grow),
        ``"static"`` (the fixed-shape step, eager), ``"graph"`` (that step captured once per request as a
        CUDA graph and replayed; CUDA only) or ``"auto"`` (graph on CUDA for ≥ :data:`GRAPH_MIN_TOKENS`
        new tokens, dynamic otherwise). All give the same tokens (tests; ``bench_runtime --gpu-check``).
        """
        if path not in ("auto", "dynamic", "static", "graph"):
            raise ConfigError(f"decode path={path!r} is not one of 'auto', 'dynamic', 'static', 'graph'.")
        if path == "graph" and self.device.type != "cuda":
            raise ConfigError(f"decode path='graph' needs a CUDA model; this one is on {self.device}.")
        if path == "auto":
            path = "graph" if self.device.type == "cuda" and max_new_tokens >= GRAPH_MIN_TOKENS else "dynamic"
        if path == "dynamic" or max_new_tokens <= 1 or not state.layers or state.n_written >= state.capacity:
            # (a full buffer: the dynamic path raises the clear capacity error when it needs a slot)
            yield from self._decode_dynamic(state, first_logits, next_pos, max_new_tokens, eos_ids, temperature,
                                            top_p, generator, stop)
        else:
            yield from self._decode_static(state, first_logits, next_pos, max_new_tokens, eos_ids, temperature,
                                           top_p, generator, stop, graph=(path == "graph"))

    def _decode_dynamic(self, state, logits, next_pos, max_new_tokens, eos_ids, temperature, top_p, generator, stop):
        out: list[int] = []
        eos = set(int(e) for e in eos_ids)
        for step in range(max_new_tokens):
            tok = _sample(logits, temperature, top_p, generator)
            out.append(tok)
            yield tok
            if tok in eos or (stop is not None and stop(out)) or step == max_new_tokens - 1:
                return
            logits = self.forward(state, [tok], [next_pos])
            next_pos += 1

    def _decode_static(self, state, logits, next_pos, max_new_tokens, eos_ids, temperature, top_p, generator, stop,
                       *, graph: bool):
        import torch

        n0 = state.n_written
        with torch.inference_mode():
            for buf in state.layers.values():      # masked slots must hold finite values (0 · NaN is NaN)
                buf.k[:, buf.local_start + buf.n_local:].zero_()
                buf.v[:, buf.local_start + buf.n_local:].zero_()
            if graph:
                if state.decode_graph is None:
                    state.decode_graph = self._capture_step(state, n0, next_pos)
                sp, g = state.decode_graph
                run = g.replay
            else:
                sp = self._new_step(logits.shape[0])
                run = lambda: self._static_forward(state, sp)  # noqa: E731
        out: list[int] = []
        eos = set(int(e) for e in eos_ids)
        steps = 0
        try:
            for step in range(max_new_tokens):
                if step == 0 or temperature > 0:
                    tok = _sample(logits, temperature, top_p, generator)
                else:
                    tok = int(sp.ids[0, 0])             # the step's own argmax (one 8-byte copy to the host)
                out.append(tok)
                yield tok
                if tok in eos or (stop is not None and stop(out)) or step == max_new_tokens - 1:
                    return
                if n0 + steps + 1 > state.capacity:
                    raise RuntimeMemoryError(f"Request needs more than its {state.capacity} local-token slots.")
                with torch.inference_mode():
                    if step == 0:
                        sp.pos.fill_(next_pos)
                        sp.n.fill_(n0)
                    if step == 0 or temperature > 0:
                        sp.ids.fill_(tok)
                    run()
                steps += 1
                logits = sp.logits
        finally:                                    # the host's counters follow the device's, even on close()
            state.n_written = n0 + steps
            for buf in state.layers.values():
                buf.n_local = n0 + steps

    def _new_step(self, vocab: int) -> StaticStep:
        import torch

        z = dict(dtype=torch.long, device=self.device)
        return StaticStep(torch.zeros((1, 1), **z), torch.zeros((1, 1), **z), torch.zeros(1, **z),
                           torch.zeros(vocab, dtype=torch.float32, device=self.device))

    def _static_forward(self, state: ForwardState, sp: StaticStep) -> None:
        """The fixed-shape step: only device tensors change between calls (what a CUDA graph replays)."""
        import torch

        state.local_pos.index_copy_(0, sp.n, sp.pos[0])
        state.static = sp
        try:
            with self.session(state):
                res = self.model(input_ids=sp.ids, position_ids=sp.pos, attention_mask=self._mask_dict,
                                 use_cache=False, logits_to_keep=1)
        finally:
            state.static = None
            state.masks.clear()
        sp.logits.copy_(res.logits[0, -1])
        sp.ids.copy_(torch.argmax(sp.logits).view(1, 1))
        sp.n.add_(1)
        sp.pos.add_(1)

    def _capture_step(self, state: ForwardState, n0: int, next_pos: int) -> tuple[StaticStep, Any]:
        """Warm the step up on a side stream (cuBLAS / SDPA choose their kernels), then capture it. The
        warm-up calls write slot ``n0`` only, which the first replay overwrites."""
        import torch

        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        sp = self._new_step(vocab)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                sp.n.fill_(n0)
                sp.pos.fill_(next_pos)
                self._static_forward(state, sp)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        sp.n.fill_(n0)
        sp.pos.fill_(next_pos)
        with torch.cuda.graph(g):
            self._static_forward(state, sp)
        return sp, g


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(), 1, generator=generator)
        return int(si[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
