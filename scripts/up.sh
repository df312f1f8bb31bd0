#!/usr/bin/env bash
# Quick start, step 1: installs what is needed, builds Berth and its guest
# image, starts the Berth VM (`berth start`) and proves Docker works by
# running a container from a locally made image with the docker CLI.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
ensure_docker_cli
say "building the guest image (cold: ~20 min on 2 cores, two kernel compiles; warm: seconds)"
IMAGE_DIR=$(guest-image/build.sh)
say "building berth and berth-vmm"
cargo build --release --quiet -p berth-core -p berth-vmm
BERTH="$REPO/target/release/berth"
export BERTH_IMAGE_DIR=$IMAGE_DIR
say "berth start"
"$BERTH" start
say "making an image locally (no registry needed): busybox-static imported as berth-demo/busybox"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin"
cp "$(command -v busybox)" "$work/root/bin/busybox"
for a in sh echo uname cat; do ln -s busybox "$work/root/bin/$a"; done
tar --numeric-owner --owner=0 --group=0 -C "$work/root" -cf "$work/rootfs.tar" .
docker --context berth import "$work/rootfs.tar" berth-demo/busybox >/dev/null
say "docker run --rm berth-demo/busybox"
docker --context berth run --rm berth-demo/busybox sh -c 'echo "Hello from a container in Berth ($(uname -sr))"'
say "a host folder in a container (the temp dir is shared at the same path)"
echo "written on the host at $(date +%T)" > "$work/hello.txt"
docker --context berth run --rm -v "$work:/src" berth-demo/busybox cat /src/hello.txt
"$BERTH" status
cat <<MSG

Berth is running. Use your docker CLI as usual (context "berth"), e.g.
    docker ps
Stop the VM with:   $BERTH stop
Its console:        $BERTH logs -f
A guest shell:      $BERTH shell
MSG
