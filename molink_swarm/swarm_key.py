"""Private swarms: the swarm key, and the proofs by which peers show they hold it.

A private swarm shares one secret, the swarm key: 32 random bytes in a file that ``molink-swarm keygen PATH``
writes (mode 0600) in libp2p's own pre-shared-key format::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

Every command takes ``--swarm-key PATH`` (and ``from_pretrained(..., swarm_key=PATH)``); without it, nothing
changes (a public swarm).

**Why at our layer.** libp2p can make a private network itself (pnet: the connection is encrypted with the key
before anything else), but the p2p daemon shipped with hivemind 1.1.12 has no such option (``p2pd --help``
lists none, and the binary has no pnet code). So any peer can still open a libp2p connection to us; what the key
gates is every request that reaches our code:

- DHT requests and answers (dht/auth.py, through hivemind's ``authorizer`` hook of its DHT protocol): a peer
  without the key gets no answer to a ping, store or find, so it cannot bootstrap, read a record or store one
  (the DHT's value store takes records only through store requests, and a peer with the key answers finds only
  to peers with it). Answers carry a proof too: a peer without the key cannot pose as a DHT node to us.
- Our RPCs (protocol/auth.py: inference, forward, push, push stream, info, ping, and the relay's dial-back,
  register, relay stream, relay call and load): the caller sends a proof before its first message and the
  server answers with its own before its first reply; a request without a valid one is refused, with a message
  saying what to do, before any of it is read or computed.

**A proof** is HMAC-SHA256, under a key derived from the swarm key for its purpose, of: the direction
(request or answer), the method, the caller's and the receiver's libp2p peer ids, a timestamp and a random
nonce (an answer also names its request's nonce). The peer ids are the ones libp2p authenticated when the
connection was made (its Noise/TLS handshake proves the private key of each), so a proof is good only between
those two peers: one that receives our proof cannot use it anywhere else. The receiver accepts a timestamp
within :data:`FRESHNESS_S` of its clock (peers need clocks within a minute, as hivemind's DHT expirations
already do), and each nonce once (:class:`ReplayGuard`). One proof per stream suffices: the libp2p connection
carries the rest of the stream encrypted and authenticated.

**What a peer without the key can still do** (it can reach our ports):

- open libp2p connections, and learn what libp2p's identify protocol tells anyone: our peer id, listening
  addresses, agent version and the names of the protocols we serve (that we are a molink-swarm DHT node,
  server or relay), and see traffic sizes and timing;
- use what the daemon itself serves: libp2p ping, identify, AutoNAT and hole punching, libp2p's own Kademlia
  DHT (a separate one, used for peer routing: it can look up the addresses of a peer id it already knows, and
  learn peer ids from its routing tables), and the circuit-relay service of `dht` peers (reservations and
  relayed connections within the daemon's limits), which costs the relay's bandwidth but gives no way in;
- make us spend resources: connections and streams up to the daemon's and our per-peer limits, and an HMAC
  check per request (refused requests cost no other work, no DHT lookup, no compute); that is, denial of
  service as against any public server;
- nothing more if a peer with the key dials it (listed in its initial peers by mistake): the proofs it
  receives name it as receiver, and we refuse its answers.

It cannot read or write our DHT's records, appear as a server to clients, use a server or a relay, or learn
which models the swarm serves or which peer serves what. A holder of the key is a full member: the key admits peers, it does not make a
member honest (records are still signed per peer and checked, sessions still owned). Changing the key
(everyone restarts with a new file) is the only way to exclude a peer who has it.
"""

from __future__ import annotations

import binascii
import collections
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Union

from molink_swarm.errors import UserError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
FRESHNESS_S = 60.0  # the most a proof's timestamp may differ from the receiver's clock
MAX_FILE_BYTES = 4096


class SwarmKeyError(UserError):
    """A key file that is missing, unreadable or not a swarm key, or one that exists where keygen would write."""


