#!/usr/bin/env bash
# Load benchmark of the release server on loopback (`make bench`). Prints one table.
#
# Builds target/release/image-server, generates grainy q90 JPEG originals with the vips CLI (the same
# recipe as the `photo` fixture in src/image/fixtures.rs, so these numbers line up with `make bench-micro`
# and docs/performance.md), and runs each workload against a freshly started server (so peak RSS is per
# workload) whose originals are a temporary directory (`source_store = "file://…"`):
#
#   W1 fit      3000x2000 q90 -> w300-q80.jpg (300x200), 8 and 32 connections
#   W2 cover    same original -> 300x400-q80.jpg, 8 connections
#               (W1 and W2 again with progressive_jpeg=false: baseline JPEG, what the default costs)
#   W3 large    6000x4000 q90 -> 300x400-q80.jpg, 8 connections
#   W4 formats  W1 as .webp and as .avif, 8 connections
#   W5 hits     one ~30 KB variant from the memory cache, 64 connections, next to nginx serving the same
#               bytes as a static file (sendfile, one worker per core); the two in alternating rounds
#   W6 stampede 200 simultaneous requests for one cold key: one origin fetch and one render expected
#   W7 page     a catalogue page: 6 versions of each id at once (w100, w200, w300, x150, 300x400 jpg,
#               w600 webp), cold; CPU per page against one W1 request; decode passes in the note
#   W8 prerender single requests for distinct ids (70 % w300, 30 % over 5 other versions), 1 connection,
#               prerender_popular 0 then 3: foreground p99, and the memory hit ratio of follow-ups
#   mixed       16 connections of valid cold JPEGs next to 16 connections of decoder bombs (a PNG whose
#               header claims 100000x100000, a GIF frame at offset 60000,60000)
#   attack      W1 fit at 8 connections (W1's server flags) for 30 s while scripts/attack.py, on the same
#               machine, holds 2000 idle sockets on the image port and 200 on the status port (sending
#               nothing; one the server closes is opened again), sends 50 hostile requests/s on fresh
#               connections, three kinds in turn: a JPEG scan bomb (flat grey 6000x6000, one AC scan
#               repeated 20000 times: made by bench.py with cjpeg, checked with djpeg), full_size.avif
#               of the 6000x4000 original, the mixed row's decoder bombs; and GETs /health on the status
#               port every 100 ms (fresh connection, 5 s timeout). Three rows, counting only what was
#               sent during the wrk run: the valid requests (req/s as a ratio of the W1 fit c=8 row,
#               target >= 0.7; non-2xx, target 0; peak RSS next to max_memory_mb), /health (p50/p99,
#               target p99 < 100 ms; a failed probe counts as 5000 ms) and the hostile answers by kind
#               and status. Without the W1 fit c=8 row (BENCH_ONLY), a quiet W1 run on the attack's
#               server comes first as the reference.
#
# Every render request names a different id (`/product/image/<n>/…`); all ids are hard links to one
# original, so each is a distinct URL and cache key while the bytes come from the page cache. Render
# workloads run with memory_cache_mb=0 and originals_cache_mb=0 (no result or original is kept; each
# request fetches and renders) and queue_size=64 avif_queue_size=64 (above every connection count, so the numbers measure
# rendering rather than 503 shedding; the extra "default queue" row shows what the default does).
# W5 and W6 run with the default caches, as in production.
#
# Columns: req/s counts 2xx answers only; req/CPU-s and CPU ms/req use the server process's
# utime+stime (/proc/PID/stat) over the wrk run, not wall time; cores = CPU-s per wall-s; p50/p99 come
# from wrk's latency histogram; peak RSS is VmHWM, since that server started (warm-up included);
# x floor = CPU per request / CPU of the bare decode, `djpeg -scale 1/8` (fit, large) or `-scale 1/4`
# (cover): the mean of 25 runs just before and 25 just after the row's wrk run (50 each at start-up
# for the report's header and the mixed row).
#
# The load generator runs on the same machine (wrk, one thread) and takes CPU from the server: on a
# 2-core box that costs the server a few percent at render rates and much more at W5's hit rates.
#
# Usage: scripts/bench.sh                 full run: 15 s per workload, 30 s for attack (+1 s warm-up),
#                                         ~10 min in all (+2-3 min the first time: the scan bomb's check)
#        BENCH_QUICK=1 scripts/bench.sh   smoke run: 2 s per workload (attack too), no warm-up, 10 floor runs
#        BENCH_DURATION=N                 seconds per workload, attack included (overrides both)
#        BENCH_ONLY='W1|W5'               only the workloads whose name matches this extended regex
#        BENCH_KEEP=1                     keep the temporary directory (server logs, wrk outputs)
# The report also goes to target/bench/report.txt; generated originals are kept in target/bench/inputs
# (delete it to regenerate). Needs: scripts/install-deps.sh build bench (wrk, nginx, djpeg, vips).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    duration=${BENCH_DURATION:-2}
    attack_duration=${BENCH_DURATION:-2}
    warmup=0
    floor_runs=10
