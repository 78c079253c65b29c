#!/usr/bin/env bash
# A fleet on this machine, on loopback (127.0.0.1) only: nginx in front of N image-server instances
# that share one S3 result store (SeaweedFS, `weed mini`). deploy/fleet/README.md explains the
# layout; the nginx configuration is deploy/fleet/nginx.conf with the ports filled in.
#
# Usage: scripts/fleet.sh COMMAND
#   up N               start SeaweedFS, N instances and nginx; returns once every part answers
#   down               stop everything `up` started, and nothing else
#   status             each part with its ports and PID, and whether it answers
#   start-instance K   (re)start instance K on its ports: a fresh process, empty memory cache
#   stop-instance K    stop instance K (SIGTERM: it drains, then exits)
#
# Environment:
#   FLEET_DIR            state: configuration, logs, PIDs, store data, fleet.env (default target/fleet)
#   FLEET_BIN            the image-server binary (default target/release/image-server, built if missing)
#   FLEET_PORT           first port of a fixed layout: nginx P, instance K on P+K (images) and P+100+K
#                        (status), SeaweedFS on P+200..P+204; default: free ports picked at random
#   FLEET_SOURCE_DOMAIN  HTTP origin of the originals, e.g. http://127.0.0.1:9000 (default: the
#                        repository's samples/, as `make run` serves them)
#   FLEET_NGINX          nginx binary (default /usr/sbin/nginx, else nginx on PATH)
#   FLEET_WEED           SeaweedFS binary (default weed on PATH)
#
# $FLEET_DIR/fleet.env (shell syntax) names every port and PID: FLEET_NGINX_PORT, FLEET_NGINX_PID,
# FLEET_INSTANCES, FLEET_INSTANCE_{K}_PORT / _STATUS_PORT / _PID, FLEET_S3_ENDPOINT, FLEET_WEED_PID…
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEET_DIR="${FLEET_DIR:-$root/target/fleet}"
mkdir -p "$FLEET_DIR"
FLEET_DIR="$(cd "$FLEET_DIR" && pwd)"
layout="$FLEET_DIR/layout.env"
envfile="$FLEET_DIR/fleet.env"
piddir="$FLEET_DIR/pids"
logdir="$FLEET_DIR/logs"

# S3 credentials SeaweedFS checks signatures against; it only listens on loopback.
S3_ACCESS_KEY="fleet-access-key"
S3_SECRET_KEY="fleet-secret-key"
S3_BUCKET="results"

say() { echo "fleet: $*"; }
die() {
    echo "fleet: $*" >&2
    exit 1
}

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# --- processes ----------------------------------------------------------------------------------

# True when PID is alive and is ours: its command line names the state directory (a PID reused by
# an unrelated process after ours died is left alone).
ours() {
    local pid="$1"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] &&
        { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$FLEET_DIR/"
}

# True while PID runs (a child that exited but was not reaped yet is a zombie: not running). Right
# after `spawn`, before its exec, a child's command line is still this script's, so `ours` would
# not know it yet.
alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" && [ -n "$state" ] && [[ "$state" != Z* ]]
}

pid_of() { cat "$piddir/$1.pid" 2>/dev/null || true; }

# Starts a command detached (its own session, stdio to a log) and records its PID as NAME.
spawn() {
    local name="$1"
    shift
    setsid "$@" </dev/null >>"$logdir/$name.log" 2>&1 &
    local pid=$! i
    echo "$pid" >"$piddir/$name.pid"
    # Until it has exec'd, `ours` (and so `down`) would not recognise it.
    for ((i = 0; i < 100; i++)); do
        if ours "$pid" || ! alive "$pid"; then break; fi
        sleep 0.05
    done
}

