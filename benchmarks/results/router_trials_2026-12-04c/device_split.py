"""On the lent GPU: cut a trained adapter's weights (up to 7 layers, 23 MB) into two files under the call's 16 MiB cap."""
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, out = Path(sys.argv[1]), Path(os.environ["OUT"])
cand = src / "candidates"     # every candidate layer trained (the adapter itself keeps the layers chosen on dev)
shutil.copy(src / "router_adapter.json", out / "chosen_router_adapter.json")
shutil.copy(src / "training.json", out / "training.json")
if cand.is_dir():             # absent when every candidate was kept
    src = cand
d = load_file(src / "router_adapter.safetensors")
shallow = {k: v for k, v in d.items() if int(k.split(".")[2]) <= 11}
save_file(shallow, out / "w_shallow.safetensors")
save_file({k: v for k, v in d.items() if k not in shallow}, out / "w_deep.safetensors")
shutil.copy(src / "router_adapter.json", out / "router_adapter.json")
shutil.rmtree(Path(sys.argv[1]))
