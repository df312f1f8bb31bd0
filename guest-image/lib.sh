# Shared helpers for guest-image/*.sh. Sourced, not run.
# shellcheck shell=bash

GI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$GI_DIR")
# Slow artifacts live outside the checkout, keyed by the hash of their inputs.
CACHE_DIR=${BERTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
# The one directory the assembled artifacts land in.
OUT_DIR=${BERTH_GUEST_IMAGE_DIR:-$REPO_DIR/target/guest-image}

log() { printf '[guest-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[guest-image] error: %s\n' "$*" >&2; exit 1; }

# sha256 of the named files' contents plus any extra strings, first 16 hex digits.
inputs_key() {
    local f
    {
        for f in "$@"; do
            if [ -f "$f" ]; then printf 'file %s\n' "$(basename "$f")"; cat "$f"; else printf 'str %s\n' "$f"; fi
        done
    } | sha256sum | cut -c1-16
}

# Installs the Debian packages named, if any is missing. Idempotent and quiet
# when everything is there already.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Runs "$@" only when "$dest/.done" is absent, building into a temporary
# sibling and renaming it into place, so an interrupted build never leaves a
# half-made cache entry behind.
cached_step() {
    local dest=$1; shift
    if [ -f "$dest/.done" ]; then return 0; fi
    local tmp="$dest.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    "$@" "$tmp"
    touch "$tmp/.done"
    rm -rf "$dest"; mv "$tmp" "$dest"
}