# Sends SIGNAL to NAME's process if it is ours, waits up to SECONDS for it to exit, then SIGKILLs.
stop() {
    local name="$1" signal="$2" seconds="$3" pid
    pid="$(pid_of "$name")"
    if ! ours "$pid"; then
        rm -f "$piddir/$name.pid"
        return 0
    fi
    kill "-$signal" "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < seconds * 10; i++)); do
        ours "$pid" || break
        sleep 0.1
    done
    if ours "$pid"; then
        # The whole process group: `spawn` made it, so it holds only this part's processes (for
        # nginx, the master and its workers, which a SIGKILLed master would leave running).
        say "$name (PID $pid) still running after ${seconds}s: SIGKILL"
        local group mine
        group="$(ps -o pgid= -p "$pid" | tr -d ' ')"
        mine="$(ps -o pgid= -p $$ | tr -d ' ')"
        if [ "$group" = "$pid" ] && [ "$group" != "$mine" ]; then
            kill -KILL -- "-$group" 2>/dev/null || true
        fi
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            ours "$pid" || break
            sleep 0.1
        done
    fi
    rm -f "$piddir/$name.pid"
}

# Prints the end of NAME's log, for a failure message.
log_tail() {
    echo "--- last lines of $logdir/$1.log:" >&2
    tail -n 30 "$logdir/$1.log" >&2 2>/dev/null || true
}

# --- ports --------------------------------------------------------------------------------------

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

taken=" "
# Sets VAR to a free loopback port below the kernel's ephemeral range (so it cannot be handed to an
# outgoing connection meanwhile), one not picked before. With "pair", port + 10000 must be free
# too: SeaweedFS puts each service's gRPC there.
pick_port() {
    local var="$1" pair="${2:-}" p i
    for ((i = 0; i < 500; i++)); do
        p=$((20000 + RANDOM % 2700))
        case "$taken" in *" $p "* | *" $((p + 10000)) "*) continue ;; esac
        port_free "$p" || continue
        if [ -n "$pair" ]; then port_free $((p + 10000)) || continue; fi
        taken+="$p $((p + 10000)) "
        printf -v "$var" '%s' "$p"
        return 0
    done
    die "no free loopback port found in 20000-22700"
}

# --- readiness ----------------------------------------------------------------------------------

http_code() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" 2>/dev/null || true
}

# Waits up to SECONDS for CHECK (a command) to succeed while NAME's process lives.
wait_for() {
    local name="$1" seconds="$2" what="$3"
    shift 3
    local i pid
    pid="$(pid_of "$name")"
    for ((i = 0; i < seconds * 10; i++)); do
        if "$@"; then return 0; fi
        if ! alive "$pid"; then
            log_tail "$name"
            die "$name exited before $what"
        fi
        sleep 0.1
    done
    log_tail "$name"
    die "$name: no $what within ${seconds}s"
}