else
    duration=${BENCH_DURATION:-15}
    # Longer than the others: a scan bomb's render can outlast 15 s, and the row is about what
    # builds up while the attack goes on.
    attack_duration=${BENCH_DURATION:-30}
    warmup=1
    floor_runs=50
fi
# Ids per original: more than any workload requests at these rates (ids wrap around after this, which
# is harmless with the caches off, and the table says so when it happens).
ids=20000
bomb_ids=30000
# wrk threads: one is plenty for these rates and leaves the cores to the server.
wrk_threads=1

for tool in wrk nginx djpeg cjpeg vips vipsheader curl python3 cargo; do
    command -v "$tool" >/dev/null || {
        echo "bench: $tool missing (scripts/install-deps.sh build bench)" >&2
        exit 1
    }
done

bench_py() { python3 "$root/scripts/bench.py" "$@"; }
say() { echo "bench: $*" >&2; }
# want NAME: whether BENCH_ONLY selects this workload.
want() { [ -z "${BENCH_ONLY:-}" ] || [[ $1 =~ $BENCH_ONLY ]]; }

work="$(mktemp -d "${TMPDIR:-/tmp}/image-server-bench.XXXXXX")"
# nginx workers run as an unprivileged user when the master is root: let them read the static file.
chmod 755 "$work"
started=() # every process this script starts; stopped on exit, whatever happens

