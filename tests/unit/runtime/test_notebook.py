"""The quickstart notebook (notebooks/quickstart.ipynb) runs end to end under nbclient.

It encodes a small folder with ``encode_corpus`` (tiny random MSA checkpoint, synchronous Dask
scheduler), opens the store, searches and asks in text / pooled / interleave modes.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_notebook.py -q
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("MSA_NOTEBOOK_MODEL", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in c.get("outputs", []))
               for c in nb.cells if c.cell_type == "code"]
    assert any("Memory(store=" in o for o in outputs)
    assert any("notes/doors.txt" in o for o in outputs)                  # documents table / search hits
    html = [o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("<caption>msa_memory.Memory</caption>" in h for h in html)  # Memory's HTML repr rendered
    assert any("<b>Q:</b>" in h for h in html)                            # Answer's HTML repr rendered
