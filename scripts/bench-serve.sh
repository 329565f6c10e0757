#!/usr/bin/env bash
# redis-benchmark against `nvhtm serve` and redis-server with the same durability promise, same
# command lines, same run, side by side (issue 12, "Benchmarks"; a script, not CI):
#
#   nvhtm --mode strict, mapped pool       vs  redis appendonly yes, appendfsync always
#   nvhtm --mode strict, FAMS pool         vs  redis appendonly yes, appendfsync always
#     (group commit)
#   nvhtm --mode hybrid                    vs  redis appendonly yes, appendfsync always
#     (DRAM index over a log, group commit)
#   nvhtm --mode periodic (Dalí map)       vs  redis appendonly yes, appendfsync everysec
#   nvhtm --mode fams (sync every 1000 ms) vs  redis save "1 1" (a snapshot each second with a change), no AOF
#
# on /dev/shm and on a disk directory, for SET, GET, INCR, MSET with 50 clients and pipelining 1
# and 16. Prints a table of requests per second and each nvhtm mode's ratio to its Redis
# counterpart, and writes it with a description of the machine to
# target/bench-serve/results-<time>.md. Restart times after kill -9 are not measured here yet.
#
# Usage: scripts/bench-serve.sh [-n requests] [-d disk-dir] [-s shm-dir] [-c configs] [--nvhtm path]
#   -n        requests per redis-benchmark run (default 100000)
#   -c        the configurations to measure, comma-separated (default: all): strict, group,
#             hybrid, always (redis appendfsync always), periodic, everysec (redis appendfsync
#             everysec), fams, save (redis save 1 1); e.g. -c hybrid,always for the durable-write
#             rows of the hybrid map
#   -d        a directory on a disk file system (default target/bench-serve/data)
#   -s        a directory on tmpfs (default /dev/shm; empty to skip)
#   --nvhtm   a built nvhtm binary (default: cargo build --release)
# Needs redis-server and redis-benchmark (Debian: redis-server, redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

requests=100000
disk_dir=target/bench-serve/data
shm_dir=/dev/shm
nvhtm=
configs=strict,group,hybrid,always,periodic,everysec,fams,save
while [ $# -gt 0 ]; do
    case "$1" in
        -n) requests=$2; shift 2 ;;
        -d) disk_dir=$2; shift 2 ;;
        -s) shm_dir=$2; shift 2 ;;
        -c) configs=$2; shift 2 ;;
        --nvhtm) nvhtm=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
for tool in redis-server redis-benchmark redis-cli; do
    command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install redis-server redis-tools)" >&2; exit 1; }
done
if [ -z "$nvhtm" ]; then
    cargo build --release --quiet --bin nvhtm
    nvhtm=target/release/nvhtm
fi

out_dir=target/bench-serve
mkdir -p "$out_dir" "$disk_dir"
results="$out_dir/results-$(date -u +%Y%m%dT%H%M%SZ).md"
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

clients=50
tests=set,get,incr,mset
redis_port=${REDIS_PORT:-16379}

# Starts nvhtm serve with the given arguments; sets $port and $pid.
start_nvhtm() {
    local log=$work/nvhtm.log
    : >"$log"
    "$nvhtm" serve --port 0 "$@" 2>"$log" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 600); do
        port=$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$log" | head -1)
        [ -n "$port" ] && return
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "nvhtm serve did not start" >&2
    exit 1
}

# Starts redis-server in directory $1 with the remaining arguments; sets $port and $pid.
start_redis() {
    local dir=$1
    shift
    redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --daemonize no --logfile "$work/redis.log" "$@" &
    pid=$!
    pids+=("$pid")
    port=$redis_port
    for _ in $(seq 600); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "redis-server did not start" >&2
    exit 1
}

stop() {
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait "$pid" 2>/dev/null || true
}

# Runs the benchmark against $port with pipelining $1; prints "test rps" lines.
bench() {
    redis-benchmark -p "$port" -n "$requests" -c "$clients" -P "$1" -r 100000 -t "$tests" --csv 2>/dev/null |
        awk -F'","|"' 'NR > 1 && $2 != "" { split($2, name, " "); printf "%s %s\n", name[1], $3 }'
}

