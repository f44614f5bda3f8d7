"""CurveZMQ for zdyn's sockets: a deployment's keypairs, who may connect to which socket, and ZAP.

A deployment's keys live in one folder (``zdyn keys generate DIR``), as pyzmq's z85 certificate files:

- ``server.key`` / ``server.key_secret``: the keypair every socket that binds serves with (hubs, the router's
  query socket, the prefill queue, a worker's KV-event relay). Clients check the server by its public key.
- ``<role>.key`` / ``<role>.key_secret``: each role's client keypair (frontend, processor, worker, prefill,
  router). A process connects with its own role's keypair.
- ``<role>-<name>.key``: more public keys allowed as that role (``zdyn keys add``), for keypairs made elsewhere.

A server socket names the roles it accepts (``make_socket(..., allow=("worker",))``); pyzmq's asyncio ZAP
authenticator then lets a client in only if its public key is one of those roles' keys. So a key without a
role (or none at all) cannot register, and a worker's key cannot register as a processor.

The settings belong to a ZeroMQ context (``install(ctx, Curve(...))``): one process is one role, and tests run
several "processes" in one by giving each its own context. Only ``tcp://`` endpoints use CURVE: ``ipc://`` and
``inproc://`` never leave the host and are protected by file permissions.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import weakref
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

SERVER = "server"
ROLES = ("frontend", "processor", "worker", "prefill", "router", "prefill-queue")
KEYS_DIR_ENV = "ZDYN_KEYS_DIR"
INSECURE_ENV = "ZDYN_INSECURE"
DEFAULT_KEYS_DIR = "~/.config/zdyn/keys"  # where the examples keep theirs
MAX_OWNERS = 65536  # peer ids whose key is remembered (the oldest forgotten first)


class KeysError(ValueError):
    """Keys that are missing, unreadable or not allowed (a setting to fix)."""


@dataclass(frozen=True, slots=True)
class Keypair:
    public: bytes  # z85, 40 bytes
    secret: bytes


class KeyFolder:
    """A deployment's key folder: keypairs by name, public keys by role."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise KeysError(f"no key folder {self.folder}: create one with `zdyn keys generate {self.folder}`")

    def keypair(self, name: str) -> Keypair:
        path = self.folder / f"{name}.key_secret"
        if not path.is_file():
            raise KeysError(f"{path} is missing: `zdyn keys generate {self.folder}` creates the missing keypairs")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise KeysError(f"cannot read {path}: {e}") from e
        if secret is None:
            raise KeysError(f"{path} holds no secret key")
        return Keypair(public, secret)

    def public_keys(self, role: str) -> set[bytes]:
        """``role.key`` and every ``role-NAME.key`` (keys added for that role)."""
        keys: set[bytes] = set()
        for path in [self.folder / f"{role}.key", *self.folder.glob(f"{role}-*.key")]:
            if path.is_file():
                try:
                    keys.add(zmq.auth.load_certificate(path)[0])
                except (OSError, ValueError) as e:
                    log.warning("skipped unreadable public key %s: %s", path, e)
        return keys

    def named_keys(self) -> dict[str, bytes]:
        """Every ``ROLE-NAME.key`` public key by its name: a key listed for the peer id NAME."""
        found = {}
        for path in self.folder.glob("*-*.key"):
            try:
                found[path.stem] = zmq.auth.load_certificate(path)[0]
            except (OSError, ValueError):
                continue
        return found

    def entries(self) -> list[tuple[str, str, bool]]:
        """(name, public key, has its secret) for every public key file, sorted by name."""
        found = []
        for path in sorted(self.folder.glob("*.key")):
            public = zmq.auth.load_certificate(path)[0].decode()
            found.append((path.stem, public, (self.folder / f"{path.stem}.key_secret").is_file()))
        return found


def generate(folder: str | Path, names: Iterable[str] = (SERVER, *ROLES)) -> list[str]:
    """Create the keypairs of ``names`` missing from ``folder`` (created, mode 0700); the names created."""
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    created = []
    old_umask = os.umask(0o077)
    try:
        for name in names:
            if not (path / f"{name}.key_secret").exists():
                zmq.auth.create_certificates(path, name)
                created.append(name)
    finally:
        os.umask(old_umask)
    return created


def add_public_key(folder: str | Path, role: str, name: str, public: str) -> Path:
    """Allow ``public`` (a z85 key, or a ``.key`` file's path) as ``role``: writes ``role-name.key``."""
    if role not in ROLES:
        raise KeysError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or "/" in name or name.startswith("."):
        raise KeysError(f"bad key name {name!r}")
    key = zmq.auth.load_certificate(public)[0] if Path(public).is_file() else public.strip().encode()
    try:
        if len(z85.decode(key)) != 32:
            raise ValueError("not 32 bytes")
    except (ValueError, KeyError) as e:
        raise KeysError(f"not a z85 CURVE public key: {public!r} ({e})") from None
    target = KeyFolder(folder).folder / f"{role}-{name}.key"
    target.write_text(f'# zdyn keys add {role} {name}\nmetadata\ncurve\n    public-key = "{key.decode()}"\n')
    return target


