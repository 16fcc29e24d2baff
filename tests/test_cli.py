"""User errors on the command line are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess

import pytest

from molink_swarm.lab import local_swarm

UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRaGZLmK2yqL1deDTar2Ford2mzoBfGtWHEKFiC5AcMAQ"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m molink_swarm ARGS`` (forked from the tests' fork server: no seconds of imports each)."""
    return local_swarm.run(args, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize("blocks", ["3:1", "abc", "-1:2", "2:2"])
def test_join_with_a_bad_range(blocks, tiny_llama_path):
    result = run_cli("join", "--model", str(tiny_llama_path), f"--blocks={blocks}", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "--blocks", "START")


def test_join_with_a_range_beyond_the_model(tiny_llama_path):
    result = run_cli("join", "--model", str(tiny_llama_path), "--blocks", "0:99", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "out of range", "6 blocks")


def test_join_with_an_unknown_model(tmp_path):
    result = run_cli("join", "--model", str(tmp_path / "nope"), "--blocks", "0:2", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "Model not found", "--model accepts")


def test_join_with_unreachable_peers(tiny_llama_path):
    result = run_cli("join", "--model", str(tiny_llama_path), "--blocks", "0:2", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "Could not reach any of the initial peers")


def test_join_with_a_bad_thread_count(tiny_llama_path):
    result = run_cli("join", "--model", str(tiny_llama_path), "--blocks", "0:2", "--threads", "0", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "--threads", "'0' is not a whole number of at least 1")


def test_join_with_an_unknown_quantization(tiny_llama_path):
    result = run_cli("join", "--model", str(tiny_llama_path), "--blocks", "0:2", "--quant", "int4", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "--quant", "'int4'", "'none', 'int8', 'nf4'")


def test_join_on_a_taken_port(tiny_llama_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "join", "--model", str(tiny_llama_path), "--blocks", "0:2", "--port", str(port), "--initial-peers", UNREACHABLE_PEER
        )
    assert_one_line_error(result, f"Cannot listen on 0.0.0.0:{port}", "another --port")


def test_usage_mistakes_are_one_line():
    result = run_cli("join", "--blocks")
    assert_one_line_error(result, "--blocks", "--help")


def test_web_on_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("web", "--initial-peers", UNREACHABLE_PEER, "--port", str(port))
    assert_one_line_error(result, "Cannot listen on", "--port")


@pytest.mark.parametrize("command", ["dht", "join", "status", "chat", "web", "demo"])
def test_every_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: molink-swarm" in result.stdout


def test_status_shows_every_server_and_missing_blocks(swarm, tiny_llama_path):
    local = swarm(tiny_llama_path, ["0:2", "1:4"])
    result = run_cli("status", "--initial-peers", *local.initial_peers)
    assert result.returncode == 0, result.stderr
    assert "tiny-llama" in result.stdout
    assert "0:2" in result.stdout and "1:4" in result.stdout
    assert "Missing blocks: 4:6" in result.stdout


def test_join_leaves_cleanly_on_sigterm(swarm, tiny_llama_path):
    local = swarm(tiny_llama_path, ["0:6"], "--threads", "1")
    server = local.servers[0]
    assert server.wait_for(r"computing with (\d+) torch threads", 5).group(1) == "1"
    assert server.stop() == 0
    assert any("offline" in line for line in server.lines), server.output()


def test_server_info_over_rpc(swarm, tiny_llama_path):
    from molink_swarm.client.loop import run_sync
    from molink_swarm.client.swarm import SwarmClient
    from molink_swarm.models import resolve_model

    local = swarm(tiny_llama_path, ["2:5"])
    source = resolve_model(tiny_llama_path)
    client = SwarmClient(local.initial_peers, source.model_id, source.fingerprint, 6)
    try:
        [server] = run_sync(client.servers())
        status = run_sync(client.info(server.peer_id))
        assert (status.model_id, status.start, status.end, status.active_sessions) == (source.model_id, 2, 5, 0)
    finally:
        client.shutdown()
