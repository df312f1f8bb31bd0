#!/usr/bin/env bash
# Benchmarks of the forwarded Docker socket and `berth start` (figures for
# docs/benchmarks.md). Boots its own Berth VM in a scratch state directory.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
ensure_docker_cli
export BERTH_IMAGE_DIR=$(guest-image/build.sh)
# cargo bench builds berth (release); berth-vmm must sit next to it.
cargo build --release --quiet -p berth-vmm
cargo bench -p berth-core --bench docker_socket
