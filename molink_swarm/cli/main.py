"""The `molink-swarm` command: dht, join, status, chat, web, demo, keygen."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings
from typing import Optional, Sequence

from molink_swarm import __version__
from molink_swarm.errors import UserError
from molink_swarm.models import families  # the registry alone: no torch, so --help stays quick

logger = logging.getLogger("molink_swarm")

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SPOT_CHECK_RATE = 0.05  # client.spot_check's, written out: importing it loads torch, which --help should not wait for


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _setup_logging(verbose: bool) -> None:
    """Our lines for the user; libraries' notices meant for developers only with --verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs piped to a file or another process: one line per event, never wrapped
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("molink_swarm").setLevel(level)
    if not verbose:
        # transformers' notices (tokenizer "legacy" behaviour, "attention mask is not set") are for developers.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        logging.getLogger("asyncio").setLevel(logging.ERROR)  # e.g. a daemon reaped after its loop closed
    # hivemind logs through its own handler; keep it to warnings unless asked.
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if verbose else "WARNING")
    import hivemind.utils.logging as hivemind_logging

    hivemind_logging.get_logger("hivemind").setLevel(logging.DEBUG if verbose else logging.WARNING)
    hivemind_logging.get_logger("hivemind.p2p.p2p_daemon").addFilter(_ExpectedDaemonNoise())


