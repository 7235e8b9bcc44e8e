#!/usr/bin/env bash
# Builds blocksync and runs a real sync on generated files: a 256 MiB image, a copy of
# it, a few scattered changes, then a sync that writes only the changed blocks.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release
bin=target/x86_64-unknown-linux-gnu/release/blocksync
work=$(mktemp -d /var/tmp/blocksync-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "== generating a 256 MiB image in $work"
head -c $((256 << 20)) /dev/urandom >"$work/disk.img"
echo "== first sync: the destination is missing, every block is written"
"$bin" -f "$work/disk.img" "$work/backup.img"
echo "== changing 5 scattered 4 KiB pieces of the source"
for i in 1 2 3 4 5; do
    head -c 4096 /dev/urandom | dd of="$work/disk.img" bs=4096 seek=$((i * 12000)) conv=notrunc status=none
done
echo "== dry run: what would change"
"$bin" -n "$work/disk.img" "$work/backup.img"
echo "== second sync: only the changed blocks are written"
"$bin" -f "$work/disk.img" "$work/backup.img"
cmp "$work/disk.img" "$work/backup.img" && echo "== destination equals source, byte for byte"
