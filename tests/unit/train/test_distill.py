"""Listwise distillation (``msa_memory.train.distill``, ``TrainConfig.objective="distill"``): the loss against a
hand-computed KL, the teacher's candidate lists, the pseudo-queries, and learning on a synthetic task.

Run: ``.venv/bin/python -m pytest tests/unit/train/test_distill.py -q`` (no model, CPU, seconds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msa_memory.errors import ConfigError
from msa_memory.train.distill import man_name_line, parse_query_sources, pseudo_query_pairs, teacher_lists
from msa_memory.train.pairs import Query
from msa_memory.train.scores import listwise_kl
from msa_memory.train.trainer import Features, RouterProjections, TrainConfig, evaluate, train_router


# ----------------------------------------------------------------------------- the loss

def test_listwise_kl_equals_hand_computed_kl():
    student = torch.tensor([[0.5, 0.1, -0.2, 0.3], [0.0, 0.4, 0.2, 9.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.3, 1.0, 0.0, float("nan")]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    ts, tt = 0.1, 0.2

    def kl(s, t):
        zs = [math.exp(x / ts) for x in s]
        zt = [math.exp(x / tt) for x in t]
        p = [z / sum(zt) for z in zt]
        q = [z / sum(zs) for z in zs]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    want = (kl([0.5, 0.1, -0.2, 0.3], [1.0, 0.0, 0.5, 0.2]) + kl([0.0, 0.4, 0.2], [0.3, 1.0, 0.0])) / 2
    got = listwise_kl(student, teacher, valid, tau_student=ts, tau_teacher=tt)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # the padded entry's student score (9.0) and NaN teacher take no part; NaN alone marks padding too
    assert float(listwise_kl(student, teacher, None, tau_student=ts, tau_teacher=tt)) == pytest.approx(want, rel=1e-5)
    # zero when the student's softmax is the teacher's (same logits), and a row with one entry is skipped
    t = torch.tensor([[0.2, 0.9, 0.4]])
    assert float(listwise_kl(t * 0.5, t, tau_student=0.05, tau_teacher=0.1)) == pytest.approx(0.0, abs=1e-6)
    one = torch.tensor([[True, False, False]])
    assert float(listwise_kl(t, t.flip(1), one)) == 0.0


def test_listwise_kl_gradient_moves_the_student_towards_the_teacher():
    s = torch.zeros(1, 3, requires_grad=True)
    listwise_kl(s, torch.tensor([[1.0, 0.0, 0.5]]), tau_student=0.1, tau_teacher=0.1).backward()
    g = s.grad[0]
    assert g[0] < 0 < g[2] < g[1]         # descent raises the teacher's best, lowers its worst the most


# ----------------------------------------------------------------------------- candidate lists

def _embed_table(vectors):
    table = {str(i): v / np.linalg.norm(v) for i, v in enumerate(vectors)}
    return lambda texts: np.stack([table[t] for t in texts]).astype(np.float32)


def test_teacher_lists_hold_positives_then_the_teachers_best_then_random():
    rng = np.random.default_rng(0)
    N = 30
    vecs = rng.normal(size=(N, 8))
    passages = [str(i) for i in range(N)]
    # query i is passage (i + 3)'s vector: its positive (i) is not the teacher's best
    queries = [Query(str((i + 3) % N), (i,)) for i in range(6)] + [Query("5", (1, 2))]
    cands, scores = teacher_lists(passages, queries, "minilm", n_mined=4, n_random=5, seed=1,
                                  embed=_embed_table(vecs))
    assert cands.shape == scores.shape == (7, 2 + 4 + 5)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    for qi, q in enumerate(queries):
        row = [int(d) for d in cands[qi] if d >= 0]
        npos = len(q.positives)
        assert row[:npos] == list(q.positives)
        sims = unit @ unit[int(q.text)]
        others = [d for d in np.argsort(-sims, kind="stable") if d not in q.positives]
        assert row[npos:npos + 4] == [int(d) for d in others[:4]]            # the teacher's best, best first
        rnd = row[npos + 4:]
        assert len(rnd) == 5 and not set(rnd) & set(row[:npos + 4]) and len(set(rnd)) == 5
        got = scores[qi, :len(row)]
        want = sims[row]
        want = (want - want.min()) / (want.max() - want.min())
        assert np.allclose(got, want, atol=1e-5) and got.min() == 0.0 and got.max() == pytest.approx(1.0)
    # one positive fewer than the widest row: one pad at the end
    assert cands[0, -1] == -1 and np.isnan(scores[0, -1]) and (cands[6] >= 0).all()
    again = teacher_lists(passages, queries, "minilm", n_mined=4, n_random=5, seed=1, embed=_embed_table(vecs))
    assert np.array_equal(again[0], cands)                                   # seeded


def test_teacher_lists_with_bm25_and_fusion_and_few_passages():
    passages = ["the cat sat on the mat", "dogs chase cats in the park", "stock markets fell sharply today",
                "a cat and a dog", "interest rates and markets"]
    queries = [Query("cat on a mat", (3,)), Query("markets", (2,))]
    cands, scores = teacher_lists(passages, queries, "bm25", n_mined=2, n_random=9, seed=0)
    assert cands.shape == (2, 12)
    assert cands[0, 0] == 3 and cands[0, 1] == 0                 # positive, then BM25's best other passage
    assert cands[1, 0] == 2 and cands[1, 1] == 4
    for r in range(2):                                            # only 5 passages: the rest is padding
        assert (cands[r, :5] >= 0).all() and (cands[r, 5:] == -1).all() and np.isnan(scores[r, 5:]).all()
        assert sorted(cands[r, :5].tolist()) == [0, 1, 2, 3, 4]
    vecs = np.eye(5) + 0.1
    fused = teacher_lists(passages, queries, "fusion", n_mined=2, n_random=0, seed=0,
                          embed=lambda ts: np.stack([vecs[passages.index(t)] if t in passages else vecs[0]
                                                     for t in ts]).astype(np.float32))
    assert fused[0].shape == (2, 3) and np.nanmax(fused[1]) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="Unknown teacher"):
        teacher_lists(passages, queries, "gpt")


# ----------------------------------------------------------------------------- pseudo-queries

def test_man_name_line():
    assert man_name_line('.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n') == \
        "list directory contents"
    assert man_name_line('.SH "NAME"\n\\fBgrep\\fR, egrep \\- print lines that match patterns\n.SH X') == \
        "print lines that match patterns"
    assert man_name_line(".Dd 2020\n.Sh NAME\n.Nm cp\n.Nd copy files\n.Sh SYNOPSIS") == "copy files"
    assert man_name_line(".SH DESCRIPTION\nnothing\n") == ""


def test_pseudo_queries_cut_the_summary_and_first_sentence_and_read_man_names():
    doc = ("Return the number of items in a container. Works for lists and tuples alike.\n\n"
           + "Second paragraph starts here with words. " * 4 + "\n\n"
           + "Third part first sentence is a title like lead. " + "More text follows in this part. " * 8)
    docs = [("stdlib/x.py:f", doc), ("man/man1/ls.1.gz", "Some prose about listing files and folders. " * 8)]
    ps = pseudo_query_pairs(docs, ["summary", "name", "first-sentence"], max_chars=400,
                            name_of=lambda s: "list directory contents" if s.endswith("ls.1.gz") else "")
    by_kind = {q.kind: q for q in ps.queries}
    assert set(by_kind) == {"summary", "name", "first-sentence"}
    s = by_kind["summary"]
    assert s.text == "Return the number of items in a container."
    assert s.text not in ps.passages[s.positives[0]] and ps.passages[s.positives[0]].startswith("Works for")
    assert by_kind["name"].text == "list directory contents"
    assert ps.sources[by_kind["name"].positives[0]] == "man/man1/ls.1.gz"
    fs = by_kind["first-sentence"]
    assert fs.text not in ps.passages[fs.positives[0]]
    assert all(len(q.positives) == 1 for q in ps.queries) and len(ps.passages) == len(ps.sources)
    assert len({q.positives[0] for q in ps.queries}) == len(ps.queries)      # at most one query a passage
    assert parse_query_sources("summary, ict") == ("summary", "ict")
    with pytest.raises(ConfigError, match="pseudo-query"):
        parse_query_sources("summary,titles")


# ----------------------------------------------------------------------------- training

def _topics(n_docs, seed, A, E=24, chunks=2, T=3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_docs, E, generator=g)
    x = torch.stack([u.repeat_interleave(chunks, 0) + 0.3 * torch.randn(n_docs * chunks, E, generator=g)])
    qx = ((u.repeat_interleave(T, 0) @ A.T) + 0.3 * torch.randn(n_docs * T, E, generator=g))[:, None]
    f = Features((3,), x, torch.arange(n_docs).repeat_interleave(chunks), n_docs, qx,
                 torch.arange(0, n_docs * T + 1, T), [(d,) for d in range(n_docs)], ["ict"] * n_docs)
    return f, u


def test_distillation_learns_the_teachers_ranking_and_needs_its_lists():
    g = torch.Generator().manual_seed(0)
    E = 24
    A = torch.linalg.qr(torch.randn(E, E, generator=g))[0]
    train, u = _topics(96, 1, A)
    held, _ = _topics(48, 2, A)
    eye = torch.eye(E)
    proj = RouterProjections((3,), [eye.clone()], [eye[:12].clone()], n_q_heads=2, n_kv_heads=1, head_dim=12)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=2e-2, n_hard=0, n_random=8, ks=(1, 5), objective="distill",
                      distill_alpha=0.0)
    with pytest.raises(ConfigError, match="candidate lists"):
        train_router(proj, train, held, cfg)
    vecs = u.numpy()
    texts = [str(i) for i in range(train.n_docs)]
    cands, scores = teacher_lists(texts, [Query(str(d), (d,)) for d in range(train.n_docs)], "minilm",
                                  n_mined=6, n_random=6, seed=0, embed=_embed_table(vecs))
    dist = train.with_teacher(cands, scores)
    before = evaluate(proj, held, cfg)["recall"]
    hist = train_router(proj, dist, held, cfg)
    after = evaluate(proj, held, cfg)["recall"]
    assert hist[-1]["loss"] < hist[1]["loss"]
    assert after[1] > before[1] + 0.3, (before, after)      # the teacher's best is each query's own topic
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="mse")


def test_teacher_lists_survive_feature_save_load_and_subsets(tmp_path):
    from msa_memory.train.features import load_features, save_features

    f, _ = _topics(10, 3, torch.eye(24))
    cands = torch.arange(30).reshape(10, 3) % 10
    scores = torch.rand(10, 3)
    f = f.with_teacher(cands, scores)
    save_features(f, str(tmp_path / "f.pt"))
    g = load_features(str(tmp_path / "f.pt"))
    assert torch.equal(g.teacher_cands, cands) and torch.equal(g.teacher_scores, scores)
    assert torch.equal(g.layer_subset((3,)).teacher_cands, cands)
    with pytest.raises(ConfigError, match="teacher_cands"):
        f.with_teacher(cands[:5], scores[:5])


def test_distill_pairs_split_documents_and_cache_them(tmp_path, monkeypatch):
    from msa_memory.train import recipe

    calls = []

    def fake():
        calls.append(1)
        return [(f"stdlib/m{i}.py:f", f"Compute the value number {i} of the table. " + "Body text goes on here. " * 12)
                for i in range(40)]

    monkeypatch.setitem(recipe.BUILTIN_SOURCES, "stdlib", fake)
    train, dev = recipe.distill_pairs(20, 5, sources=("stdlib",), queries=("summary",), docs_cache=tmp_path)
    assert len(train.passages) == 20 and len(dev.passages) == 5
    assert not set(train.sources) & set(dev.sources)                      # disjoint documents
    assert all(q.kind == "summary" and q.text.startswith("Compute the value") for q in train.queries + dev.queries)
    again = recipe.distill_pairs(20, 5, sources=("stdlib",), queries=("summary",), docs_cache=tmp_path)
    assert len(calls) == 1 and again[0].passages == train.passages       # the second read is the cache's


def test_train_router_command_records_the_distillation_options():
    from msa_memory.train.cli_support import train_router_command

    base = ("out", None, None, None, "default", "13", 9, 4, 64, 0.005, 500, 100, 800, 0, None, "cpu")
    assert "--objective" not in train_router_command(*base)
    cmd = train_router_command(*base, objective="distill", teacher="fusion", queries="summary,name",
                               distill_tau=0.05, distill_alpha=0.0, teacher_mined=10, teacher_random=4)
    for part in ("--queries summary,name", "--objective distill", "--teacher fusion", "--distill-tau 0.05",
                 "--distill-alpha 0", "--teacher-mined 10", "--teacher-random 4"):
        assert part in cmd
