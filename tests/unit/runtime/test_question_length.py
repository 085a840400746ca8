"""A question longer than Memory takes is refused before any forward: fast, in little memory.

The issue's repro: `msa search` with a 119 KB question used 4.2 GB and 41 s on the default model and
was killed at 24 GB on the tiny byte-level model (one token per byte). Memory takes at most
``max_question_tokens`` tokens (and never more than the model's context); beyond that search, route
and ask raise ConfigError naming the length in tokens, the limit and what to do, and the CLI exits 2.
Run: .venv/bin/python -m pytest tests/unit/runtime/test_question_length.py -q
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msa_memory.errors import ConfigError

BIN = Path(sys.executable).parent
HUGE = ("What is the blue door code? " * 4300)[:119_000]   # 119 KB: 119,000 tokens of the byte-level tokenizer


def _n_tokens(mem, text: str) -> int:
    return len(mem.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_question_at_the_limit_is_served_one_token_more_is_refused(tiny_memory):
    mem = tiny_memory
    limit = mem.question_token_limit
    ctx = mem.model.hf_model.config.max_position_embeddings
    assert limit == min(mem.max_question_tokens, ctx) and limit > 0
    at_limit, over = "a" * limit, "a" * (limit + 1)
    assert _n_tokens(mem, at_limit) == limit and _n_tokens(mem, over) == limit + 1
    assert mem.search(at_limit, k=2).num_rows == 2
    for call in (lambda q: mem.search(q, k=2), lambda q: mem.route(q), lambda q: mem.ask(q, mode="text", max_new_tokens=1),
                 lambda q: mem.ask(q, mode="pooled", max_new_tokens=1), lambda q: mem.ask(q, mode="interleave", max_new_tokens=1)):
        with pytest.raises(ConfigError) as caught:
            call(over)
        msg = str(caught.value)
        assert f"{limit + 1:,} tokens" in msg and f"{limit:,}" in msg and "max_question_tokens" in msg, msg
    with pytest.raises(ConfigError, match=f"{limit + 1:,} tokens"):   # token ids count the same
        mem.search(mem.tokenizer(over, add_special_tokens=False)["input_ids"], k=2)


def test_huge_question_is_refused_fast(tiny_memory):
    mem = tiny_memory
    with pytest.raises(ConfigError):   # without a limit this search would run HUGE's forward in this process
        mem.search("a" * (mem.question_token_limit + 1), k=2)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        mem.search(HUGE, k=2)
    assert time.perf_counter() - t0 < 5.0
    assert "119,000 tokens" in str(caught.value)


# Linux counts the RSS of the address space a process had before exec (here: a fork of this pytest process)
# in its ru_maxrss, so `msa` is started from a small Python that reports its peak RSS from wait4.
_MEASURED = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "p.returncode = os.waitstatus_to_exitcode(status)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
             "sys.exit(p.returncode)\n")


def _run_capped(args: list[str], cap_bytes: int, rss_file: Path) -> tuple[int, str, str, int]:
    """Run `msa ARGS` with its data segment capped; (exit code, stdout, stderr, peak RSS in bytes).

    RLIMIT_DATA (private writable memory: heap, anonymous mappings, where tensors live), not RLIMIT_AS: the
    address space also counts mapped libraries (a CUDA build of torch maps several GB of them) and thread-pool
    reservations that grow with the core count, neither of which is memory the command uses. NumPy's OpenBLAS
    gets one thread for the same reason (it reserves a buffer per thread at import; the command does not use it).
    """
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    env = {**os.environ, "MSA_DISABLE_PROGRESS_BARS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _MEASURED, str(rss_file), str(BIN / "msa"), *args], capture_output=True,
                       text=True, preexec_fn=cap, env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr, int(rss_file.read_text())


@pytest.mark.parametrize("command", ["search", "ask"])
def test_cli_refuses_a_119_kb_question_with_exit_code_2_in_little_memory(tiny_store, tiny_msa_model, command,
                                                                         tmp_path):
    args = [command, str(tiny_store.root), HUGE, "--model", tiny_msa_model.source["path"], "--device", "cpu", "--json"]
    rc, out, err, peak = _run_capped(args, 4 << 30, tmp_path / "rss")   # before the fix the forward ran out of this and died
    assert rc == 2, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["type"] == "ConfigError" and res["exit_code"] == 2
    assert "119,000 tokens" in res["error"] and "2,048" in res["error"]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert peak < 1.5 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"
