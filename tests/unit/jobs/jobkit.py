"""Write a minimal valid one-page PDF with a line of text (a test fixture; xref offsets computed)."""

from __future__ import annotations


def minimal_pdf(text: str) -> bytes:
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 12 Tf 72 720 Td ({safe}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# ----------------------------------------------------------------------------- job test helpers

import hashlib  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_WORDS = ("dome telescope mirror night shift summit road weather humidity wind cryostat detector "
          "archive pipeline frame observer operator engineer pager rota fuel generator tank shuttle "
          "visitor badge policy travel leave booking safety oxygen radio channel log fault").split()


def write_tiny_model(path: Path, family: str = "qwen3", seed: int = 0) -> Path:
    """Save a tiny random-weight HF model + byte-level tokenizer (msa_memory.encode.tiny) to ``path``."""
    from msa_memory.encode.tiny import tiny_model, tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_corpus(root: Path, n_files: int, *, seed: int = 0, words: tuple[int, int] = (20, 60)) -> Path:
    """``n_files`` small Markdown files of made-up sentences under ``root`` (deterministic)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        n = rng.randint(*words)
        text = f"# Note {i}\n\n" + " ".join(rng.choice(_WORDS) for _ in range(n)) + f". Fact {i}: value {rng.randint(0, 9999)}.\n"
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"note{i:03d}.md").write_text(text)
    return root


def store_digest(root: Path) -> dict:
    """Everything a version holds, as comparable values: docs (id, path, text...) and tensor hashes."""
    from msa_memory.store import open_store

    s = open_store(root)
    cols = ["doc_id", "source_path", "passage_index", "byte_start", "byte_end", "file_sha256", "n_tokens",
            "n_chunks", "text"]
    docs = sorted(s.documents(columns=cols).to_pylist(), key=lambda r: r["doc_id"])
    ids = [d["doc_id"] for d in docs]
    kv = s.load_kv(ids) if ids else []
    kv_hash = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in kv]
    router = []
    for layer in range(s.identity.n_layers):
        keys, chunk_doc = s.router_keys(layer)
        order = np.argsort(chunk_doc, kind="stable")
        router.append(hashlib.sha256(np.ascontiguousarray(keys[order]).tobytes() + chunk_doc[order].tobytes()).hexdigest())
    for j in range(len(s.identity.shifted_layers)):                      # the shifted router-key grid, if any
        keys, chunk_doc = s.router_keys_shifted(j)
        order = np.argsort(chunk_doc, kind="stable")
        router.append(hashlib.sha256(np.ascontiguousarray(keys[order]).tobytes() + chunk_doc[order].tobytes()).hexdigest())
    return {"docs": docs, "kv": kv_hash, "router": router, "n_docs": len(docs)}


def edit(path: Path, text: str) -> None:
    path.write_text(text)
    os.utime(path)


def assert_same_content(a: Path, b: Path, *, router_ulps: int = 0) -> None:
    """Stores ``a`` and ``b`` hold the same documents, bit-identical K̄/V̄, and router keys within
    ``router_ulps`` bf16 ulps (0: bit-identical). Router keys come from a small GEMM whose reduction
    order may depend on the torch thread count, which differs between worker layouts."""
    from msa_memory.store import open_store

    da, db = store_digest(a), store_digest(b)
    assert da["docs"] == db["docs"]
    assert da["kv"] == db["kv"]
    sa, sb = open_store(a), open_store(b)
    for layer in range(sa.identity.n_layers):
        (ka, ca), (kb, cb) = sa.router_keys(layer), sb.router_keys(layer)
        assert np.array_equal(ca, cb)
        ulps = np.abs(ka.astype(np.int32) - kb.astype(np.int32))  # bf16 bit patterns
        assert ulps.max(initial=0) <= router_ulps, f"layer {layer}: router keys differ by up to {ulps.max()} bf16 ulps"