class _ExpectedDaemonNoise(logging.Filter):
    """The p2p daemon reports its own socket closing as an error when we shut it down."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "use of closed network connection" not in record.getMessage()


def _stop_event_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


# ---- dht


def cmd_dht(args: argparse.Namespace) -> None:
    from molink_swarm.dht import start_dht
    from molink_swarm.net.relay import RelayService
    from molink_swarm.swarm_key import load_swarm_key

    swarm_key = load_swarm_key(args.swarm_key)

    async def run() -> None:
        stop = _stop_event_on_signals()
        dht, _ = start_dht(
            args.initial_peers,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            identity_path=args.identity,
            swarm_key=swarm_key,
            # A relay must stay one: with reachability left to AutoNAT, libp2p drops the relay service whenever
            # its checks flap. A bootstrap peer is public by definition.
            force_reachability="public",
        )
        try:
            # Every bootstrap peer also checks joining servers' reachability and relays for those behind NATs.
            p2p = await dht.replicate_p2p()
            await RelayService(p2p).add_p2p_handlers(p2p)
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
            if swarm_key is not None:
                print(
                    f"Private swarm (key {swarm_key.fingerprint}): every peer needs the key file, --swarm-key {args.swarm_key}",
                    flush=True,
                )
            print("Bootstrap peer online. Give others these addresses (--initial-peers):", flush=True)
            for maddr in maddrs:
                print(f"  {maddr}", flush=True)
            await stop.wait()
        finally:
            dht.shutdown()

    asyncio.run(run())


# ---- join


def cmd_join(args: argparse.Namespace) -> None:
    from molink_swarm.server.server import BadBlockRangeError, Server, ServerConfig, parse_block_range

    if args.blocks and args.num_blocks:
        raise BadBlockRangeError("Give either --blocks A:B or --num-blocks N, not both")
    config = ServerConfig(
        model=args.model,
        blocks=parse_block_range(args.blocks) if args.blocks else None,
        num_blocks=args.num_blocks,
        initial_peers=tuple(args.initial_peers),
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        wire_dtype=args.wire_dtype,
        host=args.host,
        port=args.port,
        public_ip=args.public_ip,
        announce_maddrs=tuple(args.announce_maddrs or ()),
        public_name=args.public_name,
        max_sessions=args.max_sessions,
        cache_tokens=args.cache_tokens,
        update_period=args.update_period,
        identity_path=args.identity,
        swarm_key=args.swarm_key,
        metrics_port=args.metrics_port,
        force_relay=args.force_relay,
        chunk_tokens=args.chunk_tokens,
        max_batch_size=args.max_batch_size,
        threads=args.threads,
        rebalance_margin=args.rebalance_margin,
        debug_fault_noise=args.debug_fault_noise,
        debug_fault_rate=args.debug_fault_rate,
    )
    server = Server(config)

    def online(s: Server) -> None:
        reach = s.reachability.value
        if s.relays is not None:
            reach += " via " + ", ".join(sorted(s.relays.active))
        quant = f"{s.config.quant} weights; " if s.config.quant != "none" else ""
        print(
            f"Server {s.peer_id} online: blocks {s.start}:{s.end} of {s.source.name} "
            f"({quant}{s.throughput:.0f} tokens/s per block; {reach})"
            + (f"; metrics at {s.metrics_url}" if s.metrics_url else ""),
            flush=True,
        )

    async def run() -> None:
        await server.run(_stop_event_on_signals(), on_online=online)

    asyncio.run(run())
    print("Server offline.", flush=True)


# ---- status


def cmd_status(args: argparse.Namespace) -> None:
    from molink_swarm.cli.status import print_status
    from molink_swarm.swarm_key import load_swarm_key

    print_status(args.initial_peers, model=args.model, swarm_key=load_swarm_key(args.swarm_key))


# ---- chat


def cmd_chat(args: argparse.Namespace) -> None:
    from molink_swarm.cli.chat import run_terminal_chat
    from molink_swarm.swarm_key import load_swarm_key

    run_terminal_chat(
        args.model, args.initial_peers, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        wire_dtype=args.wire_dtype, swarm_key=load_swarm_key(args.swarm_key), spot_check=args.spot_check,
    )


# ---- web


def _web_limits(args: argparse.Namespace):
    from molink_swarm.web import Limits

    return Limits(
        max_new_tokens=args.max_new_tokens,
        default_new_tokens=min(256, args.max_new_tokens),
        max_prompt_tokens=args.max_prompt_tokens,
        max_sessions_per_client=args.max_sessions_per_client,
    )


def _serve_web(
    models: Sequence[str], initial_peers: Sequence[str], host: str, port: int, limits, max_concurrent: int, wait_for_blocks_s: float = 10.0,
    wire_dtype: str = "auto", swarm_key=None, spot_check: float = DEFAULT_SPOT_CHECK_RATE,
) -> None:
    from molink_swarm.web import run_web

    def ready(url: str) -> None:
        print(f"Web demo online at {url}  (OpenAI API: {url}v1, status: {url}status)", flush=True)

    async def run() -> None:
        await run_web(
            models, initial_peers, host=host, port=port, limits=limits, max_concurrent=max_concurrent,
            wait_for_blocks_s=wait_for_blocks_s, wire_dtype=wire_dtype, swarm_key=swarm_key, stop=_stop_event_on_signals(),
            on_ready=ready, spot_check=spot_check,
        )

    asyncio.run(run())


def cmd_web(args: argparse.Namespace) -> None:
    from molink_swarm.swarm_key import load_swarm_key

    _serve_web(
        args.model, args.initial_peers, args.host, args.port, _web_limits(args), args.max_concurrent, args.wait_for_blocks,
        wire_dtype=args.wire_dtype, swarm_key=load_swarm_key(args.swarm_key), spot_check=args.spot_check,
    )


# ---- demo


def cmd_demo(args: argparse.Namespace) -> None:
    from rich.console import Console

    from molink_swarm.cli.local_swarm import LocalSwarm
    from molink_swarm.models import resolve_model
    from molink_swarm.net.ports import free_port, port_is_free
    from molink_swarm.web import Limits

    console = Console()
    model = DEFAULT_MODEL
    resolve_model(model, progress=True)  # convert once, before the servers race to do it
    swarm = LocalSwarm(model)
    try:
        with console.status("Starting a local swarm: a bootstrap peer and 2 servers (blocks 0:15 and 15:30)…"):
            swarm.start(["0:15", "15:30"])
        console.print(
            f"Swarm online. Add your own server: molink-swarm join --model {model} --num-blocks 10 "
            f"--initial-peers {swarm.initial_peers[0]}",
            soft_wrap=True,  # an address broken over two lines cannot be copied
        )
        port = 8080 if port_is_free(8080) else free_port()
        _serve_web([model], swarm.initial_peers, "127.0.0.1", port, Limits(), max_concurrent=24)
    finally:
        swarm.stop()


# ---- keygen


def cmd_keygen(args: argparse.Namespace) -> None:
    from molink_swarm.swarm_key import SwarmKey

    key = SwarmKey.generate()
    key.write(args.path, force=args.force)
    print(
        f"Wrote a new swarm key to {args.path} (fingerprint {key.fingerprint}). Give this file to every peer of the "
        f"swarm over a safe channel; each passes --swarm-key {args.path} to dht, join, status, chat and web.",
        flush=True,
    )


# ---- parser


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other user error."""

    def error(self, message: str) -> None:
        self.exit(2, f"Error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="molink-swarm", description="Run LLMs over a peer-to-peer swarm.")
    parser.add_argument("--version", action="version", version=f"molink-swarm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def peers(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--initial-peers", nargs="+", required=required, default=[], metavar="MADDR",
                       help="multiaddrs of swarm peers, as printed by `molink-swarm dht`")

    def swarm_key(p: argparse.ArgumentParser) -> None:
        p.add_argument("--swarm-key", default=None, metavar="PATH",
                       help="key file of a private swarm (from `molink-swarm keygen`): only peers holding it can join "
                       "and use the swarm (default: a public swarm)")

    def wire_dtype(p: argparse.ArgumentParser, what: str) -> None:
        # protocol.tensors.WIRE_DTYPES, written out: importing it loads torch, which --help should not wait for.
        p.add_argument("--wire-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"],
                       help=f"{what}: auto = as computed (exact), float16/bfloat16 = half the bytes of float32, "
                       "int8 = a quarter (per-row absmax); peers decode whatever arrives (default: auto)")

    def spot_check(p: argparse.ArgumentParser, default: float) -> None:
        p.add_argument("--spot-check", type=_fraction, default=default, metavar="RATE",
                       help="re-run this fraction of the steps (and each server's first) on a second server holding the "
                       "same blocks, and ban servers whose outputs are wrong; 0: off (default: %(default)s)")

    p = sub.add_parser("dht", help="run a bootstrap peer (prints the multiaddrs to give others)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"], metavar="MADDR",
                   help="where to listen (default: /ip4/0.0.0.0/tcp/31337)")
    p.add_argument("--announce-maddrs", nargs="+", default=None, metavar="MADDR",
                   help="public addresses to announce (for hosts with a mapped public IP)")
    p.add_argument("--identity", default=None, metavar="PATH", help="private key file: keeps the peer id stable")
    peers(p, required=False)
    swarm_key(p)
    p.set_defaults(func=cmd_dht)

    p = sub.add_parser(
        "join",
        help="serve blocks of a model to the swarm",
        epilog=f"Supported model families (transformers model types): {families.names()}.",
    )
    p.add_argument("--model", required=True,
                   help="a local HF folder, a .gguf file, or smollm2-135m-instruct (of a family listed below)")
    p.add_argument("--blocks", default=None, metavar="A:B", help="serve blocks A..B-1 (half-open, like Python slices)")
    p.add_argument("--num-blocks", type=int, default=None, metavar="N",
                   help="without --blocks: serve N blocks (default: as many as half the free memory holds), placed "
                   "where the swarm has the least capacity, and move later if it needs them more elsewhere")
    p.add_argument("--rebalance-margin", type=float, default=0.05, metavar="F",
                   help="without --blocks: move only when the blocks elsewhere are weaker by more than this fraction")
    peers(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    # models.quant.QUANT_MODES, written out: importing it loads torch, which --help should not wait for.
    p.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                   help="keep the blocks' weights compact in memory: int8 (about 1/4 of float32, per-row scales) or nf4 "
                   "(4-bit NormalFloat, about 1/7); clients chain servers of one quantization only (default: none)")
    wire_dtype(p, "how this server sends hidden states (replies, pushes to the next server)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: any free port)")
    p.add_argument("--public-ip", default=None, help="public IP of a port-forwarded host (needs --port)")
    p.add_argument("--announce-maddrs", nargs="+", default=None, metavar="MADDR",
                   help="addresses to announce instead of the listening ones (a forwarded port, a relay, a proxy)")
    p.add_argument("--public-name", default=None, help="a name shown in `status`")
    p.add_argument("--force-relay", action="store_true",
                   help="be reached through a relay (an initial peer) even if the swarm could dial this machine")
    p.add_argument("--max-sessions", type=int, default=32)
    p.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help="split long prompts and forward passes into chunks of N tokens (default: measured, ~0.25 s each)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="steps of up to N sessions computed in one pass (continuous batching; 1: off)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads computing the blocks (default: torch's, one per core); several servers on one "
                   "machine are faster with a share of the cores each")
    p.add_argument("--cache-tokens", type=int, default=32768, help="KV cache budget, in tokens, over all sessions")
    p.add_argument("--update-period", type=float, default=15.0, help="seconds between DHT heartbeats")
    p.add_argument("--identity", default=None, metavar="PATH", help="private key file: keeps the peer id stable")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics at http://HOST:P/metrics (0: any free port; default: off)")
    # Testing only, hidden from --help: a deliberately faulty server for the spot checks' tests (server/faults.py).
    p.add_argument("--debug-fault-noise", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-fault-rate", type=float, default=1.0, help=argparse.SUPPRESS)
    swarm_key(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("status", help="show the swarm: models, servers, blocks")
    peers(p)
    p.add_argument("--model", default=None, help="only this model")
    swarm_key(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--model", default=DEFAULT_MODEL)
    peers(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    wire_dtype(p, "how this client sends hidden states to the servers")
    spot_check(p, 0.0)
    swarm_key(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("web", help="serve the chat web demo, the OpenAI-compatible API and the status page")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], help="model(s) to serve (default: %(default)s)")
    peers(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: public)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens one request may generate")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted, in tokens")
    p.add_argument("--max-sessions-per-client", type=int, default=2, help="concurrent generations per client address")
    p.add_argument("--max-concurrent", type=int, default=24,
                   help="generations at once over all clients, batched together (others queue; a server admits 24 sessions of one peer by default)")
    p.add_argument("--wait-for-blocks", type=float, default=10.0, metavar="S",
                   help="how long a request waits for missing blocks to appear before failing")
    wire_dtype(p, "how this client sends hidden states to the servers")
    spot_check(p, DEFAULT_SPOT_CHECK_RATE)
    swarm_key(p)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("demo", help="start a local swarm of the embedded model and its web demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keygen", help="write a new swarm key file: a private swarm admits only peers that hold it")
    p.add_argument("path", metavar="PATH", help="where to write the key file (readable by its owner only)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    # Idle OpenMP threads that spin steal cores from the next process in the chain when several peers share a
    # machine (and from the owner's other work on a volunteer's machine); must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
