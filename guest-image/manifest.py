#!/usr/bin/env python3
"""Writes manifest.json beside the guest-image artifacts: versions of the
kernel, dockerd, containerd, runc and the agent, each artifact's sha256 and
size, and the default kernel command line."""
import argparse
import hashlib
import json
import os


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--kernel-dir", required=True)
    p.add_argument("--versions", required=True)
    p.add_argument("--agent-version", required=True)
    p.add_argument("--cmdline", required=True)
    p.add_argument("--rootfs", required=True)
    p.add_argument("--format", required=True)
    a = p.parse_args()
    versions = dict(
        line.strip().split("=", 1) for line in open(a.versions) if "=" in line
    )
    read = lambda name: open(os.path.join(a.kernel_dir, name)).read().strip()
    artifacts = {}
    for name in ("vmlinux", "bzImage", a.rootfs):
        path = os.path.join(a.out, name)
        artifacts[name] = {"sha256": sha256(path), "size": os.path.getsize(path)}
    manifest = {
        "schema": 1,
        "arch": "x86_64",
        "kernel": {
            "release": read("release"),
            "source": "linux-source " + read("source-version"),
        },
        "rootfs": {"format": a.format, "file": a.rootfs, "debian": versions["DEBIAN_VERSION"]},
        "versions": {
            "dockerd": versions["DOCKERD_VERSION"],
            "containerd": versions["CONTAINERD_VERSION"],
            "runc": versions["RUNC_VERSION"],
            "iptables": versions["IPTABLES_VERSION"],
            "agent": a.agent_version,
        },
        "artifacts": artifacts,
        "cmdline": a.cmdline,
    }
    tmp = os.path.join(a.out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(a.out, "manifest.json"))


if __name__ == "__main__":
    main()