def is_local(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ipc, inproc and loopback tcp."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # *, a name or an interface


class Curve:
    """One process's CURVE settings: it serves with the deployment's server keypair, connects with its
    role's keypair, and lets clients in by the role of their key."""

    def __init__(self, keys: KeyFolder, role: str) -> None:
        if role not in ROLES:
            raise KeysError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.keys = keys
        self.role = role
        self.server = keys.keypair(SERVER)
        self.own = keys.keypair(role)
        self.allowed = {r: keys.public_keys(r) for r in ROLES}
        self.refused: Counter[str] = Counter()  # clients refused, by socket domain
        self.named = keys.named_keys()  # "worker-gpu3" -> the key listed for worker id "gpu3"
        self.owners: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (role, peer id) -> the key that took it
        self._auth: AsyncioAuthenticator | None = None

    @property
    def num_refused(self) -> int:
        return sum(self.refused.values())

    def serve(self, sock: zmq.Socket, ctx: zmq.asyncio.Context, allow: Collection[str]) -> None:
        """Make ``sock`` a CURVE server that admits the keys of the roles in ``allow``."""
        unknown = set(allow) - set(ROLES)
        if not allow or unknown:
            raise KeysError(f"a CURVE server socket needs the roles it admits, got {sorted(allow)}")
        self._start(ctx)
        domain = "+".join(sorted(allow))
        assert self._auth is not None
        if domain not in self._auth.credentials_providers:
            self._auth.configure_curve_callback(domain, _RoleCheck(self, frozenset(allow), domain))
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server.secret)

    def claim(self, key: bytes, role: str, peer_id: str) -> str | None:
        """A peer id belongs to the key listed for it (``ROLE-ID.key``), else to the first key that registered it:
        why ``key`` may not use it, or None."""
        listed = self.named.get(f"{role}-{peer_id}")
        owner = listed or self.owners.get((role, peer_id))
        if owner is not None and owner != key:
            return f"{role} id {peer_id!r} belongs to another key{' (the one listed for it)' if listed else ''}"
        self.owners[(role, peer_id)] = key
        self.owners.move_to_end((role, peer_id))
        if len(self.owners) > MAX_OWNERS:
            self.owners.popitem(last=False)
        return None

    def connect(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.own.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.own.secret)

    def _start(self, ctx: zmq.asyncio.Context) -> None:
        """Start the ZAP handler before the first server socket exists (without one, libzmq lets anyone in)."""
        if self._auth is None:
            self._auth = AsyncioAuthenticator(ctx)
            self._auth.log = log
            self._auth.start()

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class _RoleCheck:
    """The ZAP callback of one socket domain: is this client key one of the admitted roles' keys?"""

    def __init__(self, curve: Curve, roles: frozenset[str], domain: str) -> None:
        self.curve, self.roles, self.domain = curve, roles, domain

    def callback(self, domain: str, key: bytes) -> bool:
        if any(key in self.curve.allowed[r] for r in self.roles):
            return True
        self.curve.refused[domain] += 1
        n = self.curve.refused[domain]
        if n <= 5 or n % 100 == 0:
            held = [r for r in ROLES if key in self.curve.allowed[r]]
            what = f"a {'/'.join(held)} key" if held else "an unknown key"
            log.warning("refused a client with %s on a socket for %s (refusal #%d here)", what, self.domain, n)
        return False


_installed: weakref.WeakKeyDictionary[zmq.Context, Curve] = weakref.WeakKeyDictionary()


def install(ctx: zmq.Context, curve: Curve) -> Curve:
    """Every tcp socket made in ``ctx`` from now on uses CURVE with ``curve``'s keys."""
    _installed[ctx] = curve
    return curve


def uninstall(ctx: zmq.Context) -> None:
    curve = _installed.pop(ctx, None)
    if curve is not None:
        curve.stop()


def curve_of(ctx: zmq.Context) -> Curve | None:
    return _installed.get(ctx)


def claim(ctx: zmq.Context, key: bytes, role: str, peer_id: str) -> str | None:
    """Why a client with CURVE ``key`` may not register as ``peer_id`` (``Curve.claim``); None without keys."""
    curve = _installed.get(ctx)
    return curve.claim(key, role, peer_id) if curve is not None and key else None


def configure(
    sock: zmq.Socket, ctx: zmq.asyncio.Context, endpoint: str, *, bind: bool, allow: Collection[str] | None
) -> bool:
    """Apply ``ctx``'s CURVE settings to a socket about to bind or connect ``endpoint``; True if it uses CURVE."""
    curve = _installed.get(ctx)
    if curve is None or not endpoint.startswith("tcp://"):
        return False
    if bind:
        if allow is None:
            raise KeysError(f"binding {endpoint} with keys needs the roles it admits (allow=...)")
        curve.serve(sock, ctx, allow)
    else:
        curve.connect(sock)
    return True


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """What a role's command line says about keys: the folder (None: no CURVE) and ``--insecure``."""

    keys_dir: str | None = None
    insecure: bool = False

    def check_binds(self, prog: str, endpoints: Iterable[str]) -> list[str]:
        """Refuse (KeysError) to bind a non-loopback endpoint without keys unless insecure; the warnings to log."""
        if self.keys_dir:
            return []
        exposed = [e for e in endpoints if not is_local(e)]
        if not exposed:
            return []
        if not self.insecure:
            raise KeysError(
                f"{prog} would listen on {', '.join(exposed)} without keys, so anyone who can reach it could "
                f"register or read prompts: give --keys-dir (or ${KEYS_DIR_ENV}; `zdyn keys generate DIR` makes "
                "them), bind 127.0.0.1, or pass --insecure"
            )
        return [f"--insecure: {prog} listens on {', '.join(exposed)} without authentication or encryption"]

    def install(self, ctx: zmq.Context, role: str) -> Curve | None:
        if not self.keys_dir:
            return None
        return install(ctx, Curve(KeyFolder(self.keys_dir), role))
