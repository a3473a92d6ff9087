#!/usr/bin/env bash
# Disk request throughput of the reference guest's virtio-blk driver, for two
# snapvmm binaries side by side (e.g. before and after a virtqueue change).
#   scripts/bench-virtio.sh OLD_BINARY NEW_BINARY [ROUNDS]
set -euo pipefail
old="$1" new="$2" rounds="${3:-3}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for i in $(seq "$rounds"); do
  for which in old new; do
    bin="$old"; [ "$which" = new ] && bin="$new"
    rm -f "$dir/d.raw" "$dir/serial"; truncate -s 64M "$dir/d.raw"
    s=$(date +%s%N)
    "$bin" run --mem 256M --disk "$dir/d.raw" --serial "file:$dir/serial" \
      --cmdline "workload=diskwrite disk_region=32M passes=3"
    e=$(date +%s%N)
    grep -q 'corrupt=0 disk_passes=3' "$dir/serial" || { echo "$which: guest did not finish cleanly" >&2; exit 1; }
    # 3 passes over 8192 blocks of 4 KiB (pass 1 writes; later passes read, check, write).
    echo "$which round $i: $(( (e - s) / 1000000 )) ms"
  done
done
