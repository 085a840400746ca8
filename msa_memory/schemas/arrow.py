"""Arrow schemas of the per-shard document table (``shards/{shard_id}/docs.parquet``) and of a shard's
lexical postings (``postings.ANALYZER.parquet``, see ``store/lexical.py``).

One row per document (an MSA "document" = one passage). The table is written once with its
shard and never changed: deletions live in per-version deletion files, not in this table.
``store.documents()`` returns these columns for the live documents of a version, in the order
of the version's shards (``shard_id`` says where each row lives).

No I/O here; the store writes the table with Parquet page checksums so a flipped byte is caught.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["DOCUMENT_SCHEMA", "DOCUMENT_COLUMNS", "POSTINGS_SCHEMA", "document_schema"]

#: Columns of the document table, in order, with their meaning.
DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),  # store id, never reused
        pa.field("source_path", pa.string(), nullable=False),  # file the passage came from
        pa.field("passage_index", pa.int64(), nullable=False),  # index of the passage in its file
        pa.field("byte_start", pa.int64(), nullable=False),  # UTF-8 byte range in the source file
        pa.field("byte_end", pa.int64(), nullable=False),
        pa.field("file_sha256", pa.string(), nullable=False),  # hash of the whole source file
        pa.field("text_sha256", pa.string(), nullable=False),  # hash of the passage text (UTF-8)
        pa.field("n_tokens", pa.int64(), nullable=False),  # tokens of the wrapped document
        pa.field("n_chunks", pa.int64(), nullable=False),  # ceil(n_tokens / chunk_tokens)
        pa.field("chunk_start", pa.int64(), nullable=False),  # first chunk row inside the shard
        pa.field("shard_id", pa.string(), nullable=False),  # shard holding the arrays
        pa.field("text", pa.large_string(), nullable=False),  # raw passage text
    ],
    metadata={"msa_memory.table": "documents"},
)
DOCUMENT_COLUMNS: tuple[str, ...] = tuple(DOCUMENT_SCHEMA.names)

#: Lexical postings of a shard: one row per distinct term of a document, sorted by doc_id then term_hash
#: (a document's length is the sum of its tf). The writer adds ``msa_lexical_analyzer`` to the metadata.
POSTINGS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),  # store id of the document
        pa.field("term_hash", pa.uint64(), nullable=False),  # blake2b-64 of the term (UTF-8), little-endian
        pa.field("tf", pa.int32(), nullable=False),  # occurrences of the term in the document
    ],
    metadata={"msa_memory.table": "postings"},
)


def document_schema() -> pa.Schema:
    """The document table schema (same object as :data:`DOCUMENT_SCHEMA`)."""
    return DOCUMENT_SCHEMA