class SwarmKey:
    """The secret of a private swarm. Never logged or printed: :attr:`fingerprint` names it instead."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes):
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a swarm key is {KEY_BYTES} bytes")
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> "SwarmKey":
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SwarmKey":
        """Read a key file; every problem is a :class:`SwarmKeyError` saying what to do."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except FileNotFoundError:
            raise SwarmKeyError(
                f"--swarm-key {path}: no such file; create a key with `molink-swarm keygen {path}` "
                "or ask the swarm's operator for its key file"
            ) from None
        except IsADirectoryError:
            raise SwarmKeyError(f"--swarm-key {path}: is a directory, not a swarm key file") from None
        except OSError as e:
            raise SwarmKeyError(f"--swarm-key {path}: cannot read it ({e.strerror}); check its permissions") from None
        key = cls._parse(data)
        if key is None:
            raise SwarmKeyError(
                f"--swarm-key {path}: not a swarm key file (expected the lines {HEADER!r}, {ENCODING!r} and 64 hex "
                "digits, as `molink-swarm keygen` writes)"
            )
        if stat.S_IMODE(mode) & 0o077:
            logger.warning("Swarm key %s is readable by other users of this machine; run: chmod 600 %s", path, path)
        return key

    @staticmethod
    def _parse(data: bytes) -> Optional["SwarmKey"]:
        if len(data) > MAX_FILE_BYTES:
            return None
        try:
            lines = [line.strip() for line in data.decode("ascii").splitlines() if line.strip()]
        except UnicodeDecodeError:
            return None
        if len(lines) != 3 or lines[0] != HEADER or lines[1] != ENCODING or len(lines[2]) != 2 * KEY_BYTES:
            return None
        try:
            return SwarmKey(binascii.unhexlify(lines[2]))
        except (binascii.Error, ValueError):
            return None

    def write(self, path: Union[str, os.PathLike], *, force: bool = False) -> None:
        """Write the key file, readable by its owner only. An existing file is replaced only with ``force``."""
        path = Path(path)
        if path.is_dir():
            raise SwarmKeyError(f"{path} is a directory; give the path of the key file to write")
        if path.exists() and not force:
            raise SwarmKeyError(
                f"{path} exists; pass --force to replace it (every peer of the swarm then needs the new key)"
            )
        text = f"{HEADER}\n{ENCODING}\n{self._secret.hex()}\n".encode()
        folder = path.parent if str(path.parent) else Path(".")
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)  # created with mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                if force:
                    os.replace(temporary, path)
                else:
                    os.link(temporary, path)  # fails if the file appeared meanwhile: never overwrite by accident
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except FileExistsError:
            raise SwarmKeyError(f"{path} exists; pass --force to replace it") from None
        except OSError as e:
            raise SwarmKeyError(f"Cannot write {path} ({e.strerror})") from None

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (for logs and messages): peers with the same key show the same one."""
        return hashlib.sha256(b"molink-swarm key fingerprint\0" + self._secret).hexdigest()[:12]

    def derive(self, purpose: str) -> bytes:
        """A key for one purpose (DHT, RPCs), so a proof made for one can never pass for the other."""
        return hmac.new(self._secret, b"molink-swarm/" + purpose.encode(), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"SwarmKey({self.fingerprint})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwarmKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def load_swarm_key(key: Union[None, str, os.PathLike, SwarmKey]) -> Optional[SwarmKey]:
    """``--swarm-key`` / ``swarm_key=``: a path to a key file, a loaded key, or None (a public swarm)."""
    if key is None or isinstance(key, SwarmKey):
        return key
    return SwarmKey.load(key)


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the parts, each length-prefixed (no two different lists of parts give the same input)."""
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        digest.update(struct.pack(">I", len(part)))
        digest.update(part)
    return digest.digest()


def timestamp_bytes(timestamp: float) -> bytes:
    return struct.pack(">d", timestamp)


class ReplayGuard:
    """Accepts a (timestamp, nonce) once, and only if the timestamp is within ``window_s`` of this clock.

    A nonce is remembered for twice the window after it was accepted: by then its timestamp is out of the window,
    so a replay is refused either way. Entries are kept in the order they were accepted, and expire in that order.
    """

    def __init__(self, window_s: float = FRESHNESS_S, max_entries: int = 1 << 20):
        self.window_s, self.max_entries = window_s, max_entries
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # nonce -> forget after
        self._lock = threading.Lock()

    def admit(self, timestamp: float, nonce: bytes, now: Optional[float] = None) -> Optional[str]:
        """None if fresh (the nonce is now used up), else why not."""
        now = time.time() if now is None else now
        if not abs(timestamp - now) <= self.window_s:  # also refuses NaN
            return (
                f"its timestamp is {timestamp - now:+.0f} s off this peer's clock (more than {self.window_s:.0f} s; "
                "check both clocks)"
            )
        if len(nonce) < 8:
            return "its nonce is too short"
        with self._lock:
            while self._seen:
                oldest, forget_after = next(iter(self._seen.items()))
                if forget_after > now:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                return "it replays an earlier request"
            if len(self._seen) >= self.max_entries:
                return "this peer is checking too many requests at once; try again later"
            self._seen[nonce] = now + 2 * self.window_s
        return None

    def __len__(self) -> int:
        return len(self._seen)


# The key each p2p daemon of this process works with, by its control address: every P2P object on that daemon
# (the DHT's, and the replicas that servers, clients and relays use) signs and checks RPCs with it.
_daemon_keys: dict[str, SwarmKey] = {}


def bind_daemon(daemon_listen_maddr: object, key: Optional[SwarmKey]) -> None:
    if key is not None:
        _daemon_keys[str(daemon_listen_maddr)] = key


def key_of_daemon(daemon_listen_maddr: object) -> Optional[SwarmKey]:
    return _daemon_keys.get(str(daemon_listen_maddr))
