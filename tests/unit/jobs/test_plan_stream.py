"""Plain-text files are planned and encoded from the file, a block at a time (issue 41, item 9).

- The passages made from a ``TextFile`` (the file read a block at a time) are the passages made from
  the whole text in memory, for any block size, window and cache (hypothesis; tiny blocks and windows
  put block and window edges inside characters, separators and passages).
- A scan that streams (``hold_text=False``) gives the same sources, hashes and skip reasons as one
  that reads each file whole, including undecodable bytes behind a block edge.
- A streamed plan gives the same shard tasks (ids, doc ids, token counts) as the in-memory plan, its
  tasks carry byte ranges, not text, and they load the same passages.
- A file changed between plan and encode (same size, shorter, gone) fails the job, naming the file,
  and nothing is committed; the next run plans the new content.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_memory.encode._textfile import TextFile, index_text_file
from msa_memory.encode.scan import scan_corpus
from msa_memory.encode.sources import ReaderOptions, decode_text
from msa_memory.encode.passages import split_passages
from msa_memory.encode.tiny import tiny_tokenizer
from msa_memory.errors import JobError
from msa_memory.jobs import encode_corpus
from msa_memory.jobs.plan import make_shard_tasks, plan_passages, shard_tasks, split_and_count

TOK = tiny_tokenizer()
#: pieces that exercise every separator level, multi-byte characters and whitespace the levels treat apart
PIECES = ["a", "bc", "word", " ", "  ", "\n", "\n\n", "\n \n", "\n\t\n  ", ". ", "! ", "? ", ";", ":", "é", "日本",
          "😀", "\t", "\r\n", "\u00a0", "\u2028", "\u3000", "x" * 37, "Fact 7."]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=300), bom=st.booleans(),
       block=st.sampled_from([4, 5, 7, 16, 61, 1 << 18]), window=st.sampled_from([1, 2, 3, 8, 100, 1 << 16]),
       cache=st.sampled_from([1, 2, 16]), max_tokens=st.sampled_from([1, 2, 5, 16, 64, 512]))
def test_passages_of_a_streamed_file_are_those_of_its_text_in_memory(tmp_path: Path, pieces: list[str], bom: bool,
                                                                      block: int, window: int, cache: int,
                                                                      max_tokens: int) -> None:
    text = "".join(pieces)
    data = text.encode()
    path = _write(tmp_path / "f.txt", (b"\xef\xbb\xbf" if bom else b"") + data)
    index, reason = index_text_file(path, block_bytes=block)
    if not text.strip():
        assert index is None and reason == "no text (empty after extraction)"
        return
    assert reason is None and index is not None
    assert index.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and index.n_chars == len(text)
    tf = TextFile(index)
    tf.window_chars, tf.cache_blocks = window, cache
    assert tf.get(0, len(text)) == text
    held = split_passages(text, "k", TOK, max_tokens=max_tokens, file_sha256=index.sha256)
    streamed = split_passages(tf, "k", TOK, max_tokens=max_tokens)
    assert streamed == held
    for p in streamed:   # what a worker reads back: the passage's bytes, by range
        assert index.read(p.byte_start, p.byte_end) == data[p.byte_start:p.byte_end] == p.text.encode()
        part = index.part(p.byte_start, p.byte_end)
        assert part.read(p.byte_start, p.byte_end) == p.text.encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64) | st.lists(st.sampled_from([b"a", b" ", b"\n", b"\xc3\xa9", b"\xe6\x97\xa5",
                                                               b"\xf0\x9f\x98\x80", b"\xff", b"\x80", b"\xc3",
                                                               b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00"]),
                                              max_size=40).map(b"".join),
       block=st.sampled_from([4, 5, 6, 9, 1 << 18]))
def test_a_streaming_read_skips_a_file_for_the_reason_a_whole_read_gives(tmp_path: Path, data: bytes, block: int) -> None:
    path = _write(tmp_path / "f.txt", data)
    index, reason = index_text_file(path, block_bytes=block)
    if b"\x00" in data[:8192]:
        assert reason == "binary (NUL bytes)"
        return
    text, whole_reason = decode_text(data)
    if whole_reason is None and not text.strip():
        whole_reason = "no text (empty after extraction)"
    assert reason == whole_reason
    if reason is None:
        assert TextFile(index).get(0, index.n_chars) == text


def test_a_streaming_scan_finds_what_a_whole_scan_finds(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    _write(root / "a.md", b"# Title\n\nHello there.\r\n")
    _write(root / "bom.txt", b"\xef\xbb\xbfWith a BOM \xc3\xa9.")
    _write(root / "only-bom.txt", b"\xef\xbb\xbf")
    _write(root / "blank.txt", b" \n\t\n")
    _write(root / "bin.txt", b"abc\x00def")
    _write(root / "late-bad.txt", b"x" * (1 << 18) + b"ok \xe6\x97" + b"\xff rest")  # a cut character behind a block edge
    _write(root / "p.html", b"<p>Para one.</p><p>Two</p>")
    _write(root / "r.jsonl", b'{"id": 1, "text": "one"}\n{"text": "two"}\n')
    _write(root / "code.py", "def f():\n    return '日本'\n".encode())
    whole = scan_corpus([root])
    streamed = scan_corpus([root], ReaderOptions(hold_text=False))

    def summary(scan):  # noqa: ANN001, ANN202
        return ([(s.key, s.sha256, s.n_bytes, s.kind, s.path) for s in scan.sources],
                [(k.path, k.reason, k.key) for k in scan.skipped])

    assert summary(streamed) == summary(whole)
    assert {k.reason for k in whole.skipped} >= {"binary (NUL bytes)", "no text (empty after extraction)",
                                                  f"not UTF-8 text (undecodable byte at offset {(1 << 18) + 3})"}
    for w, s in zip(whole.sources, streamed.sources):
        held = s.kind != "text"  # HTML and JSON Lines are parsed whole and keep their text
        assert (s.text is not None) == held and (s.index is None) == held
        opened = s.open_text()
        assert (opened if held else opened.get(0, len(opened))) == w.text


def _big_text(n_paragraphs: int) -> str:
    import random

    rng = random.Random(3)
    paras = []
    for i in range(n_paragraphs):
        words = " ".join(rng.choice(PIECES[:4] + ["dome", "night", "é", "日本"]) for _ in range(rng.randint(5, 120)))
        paras.append(f"{words}. Fact {i}." + rng.choice(["\n\n", "\n", " ", "\n \n\n"]))
    return "".join(paras)


def test_a_streamed_plan_makes_the_tasks_of_the_in_memory_plan_from_byte_ranges(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    _write(root / "big.md", _big_text(600).encode())
    _write(root / "small.txt", b"A short note.\n")
    _write(root / "page.html", b"<p>" + b"Para. " * 300 + b"</p>")
    held_sources = scan_corpus([root]).sources
    streamed_sources = scan_corpus([root], ReaderOptions(hold_text=False)).sources
    passages, counts = split_and_count(held_sources, TOK, max_passage_tokens=64)
    ids = np.arange(1000, 1000 + len(passages), dtype=np.int64)
    want = make_shard_tasks(passages, counts, ids, plan_id="cd" * 32, shard_tokens=700)
    planned = plan_passages(streamed_sources, TOK, max_passage_tokens=64)
    got = shard_tasks(planned, ids, plan_id="cd" * 32, shard_tokens=700)
    assert [(t.shard_id, t.doc_ids.tolist(), t.n_tokens, t.keys) for t in got] == \
        [(t.shard_id, t.doc_ids.tolist(), t.n_tokens, t.keys) for t in want]
    assert [t.load_passages() for t in got] == [list(t.passages) for t in want]
    big = [t for t in got if t.keys == ("notes/big.md",)]
    assert len(big) > 3 and all(p.passages is None and p.spans is not None for t in big for p in t.parts)
    # a task of a streamed file carries its ranges and the digests of its blocks, not the text
    sizes = [len(pickle.dumps(t)) for t in big]
    text_bytes = [sum(p.byte_end - p.byte_start for p in t.load_passages()) for t in big]
    assert max(sizes) < 2048 + 16 * max(t.n_docs for t in big), (sizes, text_bytes)


def _changed(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "same size":
        i = data.index(b"Fact 100.")
        path.write_bytes(data[:i] + b"Fact 101." + data[i + 9:])
    elif how == "shorter":
        path.write_bytes(data[:-10])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["same size", "shorter", "gone"])
def test_a_file_changed_between_plan_and_encode_fails_the_job_naming_it(tmp_path: Path, tiny_model_dir: Path,
                                                                         how: str) -> None:
    corpus = tmp_path / "notes"
    _write(corpus / "big.md", _big_text(150).encode())
    _write(corpus / "other.md", b"Another note.\n")
    store = tmp_path / "mem.msa"
    first = encode_corpus([corpus / "other.md"], store, model=str(tiny_model_dir), device="cpu", workers=1)
    assert first.committed
    job = encode_corpus([corpus], store, model=str(tiny_model_dir), device="cpu", compute=False,
                        shard_tokens=4096, max_passage_tokens=128)
    _changed(corpus / "big.md", how)   # after the plan, before any shard is encoded
    with pytest.raises(JobError, match=r"File '.*big\.md' \(source 'notes/big\.md'\) changed after this job read it") as e:
        job.compute(scheduler="synchronous")
    assert "Rerun the same command" in str(e.value)
    from msa_memory.store import open_store

    assert open_store(store).version == first.version   # nothing committed
    if how != "gone":
        again = encode_corpus([corpus], store, model=str(tiny_model_dir), device="cpu", workers=1,
                              shard_tokens=4096, max_passage_tokens=128)
        assert again.committed and again.files_added == ["notes/big.md", "notes/other.md"]
        docs = open_store(store).documents(columns=["source_path", "text", "file_sha256"]).to_pylist()
        big = [d for d in docs if d["source_path"] == "notes/big.md"]
        assert {d["file_sha256"] for d in big} == {hashlib.sha256((corpus / "big.md").read_bytes()).hexdigest()}
        assert " ".join(d["text"] for d in big).count("Fact 101.") == (2 if how == "same size" else 1)


def test_a_file_changed_during_the_plan_fails_it_naming_the_file(tmp_path: Path) -> None:
    text = "".join(f"Line {i} of the note.\n" + ("\n" if i % 7 == 0 else "") for i in range(2000))  # ASCII
    path = _write(tmp_path / "n.txt", text.encode())
    index, _ = index_text_file(path, block_bytes=4096)
    path.write_bytes(text[:5000].encode() + b"#" + text[5001:].encode())   # same size, block 1 differs
    tf = TextFile(index, "notes/n.txt")
    assert tf.get(0, 100) == text[:100]          # block 0 is unchanged
    with pytest.raises(JobError, match=r"n\.txt' \(source 'notes/n\.txt'\) changed .* bytes 4,096-8,192 differ"):
        split_passages(tf, "notes/n.txt", TOK, max_tokens=32)
    os.remove(path)
    with pytest.raises(JobError, match="cannot be read any more"):
        TextFile(index, "notes/n.txt").get(0, 10)


def test_a_task_with_its_text_needs_no_file(tmp_path: Path) -> None:
    """What the job sends to the workers of a given cluster (other hosts, sharing only the store):
    ``with_text`` reads the streamed parts on the client, so the task no longer refers to the file."""
    root = tmp_path / "notes"
    _write(root / "big.md", _big_text(200).encode())
    planned = plan_passages(scan_corpus([root], ReaderOptions(hold_text=False)).sources, TOK, max_passage_tokens=64)
    n = sum(len(p) for p in planned)
    tasks = shard_tasks(planned, np.arange(n, dtype=np.int64), plan_id="ef" * 32, shard_tokens=700)
    want = [t.load_passages() for t in tasks]
    shipped = [t.with_text() for t in tasks]
    assert all(p.passages is not None and p.index is None for t in shipped for p in t.parts)
    assert all(s.with_text() is s for s in shipped)
    (root / "big.md").unlink()
    assert [pickle.loads(pickle.dumps(t)).load_passages() for t in shipped] == want
