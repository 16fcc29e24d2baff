"""The package's arrows run one way: each part imports only the parts below it, and nothing at run time imports
the test tooling (molink_swarm.lab). Each module is imported on its own in a fresh interpreter."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import molink_swarm

# What each part may load besides itself (molink_swarm, .errors, .swarm_key and .peer_keys are shared by all).
ALLOWED = {
    "protocol": set(),
    "net": {"protocol"},
    "dht": set(),
    "routing": set(),
    "models": set(),
    "server": {"dht", "protocol", "net", "models", "routing"},
    "client": {"dht", "protocol", "net", "models", "routing"},
    "web": {"client", "dht", "protocol", "net", "models", "routing"},
    "cli": {"web", "client", "server", "dht", "protocol", "net", "models", "routing"},
}
SHARED = {"", "errors", "swarm_key", "peer_keys", "__main__"}

# Each module is imported in its own forked child of a fresh interpreter, side by side.
PROBE = r"""
import importlib, json, os, sys


def in_child(work):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            payload = json.dumps(work())
        except BaseException as e:
            payload = json.dumps({"error": repr(e)})
        with os.fdopen(write, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(write)
    return pid, os.fdopen(read)


def collect(child):
    pid, inp = child
    result = json.loads(inp.read())
    os.waitpid(pid, 0)
    return result


def ours(module):
    return module == "molink_swarm" or module.startswith("molink_swarm.")


def everything_else():
    for name in sys.argv[1:]:
        __import__(name)
    return sorted(m for m in sys.modules if not ours(m))


# The third-party modules our code needs are imported once here; every child starts from them and from no
# molink_swarm module at all.
for module in collect(in_child(everything_else)):
    try:
        importlib.import_module(module)
    except BaseException:
        pass
assert not any(ours(m) for m in sys.modules)
children = {name: in_child(lambda name=name: {"loaded": sorted(m for m in (__import__(name), sys.modules)[1] if ours(m))}) for name in sys.argv[1:]}
print(json.dumps({name: collect(child) for name, child in children.items()}))
"""


def part(module: str) -> str:
    """``molink_swarm.net.links`` -> ``net``; ``molink_swarm.errors`` -> ``errors``; ``molink_swarm`` -> ``""``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def runtime_modules() -> list[str]:
    found = pkgutil.walk_packages(molink_swarm.__path__, prefix="molink_swarm.")
    return sorted(m.name for m in found if part(m.name) not in {"lab", "__main__"})


def test_arrows_run_one_way():
    modules = runtime_modules()
    assert {"molink_swarm.client.model", "molink_swarm.server.server", "molink_swarm.net.links"} <= set(modules)
    probe = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    results = json.loads(probe.stdout.strip().splitlines()[-1])

    wrong = []
    for module, result in results.items():
        assert "error" not in result, f"importing {module} failed: {result['error']}"
        own = part(module)
        allowed = SHARED | {own} | ALLOWED.get(own, set())
        for loaded in result["loaded"]:
            if part(loaded) not in allowed:
                wrong.append(f"{module} loads {loaded}")
    assert not wrong, "imports against the arrows:\n" + "\n".join(wrong)


def test_the_probe_would_see_a_wrong_arrow():
    """The check itself works: the lab (test tooling) loads the cli, which the rules forbid for runtime parts."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, "molink_swarm.lab.local_swarm"], capture_output=True, text=True, timeout=300
    )
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])["molink_swarm.lab.local_swarm"]["loaded"]
    assert "molink_swarm.cli.local_swarm" in loaded
