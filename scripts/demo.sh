#!/usr/bin/env bash
# The main job: build nvhtm, create a pool on /dev/shm (emulated persistent memory), inspect and
# check it, grow it in place, show the crash simulator catching broken persistence protocols,
# then the crash demo: a map survives 20 kill -9s with every acknowledged key intact.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin nvhtm
nvhtm=target/release/nvhtm
pool=${1:-/dev/shm/nvhtm-demo.pool}
rm -f "$pool"

echo "== nvhtm create $pool --size 64MiB"
"$nvhtm" create "$pool" --size 64MiB
echo
echo "== nvhtm info $pool"
"$nvhtm" info "$pool"
echo
echo "== nvhtm check $pool   (recovery on a private mapping, then a walk of the heap)"
"$nvhtm" check "$pool"
echo
echo "== nvhtm grow $pool 256MiB   (in place: the mapping's address range is reserved, nothing is copied)"
"$nvhtm" grow "$pool" 256MiB
"$nvhtm" info "$pool" --json | grep -E '"(size|clean_shutdown|state_seq)"'
echo
echo "== nvhtm info on something that is not a pool (a specific error, exit status 1)"
"$nvhtm" info /etc/hostname 2>&1 || echo "(exit status $?)"
echo
echo "== nvhtm litmus: every crash image of small persistence protocols, correct and broken"
"$nvhtm" litmus
echo
echo "== nvhtm demo: a writer process is killed with SIGKILL 20 times while inserting 10^6 keys"
"$nvhtm" demo --keys 1000000 --rounds 20
