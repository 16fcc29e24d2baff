"""Start a swarm of real processes on this machine: a bootstrap peer and servers (used by `demo` and tests)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def spawn(
    name: str,
    args: Sequence[str],
    *,
    log_dir: Optional[Path] = None,
    env: Optional[dict] = None,
    prefix: Sequence[str] = (),
    netns: Optional[str] = None,
) -> SwarmProcess:
    """Run ``molink-swarm <args>``; ``prefix`` wraps the command; ``netns`` runs it in that network namespace
    (like ``ip netns exec NETNS``)."""
    return spawn_module(name, "molink_swarm", args, log_dir=log_dir, env=env, prefix=prefix, netns=netns)


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
    cmd = [*prefix, sys.executable, "-u", "-m", module, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = None
    if _forkserver_enabled and not prefix:
        popen = _forkserver_spawn(cmd, module, list(args), full_env, netns)
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
    ``capture_output=True, text=True``); forked from the fork server when it is on (see below)."""
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as spawn() has it: the same fork server
    process = _forkserver_spawn(cmd, module, list(args), env, None, separate_stderr=True) if _forkserver_enabled else None
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


# ---- fork server: processes forked from one that has already imported torch, transformers and hivemind
#
# Importing them takes a `join` process about 8 s of CPU time, most of its start-up: a fork server pays that once.
# Every process it forks is what ``python -u -m MODULE ARGS`` would be (its own session, the same environment,
# stdout and stderr to a pipe), with an exit status; only ``prefix`` commands (e.g. `ip netns exec`) still run
# through subprocess. Off unless ``use_forkserver()`` is called (the tests do).

_forkserver_enabled = False
_forkservers: dict[tuple, Any] = {}
_forkserver_lock = threading.Lock()
_PER_PROCESS_ENV = {"PYTEST_CURRENT_TEST"}
_PRELOAD = (
    "torch",
    "transformers",
    "hivemind",
    "rich.logging",
    "molink_swarm.cli",
    "molink_swarm.dht",
    "molink_swarm.relay",
    "molink_swarm.server.server",
    "molink_swarm.wan_emulator",
)


def use_forkserver(enabled: bool = True) -> None:
    """Start later swarm processes from a fork server (see above) instead of a fresh interpreter each."""
    global _forkserver_enabled
    _forkserver_enabled = enabled


class ForkedProcess:
    """The part of ``subprocess.Popen`` that SwarmProcess uses, for a process started by the fork server.

    The process is not our child: the fork server's intermediate process waits for it and reports its exit code."""

    def __init__(self, args: list[str], pid: int, stdout, status, stderr=None) -> None:
        self.args, self.pid, self.stdout, self.stderr = args, pid, stdout, stderr
        self.returncode: Optional[int] = None
        self._exited = threading.Event()
        self._status = status
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        code = -signal.SIGKILL  # the intermediate process died without a word: count it as killed
        for line in self._status:
            if line.startswith(b"exit "):
                code = int(line.split()[1])
        self._status.close()
        self.returncode = code
        self._exited.set()

    def poll(self) -> Optional[int]:
        return self.returncode if self._exited.is_set() else None

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def _forkserver_spawn(
    cmd: list[str], module: str, args: list[str], env: dict, netns: Optional[str], separate_stderr: bool = False
) -> Optional[ForkedProcess]:
    # A fork server per environment (modules read some of it as they load), except for what pytest changes per test.
    key = tuple(sorted((k, v) for k, v in env.items() if k not in _PER_PROCESS_ENV))
    with _forkserver_lock:
        if key not in _forkservers or (_forkservers[key] is not None and _forkservers[key].poll() is not None):
            _forkservers[key] = _start_forkserver(env)
        server = _forkservers[key]
        if server is None:  # it could not be started, or failed: subprocess it is
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if separate_stderr else (None, out_w)
        status_r, status_w = os.pipe()
        ours, theirs = [out_r, status_r, *([err_r] if separate_stderr else [])], [out_w, status_w, *([err_w] if separate_stderr else [])]
        try:
            request = {"module": module, "args": args, "cwd": os.getcwd(), "env": env, "netns": netns}
            request = json.dumps(request).encode()
            socket.send_fds(server.control, [request], [out_w, err_w, status_w])
        except OSError:
            logger.warning("The fork server is gone; starting processes with subprocess", exc_info=True)
            for fd in ours + theirs:
                os.close(fd)
            _forkservers[key] = None
            return None
        for fd in theirs:
            os.close(fd)
        status = os.fdopen(status_r, "rb")
        first = status.readline()
        if not first.startswith(b"pid "):
            for fd in ours:
                os.close(fd)
            logger.warning("The fork server could not start %s; starting processes with subprocess", cmd)
            _forkservers[key] = None
            return None
        stdout = io.TextIOWrapper(os.fdopen(out_r, "rb"), errors="replace")
        stderr = io.TextIOWrapper(os.fdopen(err_r, "rb"), errors="replace") if separate_stderr else None
        args = cmd if netns is None else ["ip", "netns", "exec", netns, *cmd]
        return ForkedProcess(args, int(first.split()[1]), stdout, status, stderr)


