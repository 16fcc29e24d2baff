"""A fork server for test swarms: processes forked from one that has already imported torch, transformers and
hivemind.

Importing them takes a `join` process about 8 s of CPU time, most of its start-up: a fork server pays that once.
Every process it forks is what ``python -u -m MODULE ARGS`` would be (its own session, the same environment and
working directory, stdout and stderr to pipes, in network namespace ``netns`` if given), with an exit status
reported by an intermediate process that waits for it. Commands with a ``prefix`` still run through subprocess,
and so does everything when a fork server cannot be used. Off unless ``use_forkserver()`` is called (the tests
do; `demo` does not).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Optional

from molink_swarm.cli import local_swarm

logger = logging.getLogger(__name__)

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
    "molink_swarm.net.relay",
    "molink_swarm.server.server",
    "molink_swarm.lab.wan_emulator",
)


def use_forkserver(enabled: bool = True) -> None:
    """Start later swarm processes from a fork server (see above) instead of a fresh interpreter each."""
    local_swarm.launcher = _forkserver_spawn if enabled else None


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
        ours = [out_r, status_r, *([err_r] if separate_stderr else [])]
        theirs = [out_w, status_w, *([err_w] if separate_stderr else [])]
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
    random.seed()  # fresh randomness, as a new interpreter has (random does it at fork too; numpy does not)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)