# Whether configuration $1 was asked for (-c).
wanted() {
    case ",$configs," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

declare -A rps
# Measures one configuration if asked for: $1 its -c name, $2 label, $3 "nvhtm" or "redis",
# then the start arguments.
measure() {
    local config=$1 label=$2 kind=$3
    shift 3
    wanted "$config" || return 0
    if [ "$kind" = nvhtm ]; then start_nvhtm "$@"; else start_redis "$@"; fi
    for pipeline in 1 16; do
        while read -r test value; do
            rps["$label|P$pipeline|$test"]=$value
        done < <(bench "$pipeline")
    done
    stop
}

locations=()
[ -n "$shm_dir" ] && locations+=("$shm_dir")
locations+=("$disk_dir")
rows=()
for loc in "${locations[@]}"; do
    where=$(df -T "$loc" | awk 'NR == 2 { print $2 }')
    d=$loc/nvhtm-bench-$$
    rm -rf "$d"
    mkdir -p "$d/redis-aof" "$d/redis-rdb"
    mkdir -p "$d/redis-everysec"
    wanted group && "$nvhtm" create --fams "$d/group.pool" --size 256MiB >/dev/null
    measure strict "$loc strict (mapped)" nvhtm --pool "$d/strict.pool" --mode strict --size 256MiB
    measure group "$loc strict (FAMS, group commit)" nvhtm --pool "$d/group.pool" --mode strict
    measure hybrid "$loc hybrid (group commit)" nvhtm --pool "$d/hybrid.pool" --mode hybrid --size 256MiB
    measure always "$loc redis appendfsync always" redis "$d/redis-aof" --appendonly yes --appendfsync always --save ""
    measure periodic "$loc periodic (Dalí)" nvhtm --pool "$d/periodic.pool" --mode periodic --size 256MiB
    measure everysec "$loc redis appendfsync everysec" redis "$d/redis-everysec" --appendonly yes --appendfsync everysec --save ""
    measure fams "$loc fams (sync 1000 ms)" nvhtm --pool "$d/fams.pool" --mode fams --size 256MiB --sync-ms 1000
    measure save "$loc redis save 1 1" redis "$d/redis-rdb" --appendonly no --save "1 1"
    rm -rf "$d"
    for pair in "strict|strict (mapped)|always|redis appendfsync always" \
        "group|strict (FAMS, group commit)|always|redis appendfsync always" \
        "hybrid|hybrid (group commit)|always|redis appendfsync always" \
        "periodic|periodic (Dalí)|everysec|redis appendfsync everysec" \
        "fams|fams (sync 1000 ms)|save|redis save 1 1"; do
        IFS='|' read -r mine mode _ peer <<<"$pair"
        if wanted "$mine"; then
            rows+=("$loc ($where)|$mode|$peer")
        fi
    done
done

{
    echo "# nvhtm serve vs redis-server ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, $(free -g | awk '/Mem:/ { print $2 }') GiB, $(uname -sr)"
    echo "- nvhtm: $("$nvhtm" --version 2>/dev/null || echo "?") at $(git rev-parse --short HEAD 2>/dev/null || echo "?") ($nvhtm)"
    echo "- redis: $(redis-server --version | awk '{ print $3 }')"
    echo "- redis-benchmark -n $requests -c $clients -r 100000 -t $tests, -P 1 and -P 16, one run each"
    echo
    echo "| location | nvhtm | Redis with the same promise | pipeline | test | nvhtm req/s | Redis req/s | ratio |"
    echo "|---|---|---|---|---|---|---|---|"
    for row in "${rows[@]}"; do
        IFS='|' read -r where mode peer <<<"$row"
        loc=${where%% (*}
        for pipeline in 1 16; do
            for test in SET GET INCR MSET; do
                a=${rps["$loc $mode|P$pipeline|$test"]:-}
                b=${rps["$loc $peer|P$pipeline|$test"]:-}
                ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f×", a / b }')
                echo "| $where | $mode | $peer | $pipeline | $test | ${a:--} | ${b:--} | $ratio |"
            done
        done
    done
} | tee "$results"
echo
echo "written to $results"
