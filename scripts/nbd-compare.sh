#!/usr/bin/env bash
# The NBD server against nbdkit's file plugin and qemu-nbd serving a raw file of the same size,
# measured side by side with fio's nbd engine (libnbd), each job run for every server in turn,
# the order rotating each round. Both the pool volume and the raw file are written whole first,
# so writes overwrite allocated blocks on every side.
#
#   bash scripts/nbd-compare.sh [DIR] [ROUNDS]
#
# Needs: fio (with the nbd engine), nbdkit, qemu-nbd (apt-get install fio nbdkit qemu-utils).
set -euo pipefail
dir=${1:-$(mktemp -d)}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --features nbd --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
snapvol=$root/target/release/snapvol
size=1G
rm -f "$dir"/{pool.img,plain.raw,*.sock}
"$snapvol" pool create "$dir/pool.img" --size 4G >/dev/null
"$snapvol" create "$dir/pool.img" vm --size $size >/dev/null
# Both files are written with 1 MiB writes (the size `snapvol import` uses): on ext4 the
# cost of a later 4 KiB overwrite depends on the size of the page-cache folios the first
# write left (BENCHMARKS.md), so both sides must start alike.
head -c $((1 << 30)) /dev/urandom > "$dir/source.raw"
dd if="$dir/source.raw" of="$dir/plain.raw" bs=1M status=none
"$snapvol" import "$dir/pool.img" filled "$dir/source.raw" >/dev/null
rm -f "$dir/source.raw"
"$snapvol" destroy "$dir/pool.img" vm >/dev/null
"$snapvol" rename "$dir/pool.img" filled vm >/dev/null
sync

"$snapvol" nbd "$dir/pool.img" --socket "$dir/snapvol.sock" 2>"$dir/snapvol.log" &
pids=$!
nbdkit --exit-with-parent -f -U "$dir/nbdkit.sock" file "$dir/plain.raw" &
pids="$pids $!"
qemu-nbd -f raw -x vm -k "$dir/qemu.sock" --persistent --shared=4 --cache=writeback "$dir/plain.raw" &
pids="$pids $!"
trap 'kill $pids 2>/dev/null || true' EXIT
for s in snapvol nbdkit qemu; do
  for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
done
sleep 0.5

uri() {
  case $1 in
    snapvol) echo "nbd+unix:///vm?socket=$dir/snapvol.sock" ;;
    nbdkit) echo "nbd+unix:///?socket=$dir/nbdkit.sock" ;;
    qemu-nbd) echo "nbd+unix:///vm?socket=$dir/qemu.sock" ;;
  esac
}

jobs=("randwrite 4k 1" "randread 4k 1" "randwrite 4k 16" "randread 4k 16" "write 1m 4" "read 1m 4")
servers=(snapvol nbdkit qemu-nbd)
declare -A results
for ((r = 0; r < rounds; r++)); do
  for job in "${jobs[@]}"; do
    read -r rw bs depth <<<"$job"
    for ((i = 0; i < ${#servers[@]}; i++)); do
      s=${servers[$(((i + r) % ${#servers[@]}))]}
      iops=$(fio --name=j --ioengine=nbd --uri="$(uri "$s")" --rw="$rw" --bs="$bs" \
        --iodepth="$depth" --size=$size --runtime=4 --time_based --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))')
      results["$job/$s"]+="$iops "
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-18s %10s %10s %10s %18s %18s\n' job snapvol nbdkit qemu-nbd "snapvol/nbdkit" "snapvol/qemu-nbd"
for job in "${jobs[@]}"; do
  a=$(echo "${results["$job/snapvol"]}" | median)
  b=$(echo "${results["$job/nbdkit"]}" | median)
  c=$(echo "${results["$job/qemu-nbd"]}" | median)
  printf '%-18s %10s %10s %10s %17.2fx %17.2fx\n' "$job" "$a" "$b" "$c" \
    "$(echo "$a / $b" | bc -l)" "$(echo "$a / $c" | bc -l)"
done
echo "(IOPS, median of $rounds rounds of 4 s; fio nbd engine; jobs: rw bs iodepth)"
