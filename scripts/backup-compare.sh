#!/usr/bin/env bash
# Backups against the plain-file operations they replace, side by side in one run, each pair
# measured ROUNDS times in alternating order, with the page cache dropped before every
# measurement when run as root (cold reads on both sides):
#
#   full push of a 1 GiB snapshot of random data   vs  cp of an equal raw file + sync
#   restore of that backup into a new pool         vs  dd of the raw file into a new file
#                                                      with conv=fdatasync
#   incremental pushes after 4 MiB of scattered change in a 64 GiB volume
#   two clones of a 256 MiB template pushed one after the other
#   push and restore against moto on loopback (if moto_server is installed)
#
#   bash scripts/backup-compare.sh [DIR] [ROUNDS]
set -euo pipefail
dir=${1:-$(mktemp -d)}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --features s3 --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
sv=$root/target/release/snapvol
mkdir -p "$dir"
rm -rf "$dir"/{a.img,b.img,big.img,t.img,repo,crepo,plain.raw,copy.raw,new.raw,data.raw}

drop() {
  sync
  # The disk may be mounted with `discard`: the deletes before a measurement issue their
  # discards after the journal commit, and a measurement must not pay for them.
  sleep 2
  sync
  if [ "$(id -u)" = 0 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}
# Seconds a command takes (after dropping the page cache).
timed() {
  drop
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

head -c $((1 << 30)) /dev/urandom > "$dir/plain.raw"
"$sv" pool create "$dir/a.img" --size 4G >/dev/null
"$sv" import "$dir/a.img" vol "$dir/plain.raw" >/dev/null
"$sv" snapshot "$dir/a.img" vol@s >/dev/null
id=$("$sv" list "$dir/a.img" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshots"][0]["id"])')

echo "== full push of 1 GiB (random data, 4 MiB chunks) vs cp + sync"
push=(); cp_=()
for r in $(seq "$rounds"); do
  # Each side deletes its own previous output before it runs; the order alternates.
  if [ $((r % 2)) = 1 ]; then
    rm -rf "$dir/repo"; push+=("$(timed "$sv" backup push "$dir/a.img" vol@s --to "$dir/repo")")
    rm -f "$dir/copy.raw"; cp_+=("$(timed sh -c "cp '$dir/plain.raw' '$dir/copy.raw' && sync")")
  else
    rm -f "$dir/copy.raw"; cp_+=("$(timed sh -c "cp '$dir/plain.raw' '$dir/copy.raw' && sync")")
    rm -rf "$dir/repo"; push+=("$(timed "$sv" backup push "$dir/a.img" vol@s --to "$dir/repo")")
  fi
done
echo "push rounds: ${push[*]}"
echo "cp rounds:   ${cp_[*]}"
mp=$(median "${push[@]}"); mc=$(median "${cp_[@]}")
printf 'push  %s s (median of %s)\ncp    %s s\nratio (cp time / push time) %.2f\n' "$mp" "$rounds" "$mc" "$(echo "$mc / $mp" | bc -l)"

echo "== restore of 1 GiB into a new pool vs dd into a new file with fdatasync"
res=(); dd_=()
for r in $(seq "$rounds"); do
  rm -f "$dir/b.img"
  "$sv" pool create "$dir/b.img" --size 4G >/dev/null
  res+=("$(timed "$sv" backup restore "$dir/repo" "$id" "$dir/b.img")")
  rm -f "$dir/new.raw"
  dd_+=("$(timed dd if="$dir/plain.raw" of="$dir/new.raw" bs=1M conv=fdatasync status=none)")
done
echo "restore rounds: ${res[*]}"
echo "dd rounds:      ${dd_[*]}"
mr=$(median "${res[@]}"); md=$(median "${dd_[@]}")
printf 'restore %s s\ndd      %s s\nratio (dd time / restore time) %.2f\n' "$mr" "$md" "$(echo "$md / $mr" | bc -l)"
cmp <("$sv" read "$dir/b.img" vol@s) "$dir/plain.raw" && echo "restored bytes equal the source"
rm -f "$dir/b.img" "$dir/new.raw" "$dir/copy.raw"

echo "== incremental push after 4 MiB of scattered change in a 64 GiB volume (1 GiB of data)"
"$sv" pool create "$dir/big.img" --size 16G >/dev/null
# 1 GiB of data, 1 MiB every 64 MiB, then the first backup.
python3 - "$dir/sparse.raw" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 30)
    for i in range(0, 64 << 10, 64):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
EOF
"$sv" import "$dir/big.img" big "$dir/sparse.raw" >/dev/null
rm -f "$dir/sparse.raw"
"$sv" snapshot "$dir/big.img" big@a >/dev/null
for chunk in 4M 256K 64K; do
  rm -rf "$dir/crepo"
  "$sv" backup init "$dir/crepo" --chunk-size $chunk >/dev/null
  # The base: everything written so far, pushed whole.
  "$sv" snapshot "$dir/big.img" "big@base$chunk" >/dev/null
  "$sv" backup push "$dir/big.img" "big@base$chunk" --to "$dir/crepo" >/dev/null
  for shape in "64x64K" "1024x4K"; do
    n=${shape%x*}; sz=${shape#*x}
    bytes=$(( ${sz%K} * 1024 ))
    python3 - "$sv" "$dir" "$n" <<'EOF' > "$dir/offsets"
import random, sys
random.seed(int(sys.argv[3]))
for _ in range(int(sys.argv[3])):
    print(random.randrange(0, (64 << 30) // 65536) * 65536)
EOF
    # One `write` per region (each a 4 KiB or 64 KiB write and a flush).
    while read -r off; do
      head -c $bytes /dev/urandom | "$sv" write "$dir/big.img" big - --offset "$off" >/dev/null
    done < "$dir/offsets"
    snap="b$chunk$shape"
    "$sv" snapshot "$dir/big.img" "big@$snap" >/dev/null
    drop
    t0=$(date +%s.%N)
    out=$("$sv" backup push "$dir/big.img" "big@$snap" --to "$dir/crepo" --json)
    t1=$(date +%s.%N)
    echo "$out" | python3 -c "import json,sys; j=json.load(sys.stdin); print('chunk $chunk, $n writes of $sz: %.3f s, %d chunks read, %d uploaded, %.1f MiB' % ($t1 - $t0, j['read_chunks'], j['uploaded_chunks'], j['uploaded_bytes']/2**20))"
  done
done
rm -f "$dir/big.img"

echo "== two clones of a 256 MiB template pushed one after the other"
"$sv" pool create "$dir/t.img" --size 2G >/dev/null
head -c $((256 << 20)) /dev/urandom > "$dir/data.raw"
"$sv" import "$dir/t.img" template "$dir/data.raw" >/dev/null
"$sv" snapshot "$dir/t.img" template@gold >/dev/null
"$sv" clone "$dir/t.img" template@gold w1 >/dev/null
"$sv" clone "$dir/t.img" template@gold w2 >/dev/null
"$sv" snapshot "$dir/t.img" w1@s w2@s >/dev/null
rm -rf "$dir/crepo"
a=$("$sv" backup push "$dir/t.img" w1@s --to "$dir/crepo" --json)
b=$("$sv" backup push "$dir/t.img" w2@s --to "$dir/crepo" --json)
python3 -c "import json; a=json.loads('$a'); b=json.loads('$b'); print('first %d bytes uploaded, second %d (%.3f%%)' % (a['uploaded_bytes'], b['uploaded_bytes'], 100*b['uploaded_bytes']/a['uploaded_bytes']))"

if command -v moto_server >/dev/null 2>&1; then
  echo "== push and restore of 256 MiB against moto on loopback"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  moto=$!
  trap 'kill $moto 2>/dev/null' EXIT
  for _ in $(seq 50); do curl -s "http://127.0.0.1:$port" >/dev/null && break; sleep 0.2; done
  curl -s -X PUT "http://127.0.0.1:$port/bench" >/dev/null
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
  s3=(--endpoint "http://127.0.0.1:$port" --region us-east-1 --path-style --allow-http)
  t0=$(date +%s.%N)
  "$sv" backup push "$dir/t.img" template@gold --to s3://bench/r "${s3[@]}" >/dev/null
  t1=$(date +%s.%N)
  tid=$("$sv" list "$dir/t.img" --json | python3 -c 'import json,sys; print([s["id"] for s in json.load(sys.stdin)["snapshots"] if s["name"]=="template@gold"][0])')
  "$sv" pool create "$dir/b.img" --size 2G >/dev/null
  t2=$(date +%s.%N)
  "$sv" backup restore s3://bench/r "$tid" "$dir/b.img" "${s3[@]}" >/dev/null
  t3=$(date +%s.%N)
  python3 -c "print('moto push %.1f MiB/s, restore %.1f MiB/s' % (256/($t1-$t0), 256/($t3-$t2)))"
fi
rm -rf "$dir"/{a.img,b.img,t.img,repo,crepo,plain.raw,data.raw,offsets}
