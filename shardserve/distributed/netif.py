"""Which network interface carries an address: Gloo must be told (GLOO_SOCKET_IFNAME) on multi-node runs."""
from __future__ import annotations

import subprocess


def interface_for_ip(ip: str) -> str | None:
    """The network interface that carries `ip` on this host (parsed from `ip -o -4 addr`), or None."""
    if ip.startswith("127."):
        return "lo"
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():   # "2: veth0    inet 10.213.7.1/24 brd ... scope global veth0"
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet" and parts[3].split("/")[0] == ip:
            return parts[1].split("@")[0]
    return None
