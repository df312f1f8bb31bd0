#!/usr/bin/env python3
"""Fails if moby's check-config.sh output lists anything missing among the
"Generally Necessary" options or the bridge/overlay/macvlan/ipvlan network
drivers. Usage: check_config_verdict.py check-config.txt"""
import re
import sys


def sections(text):
    """Yields (section, line) with section in {necessary, network, other}."""
    section = "other"
    for line in text.splitlines():
        if line.startswith("Generally Necessary:"):
            section = "necessary"
        elif line.startswith("Optional Features:"):
            section = "optional"
        elif section == "optional" and line.strip().startswith("- Network Drivers:"):
            section = "network"
        elif section == "network" and line.strip().startswith("- Storage Drivers:"):
            section = "other"
        yield section, line


def main(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    if "Generally Necessary:" not in text:
        print(f"{path}: not check-config.sh output", file=sys.stderr)
        return 2
    bad = []
    in_ftp = False
    for section, line in sections(text):
        if section == "network":
            # The FTP/TFTP helper list is an extra, not a network driver.
            if re.search(r'"ftp,tftp client', line):
                in_ftp = True
            if in_ftp:
                continue
        if section in ("necessary", "network") and re.search(r":\s*missing", line):
            bad.append(line.strip())
    for line in bad:
        print(f"missing: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
