"""Every routing kernel (``msa_memory.routing.kernels``) against the slow reference scorer
(``msa_memory.routing.reference``), through the one kernel interface, and the fallback everywhere.

- each registered kernel declares a known stage, a unique name and the methods of its stage;
- each kernel, where it applies on this machine (skipped with its own ``why_not`` elsewhere: AVX2-only CPUs,
  no CUDA), gives the reference's chunk scores / document scores / top-k through ``RouterIndex``;
- where no kernel applies (or every kernel is made unavailable), the index runs the torch path and equals
  the reference; a kernel that fails at run time warns once, is marked broken, and the results still equal
  the reference;
- a new kernel is picked up by the index through the interface alone (a stand-in registered by hand).
The Triton kernels also run on CPU under ``TRITON_INTERPRET=1`` (``tests/equivalence/test_routing_paths.py``);
each kernel's own file under ``tests/equivalence/`` checks it in depth.
Run: .venv/bin/python -m pytest tests/unit/routing/test_kernels.py -q -rs
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from msa_memory.routing import kernels, reference
from msa_memory.routing.config import RoutingConfig
from msa_memory.routing.index import RouterIndex
from msa_memory.routing.kernels import Need, RoutingKernel

STAGE_METHODS = {"scores": ("score",), "doc_reduce": ("reduce",), "doc_topk": ("topk",), "route": ("make",)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMBOS = [("dot", "mean", "max", "max"), ("cosine", "max", "mean", "mean"), ("dot", "max", "max", "max"),
          ("cosine", "mean", "last", "max")]


def ref_doc_scores(index: RouterIndex, layer: int, q: torch.Tensor, chunk_doc: np.ndarray) -> torch.Tensor:
    """(N,) float64 reference document scores of ``q`` against the index's resident keys (as it holds them)."""
    cfg = index.config
    keys = index.keys[layer].double().cpu()
    mask = torch.ones(1, q.shape[0], dtype=torch.bool)
    cs = reference.chunk_scores(q[None].double(), mask, keys, score=cfg.score, head_reduce=cfg.head_reduce,
                                query_reduce=cfg.query_reduce)
    return reference.doc_scores(cs, torch.from_numpy(chunk_doc), index.n_docs, chunk_reduce=cfg.chunk_reduce)[0]


def make_index(combo, dtype=torch.float32, seed=0, n_docs=120, **cfg):
    score, hr, qr, cr = combo
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_docs,), generator=g).numpy()
    chunk_doc = np.repeat(np.arange(n_docs), counts)
    keys = torch.randn(len(chunk_doc), 2, 64, generator=g).to(dtype)
    config = RoutingConfig(score=score, head_reduce=hr, query_reduce=qr, chunk_reduce=cr, top_k=8,
                           compute_dtype="auto" if dtype == torch.float32 else str(dtype).removeprefix("torch."),
                           **cfg)
    index = RouterIndex([keys], chunk_doc, np.arange(n_docs) + 1000, config, device=DEVICE)
    return index, chunk_doc, torch.randn(5, 4, 64, generator=g)


def tolerance(index: RouterIndex) -> float:
    return 1e-4 if index.key_dtype == torch.float32 else 5e-2      # bf16 query operand: rounded once


def assert_equals_reference(index, chunk_doc, q, what):
    want = ref_doc_scores(index, 0, q, chunk_doc)
    got = index.doc_scores(0, q).double().cpu()
    err = (got - want).abs()
    assert float(err.max()) <= tolerance(index), f"{what}: max {float(err.max()):.3g}, mean {float(err.mean()):.3g}"
    res = index.route(0, q)
    np.testing.assert_allclose(res.scores, torch.topk(want, 8).values.numpy(), atol=tolerance(index), rtol=0)
    np.testing.assert_allclose(want[res.doc_index].numpy(), res.scores, atol=tolerance(index), rtol=0)


def test_every_kernel_states_its_interface():
    found = kernels.all_kernels()
    assert found, "no routing kernel registered"
    assert len({k.name for k in found}) == len(found)
    for kern in found:
        assert isinstance(kern, RoutingKernel) and kern.name and kern.stage in kernels.STAGES, kern
        assert kern.devices, f"{kern.name} states no device"
        assert all(callable(getattr(kern, m)) for m in STAGE_METHODS[kern.stage]), kern
        if kern.layout:
            assert kern.stage == "scores" and callable(kern.pack) and callable(kern.unpack)
        if kern.switch:
            assert isinstance(getattr(RoutingConfig(), kern.switch), bool), kern.switch
    assert [k.priority for k in found] == sorted((k.priority for k in found), reverse=True)


