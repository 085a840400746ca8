#!/bin/bash
# On the lent GPU: keep this call's part of carry NAME in /tmp/parts_NAME; once all N are there, check the
# whole tar's sha256 against the one taken here and unpack it into /tmp (the carry folder NAME).
# Usage: parts.sh NAME N SHA256 PARTDIR
set -euo pipefail
name=$1; n=$2; sha=$3; dir=$4
mkdir -p /tmp/parts_$name
cp $dir/$name.tar.* /tmp/parts_$name/
ls -la /tmp/parts_$name
if [ "$(ls /tmp/parts_$name | wc -l)" = "$n" ]; then
  got=$(cat /tmp/parts_$name/$name.tar.* | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "carry $name: sha256 $got, expected $sha"; exit 3; }
  cat /tmp/parts_$name/$name.tar.* | tar xf - -C /tmp
  echo "carry $name unpacked into /tmp/$name"
fi
