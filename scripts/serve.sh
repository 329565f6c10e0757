#!/usr/bin/env bash
# The main job: `nvhtm serve` on a pool in /dev/shm (emulated persistent memory, strict mode),
# written through the Redis protocol, killed with kill -9 in the middle of the writes, restarted,
# and checked: every write it acknowledged is there; then a key's time to live and a MULTI/EXEC
# transaction across one more kill -9. Needs only the Rust toolchain and bash (it
# talks to the server through bash's /dev/tcp; redis-cli works the same way against it).
#
#   ./scripts/serve.sh [ROUNDS]        (default 5 kills)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin nvhtm
nvhtm=target/release/nvhtm
rounds=${1:-5}
dir=$(mktemp -d /dev/shm/nvhtm-serve.XXXXXX)
pool=$dir/serve.pool
log=$dir/serve.log
server=
trap '[ -n "$server" ] && kill -9 "$server" 2>/dev/null; rm -rf "$dir"' EXIT

# Starts the server on a free port and waits for its startup line; sets $server and $port.
start() {
    : >"$log"
    "$nvhtm" serve --pool "$pool" --port 0 2>"$log" &
    server=$!
    for _ in $(seq 1 500); do
        if grep -q "listening on" "$log"; then
            port=$(grep -o "listening on [0-9.]*:[0-9]*" "$log" | head -1 | sed 's/.*://')
            grep "listening on" "$log" | sed 's/^/  server: /'
            return
        fi
        kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.01
    done
    echo "the server did not start"; cat "$log"; exit 1
}

# Sends one inline command on fd 3 and reads its one-line reply into $reply.
ask() {
    printf '%s\r\n' "$*" >&3
    IFS= read -r reply <&3
    reply=${reply%$'\r'}
}

acked=0      # keys k0 .. k(acked-1) were acknowledged by some run
echo "== $rounds rounds: write keys until kill -9, restart, check every acknowledged key"
for round in $(seq 1 "$rounds"); do
    start
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    # Every acknowledged key of earlier rounds must be there, with its value.
    lost=0
    for ((from = 0; from < acked; from += 500)); do
        to=$((from + 500 < acked ? from + 500 : acked))
        for ((i = from; i < to; i += 1)); do
            printf 'GET k%d\r\n' "$i" >&3 # pipelined, 500 at a time
        done
        for ((i = from; i < to; i += 1)); do
            IFS= read -r len <&3
            if [ "${len%$'\r'}" = '$-1' ]; then
                lost=$((lost + 1))
            else
                IFS= read -r value <&3
                [ "${value%$'\r'}" = "v$i" ] || lost=$((lost + 1))
            fi
        done
    done
    ask DBSIZE
    echo "  round $round: restarted with ${reply#:} keys; $acked acknowledged before, $lost lost"
    [ "$lost" = 0 ] || { echo "LOST $lost acknowledged writes"; exit 1; }
    # Write new keys, one acknowledgement at a time, and kill the server at a random point.
    target=$((acked + 500 + RANDOM % 1500))
    while [ "$acked" -lt "$target" ]; do
        ask SET "k$acked" "v$acked"
        [ "$reply" = "+OK" ] || { echo "unexpected reply: $reply"; exit 1; }
        acked=$((acked + 1))
    done
    printf 'SET k%d v%d\r\n' "$acked" "$acked" >&3   # in flight when the kill lands
    kill -9 "$server"
    wait "$server" 2>/dev/null || true
    server=
    exec 3>&-
done
start
exec 3<>"/dev/tcp/127.0.0.1/$port"
ask DBSIZE
echo "== after the last kill: ${reply#:} keys, $acked acknowledged (the one in flight may or may not be there)"
echo "== a time to live and a transaction, then kill -9"
ask SET session token EX 3600
echo "  SET session token EX 3600 -> $reply"
ask MULTI
ask INCRBY balance:a -10
ask INCRBY balance:b 10
ask EXEC
IFS= read -r a <&3
IFS= read -r b <&3
echo "  MULTI; INCRBY balance:a -10; INCRBY balance:b 10; EXEC -> $reply ${a%$'\r'} ${b%$'\r'}"
kill -9 "$server"
wait "$server" 2>/dev/null || true
exec 3>&-
start
exec 3<>"/dev/tcp/127.0.0.1/$port"
ask TTL session
echo "  after the restart: TTL session -> $reply"
ask INCRBY balance:a 0
a=$reply
ask INCRBY balance:b 0
echo "  balance:a $a, balance:b $reply (EXEC was answered: both durable. A crash inside an EXEC could"
echo "  leave a prefix of it on this mapped pool; on FAMS pools it is all or nothing, see the README)"
echo "== SHUTDOWN closes the pool cleanly"
ask SHUTDOWN || true
wait "$server" 2>/dev/null || true
server=
"$nvhtm" info "$pool" | grep -iE "clean|size" || true
