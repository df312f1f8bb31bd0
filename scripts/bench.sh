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
# Shared folders: the FUSE server in process beside direct syscalls.
cargo bench -p berth-devices --features test-utils --bench fs