@pytest.mark.parametrize("name", [k.name for k in kernels.all_kernels()])
def test_kernel_equals_reference_where_it_applies(name):
    kern = kernels.named(name)
    dtype = torch.bfloat16 if "bfloat16" in kern.key_dtypes else torch.float32
    combo = next(c for c in COMBOS if (not kern.query_reduces or c[2] in kern.query_reduces)
                 and (not kern.chunk_reduces or c[3] in kern.chunk_reduces))
    index, chunk_doc, q = make_index(combo, dtype)
    used = index.kernel_for(kern.stage, 0, q=q, k=8)
    if used != name:
        need = Need(kern.stage, index.device.type, index.config, key_dtype=str(dtype).removeprefix("torch."),
                    head_dim=64, rows=q.shape[0] * 4, sorted_map=True, n_docs=index.n_docs, k=8)
        pytest.skip(f"routing kernel {name!r} does not apply here: it {kern.why_not(need) or f'yields to {used!r}'}")
    assert_equals_reference(index, chunk_doc, q, f"kernel {name}")
    assert not index.broken_kernels


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_equals_reference_with_every_kernel_unavailable(combo, dtype, monkeypatch):
    for kern in kernels.all_kernels():
        monkeypatch.setattr(kern, "unavailable_reason", lambda: "made unavailable by the test")
    index, chunk_doc, q = make_index(combo, dtype, seed=1)
    assert index.layout in ("rows", "chunk_minor")
    assert all(index.kernel_for(s, 0, q=q, k=8) is None for s in kernels.STAGES)
    assert_equals_reference(index, chunk_doc, q, "torch path")


def test_fallback_on_this_machine_equals_reference():
    """Whatever applies here (the AVX512-BF16 kernel or none on CPUs, the GPU kernels on CUDA)."""
    index, chunk_doc, q = make_index(COMBOS[0], torch.bfloat16, seed=2)
    assert_equals_reference(index, chunk_doc, q, f"auto ({index.layout})")


class _Failing(RoutingKernel):
    """A stand-in score kernel for every device and dtype, registered by hand: it fails when it runs."""

    name = "stand_in"
    stage = "scores"
    devices = ("cpu", "cuda")
    priority = 1000

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.calls = 0

    def score(self, lhs, keys, plan, out):
        self.calls += 1
        if self.fail:
            raise RuntimeError("stand-in exploded")
        cs = torch.einsum("grd,cgd->cgr", lhs.float(), keys.float())           # (C, G, R)
        if plan.query_reduce == "max":
            out.copy_(cs.amax(dim=(1, 2)))
        else:
            out.copy_(cs.unflatten(2, (plan.T, plan.rep)).amax(dim=(1, 3)).mean(1))


@pytest.mark.parametrize("fail", [False, True])
def test_a_new_kernel_is_picked_through_the_interface_and_a_failing_one_falls_back(fail, monkeypatch):
    stand_in = _Failing(fail)
    monkeypatch.setattr(kernels, "_found", (stand_in, *kernels.all_kernels()))
    index, chunk_doc, q = make_index(("dot", "max", "mean", "max"), seed=3)
    assert index.kernel_for("scores", 0, q=q) == "stand_in"
    if fail:
        with pytest.warns(RuntimeWarning, match=r"score kernel failed \(stand_in, RuntimeError: stand-in exploded\)"):
            index.doc_scores(0, q)
        assert index.broken_kernels == {"stand_in"} and index.kernel_for("scores", 0, q=q) != "stand_in"
        with pytest.raises(RuntimeError, match="exploded"):
            index.chunk_scores(0, q, kernel="stand_in")                # forced: the error itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no second warning
        assert_equals_reference(index, chunk_doc, q, "stand-in kernel")
    assert stand_in.calls >= 1


def test_why_not_names_the_reason():
    cfg = RoutingConfig(query_reduce="mean", cpu_kernel=False)
    need = Need("scores", "cpu", cfg, key_dtype="bfloat16", head_dim=64, rows=3)
    reasons = kernels.why_not(need)
    assert set(reasons) == {k.name for k in kernels.all_kernels() if k.stage == "scores"}
    if "cpu" in reasons:
        assert reasons["cpu"] == "is off (RoutingConfig.cpu_kernel=False)"
    if "triton" in reasons:
        assert reasons["triton"] == "needs query_reduce 'max', not 'mean'"
    assert kernels.select(need) is None
