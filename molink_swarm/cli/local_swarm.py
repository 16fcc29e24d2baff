"""Start a swarm of real processes on this machine: a bootstrap peer, servers, a web app (`demo`; tests build
on it in molink_swarm/lab)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from molink_swarm.net.ports import free_port

logger = logging.getLogger(__name__)

_MADDR_RE = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
_ONLINE_RE = re.compile(r"Server (\S+) online")


class LocalSwarmError(RuntimeError):
    pass


@dataclasses.dataclass
class SwarmProcess:
    """A child process whose output is collected in the background (so its pipe never fills up)."""

    name: str
    popen: subprocess.Popen
    lines: list[str] = dataclasses.field(default_factory=list)
    log_path: Optional[Path] = None
    peer_id: Optional[str] = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._terminated = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        log = open(self.log_path, "a") if self.log_path else None
        for line in self.popen.stdout:
            if log:
                log.write(line)
                log.flush()
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        if log:
            log.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until a line of output matches ``pattern``; fail (with the output) if the process dies first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and seen == len(self.lines):
                    # Give the pump a moment to drain the last lines.
                    self._cond.wait(0.2)
                    if seen == len(self.lines):
                        raise LocalSwarmError(f"{self.name} exited ({self.popen.returncode}):\n" + self.output())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LocalSwarmError(f"{self.name}: no line matching {pattern!r} in {timeout} s:\n" + self.output())
                self._cond.wait(min(remaining, 0.5))

    def wait_online(self, timeout: float = 240.0) -> "SwarmProcess":
        """Wait for the server's `online` line; remembers its peer id."""
        self.peer_id = self.wait_for(_ONLINE_RE.pattern, timeout).group(1)
        return self

    def is_online(self) -> bool:
        """Whether the server has said it is online (without waiting); remembers its peer id."""
        if self.peer_id is None:
            with self._cond:
                match = next(filter(None, map(_ONLINE_RE.search, self.lines)), None)
            if match:
                self.peer_id = match.group(1)
        return self.peer_id is not None

    def output(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its DHT process, its p2p daemon), like a crash.

        The child was started in its own session, so its process group id is its PID: only what we started."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM, once (a second one could hit it after it has removed its handler, on its way out)."""
        if not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit in time; then reap anything of its group left behind."""
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        returncode = self.popen.poll()
        self.kill()
        return returncode


# Test tooling may start processes another way (molink_swarm/lab/forkserver.py): called with (cmd, module, args,
# env, netns), it returns an object with Popen's pid/poll/wait/stdout, or None to fall back to subprocess.
launcher: Optional[Callable[..., object]] = None


def spawn(name: str, args: Sequence[str], **options) -> SwarmProcess:
    """Run ``molink-swarm <args>`` (options as for :func:`spawn_module`)."""
    return spawn_module(name, "molink_swarm", args, **options)


def spawn_module(
    name: str,
    module: str,
    args: Sequence[str],
    *,
    log_dir: Optional[Path] = None,
    env: Optional[dict] = None,
    prefix: Sequence[str] = (),
    netns: Optional[str] = None,
) -> SwarmProcess:
    """Run ``python -m <module> <args>`` in its own session; ``prefix`` wraps the command, and ``netns`` runs it in
    that network namespace (like ``ip netns exec NETNS``)."""
    cmd = [*prefix, sys.executable, "-u", "-m", module, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = launcher(cmd, module, list(args), full_env, netns) if launcher is not None and not prefix else None
    if popen is None:
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
        )
    log_path = (log_dir / f"{name}.log") if log_dir else None
    logger.debug("Started %s (pid %d): %s", name, popen.pid, " ".join(popen.args))
    return SwarmProcess(name, popen, log_path=log_path)


def run(args: Sequence[str], *, timeout: float, module: str = "molink_swarm") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` to its end, stdout and stderr captured apart (like ``subprocess.run`` with
    ``capture_output=True, text=True``); started by the ``launcher`` when one is set."""
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as spawn() has it: the same fork server
    process = launcher(cmd, module, list(args), env, None, separate_stderr=True) if launcher is not None else None
    if process is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    outputs: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, stream=stream: outputs.__setitem__(name, stream.read()), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    for reader in readers:
        reader.join()
    process.stdout.close()
    process.stderr.close()
    return subprocess.CompletedProcess(cmd, process.returncode, outputs["stdout"], outputs["stderr"])


