"""Stateful test: add / delete / replace / compact / gc / tag / restore / reopen / stale commits
applied to a real store and to a plain in-memory model of its versions; after every step the
latest version (and the snapshot held) must read exactly as the model says.

Run: .venv/bin/python -m pytest tests/property/test_store_state_machine.py -q
(HYPOTHESIS_PROFILE=nightly for a long run).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from msa_memory.errors import DocumentNotFoundError, VersionConflictError, VersionNotFoundError
from msa_memory.store import create_store, open_store, write_shard
from msa_memory.testing.faults import validate_store_manifests
from msa_memory.testing.store_kit import random_docs, tiny_identity


@dataclass(frozen=True)
class Doc:
    kv: bytes
    k_router: tuple[bytes, ...]  # per router layer
    text: str
    source: str
    n_chunks: int


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.store = create_store(self.dir / "mem", tiny_identity(hidden_size=0))
        self.model: dict[int, dict[int, Doc]] = {0: {}}  # version -> live docs
        self.tags: dict[str, int] = {}
        self.rng = np.random.default_rng(0)
        self.n_shards = 0
        self.old = self.store  # a snapshot kept across steps (must never change)
        self.old_docs: dict[int, Doc] = {}

    def teardown(self) -> None:
        validate_store_manifests(self.dir / "mem")
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- helpers
    @property
    def latest(self) -> int:
        return max(self.model)

    def _live(self) -> dict[int, Doc]:
        return self.model[self.latest]

    def _write(self, counts: list[int], source: str):
        ids = self.store.reserve_ids(len(counts))
        passages, enc = random_docs(self.store.identity, ids, counts, self.rng, source=source)
        self.n_shards += 1
        rec = write_shard(self.store.root, f"s{self.n_shards}", passages, enc)
        offs = enc.offsets
        docs = {}
        for i, d in enumerate(ids):
            a, b = offs[i], offs[i + 1]
            docs[int(d)] = Doc(enc.kv[a:b].tobytes(), tuple(enc.k_router[layer, a:b].tobytes() for layer in range(2)),
                               passages[i].text, passages[i].source_path, int(b - a))
        return rec, docs

    def _publish(self, new_store, content: dict[int, Doc]) -> None:
        assert new_store.version == self.latest + 1
        self.model[new_store.version] = content
        self.store = new_store

    # ---------------------------------------------------------------- rules
    @rule(counts=st.lists(st.integers(1, 9), min_size=1, max_size=3))
    def add(self, counts):
        rec, docs = self._write(counts, "add")
        self._publish(self.store.commit(add=[rec], message="add"), {**self._live(), **docs})

    @precondition(lambda self: self._live())
    @rule(data=st.data(), by_path=st.booleans())
    def delete(self, data, by_path):
        live = sorted(self._live())
        victims = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        if by_path:
            new = self.store.commit(delete_paths=[self._live()[v].source for v in victims])
        else:
            new = self.store.commit(delete_ids=victims)
        self._publish(new, {k: v for k, v in self._live().items() if k not in victims})

    @precondition(lambda self: self._live())
    @rule(data=st.data(), counts=st.lists(st.integers(1, 9), min_size=1, max_size=2))
    def replace(self, data, counts):
        victim = data.draw(st.sampled_from(sorted(self._live())))
        rec, docs = self._write(counts, "replace")
        new = self.store.commit(add=[rec], delete_ids=[victim], message="replace")
        content = {k: v for k, v in self._live().items() if k != victim}
        self._publish(new, {**content, **docs})

    @rule(min_dead=st.sampled_from([0.0, 0.5]), merge=st.sampled_from([0, 0, 6]))
    def compact(self, min_dead, merge):
        new = self.store.compact(min_dead_fraction=min_dead, merge_below_chunks=merge)
        if new.version != self.store.version:
            self._publish(new, dict(self._live()))

    @rule(keep_last=st.sampled_from([None, 1, 2, 3]))
    def gc(self, keep_last):
        report = self.store.gc(dry_run=False, keep_last=keep_last, grace_s=0)
        assert report["kept_versions"][-1] == self.latest
        for v in report["removed_versions"]:
            del self.model[v]
        assert sorted(self.model) == report["kept_versions"]

    @rule(name=st.sampled_from(["a", "b"]), data=st.data())
    def tag(self, name, data):
        v = data.draw(st.sampled_from(sorted(self.model)))
        self.store.tag(name, v, force=True)
        self.tags[name] = v

    @rule(data=st.data())
    def restore(self, data):
        v = data.draw(st.sampled_from(sorted(self.model) + sorted(self.tags)))
        target = self.tags[v] if isinstance(v, str) else v
        if target not in self.model:  # tag of a version gc removed: cannot happen, tags are kept
            with pytest.raises(VersionNotFoundError):
                self.store.restore(v)
            return
        self._publish(self.store.restore(v), dict(self.model[target]))

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def many_deletes(self, data):
        """Single-document deletes, enough to trigger deletion-file checkpoints (limit lowered)."""
        from msa_memory.store import commit as commit_mod

        old, commit_mod.MAX_DELETION_FILES = commit_mod.MAX_DELETION_FILES, 2
        try:
            for victim in data.draw(st.lists(st.sampled_from(sorted(self._live())), min_size=1, max_size=3,
                                             unique=True)):
                self._publish(self.store.commit(delete_ids=[victim]),
                              {k: v for k, v in self._live().items() if k != victim})
        finally:
            commit_mod.MAX_DELETION_FILES = old

    @rule()
    def reopen(self):
        self.store = open_store(self.dir / "mem")
        assert self.store.version == self.latest

    @rule(data=st.data())
    def hold_snapshot(self, data):
        v = data.draw(st.sampled_from(sorted(self.model)))
        self.old, self.old_docs = open_store(self.dir / "mem", v), self.model[v]

    @precondition(lambda self: self.latest > 0)
    @rule()
    def stale_commit_is_refused(self):
        stale = self.store.checkout_version(min(self.model))
        if stale.version == self.latest:
            return
        with pytest.raises(VersionConflictError):
            stale.commit(message="stale")
        with pytest.raises((DocumentNotFoundError, VersionConflictError)):
            self.store.commit(delete_ids=[10**9])

    # ---------------------------------------------------------------- invariants
    def _check(self, store, docs: dict[int, Doc]) -> None:
        ids = sorted(docs)
        assert sorted(store.documents(["doc_id"]).column(0).to_pylist()) == ids
        assert store.stats()["n_docs"] == len(ids)
        assert store.stats()["n_chunks"] == sum(d.n_chunks for d in docs.values())
        if ids:
            assert [a.tobytes() for a in store.load_kv(ids)] == [docs[i].kv for i in ids]
            assert store.texts(ids) == [docs[i].text for i in ids]
        for layer in range(2):
            keys, chunk_doc = store.router_keys(layer)
            assert sorted(set(chunk_doc.tolist())) == ids
            for i in ids:
                assert keys[chunk_doc == i].tobytes() == docs[i].k_router[layer]

    @invariant()
    def latest_matches_model(self):
        self._check(self.store, self._live())
        assert self.store.tags() == {k: v for k, v in self.tags.items()}
        assert [v["version"] for v in self.store.versions()] == sorted(self.model)

    @invariant()
    def held_snapshot_never_changes(self):
        if self.old.version in self.model:  # gc may have removed its files
            self._check(self.old, self.old_docs)


StoreMachine.TestCase.settings = settings(
    max_examples=max(8, settings.default.max_examples // 4), stateful_step_count=12, deadline=None)
test_store_state_machine = StoreMachine.TestCase
