#!/usr/bin/env bash
# Benchmarks of the forwarded Docker socket, `berth start` and the network
# (published ports, host.docker.internal, the forwarder in process) and the
# shared-folder FUSE server in process, each
# beside a reference measured in the same run (figures for
# docs/benchmarks.md). Each bench boots its own Berth VM in a scratch state
# directory.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
ensure_docker_cli
export BERTH_IMAGE_DIR=$(guest-image/build.sh)
# cargo bench builds berth (release); berth-vmm must sit next to it.
cargo build --release --quiet -p berth-vmm
cargo bench -p berth-core --bench docker_socket
cargo bench -p berth-core --bench network
# Idle host CPU per process beside the same guest under plain QEMU.
cargo bench -p berth-core --bench idle
# Memory, disk and clock given back, each beside its reference.
cargo bench -p berth-core --bench hygiene
# Shared folders: the FUSE server in process beside direct syscalls.
cargo bench -p berth-devices --features test-utils --bench fs
# Shared folders end to end: an npm node_modules tree made by npm on the
# host (setup, not measured; cached by the lockfile's hash), then our
# backend and QEMU's virtiofsd serving it to the same guest.
npm_tree() {
    local src=app/core/benches/npm-tree key out tmp
    if ! command -v npm >/dev/null; then
        say "installing npm (Debian) for the node_modules tree" >&2
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
    fi
    key=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -c1-16)
    out="${XDG_CACHE_HOME:-$HOME/.cache}/berth/bench/npm-tree-$key.tar"
    if [ ! -f "$out" ]; then
        mkdir -p "$(dirname "$out")"
        tmp=$(mktemp -d)
        cp "$src/package.json" "$src/package-lock.json" "$tmp/"
        (cd "$tmp" && npm ci --ignore-scripts --no-audit --no-fund >&2)
        tar -cf "$out.part" -C "$tmp" node_modules
        mv "$out.part" "$out"
        rm -rf "$tmp"
    fi
    echo "$out"
}
BERTH_BENCH_TREE=$(npm_tree) cargo bench -p berth-core --bench shares