class LocalSwarm:
    """A bootstrap peer plus servers, each a real process with its own p2p daemon, on 127.0.0.1; with ``swarm_key``
    (a key file) a private swarm: every process gets ``--swarm-key``."""

    def __init__(
        self, model: str, *, log_dir: Optional[Path] = None, env: Optional[dict] = None, swarm_key: Optional[str] = None
    ):
        self.model = model
        self.key_args = ["--swarm-key", str(swarm_key)] if swarm_key else []
        self.log_dir = log_dir
        self.env = env
        self.bootstrap: Optional[SwarmProcess] = None
        self.relays: list[SwarmProcess] = []  # more `dht` peers (each also a relay) after the bootstrap
        self.servers: list[SwarmProcess] = []
        self.webs: list[SwarmProcess] = []
        self.initial_peers: list[str] = []

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        args = ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *self.key_args]
        self.bootstrap = spawn("bootstrap", args, log_dir=self.log_dir, env=self.env)
        match = self.bootstrap.wait_for(_MADDR_RE.pattern, timeout)
        self.initial_peers = [match.group(1)]
        return self.initial_peers

    def start_relay(self, timeout: float = 60.0) -> SwarmProcess:
        """Another `molink-swarm dht` peer (every one is also a relay), joined to the swarm; servers started
        after it get it as an initial peer too."""
        args = ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *self.key_args, "--initial-peers", *self.initial_peers]
        relay = spawn(f"relay-{len(self.relays) + 1}", args, log_dir=self.log_dir, env=self.env)
        self.relays.append(relay)
        self.initial_peers.append(relay.wait_for(_MADDR_RE.pattern, timeout).group(1))
        return relay

    def start_server(self, blocks: str, *extra: str, wait: bool = True, timeout: float = 240.0) -> SwarmProcess:
        """Start a `join` process serving ``blocks``: "a:b", or "N" for N blocks that the server chooses (and may
        move later)."""
        name = f"server-{blocks.replace(':', '-')}-{len(self.servers)}"
        choice = ["--blocks", blocks] if ":" in blocks else ["--num-blocks", blocks]
        args = ["join", "--model", self.model, *choice, *self.key_args, "--initial-peers", *self.initial_peers]
        server = spawn(name, [*args, "--host", "127.0.0.1", *extra], log_dir=self.log_dir, env=self.env)
        self.servers.append(server)
        if wait:
            server.wait_online(timeout)
        return server

    def start(self, block_ranges: Sequence[str], *extra: str, timeout: float = 240.0) -> "LocalSwarm":
        """A bootstrap peer and one server per range. The servers share this machine's cores: unless ``extra`` says
        ``--threads``, each computes with its share of them (as torchrun gives each of its processes one thread).
        With all of them on every core, a pass of one server waits for threads that another server's pass holds."""
        self.start_bootstrap()
        if "--threads" not in extra:
            extra = (*extra, "--threads", str(max(1, len(os.sched_getaffinity(0)) // max(1, len(block_ranges)))))
        started = [self.start_server(blocks, *extra, wait=False) for blocks in block_ranges]
        for server in started:
            server.wait_online(timeout)
        return self

    def start_web(self, *extra: str, port: Optional[int] = None, timeout: float = 120.0) -> tuple[SwarmProcess, str]:
        """Start `molink-swarm web` for this swarm's model; returns the process and its URL."""
        args = ["web", "--model", self.model, *self.key_args, "--initial-peers", *self.initial_peers, "--port", str(port or free_port()), *extra]
        web = spawn(f"web-{len(self.webs)}", args, log_dir=self.log_dir, env=self.env)
        self.webs.append(web)
        url = web.wait_for(r"Web demo online at (\S+)", timeout).group(1)
        return web, url

    def server_by_peer(self, peer_id) -> SwarmProcess:
        """The server with this peer id (also one whose `online` line nobody has waited for yet)."""
        return next(s for s in self.servers if s.is_online() and s.peer_id == str(peer_id))

    def stop(self, graceful: bool = True) -> None:
        """Stop web front ends, then servers, then relays and the bootstrap peer; the processes of each group leave
        at once (each takes a second or two to announce it and shut down).

        ``graceful=False`` kills them all at once instead (SIGKILL to each process group), e.g. at the end of
        a test, where nobody is left to hear that they leave."""
        if not graceful:
            for process in [process for group in self._groups() for process in group]:
                try:
                    process.kill()
                except Exception:  # teardown must reach every process
                    logger.warning("Could not kill %s (pid %d)", process.name, process.pid, exc_info=True)
            return
        for group in self._groups():
            for process in group:
                try:
                    process.terminate()
                except Exception:  # teardown must reach every process
                    logger.warning("Could not signal %s (pid %d)", process.name, process.pid, exc_info=True)
            for process in group:
                try:
                    process.stop()
                except Exception:  # teardown must reach every process
                    logger.warning("Could not stop %s (pid %d)", process.name, process.pid, exc_info=True)

    def _groups(self) -> list[list[SwarmProcess]]:
        """The processes in the order they stop: each group after the one before it has left."""
        return [self.webs, self.servers, [*self.relays, *([self.bootstrap] if self.bootstrap else [])]]

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
