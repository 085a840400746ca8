"""Router projections trained over MSA's aligned 64-token chunks and chunks shifted by 32 tokens (A+S),
beside the same recipe over aligned chunks alone (A), from one feature extraction.

device_train.py's gpu step, with two changes: every passage's x̄ is pooled over both grids from the same
forward (probe_grids_scale's pooling: the shifted grid leaves each document's first 32 tokens out, its
"no head" grid), and the training is run twice on those features: once with each document's A and S
chunks (its routing score the max over both, chunk_reduce max over their union: what routing with both
grids does), saved to $OUT/adapter, then with its A chunks alone (MSA), saved to $OUT/adapter_A. Both
keep every candidate layer (no greedy selection). Same pairs, negatives, seed and TrainConfig; the dev
set is scored with the grids its run was trained on. With --feature-cache the A+S features and their
grid mask are kept (and reused by a later call, e.g. --only A after a call that ran out of time).

Usage: probe_train_shifted.py --carry /tmp/sm --batch-tokens 131072 --feature-cache /tmp/feats_sm [--only AS|A]
Writes $OUT/adapter, $OUT/adapter_A and $OUT/train_shifted.json."""
import json, os, sys, time
from pathlib import Path
import torch
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT / "benchmarks" / "results" / "router_trials_2026-12-02f"), str(ROOT), str(ROOT / "benchmarks")]
import probe_grids_scale as PG   # noqa: E402  (A+S pooling from one forward; its patches are applied below)
import msa_memory.encode.encoder as E  # noqa: E402
import msa_memory.encode.forward as F  # noqa: E402
import msa_memory.train.recipe as R  # noqa: E402
import msa_memory.train.features as FE  # noqa: E402
from msa_memory.train.trainer import Features  # noqa: E402
import device_train  # noqa: E402

MASKS: list[torch.Tensor] = []   # per encoded batch: True where a chunk is a shifted one
FEAT_MASK: dict[str, torch.Tensor] = {}   # the same per feature set ("train", "dev")
ONLY = None   # --only AS|A: run one of the two trainings
_run_training, _save, _load = R.run_training, FE.save_features, FE.load_features


def encode_tokens(self, seqs):
    pb = PG.encode_tokens(self, seqs)
    MASKS.append(PG.G["mask"].cpu())
    return pb


def a_only(f: Features, mask: torch.Tensor) -> Features:
    keep = ~mask
    return Features(f.layers, f.x_chunks[:, keep], f.chunk_doc[keep], f.n_docs, f.q_x, f.q_offsets,
                    f.positives, f.kinds, f.hard_negatives)


def _split_masks(n_train: int) -> None:
    """The masks of this call's extraction: train's batches first, then dev's."""
    if not FEAT_MASK:
        m = torch.cat(MASKS)
        FEAT_MASK["train"], FEAT_MASK["dev"] = m[:n_train], m[n_train:]


def save_features(f: Features, path: str) -> None:   # the grid mask beside the cached features
    if Path(path).stem == "train":
        _split_masks(f.x_chunks.shape[1])
    _save(f, path)
    torch.save(FEAT_MASK[Path(path).stem], path + ".mask")


def load_features(path: str) -> Features:
    f = _load(path)
    FEAT_MASK[Path(path).stem] = torch.load(path + ".mask", weights_only=True)
    return f


def run_training(*, out, features, **kw):
    tr, dv = features
    _split_masks(tr.x_chunks.shape[1])
    mt, md = FEAT_MASK["train"], FEAT_MASK["dev"]
    assert len(mt) == tr.x_chunks.shape[1] and len(md) == dv.x_chunks.shape[1], (len(mt), len(md))
    kw["keep_layers"] = True
    res = {"chunks": {"train_A": int((~mt).sum()), "train_S": int(mt.sum()), "dev_A": int((~md).sum()),
                      "dev_S": int(md.sum())}}
    first = None
    for grid in ("AS", "A"):
        if ONLY and grid != ONLY:
            continue
        o = Path(out) if grid == "AS" else Path(out).parent / "adapter_A"
        t0 = time.perf_counter()
        f = (tr, dv) if grid == "AS" else (a_only(tr, mt), a_only(dv, md))
        print(f"== training over grid {grid}: {f[0].x_chunks.shape[1]} train chunks -> {o}", flush=True)
        s = _run_training(out=o, features=f, **kw)
        res[grid] = {"out": str(o), "router_id": s["router_id"], "router_layers": s["router_layers"],
                     "dev_recall": s["dev_recall"], "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({grid: res[grid]}, default=str), flush=True)
        first = first or s
        if grid == "A":   # device_train's record lands in $OUT/adapter only: the A run gets its own note
            rec = json.loads((o / "training.json").read_text())
            rec["probe"] = "probe_train_shifted.py: aligned chunks only (the A+S run's features, S chunks dropped)"
            (o / "training.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    Path(os.environ.get("OUT", ".")).mkdir(parents=True, exist_ok=True)
    (Path(os.environ.get("OUT", ".")) / "train_shifted.json").write_text(json.dumps(res, indent=1, default=str))
    if "AS" not in res:   # device_train reads $OUT/adapter/training.json afterwards
        import shutil
        shutil.copytree(Path(out).parent / "adapter_A", out)
    return first


if __name__ == "__main__":
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        ONLY = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        assert ONLY in ("AS", "A"), ONLY
    F.Backbone.run, E.Encoder.encode_tokens = PG.run, encode_tokens
    R.run_training, FE.save_features, FE.load_features = run_training, save_features, load_features
    device_train.main(["gpu", *sys.argv[1:]])