# stop PID [SECONDS]: stops one process we started: TERM, then KILL after SECONDS (5).
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq $((${2:-5} * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    local pid
    for pid in "${started[@]}"; do stop "$pid"; done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Build, inputs, floor -----------------------------------------------------------------------

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
say "building the release binary"
cargo build --release --quiet --bin image-server
bin="$root/target/release/image-server"

inputs="$root/target/bench/inputs"
mkdir -p "$inputs"

# A grainy photo-like W×H q90 JPEG: the `photo` fixture of src/image/fixtures.rs in CLI form (x/y ramps,
# shared grain sigma 7 seed 7, per-band chroma noise sigma 3 seeds 11–13; 4:4:4 at Q 90, stripped).
#   photo_jpeg OUT W H
photo_jpeg() {
    local out=$1 w=$2 h=$3 gen="$work/gen"
    mkdir -p "$gen"
    (
        cd "$gen"
        vips xyz xy.v "$w" "$h"
        vips linear xy.v rg.v "$(awk "BEGIN { print 255 / $w, 255 / $h }")" "0 0"
        vips bandjoin_const rg.v base.v 128
        rm xy.v rg.v
        vips gaussnoise grain.v "$w" "$h" --sigma 7 --mean 0 --seed 7
        vips add base.v grain.v s1.v
        rm base.v grain.v
        for i in 0 1 2; do vips gaussnoise "c$i.v" "$w" "$h" --sigma 3 --mean 0 --seed $((11 + i)); done
        vips bandjoin "c0.v c1.v c2.v" chroma.v
        rm c0.v c1.v c2.v
        vips add s1.v chroma.v s2.v
        rm s1.v chroma.v
        vips cast s2.v s3.v uchar
        vips copy s3.v s4.v --interpretation srgb
        vips jpegsave s4.v "$out.tmp.jpg" --Q 90 --strip
    )
    mv "$out.tmp.jpg" "$out"
    rm -rf "$gen"
}

big="$inputs/big-3000x2000-q90.jpg"
large="$inputs/large-6000x4000-q90.jpg"
[ -f "$big" ] || { say "generating $big"; photo_jpeg "$big" 3000 2000; }
[ -f "$large" ] || { say "generating $large"; photo_jpeg "$large" 6000 4000; }

say "originals: hard links for $ids ids each, bombs"
src="$work/src"
mkdir -p "$src"
cp "$big" "$src/big.jpg"
cp "$large" "$src/large.jpg"
bench_py bombs "$src"
bench_py links "$src" "$src/big.jpg" "" "$ids"
bench_py links "$src" "$src/large.jpg" L "$ids"
bench_py links "$src" "$src/png-bomb" pb "$bomb_ids"
bench_py links "$src" "$src/gif-bomb" gb "$bomb_ids"
ln "$src/big.jpg" "$src/hit"
ln "$src/big.jpg" "$src/stampede"

# The attack row's JPEG scan bomb: kept with the originals, since checking it means a full djpeg
# decode of its 20004 scans (minutes of CPU). Only made when that row runs.
scan_bomb="$inputs/scan-bomb-6000x6000-20000.jpg"
if want attack; then
    if [ ! -f "$scan_bomb" ] || [ ! -f "$scan_bomb.txt" ]; then
        say "generating $scan_bomb (checked by a full djpeg decode: a few minutes)"
        bench_py scanbomb "$scan_bomb" 20000 >/dev/null
    fi
    cp "$scan_bomb" "$src/scan-bomb"
    bench_py links "$src" "$src/scan-bomb" sb "$bomb_ids"
fi

say "floor: djpeg CPU per image, $floor_runs runs each"
floor_fit="$(bench_py floor "$big" 1/8 "$floor_runs")"
floor_cover="$(bench_py floor "$big" 1/4 "$floor_runs")"
floor_large="$(bench_py floor "$large" 1/8 "$floor_runs")"

# The build and the generation above load the machine themselves: this is the figure that matters.
load_workloads="$(cut -d' ' -f1-3 /proc/loadavg)"
read -r port sport nport <<<"$(bench_py ports 3)"
results="$work/results.jsonl"
: >"$results"

# --- Server -------------------------------------------------------------------------------------

# The caller's IMAGE_SERVER_* variables and RUST_LOG would change the configuration under test.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(IMAGE_SERVER_|RUST_LOG$)' || true)

common=(
    --set "source_store=\"file://$src\""
    --set 'source_path="{id}"'
    --set 'result_store="none"'
    --set 'listen_address="127.0.0.1"'
    --set "server_port=$port"
    --set "status_port=$sport"
    --set 'log_level="warn"'
    --set 'shutdown_grace="2s"'
)
nocache=(--set memory_cache_mb=0 --set originals_cache_mb=0)
bigqueue=(--set queue_size=64 --set avif_queue_size=64)

server_pid=""
server_nofile="" # when set, the server's soft RLIMIT_NOFILE (the attack row sets it)
# start_server NAME [--set KEY=VALUE]...: starts and waits for /ready (10 s at most).
start_server() {
    local name=$1 i
    shift
    (
        if [ -n "$server_nofile" ]; then ulimit -Sn "$server_nofile"; fi
        exec "$bin" -e test "${common[@]}" "$@" serve
    ) >"$work/server-$name.log" 2>&1 &
    server_pid=$!
    started+=("$server_pid")
    for i in $(seq 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$sport/ready" && return 0
        if ! kill -0 "$server_pid" 2>/dev/null; then
            say "the server exited at start-up ($name):"
            cat "$work/server-$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    say "the server did not become ready in 10 s ($name)"
    exit 1
}

stop_server() {
    stop "$server_pid"
    # WARN lines are expected (refused bombs, 503s of the default-queue row); ERROR and panics are not.
    if grep -qE ' ERROR |panicked' "$work/server-$1.log"; then
        say "server log of $1 has errors (first lines):"
        grep -E ' ERROR |panicked' "$work/server-$1.log" | head -5 >&2
    fi
    server_pid=""
}

# Waits until nothing is rendering, queued or downloading, so a warm-up's tail is not billed to the
# measured run.
wait_idle() {
    local i
    for i in $(seq 150); do
        [ "$(bench_py status "$sport" processing.current)" = 0 ] &&
            [ "$(bench_py status "$sport" queue_depth)" = 0 ] &&
            [ "$(bench_py status "$sport" downloads.current)" = 0 ] && return 0
        sleep 0.1
    done
    say "warning: the server did not go idle in 15 s"
}

# --- wrk ----------------------------------------------------------------------------------------

# counter_lua FILE SUFFIX PREFIX...: each request takes the next id n (1..ids, disjoint per wrk
# thread) and the next prefix in turn: PREFIX<n>SUFFIX. The done() hook prints one `BENCH` line.
counter_lua() {
    local file=$1 suffix=$2 prefixes="" p
    shift 2
    for p in "$@"; do prefixes+="\"$p\", "; done
    cat >"$file" <<EOF
local prefixes = { $prefixes }
local suffix = "$suffix"
local modulo = $ids
local threads = $wrk_threads
local counter = 0
local created = {}
function setup(thread)
  thread:set("tid", #created)
  table.insert(created, thread)
end
function request()
  local n = counter * threads + (tid or 0)
  counter = counter + 1
  local p = prefixes[(n % #prefixes) + 1]
  local id = (math.floor(n / #prefixes) % modulo) + 1
  return wrk.format("GET", p .. id .. suffix)
end
EOF
    done_lua >>"$file"
}

# fixed_lua FILE PATH: every request is GET PATH (formatted in init: before it, wrk.headers has no
# Host yet, and nginx answers 400 to an HTTP/1.1 request without one).
fixed_lua() {
    cat >"$1" <<EOF
local req
function init(args) req = wrk.format("GET", "$2") end
function request() return req end
EOF
    done_lua >>"$1"
}

done_lua() {
    cat <<'EOF'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d status_errors=%d socket_errors=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
EOF
}

# run_wrk CONNS LUA OUT PORT [SECONDS]
run_wrk() {
    wrk -t"$wrk_threads" -c"$1" -d"${5:-$duration}s" --timeout 10s --latency -s "$2" \
        "http://127.0.0.1:$4/" >"$3" 2>&1 || {
        say "wrk failed:"
        cat "$3" >&2
        exit 1
    }
}

# probe URL: "WxH FORMAT, N KB" of one answer (checks the server really renders what we measure).
probe() {
    local out="$work/probe.bin" code
    code="$(curl -s -o "$out" -w '%{http_code}' "$1")"
    if [ "$code" != 200 ]; then
        echo "status $code"
        return
    fi
    # (libvips 8.14's heifload warns about nclx profiles on every AVIF: not ours to report)
    vipsheader -f width "$out" 2>/dev/null | tr '\n' x
    vipsheader -f height "$out" 2>/dev/null | tr '\n' ' '
    vipsheader -f vips-loader "$out" 2>/dev/null | sed 's/load.*//' | tr '\n' ' '
    awk "BEGIN { printf \"%.1f KB\", $(stat -c %s "$out") / 1024 }"
}

ids_note() { # wrk output file -> a note when the ids wrapped around
    local n
    n="$(sed -n 's/^BENCH requests=\([0-9]*\).*/\1/p' "$1")"
    [ "${n:-0}" -gt "$ids" ] && echo "; ids reused after $ids" || true
}

# row_floor "JPEG SCALE": djpeg's CPU per image now, over half the start-up floor's runs. Each render
# row measures it right before and right after its wrk run and divides by the mean of the two, so a
# drift of this VM's speed during the ~8 minutes of workloads (the floor alone moved 39.5-43.9 ms
# between runs) does not land on one side of the ratio only.
row_floor() {
    bench_py floor "${1% *}" "${1##* }" $(((floor_runs + 1) / 2))
}

# render_workload NAME CONNS PATH_PREFIX SUFFIX FLOOR_SPEC [SERVER ARGS...]
# FLOOR_SPEC is "JPEG SCALE" for djpeg, or empty for rows without a floor.
render_workload() {
    local name=$1 conns=$2 prefix=$3 suffix=$4 floor_spec=$5 lua="$work/w.lua" out="$work/wrk.out"
    local cpu0 cpu1 hwm note floor="" f0 f1
    shift 5
    want "$name" || return 0
    say "$name, $conns connections"
    start_server "$name" "$@"
    note="$(probe "http://127.0.0.1:$port$prefix$ids$suffix")"
    counter_lua "$lua" "$suffix" "$prefix"
    if [ "$warmup" = 1 ]; then
        run_wrk "$conns" "$lua" "$out" "$port" 1
        wait_idle
    fi
    [ -n "$floor_spec" ] && f0="$(row_floor "$floor_spec")"
    cpu0="$(bench_py cpu "$server_pid")"
    run_wrk "$conns" "$lua" "$out" "$port"
    cpu1="$(bench_py cpu "$server_pid")"
    wait_idle
    if [ -n "$floor_spec" ]; then
        f1="$(row_floor "$floor_spec")"
        floor="$(awk "BEGIN { printf \"%.2f\", ($f0 + $f1) / 2 }")"
        note+="; floor $f0/$f1 ms"
    fi
    hwm="$(bench_py hwm "$server_pid")"
    note+="$(ids_note "$out")"
    bench_py record name="$name" conns="$conns" wrk="$out" hwm_mb="$hwm" floor_ms="$floor" \
        cpu_s="$(awk "BEGIN { print $cpu1 - $cpu0 }")" note="$note" >>"$results"
    stop_server "$name"
}

# --- Workloads ----------------------------------------------------------------------------------

p=/product/image/
fit="$big 1/8"
cover="$big 1/4"
render_workload "W1 fit" 8 "$p" /w300-q80.jpg "$fit" "${nocache[@]}" "${bigqueue[@]}"
render_workload "W1 fit" 32 "$p" /w300-q80.jpg "$fit" "${nocache[@]}" "${bigqueue[@]}"
render_workload "W1 fit, default queue_size" 32 "$p" /w300-q80.jpg "$fit" "${nocache[@]}"
render_workload "W2 cover" 8 "$p" /300x400-q80.jpg "$cover" "${nocache[@]}" "${bigqueue[@]}"
# JPEG output is progressive by default; these rows show what that costs next to W1 and W2.
baseline=(--set progressive_jpeg=false)
render_workload "W1 fit, progressive_jpeg=false" 8 "$p" /w300-q80.jpg "$fit" \
    "${nocache[@]}" "${bigqueue[@]}" "${baseline[@]}"
render_workload "W2 cover, progressive_jpeg=false" 8 "$p" /300x400-q80.jpg "$cover" \
    "${nocache[@]}" "${bigqueue[@]}" "${baseline[@]}"
render_workload "W3 large cover" 8 "${p}L" /300x400-q80.jpg "$large 1/8" "${nocache[@]}" "${bigqueue[@]}"
render_workload "W4 fit webp" 8 "$p" /w300-q80.webp "" "${nocache[@]}" "${bigqueue[@]}"
render_workload "W4 fit avif" 8 "$p" /w300-q80.avif "" "${nocache[@]}" "${bigqueue[@]}"

# W5: memory-cache hits against nginx serving the same bytes (w1000 of the grainy original, ~30 KB).
# Both run at once but are measured in turn: W5_ROUNDS rounds of (image-server, nginx), each run a
# share of the workload's duration, so a drift of this VM's speed during the row (nginx alone moved
# 27-37 thousand req/s between single 15 s runs) lands on both sides of the ratio. The rows sum the
# rounds' requests and CPU; p50 is the median round's, p99 the worst round's.
w5_rounds=${W5_ROUNDS:-3}
w5_hits() {
    local hit_path=/product/image/hit/w1000-q80.jpg hwm x_cache hit_kb ratio i round secs
    local cpu_server=0 cpu_nginx=0 c0 c1
    say "W5 hits, 64 connections (image-server and nginx in turn, $w5_rounds rounds)"
    start_server w5
    mkdir -p "$work/static" "$work/nginx/tmp"
    chmod 755 "$work/static"
    curl -sf -o "$work/static/hit.jpg" "http://127.0.0.1:$port$hit_path"
    chmod 644 "$work/static/hit.jpg"
    x_cache="$(curl -sf -D - -o /dev/null "http://127.0.0.1:$port$hit_path" | tr -d '\r' |
        sed -n 's/^[Xx]-[Cc]ache: //p')"
    hit_kb="$(awk "BEGIN { printf \"%.1f\", $(stat -c %s "$work/static/hit.jpg") / 1024 }")"
    fixed_lua "$work/hit.lua" "$hit_path"

    cat >"$work/nginx/nginx.conf" <<EOF
worker_processes $cores;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $work/nginx/tmp/body;
    proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi;
    uwsgi_temp_path $work/nginx/tmp/uwsgi;
    scgi_temp_path $work/nginx/tmp/scgi;
    types { image/jpeg jpg; }
    server {
        listen 127.0.0.1:$nport;
        root $work/static;
    }
}
EOF
    nginx -p "$work/nginx/" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
    nginx_pid=$!
    started+=("$nginx_pid")
    for i in $(seq 50); do
        curl -sf -o /dev/null "http://127.0.0.1:$nport/hit.jpg" && break
        kill -0 "$nginx_pid" 2>/dev/null || {
            cat "$work/nginx/error.log" >&2
            exit 1
        }
        sleep 0.1
    done
    fixed_lua "$work/nginx.lua" /hit.jpg
    if [ "$warmup" = 1 ]; then
        run_wrk 64 "$work/hit.lua" "$work/wrk.out" "$port" 1
        run_wrk 64 "$work/nginx.lua" "$work/wrk.out" "$nport" 1
    fi
    secs=$(((duration + w5_rounds - 1) / w5_rounds))
    : >"$work/w5-server.out"
    : >"$work/w5-nginx.out"
    for round in $(seq "$w5_rounds"); do
        c0="$(bench_py cpu "$server_pid")"
        run_wrk 64 "$work/hit.lua" "$work/wrk.out" "$port" "$secs"
        c1="$(bench_py cpu "$server_pid")"
        cat "$work/wrk.out" >>"$work/w5-server.out"
        cpu_server="$(awk "BEGIN { print $cpu_server + $c1 - $c0 }")"
        c0="$(bench_py tree-cpu "$nginx_pid")"
        run_wrk 64 "$work/nginx.lua" "$work/wrk.out" "$nport" "$secs"
        c1="$(bench_py tree-cpu "$nginx_pid")"
        cat "$work/wrk.out" >>"$work/w5-nginx.out"
        cpu_nginx="$(awk "BEGIN { print $cpu_nginx + $c1 - $c0 }")"
    done
    hwm="$(bench_py hwm "$server_pid")"
    bench_py record name="W5 hit, image-server" conns=64 wrk="$work/w5-server.out" hwm_mb="$hwm" \
        cpu_s="$cpu_server" \
        note="$hit_kb KB from memory (X-Cache: ${x_cache:-?}); $w5_rounds rounds of $secs s" >>"$results"
    hwm="$(bench_py tree-hwm "$nginx_pid")"
    ratio="$(bench_py ratio "$work/w5-server.out" "$work/w5-nginx.out")"
    bench_py record name="W5 hit, nginx static" conns=64 wrk="$work/w5-nginx.out" hwm_mb="$hwm" \
        cpu_s="$cpu_nginx" \
        note="same bytes, sendfile, $cores workers (RSS: largest process); $ratio" >>"$results"
    stop "$nginx_pid"
    stop_server w5
}

# W6: one cold key, 200 requests at once, default caches.
w6_stampede() {
    say "W6 stampede, 200 requests for one cold key"
    start_server w6
    bench_py stampede "$port" "$sport" /product/image/stampede/w300-q80.jpg 200 "$server_pid" \
        >>"$results"
    stop_server w6
}

# Mixed attack: two wrk processes at once, so the valid half has its own latency histogram.
mixed_attack() {
    local cpu0 cpu1 hwm bomb_status bombs_pid u="http://127.0.0.1:$port/product/image"
    say "mixed: 16 connections of valid cold JPEGs + 16 of bombs"
    start_server mixed "${nocache[@]}" "${bigqueue[@]}"
    bomb_status="png $(curl -s -o /dev/null -w '%{http_code}' "$u/pb1/w300-q80.jpg")"
    bomb_status+=", gif $(curl -s -o /dev/null -w '%{http_code}' "$u/gb1/w300-q80.jpg")"
    counter_lua "$work/valid.lua" /w300-q80.jpg /product/image/
    counter_lua "$work/bombs.lua" /w300-q80.jpg /product/image/pb /product/image/gb
    if [ "$warmup" = 1 ]; then
        run_wrk 16 "$work/valid.lua" "$work/wrk.out" "$port" 1
        wait_idle
    fi
    cpu0="$(bench_py cpu "$server_pid")"
    run_wrk 16 "$work/bombs.lua" "$work/mixed-bombs.out" "$port" &
    bombs_pid=$!
    started+=("$bombs_pid")
    run_wrk 16 "$work/valid.lua" "$work/mixed-valid.out" "$port"
    wait "$bombs_pid"
    cpu1="$(bench_py cpu "$server_pid")"
    wait_idle
    hwm="$(bench_py hwm "$server_pid")"
    bench_py record name="mixed: valid half (W1 fit)" conns=16 wrk="$work/mixed-valid.out" \
        hwm_mb="$hwm" floor_ms="$floor_fit" cpu_s="$(awk "BEGIN { print $cpu1 - $cpu0 }")" \
        note="CPU columns: all server CPU (bombs too) per valid answer; compare W1 fit c=32$(ids_note "$work/mixed-valid.out")" \
        >>"$results"
    bench_py record name="mixed: bomb half" conns=16 wrk="$work/mixed-bombs.out" all_answers=1 \
        note="req/s: all answers (422 expected); PNG 100000x100000 header / GIF frame at 60000,60000, alternating; status: $bomb_status" \
        >>"$results"
    stop_server mixed
}

# Under attack: W1 fit c=8 with W1's flags while scripts/attack.py holds idle sockets open, sends
# hostile requests and probes /health (its doc comment has the details). Only what was sent between
# the start and the end of the wrk run counts, so the attacker's ramp-up (connecting 2,200 sockets)
# and the wait for the last hostile answers stay out of the figures.
under_attack() {
    local cpu0 cpu1 hwm t0 t1 attack_pid i u=/product/image
    say "attack: W1 fit, 8 connections, $attack_duration s, next to 2200 idle sockets," \
        "50 hostile requests/s and /health every 100 ms"
    # 2,200 idle sockets and up to 500 hostile requests waiting (50/s, 10 s timeout) need more
    # descriptors than the usual soft limit of 1024; the hard limit is as far as an unprivileged
    # user may raise it (and what the server raises its own soft limit to at start-up anyway).
    server_nofile="$(ulimit -Hn)"
    start_server attack "${nocache[@]}" "${bigqueue[@]}"
    server_nofile=""
    counter_lua "$work/valid.lua" /w300-q80.jpg /product/image/
    if [ "$warmup" = 1 ]; then
        run_wrk 8 "$work/valid.lua" "$work/wrk.out" "$port" 1
        wait_idle
    fi
    # The ratio compares with the W1 fit c=8 row of this run; when BENCH_ONLY left that row out, a
    # quiet run of the same length on this server (before any attacker) takes its place.
    if [ "$(bench_py has-row "$results" "W1 fit" 8)" = no ]; then
        say "attack: no W1 fit c=8 row in this run, a quiet reference run first"
        run_wrk 8 "$work/valid.lua" "$work/attack-quiet.out" "$port"
        wait_idle
        bench_py record name="attack: quiet W1 fit (reference)" conns=8 wrk="$work/attack-quiet.out" \
            note="this server before the attack; the W1 fit c=8 row did not run (BENCH_ONLY)" \
            >>"$results"
    fi

    rm -f "$work/attack.ready"
    # Ids: each hostile request names a different original, as the valid ones do (sb = scan bomb,
    # L = the 6000x4000 original, pb/gb = the decoder bombs); they wrap after $ids.
    python3 "$root/scripts/attack.py" "$port" "$sport" "$work/attack.json" "$work/attack.ready" \
        --idle 2000 --status-idle 200 --rate 50 --ids "$ids" --hostile-timeout 10 \
        --kind "scan bomb=$u/sb{n}/w300-q80.jpg" \
        --kind "full_size.avif=$u/L{n}/full_size.avif" \
        --kind "decoder bomb=$u/pb{n}/w300-q80.jpg,$u/gb{n}/w300-q80.jpg" \
        2>"$work/attack.log" &
    attack_pid=$!
    started+=("$attack_pid")
    # attack.py writes the file once every idle socket has connected (20 s at most).
    for i in $(seq 300); do
        [ -s "$work/attack.ready" ] && break
        kill -0 "$attack_pid" 2>/dev/null || {
            say "attack.py exited:"
            cat "$work/attack.log" >&2
            exit 1
        }
        sleep 0.1
    done
    [ -s "$work/attack.ready" ] || {
        say "attack.py did not get under way in 30 s"
        exit 1
    }
    # One second of hostile traffic before the valid one, so the run starts under attack.
    sleep 1

    t0="$(date +%s.%N)"
    cpu0="$(bench_py cpu "$server_pid")"
    run_wrk 8 "$work/valid.lua" "$work/attack-valid.out" "$port" "$attack_duration"
    cpu1="$(bench_py cpu "$server_pid")"
    t1="$(date +%s.%N)"
    # attack.py stops sending, closes its idle sockets and waits for the answers still due (each
    # request has its timeout, 10 s at most), then writes its results: 15 s before KILL.
    stop "$attack_pid" 15
    [ -s "$work/attack.json" ] || {
        say "attack.py wrote no results:"
        cat "$work/attack.log" >&2
        exit 1
    }
    hwm="$(bench_py hwm "$server_pid")"
    bench_py attack-record wrk="$work/attack-valid.out" attack="$work/attack.json" t0="$t0" t1="$t1" \
        results="$results" sport="$sport" hwm_mb="$hwm" cpu_s="$(awk "BEGIN { print $cpu1 - $cpu0 }")" \
        note="$(ids_note "$work/attack-valid.out")" >>"$results"
    stop_server attack
}

# W7 catalogue page: for each id, the six versions a product page asks for at once, cold (no memory
# cache; the originals cache on, as in production, so the six share one download). bench.py's page
# client loads 2 pages at a time, each page's 6 requests sent together on 6 keep-alive connections,
# and reports the server CPU per page against one W1 fit request of this run.
page_versions=w100.jpg,w200.jpg,w300.jpg,x150.jpg,300x400.jpg,w600.webp
w7_page() {
    say "W7 catalogue page, 6 versions per id at once, 2 pages at a time"
    start_server w7 --set memory_cache_mb=0 "${bigqueue[@]}"
    if [ "$warmup" = 1 ]; then
        bench_py pages port="$port" sport="$sport" pid="$server_pid" seconds=1 workers=2 \
            versions="$page_versions" ids="$ids" results="$results" >/dev/null
        wait_idle
    fi
    bench_py pages port="$port" sport="$sport" pid="$server_pid" seconds="$duration" workers=2 \
        versions="$page_versions" ids="$ids" results="$results" >>"$results"
    wait_idle
    stop_server w7
}

# W8 pre-render: single requests for distinct ids, 70 % w300.jpg and 30 % spread over five other
# versions, one connection (a site below its capacity: the pool has room between requests), with
# prerender_popular 0 and then 3. After each run, the three most popular versions other than w300
# are requested for 300 ids of the run: the share answered from memory is what pre-rendering bought.
w8_lua() {
    cat >"$1" <<EOF
local others = { "/w100.jpg", "/w200.jpg", "/x150.jpg", "/300x400.jpg", "/w600.jpg" }
local modulo = $ids
local counter = 0
function request()
  local n = counter
  counter = counter + 1
  local v = "/w300.jpg"
  if n % 10 >= 7 then v = others[((math.floor(n / 10) * 3 + n % 10 - 7) % 5) + 1] end
  return wrk.format("GET", "/product/image/" .. ((n % modulo) + 1) .. v)
end
EOF
    done_lua >>"$1"
}
w8_prerender() {
    local n cpu0 cpu1 hwm lua="$work/w8.lua" out="$work/wrk.out" follow
    for n in 0 3; do
        say "W8 pre-render, prerender_popular=$n"
        start_server "w8-$n" --set prerender_popular="$n"
        w8_lua "$lua"
        cpu0="$(bench_py cpu "$server_pid")"
        run_wrk 1 "$lua" "$out" "$port"
        cpu1="$(bench_py cpu "$server_pid")"
        wait_idle
        sleep 1 # background renders still running when the pool looked idle
        follow="$(bench_py followup "$port" "$sport" 300 w300.jpg)"
        hwm="$(bench_py hwm "$server_pid")"
        bench_py record name="W8 pre-render, prerender_popular=$n" conns=1 wrk="$out" hwm_mb="$hwm" \
            cpu_s="$(awk "BEGIN { print $cpu1 - $cpu0 }")" note="follow-up: $follow" >>"$results"
        if [ "$n" = 3 ]; then
            mkdir -p "$root/target/bench"
            curl -s "http://127.0.0.1:$sport/versions" >"$root/target/bench/versions.json" || true
        fi
        stop_server "w8-$n"
    done
}

cores="$(nproc)"
if want "W7 page"; then w7_page; fi
if want "W8 pre-render"; then w8_prerender; fi
if want "W5 hit"; then w5_hits; fi
if want "W6 stampede"; then w6_stampede; fi
if want "mixed"; then mixed_attack; fi
if want "attack"; then under_attack; fi

# --- Report -------------------------------------------------------------------------------------

mkdir -p "$root/target/bench"
{
    echo "image-server load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n), $cores cores," \
        "load average at start: $load_before, before the workloads: $load_workloads"
    echo "binary: target/release/image-server $(git describe --always --dirty 2>/dev/null || echo '?');" \
        "wrk -t$wrk_threads on the same machine, loopback; $duration s per workload" \
        "$([ "$warmup" = 1 ] && echo '(+1 s warm-up)' || echo '(no warm-up: BENCH_QUICK)')"
    echo "originals: $(vipsheader "$big" | sed 's/.*: //; s/ .*//') $(du -k "$big" | cut -f1) KB," \
        "$(vipsheader "$large" | sed 's/.*: //; s/ .*//') $(du -k "$large" | cut -f1) KB (q90, 4:4:4, grainy)"
    echo "floor (djpeg CPU per image, mean of $floor_runs): -scale 1/8 = $floor_fit ms (W1)," \
        "-scale 1/4 = $floor_cover ms (W2), 6000x4000 -scale 1/8 = $floor_large ms (W3);" \
        "each row's x floor divides by the mean of djpeg runs just before and after that row (notes)"
    echo "server: W1-W4, mixed and attack with memory_cache_mb=0 originals_cache_mb=0 queue_size=64 avif_queue_size=64" \
        "(unless noted); W5, W6 with the defaults; restarted for each row (peak RSS is per row)"
    if want attack; then
        echo "attack: $attack_duration s; $(cat "$scan_bomb.txt")"
    fi
    echo
    bench_py table "$results"
} | tee "$root/target/bench/report.txt"
