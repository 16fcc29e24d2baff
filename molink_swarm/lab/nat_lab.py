"""A lab of Linux network namespaces for NAT tests and benchmarks: a public segment and homes behind NATs.

Layout (``NatLab(prefix)``; needs root, ``ip`` and ``iptables``)::

    public hosts  <prefix>-pN   7.7.7.(10+N)/24 ─┐
                                                 ├─ bridge in <prefix>-wan
    routers       <prefix>-rN   7.7.7.(100+N)/24 ─┘   and 10.N.0.1/24 ── home host <prefix>-hN  10.N.0.2/24

Every router masquerades its home behind its public address. ``inbound="drop"`` makes it drop unsolicited
inbound TCP (a typical home router: hole punching can work); ``inbound="reset"`` answers it with RST (hole
punching cannot work). Addresses are in 7.7.7.0/24, which libp2p counts as public (reserved ranges such as
198.18.0.0/15 are not), inside namespaces with no link to the host's interfaces.

Processes run inside a namespace with ``lab.command(ns, argv)``. ``close()`` deletes every namespace it made.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from typing import Literal, Sequence

WAN_SUBNET = "7.7.7"
Inbound = Literal["drop", "reset"]


class NatLabError(RuntimeError):
    pass


def lab_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None if they can): used by tests to skip with a clear reason."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 iptables)"
    probe = "molink-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot create network namespaces: {result.stderr.strip() or 'permission denied'} (needs root)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclasses.dataclass(frozen=True)
class Home:
    router: str
    host: str
    public_ip: str
    private_ip: str


class NatLab:
    def __init__(self, prefix: str = "ml"):
        if len(prefix) > 6:
            raise ValueError("prefix must be at most 6 characters (interface names are limited to 15)")
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.public_hosts: list[tuple[str, str]] = []  # (namespace, ip)
        self.homes: list[Home] = []
        self.wan = f"{prefix}-wan"
        self._add_namespace(self.wan)
        self._run(self.wan, "ip", "link", "add", "br0", "type", "bridge")
        self._run(self.wan, "ip", "link", "set", "br0", "up")

    # ---- building

    def add_public_host(self) -> tuple[str, str]:
        """A host with a public address on the WAN segment; returns (namespace, ip)."""
        index = len(self.public_hosts)
        ns, ip = f"{self.prefix}-p{index}", f"{WAN_SUBNET}.{10 + index}"
        self._add_namespace(ns)
        self._wire_to_wan(ns, f"{self.prefix}p{index}", ip)
        self.public_hosts.append((ns, ip))
        return ns, ip

    def add_home(self, inbound: Inbound = "drop") -> Home:
        """A home network: a NAT router on the WAN and one host behind it."""
        index = len(self.homes) + 1
        router, host = f"{self.prefix}-r{index}", f"{self.prefix}-h{index}"
        public_ip, gateway, private_ip = f"{WAN_SUBNET}.{100 + index}", f"10.{index}.0.1", f"10.{index}.0.2"
        self._add_namespace(router)
        self._add_namespace(host)
        wan_if = self._wire_to_wan(router, f"{self.prefix}r{index}", public_ip)
        inside, outside = f"{self.prefix}h{index}i", f"{self.prefix}h{index}o"
        self._run(None, "ip", "link", "add", inside, "netns", host, "type", "veth", "peer", "name", outside, "netns", router)
        self._run(host, "ip", "addr", "add", f"{private_ip}/24", "dev", inside)
        self._run(host, "ip", "link", "set", inside, "up")
        self._run(host, "ip", "route", "add", "default", "via", gateway)
        self._run(router, "ip", "addr", "add", f"{gateway}/24", "dev", outside)
        self._run(router, "ip", "link", "set", outside, "up")
        self._run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._run(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE")
        # Unsolicited inbound connections: to the router itself (INPUT) and forwarded ones (FORWARD).
        action = ["-j", "DROP"] if inbound == "drop" else ["-j", "REJECT", "--reject-with", "tcp-reset"]
        for chain in ("INPUT", "FORWARD"):
            self._run(router, "iptables", "-A", chain, "-i", wan_if, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            self._run(router, "iptables", "-A", chain, "-i", wan_if, "-p", "tcp", *action)
            self._run(router, "iptables", "-A", chain, "-i", wan_if, "-j", "DROP")
        home = Home(router=router, host=host, public_ip=public_ip, private_ip=private_ip)
        self.homes.append(home)
        return home

    def command(self, namespace: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    # ---- teardown

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers

    def _add_namespace(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a crashed run
        self._run(None, "ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self._run(ns, "ip", "link", "set", "lo", "up")

    def _wire_to_wan(self, ns: str, name: str, ip: str) -> str:
        inside, outside = f"{name}w", f"{name}b"
        self._run(None, "ip", "link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.wan)
        self._run(self.wan, "ip", "link", "set", outside, "master", "br0")
        self._run(self.wan, "ip", "link", "set", outside, "up")
        self._run(ns, "ip", "addr", "add", f"{ip}/24", "dev", inside)
        self._run(ns, "ip", "link", "set", inside, "up")
        return inside

    def _run(self, ns: str | None, *argv: str) -> None:
        cmd = list(argv) if ns is None else self.command(ns, argv)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            self.close()
            raise NatLabError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
