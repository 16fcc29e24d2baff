"""The NAT lab (network namespaces + iptables MASQUERADE) used by the NAT tests behaves like home routers."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from molink_swarm.lab.nat_lab import NatLab

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9000), timeout=2).close()
    print("connected")
except Exception as e:
    print(type(e).__name__)
"""

LISTEN = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(); print("listening", flush=True)
c, addr = s.accept(); print(addr[0], flush=True)
"""


LAB_PREFIX = "tl"  # namespaces of this module are named tl-*


def connect(lab: NatLab, namespace: str, ip: str) -> str:
    return subprocess.run(
        lab.command(namespace, [sys.executable, "-c", CONNECT, ip]), capture_output=True, text=True, timeout=30
    ).stdout.strip()


def test_homes_reach_the_public_segment_behind_their_router_address(lab):
    public_ns, public_ip = lab.add_public_host()
    home = lab.add_home("drop")
    listener = subprocess.Popen(lab.command(public_ns, [sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "listening"
        assert connect(lab, home.host, public_ip) == "connected"
        assert listener.stdout.readline().strip() == home.public_ip  # masqueraded
    finally:
        listener.kill()
        listener.wait()


@pytest.mark.parametrize("inbound, outcome", [("drop", "TimeoutError"), ("reset", "ConnectionRefusedError")])
def test_unsolicited_inbound_is_dropped_or_reset(lab, inbound, outcome):
    public_ns, _ip = lab.add_public_host()
    home = lab.add_home(inbound)
    listener = subprocess.Popen(lab.command(home.host, [sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "listening"
        started = time.monotonic()
        assert connect(lab, public_ns, home.public_ip) == outcome
        assert connect(lab, public_ns, home.private_ip) in ("TimeoutError", "OSError")  # no route into the home
        assert time.monotonic() - started < 20
    finally:
        listener.kill()
        listener.wait()