@dataclasses.dataclass
class _ForkServer:
    popen: subprocess.Popen
    control: socket.socket

    def poll(self) -> Optional[int]:
        return self.popen.poll()


def _start_forkserver(env: dict) -> Optional[_ForkServer]:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = f"from {__name__} import _forkserver_main; _forkserver_main({child_end.fileno()})"
    try:
        popen = subprocess.Popen(
            [sys.executable, "-u", "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # never hold the test's own output open
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=[child_end.fileno()],
            start_new_session=True,
        )
    except OSError:
        logger.warning("Cannot start the fork server", exc_info=True)
        return None
    finally:
        child_end.close()
    return _ForkServer(popen, parent_end)


def _forkserver_main(fd: int) -> None:
    """The fork server: preload, then fork one process per request (runs until the test process closes its end)."""
    control = socket.socket(fileno=fd)
    launch_env = dict(os.environ)
    # What `molink-swarm` sets before it imports torch and hivemind (cli.main and cli._setup_logging).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # the forked process imports it again, and fails there the way it always would
            pass
    import gc

    gc.freeze()  # what is loaded now stays shared with the forked processes (collections would copy it)
    request = _serve_forks(control)  # returns only in a forked process
    _run_forked(request, launch_env)


def _serve_forks(control: socket.socket) -> dict:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # intermediate processes are reaped by the kernel
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 1 << 20, 3)
        except OSError:
            message, fds = b"", []
        if not message or len(fds) != 3:
            os._exit(0)  # the test process is gone
        out_w, err_w, status_w = fds
        if os.fork() != 0:
            for fd in fds:
                os.close(fd)
            continue
        # The intermediate process: forks the real one, reports its pid and then its exit code.
        pid = -1
        try:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ready_r, ready_w = os.pipe()
            pid = os.fork()
            if pid != 0:
                os.close(out_w)
                os.close(err_w)
                os.close(ready_w)
                os.read(ready_r, 1)  # end of file once it has its own session (or has died)
                os.write(status_w, f"pid {pid}\n".encode())
                _pid, status = os.waitpid(pid, 0)
                os.write(status_w, f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
        finally:
            if pid != 0:
                os._exit(0)
        # The forked process itself.
        os.close(ready_r)
        os.close(status_w)
        os.setsid()  # like start_new_session: its process group id is its pid
        os.close(ready_w)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        return json.loads(message)


def _enter_netns(name: str) -> None:
    """Move this process into the network namespace ``name`` (made by ``ip netns add``), as ``ip netns exec``
    does; every socket it and its children open is then in there."""
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join("/var/run/netns", name), os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns to network namespace {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


def _run_forked(request: dict, launch_env: dict) -> None:
    """Become ``python -u -m MODULE ARGS``: exceptions and exit codes end this process as they would end that one."""
    import random
    import runpy

    if request["netns"] is not None:
        _enter_netns(request["netns"])
    os.chdir(request["cwd"])
    for name in launch_env.keys() - request["env"].keys():
        del os.environ[name]
    os.environ.update({k: v for k, v in request["env"].items() if launch_env.get(k) != v})
    random.seed()  # (done at fork anyway) and numpy's global generator, which is not
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


class LocalSwarm:
    """A bootstrap peer plus servers, each a real process with its own p2p daemon, on 127.0.0.1."""

    def __init__(self, model: str, *, log_dir: Optional[Path] = None, env: Optional[dict] = None):
        self.model = model
        self.log_dir = log_dir
        self.env = env
        self.bootstrap: Optional[SwarmProcess] = None
        self.relays: list[SwarmProcess] = []  # more `dht` peers (each also a relay) after the bootstrap
        self.servers: list[SwarmProcess] = []
        self.links: list[SwarmProcess] = []
        self.webs: list[SwarmProcess] = []
        self.initial_peers: list[str] = []

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        self.bootstrap = spawn("bootstrap", ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], log_dir=self.log_dir, env=self.env)
        match = self.bootstrap.wait_for(_MADDR_RE.pattern, timeout)
        self.initial_peers = [match.group(1)]
        return self.initial_peers

    def start_relay(self, timeout: float = 60.0) -> SwarmProcess:
        """Another `molink-swarm dht` peer (every one is also a relay), joined to the swarm; servers started
        after it get it as an initial peer too."""
        args = ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", *self.initial_peers]
        relay = spawn(f"relay-{len(self.relays) + 1}", args, log_dir=self.log_dir, env=self.env)
        self.relays.append(relay)
        self.initial_peers.append(relay.wait_for(_MADDR_RE.pattern, timeout).group(1))
        return relay

    def start_server(
        self,
        blocks: str,
        *extra: str,
        wait: bool = True,
        timeout: float = 240.0,
        link_delay_s: Optional[float] = None,
        link_bandwidth_mbit: Optional[float] = None,
    ) -> SwarmProcess:
        """Start a `join` process; with ``link_delay_s`` it sits behind an emulated WAN link (a relay process
        that delays each direction by that much), and announces the relay's address so all peers cross it."""
        name = f"server-{blocks.replace(':', '-')}-{len(self.servers)}"
        args = ["join", "--model", self.model, "--blocks", blocks, "--initial-peers", *self.initial_peers]
        args += ["--host", "127.0.0.1", *extra]
        if link_delay_s is not None or link_bandwidth_mbit is not None:
            port = free_port()
            link_args = ["--target", f"127.0.0.1:{port}", "--delay-ms", str((link_delay_s or 0.0) * 1000)]
            if link_bandwidth_mbit is not None:
                link_args += ["--bandwidth-mbit", str(link_bandwidth_mbit)]
            link = spawn_module(f"link-{name}", "molink_swarm.wan_emulator", link_args, log_dir=self.log_dir)
            self.links.append(link)
            link_port = int(link.wait_for(r"listening on [\d.]+:(\d+)", 30).group(1))
            args += ["--port", str(port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{link_port}"]
        server = spawn(name, args, log_dir=self.log_dir, env=self.env)
        self.servers.append(server)
        if wait:
            server.wait_online(timeout)
        return server

    def start(self, block_ranges: Sequence[str], *extra: str, timeout: float = 240.0) -> "LocalSwarm":
        self.start_bootstrap()
        started = [self.start_server(blocks, *extra, wait=False) for blocks in block_ranges]
        for server in started:
            server.wait_online(timeout)
        return self

    def start_web(self, *extra: str, port: Optional[int] = None, timeout: float = 120.0) -> tuple[SwarmProcess, str]:
        """Start `molink-swarm web` for this swarm's model; returns the process and its URL."""
        args = ["web", "--model", self.model, "--initial-peers", *self.initial_peers, "--port", str(port or free_port()), *extra]
        web = spawn(f"web-{len(self.webs)}", args, log_dir=self.log_dir, env=self.env)
        self.webs.append(web)
        url = web.wait_for(r"Web demo online at (\S+)", timeout).group(1)
        return web, url

    def server_by_peer(self, peer_id) -> SwarmProcess:
        """The server with this peer id (also one whose `online` line nobody has waited for yet)."""
        return next(s for s in self.servers if s.is_online() and s.peer_id == str(peer_id))

    def stop(self, graceful: bool = True) -> None:
        """Stop web front ends, then servers, then relays and the bootstrap peer, then WAN links; the processes
        of each group leave at once (each takes a second or two to announce it and shut down).

        ``graceful=False`` kills them all at once instead (SIGKILL to each process group), e.g. at the end of
        a test, where nobody is left to hear that they leave."""
        bootstrap = [self.bootstrap] if self.bootstrap else []
        if not graceful:
            for process in [*self.webs, *self.servers, *self.relays, *bootstrap, *self.links]:
                try:
                    process.kill()
                except Exception:  # teardown must reach every process
                    logger.warning("Could not kill %s (pid %d)", process.name, process.pid, exc_info=True)
            return
        for group in (self.webs, self.servers, [*self.relays, *bootstrap], self.links):
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

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
