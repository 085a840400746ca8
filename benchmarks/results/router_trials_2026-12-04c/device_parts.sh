#!/bin/bash
# On the lent GPU: gather the carry's parts (one a call: the tree + a whole pack is over a call's 64 MiB),
# and once all are there, unpack them into /tmp/NAME and check them against the digests taken here.
# Usage: device_parts.sh [NAME [DIR]]: NAME late (the parts in .devcarry/v) or tpl (in .devcarry/w).
set -euo pipefail
name=${1:-late}
dir=${2:-.devcarry/v}
mkdir -p /tmp/parts_$name
cp $dir/$name.tar.* /tmp/parts_$name/
ls -la /tmp/parts_$name
if [ "$(ls /tmp/parts_$name | wc -l)" = 5 ]; then
  cat /tmp/parts_$name/$name.tar.* | tar xf - -C /tmp
  (cd /tmp/$name && sha256sum data.npz pack/tensors.bin)
fi
