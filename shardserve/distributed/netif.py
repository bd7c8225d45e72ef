"""Which network interface carries an address (Gloo must be told: GLOO_SOCKET_IFNAME), and which address a rank
listens on for the TCP collectives."""
from __future__ import annotations

import socket
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


def listen_ip(host_id: str, master_addr: str) -> str:
    """The address a rank listens on for its peers: host_id when it is an IPv4 address (the executors pass the
    node's advertised address), else the local address that routes to the master (no packet is sent)."""
    try:
        socket.inet_aton(host_id)
        return host_id
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