# Ready means a signed write succeeds: the S3 port answers a moment before the filer and volume
# server behind it accept data.
s3_ready() {
    [ "$(http_code -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --data-binary ready \
        "http://127.0.0.1:$S3_PORT/$S3_BUCKET/.ready-probe")" = 200 ]
}

instance_ready() { [ "$(http_code "http://127.0.0.1:$1/ready")" = 200 ]; }

nginx_ready() { [ "$(http_code "http://127.0.0.1:$NGINX_PORT/")" != 000 ]; }

# --- state files --------------------------------------------------------------------------------

load_layout() {
    [ -r "$layout" ] || die "no fleet in $FLEET_DIR (run: scripts/fleet.sh up N)"
    # shellcheck source=/dev/null
    . "$layout"
}

# fleet.env: the layout plus the PIDs now, written whole (readers never see half a file).
write_env() {
    {
        echo "# Written by scripts/fleet.sh; the fleet in $FLEET_DIR."
        echo "FLEET_DIR=$FLEET_DIR"
        echo "FLEET_INSTANCES=$INSTANCES"
        echo "FLEET_NGINX_PORT=$NGINX_PORT"
        echo "FLEET_NGINX_PID=$(pid_of nginx)"
        echo "FLEET_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
        echo "FLEET_S3_BUCKET=$S3_BUCKET"
        echo "FLEET_S3_ACCESS_KEY=$S3_ACCESS_KEY"
        echo "FLEET_S3_SECRET_KEY=$S3_SECRET_KEY"
        echo "FLEET_RESULT_STORE=s3://$S3_BUCKET/fleet"
        echo "FLEET_WEED_PID=$(pid_of weed)"
        echo "FLEET_WEED_PORTS=\"master=$WEED_MASTER volume=$WEED_VOLUME filer=$WEED_FILER s3=$S3_PORT admin=$WEED_ADMIN\""
        local k port status
        for ((k = 1; k <= INSTANCES; k++)); do
            port="INSTANCE_${k}_PORT"
            status="INSTANCE_${k}_STATUS_PORT"
            echo "FLEET_INSTANCE_${k}_PORT=${!port}"
            echo "FLEET_INSTANCE_${k}_STATUS_PORT=${!status}"
            echo "FLEET_INSTANCE_${k}_PID=$(pid_of "instance-$k")"
        done
    } >"$envfile.tmp"
    mv "$envfile.tmp" "$envfile"
}

# --- parts --------------------------------------------------------------------------------------

find_bin() {
    if [ -n "${FLEET_BIN:-}" ]; then
        [ -x "$FLEET_BIN" ] || die "FLEET_BIN=$FLEET_BIN is not an executable"
        BIN="$FLEET_BIN"
        return
    fi
    BIN="$root/target/release/image-server"
    if [ ! -x "$BIN" ]; then
        say "building $BIN (cargo build --release; several minutes the first time)"
        (cd "$root" && cargo build --release --bin image-server) >&2
    fi
}

start_weed() {
    local weed="${FLEET_WEED:-weed}"
    command -v "$weed" >/dev/null || die "SeaweedFS ($weed) is not installed (scripts/install-deps.sh test)"
    mkdir -p "$FLEET_DIR/weed"
    AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" \
        spawn weed "$weed" mini "-dir=$FLEET_DIR/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        "-master.port=$WEED_MASTER" "-volume.port=$WEED_VOLUME" "-filer.port=$WEED_FILER" \
        "-s3.port=$S3_PORT" "-admin.port=$WEED_ADMIN" -s3.port.iceberg=0 -s3.port.lance=0 \
        -webdav=false -admin.ui=false "-bucket=$S3_BUCKET"
    wait_for weed 60 "S3 answer on port $S3_PORT" s3_ready
    say "SeaweedFS ready: S3 on 127.0.0.1:$S3_PORT, bucket $S3_BUCKET (PID $(pid_of weed))"
}

stop_weed() {
    stop weed TERM 15
    # A killed weed leaves its admin gRPC socket behind (named after admin port + 10000).
    if [ -n "${WEED_ADMIN:-}" ]; then
        rm -f "${TMPDIR:-/tmp}/seaweedfs-admin-grpc-$((WEED_ADMIN + 10000)).sock"
    fi
}

# The configuration every instance shares; each gets its ports as flags.
write_instance_config() {
    local source
    if [ -n "${FLEET_SOURCE_DOMAIN:-}" ]; then
        source="source_domain = \"$FLEET_SOURCE_DOMAIN\""
    else
        source="source_store = \"file://$root/samples\""
    fi
    cat >"$FLEET_DIR/instance.toml" <<EOF
# Written by scripts/fleet.sh: what every instance of the fleet shares (ports come as flags).
listen_address = "127.0.0.1"
$source
# The shared result store: a variant one instance rendered is read by the others (X-Cache: remote).
result_store = "s3://$S3_BUCKET/fleet"
s3_endpoint = "http://127.0.0.1:$S3_PORT"
s3_allow_http = true
s3_access_key_id = "$S3_ACCESS_KEY"
s3_secret_access_key = "$S3_SECRET_KEY"
statsd_host = ""
shutdown_grace = "5s"
log_level = "info"
EOF
}

start_instance() {
    local k="$1" port status name="instance-$1"
    port="INSTANCE_${k}_PORT"
    status="INSTANCE_${k}_STATUS_PORT"
    port="${!port}"
    status="${!status}"
    port_free "$port" || die "$name: port $port is in use"
    port_free "$status" || die "$name: status port $status is in use"
    spawn "$name" "$BIN" --config "$FLEET_DIR/instance.toml" --server-port "$port" \
        --status-port "$status" serve
}

wait_instance() {
    local k="$1" status="INSTANCE_${1}_STATUS_PORT" port="INSTANCE_${1}_PORT"
    wait_for "instance-$k" 60 "200 from /ready on port ${!status}" instance_ready "${!status}"
    say "instance $k ready: images on 127.0.0.1:${!port}, status on 127.0.0.1:${!status} (PID $(pid_of "instance-$k"))"
}

# The instance's PID as its status page tells it (a SIGHUP restart replaces the process), else the
# one recorded at start.
refresh_instance_pid() {
    local k="$1" status="INSTANCE_${1}_STATUS_PORT" pid
    pid="$(curl -s --max-time 2 "http://127.0.0.1:${!status}/" 2>/dev/null |
        grep -o '"pid": *[0-9]*' | grep -o '[0-9]*$' || true)"
    if [ -n "$pid" ] && ours "$pid"; then echo "$pid" >"$piddir/instance-$k.pid"; fi
}

stop_instance() {
    refresh_instance_pid "$1"
    stop "instance-$1" TERM 30
}

start_nginx() {
    local nginx="${FLEET_NGINX:-}"
    if [ -z "$nginx" ]; then
        if [ -x /usr/sbin/nginx ]; then nginx=/usr/sbin/nginx; else nginx="$(command -v nginx || true)"; fi
    fi
    if [ -z "$nginx" ] || [ ! -x "$nginx" ]; then
        die "nginx is not installed (scripts/install-deps.sh test)"
    fi
    local dir="$FLEET_DIR/nginx" servers="" user="" k port
    mkdir -p "$dir"
    for ((k = 1; k <= INSTANCES; k++)); do
        port="INSTANCE_${k}_PORT"
        servers+="        server 127.0.0.1:${!port} max_fails=1 fail_timeout=5s;"$'\n'
    done
    [ "$(id -u)" -eq 0 ] && user="user root;"
    # Placeholders replaced literally (no sed: the values hold slashes and newlines).
    local conf
    conf="$(<"$root/deploy/fleet/nginx.conf")"
    conf="${conf//@USER@/$user}"
    conf="${conf//@LISTEN@/127.0.0.1:$NGINX_PORT}"
    conf="${conf//@SERVERS@$'\n'/$servers}"
    printf '%s\n' "$conf" >"$dir/nginx.conf"
    "$nginx" -t -q -p "$dir/" -c "$dir/nginx.conf" >>"$logdir/nginx.log" 2>&1 ||
        { log_tail nginx; die "nginx rejected $dir/nginx.conf"; }
    port_free "$NGINX_PORT" || die "nginx: port $NGINX_PORT is in use"
    spawn nginx "$nginx" -p "$dir/" -c "$dir/nginx.conf"
    wait_for nginx 10 "listening on port $NGINX_PORT" nginx_ready
    say "nginx ready: http://127.0.0.1:$NGINX_PORT/ (PID $(pid_of nginx); logs in $dir)"
}

# --- commands -----------------------------------------------------------------------------------

anything_running() {
    local f
    for f in "$piddir"/*.pid; do
        [ -e "$f" ] || continue
        ours "$(cat "$f")" && return 0
    done
    return 1
}

# EXIT trap while `up` runs: on failure, stop what was started.
up_failed() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "fleet: up failed; stopping what it started" >&2
        cmd_down >&2 || true
    fi
}

cmd_up() {
    local n="${1:-}"
    [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "up needs the number of instances, 1 to 99 (e.g. scripts/fleet.sh up 3)"
    mkdir -p "$piddir" "$logdir"
    anything_running && die "a fleet is already running in $FLEET_DIR (scripts/fleet.sh down first)"
    find_bin
    INSTANCES="$n"
    local k
    if [ -n "${FLEET_PORT:-}" ]; then
        local p="$FLEET_PORT"
        if ! [[ "$p" =~ ^[0-9]+$ ]] || [ "$p" -lt 1024 ] || [ $((p + 10204)) -gt 65535 ]; then
            die "FLEET_PORT must be 1024-55331 (SeaweedFS uses FLEET_PORT+200..204 and those + 10000)"
        fi
        NGINX_PORT="$p"
        for ((k = 1; k <= n; k++)); do
            printf -v "INSTANCE_${k}_PORT" '%s' $((p + k))
            printf -v "INSTANCE_${k}_STATUS_PORT" '%s' $((p + 100 + k))
        done
        WEED_MASTER=$((p + 200)) WEED_VOLUME=$((p + 201)) WEED_FILER=$((p + 202))
        S3_PORT=$((p + 203)) WEED_ADMIN=$((p + 204))
    else
        for var in WEED_MASTER WEED_VOLUME WEED_FILER S3_PORT WEED_ADMIN; do
            pick_port "$var" pair
        done
        pick_port NGINX_PORT
        for ((k = 1; k <= n; k++)); do
            pick_port "INSTANCE_${k}_PORT"
            pick_port "INSTANCE_${k}_STATUS_PORT"
        done
    fi
    {
        echo "INSTANCES=$n"
        echo "BIN=$BIN"
        echo "NGINX_PORT=$NGINX_PORT"
        echo "WEED_MASTER=$WEED_MASTER WEED_VOLUME=$WEED_VOLUME WEED_FILER=$WEED_FILER"
        echo "S3_PORT=$S3_PORT WEED_ADMIN=$WEED_ADMIN"
        local port status
        for ((k = 1; k <= n; k++)); do
            port="INSTANCE_${k}_PORT"
            status="INSTANCE_${k}_STATUS_PORT"
            echo "$port=${!port} $status=${!status}"
        done
    } >"$layout"
    # Whatever fails from here on, stop what was started.
    trap up_failed EXIT

    say "state in $FLEET_DIR, binary $BIN"
    start_weed
    write_instance_config
    # Start them all, then wait: they come up side by side.
    for ((k = 1; k <= n; k++)); do start_instance "$k"; done
    for ((k = 1; k <= n; k++)); do wait_instance "$k"; done
    start_nginx
    write_env
    trap - EXIT
    say "up: $n instances behind http://127.0.0.1:$NGINX_PORT/ (ports and PIDs: $envfile)"
}

cmd_down() {
    if [ ! -r "$layout" ]; then
        say "no fleet in $FLEET_DIR"
        return 0
    fi
    load_layout
    stop nginx TERM 10
    local k
    for ((k = 1; k <= INSTANCES; k++)); do stop_instance "$k"; done
    stop_weed
    rm -f "$envfile"
    say "down: nothing left running from $FLEET_DIR"
}

instance_arg() {
    local k="${1:-}"
    if ! [[ "$k" =~ ^[0-9]+$ ]] || [ "$k" -lt 1 ] || [ "$k" -gt "$INSTANCES" ]; then
        die "which instance? 1 to $INSTANCES"
    fi
}

cmd_start_instance() {
    load_layout
    instance_arg "${1:-}"
    stop_instance "$1"
    start_instance "$1"
    wait_instance "$1"
    write_env
}

cmd_stop_instance() {
    load_layout
    instance_arg "${1:-}"
    stop_instance "$1"
    write_env
    say "instance $1 stopped"
}

cmd_status() {
    load_layout
    local state k port status
    show() { # name port check...
        local name="$1" port="$2" pid
        shift 2
        pid="$(pid_of "$name")"
        if ! ours "$pid"; then
            state="not running"
        elif "$@"; then
            state="ready"
        else
            state="running, not answering"
        fi
        printf '%-12s %-24s PID %-8s %s\n' "$name" "$port" "${pid:--}" "$state"
    }
    show weed "s3 127.0.0.1:$S3_PORT" s3_ready
    for ((k = 1; k <= INSTANCES; k++)); do
        refresh_instance_pid "$k"
        port="INSTANCE_${k}_PORT"
        status="INSTANCE_${k}_STATUS_PORT"
        show "instance-$k" "127.0.0.1:${!port}/${!status}" instance_ready "${!status}"
    done
    show nginx "127.0.0.1:$NGINX_PORT" nginx_ready
    [ -r "$envfile" ] && write_env
    return 0
}

case "${1:-}" in
    up) cmd_up "${2:-}" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    start-instance) cmd_start_instance "${2:-}" ;;
    stop-instance) cmd_stop_instance "${2:-}" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
