"""Discovery without a registry: hubs and spokes tell each other which hubs exist (``Directory`` messages).

A worker given one hub (``--connect``) or a seed list (``--seed-hubs``) learns the deployment's other hubs from it
and registers at each one that takes its role and model, including hubs started later; nothing else runs.

- A hub's **book** (``DirectoryBook``, pure) is the union of itself, what each registered spoke reports (the
  hubs that spoke is linked to, as it dials them), and hubs that announced themselves to it (``--seed-hubs`` on a
  new hub, repeated while it runs, forgotten ``ANNOUNCE_TTL_S`` after the last one).
- ``HubDirectory`` runs the book at a ``Hub``: it sends the book to each peer that joins and to every peer when
  the book changes, answers a ``Directory`` question (no entries) from anyone, and announces its own hub to
  its seeds.
- ``SpokeDiscovery`` runs at a ``Spoke``: it registers at every new hub a directory names that takes its role
  (and its model), reports its links back, asks its seeds now and then, and leaves a discovered hub that has
  been silent for ``FORGET_AFTER_S``. A loopback endpoint heard from another host is skipped (it names that
  host, not this one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from zdyn.protocol import Directory, HubEntry, Role
from zdyn.rpc.hub import Hub, PeerEvent
from zdyn.rpc.spoke import Spoke
from zdyn.transport import (
    WILDCARD_HOSTS,
    MalformedCounter,
    advertised,
    endpoint_host,
    host_towards,
    ignore_result,
    is_loopback,
    is_remote,
    make_socket,
    read_messages,
    send,
)

log = logging.getLogger(__name__)

ANNOUNCE_S = 2.0  # a hub with seeds announces itself this often
ANNOUNCE_TTL_S = 10.0  # ... and is forgotten this long after its last announcement
ASK_SEEDS_S = 5.0  # a spoke asks its seeds for the directory this often
FORGET_AFTER_S = 30.0  # a spoke leaves a discovered hub silent for this long
HUB_ROLES = ("frontend", "processor", "router", "prefill-queue")  # the key roles of processes that run hubs


def new_hub_id(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(3)}"


def usable_from(endpoint: str, via: str) -> bool:
    """Whether an endpoint heard from the hub at ``via`` can be dialled from here: a loopback endpoint only
    when ``via`` is on this host too (it means ``via``'s host)."""
    if not endpoint:
        return False
    return not (is_loopback(endpoint_host(endpoint)) and is_remote(via))


class DirectoryBook:
    """The hubs one hub knows of (pure: no sockets)."""

    def __init__(self, me: HubEntry) -> None:
        self.me = me
        self.fixed_endpoint = bool(me.endpoint)  # given (a bind address or advertised host), not learned
        self.reported: dict[bytes, list[HubEntry]] = {}  # registered spoke -> the hubs it is linked to
        self.announced: dict[str, tuple[HubEntry, float]] = {}  # hub id -> (entry, when it expires)

    def report(self, peer: bytes, entries: list[HubEntry]) -> bool:
        """A spoke's links; True if the book changed."""
        before = self.entries()
        self.reported[peer] = list(entries)
        return self._learn_me() or self.entries() != before

    def forget(self, peer: bytes) -> bool:
        before = self.entries()
        self.reported.pop(peer, None)
        return self.entries() != before

    def announce(self, entry: HubEntry, now: float) -> bool:
        known = self.announced.get(entry.hub_id)
        self.announced[entry.hub_id] = (entry, now + ANNOUNCE_TTL_S)
        return entry.hub_id != self.me.hub_id and (known is None or known[0] != entry)

    def expire(self, now: float) -> bool:
        gone = [hub_id for hub_id, (_, until) in self.announced.items() if until < now]
        for hub_id in gone:
            del self.announced[hub_id]
        return bool(gone)

    def _learn_me(self) -> bool:
        """This hub's own endpoint, as spokes dial it (one from another host preferred)."""
        if self.fixed_endpoint:
            return False
        seen = [e.endpoint for entries in self.reported.values() for e in entries if e.hub_id == self.me.hub_id]
        best = next((e for e in seen if is_remote(e)), seen[0] if seen else "")
        if best and best != self.me.endpoint and (is_remote(best) or not is_remote(self.me.endpoint)):
            self.me = msgspec.structs.replace(self.me, endpoint=best)
            return True
        return False

    def entries(self) -> list[HubEntry]:
        """Every hub once (by id): this one first, then the others, each at an endpoint another host can dial
        if any report has one."""
        found: dict[str, HubEntry] = {}
        candidates = [e for entries in self.reported.values() for e in entries]
        candidates += [entry for entry, _ in self.announced.values()]
        for entry in candidates:
            if entry.hub_id == self.me.hub_id or not entry.endpoint:
                continue
            known = found.get(entry.hub_id)
            if known is None or (is_remote(entry.endpoint) and not is_remote(known.endpoint)):
                found[entry.hub_id] = entry
        return [self.me, *sorted(found.values(), key=lambda e: e.hub_id)]


class HubDirectory:
    """Keeps a hub's ``DirectoryBook`` and tells the hub's peers (see the module's docstring)."""

    def __init__(
        self,
        hub: Hub,
        kind: str,
        *,
        model: str = "",
        seeds: list[str] | None = None,
        advertise_host: str | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.hub = hub
        self.seeds = list(seeds or [])
        self.advertise_host = advertise_host
        self.ctx = ctx or zmq.asyncio.Context.instance()
        bound = endpoint_host(hub.endpoint)
        endpoint = ""
        if advertise_host:
            endpoint = advertised(hub.endpoint, advertise_host)
        elif hub.endpoint.startswith("tcp://") and bound not in WILDCARD_HOSTS:
            endpoint = hub.endpoint
        me = HubEntry(hub_id=new_hub_id(kind), endpoint=endpoint, accepts=hub.role, kind=kind, model=model)
        self.book = DirectoryBook(me)
        self.broadcasts = 0
        self._task: asyncio.Task[None] | None = None
        hub.also_allow = HUB_ROLES  # with CURVE keys, other hubs may connect to announce themselves
        hub.extra_handlers[Directory] = self._on_directory
        hub.listeners.append(self._on_peer)

    @property
    def hub_id(self) -> str:
        return self.book.me.hub_id

    def start(self) -> None:
        """Announce to the seeds and expire old announcements (call once the hub has started)."""
        self._task = asyncio.get_running_loop().create_task(self._housekeeping())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def directory(self) -> Directory:
        return Directory(sender=self.hub_id, hubs=self.book.entries())

    def _on_directory(self, identity: bytes, msg: Directory) -> None:
        if identity in self.hub.peers:  # a registered spoke's links
            if self.book.report(identity, msg.hubs):
                self._broadcast()
        elif msg.sender and msg.hubs:  # another hub announcing itself
            entry = next((e for e in msg.hubs if e.hub_id == msg.sender), None)
            if entry is not None and self.book.announce(entry, time.monotonic()):
                log.info("hub %s (%s) announced itself at %s", entry.hub_id, entry.kind, entry.endpoint)
                self._broadcast()
        else:  # a question
            self.hub.send_to(identity, self.directory())

    def _on_peer(self, event: PeerEvent) -> None:
        if event.kind == "joined":
            self.hub.send_to(event.peer.identity, self.directory())
        elif event.kind == "left" and self.book.forget(event.peer.identity):
            self._broadcast()

    def _broadcast(self) -> None:
        self.broadcasts += 1
        directory = self.directory()
        for peer in self.hub.live_peers(draining=True):
            self.hub.send_to(peer.identity, directory)

    async def _housekeeping(self) -> None:
        socks = [make_socket(self.ctx, zmq.DEALER, seed, bind=False) for seed in self.seeds]
        try:
            while True:
                for seed, sock in zip(self.seeds, socks, strict=True):
                    host = self.advertise_host or host_towards(seed)
                    me = self.book.me
                    if not self.book.fixed_endpoint or not me.endpoint:
                        me = msgspec.structs.replace(me, endpoint=advertised(self.hub.endpoint, host))
                    send(sock, Directory(sender=me.hub_id, hubs=[me])).add_done_callback(ignore_result)
                if self.book.expire(time.monotonic()):
                    self._broadcast()
                await asyncio.sleep(ANNOUNCE_S)
        finally:
            for sock in socks:
                sock.close(linger=0)


class SpokeDiscovery:
    """Registers a spoke at the hubs its hubs' directories name (see the module's docstring)."""

    def __init__(
        self,
        spoke: Spoke,
        *,
        model: str = "",
        seeds: list[str] | None = None,
        local_only: bool = False,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.spoke = spoke
        self.local_only = local_only  # it advertises a loopback address: hubs on other hosts could not reach it
        self.role: Role = spoke.ready.role
        self.model = model
        self.seeds = list(seeds or [])
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.known: dict[str, HubEntry] = {}  # hub id -> the hub's own entry
        self.joined = 0  # hubs registered at through discovery
        self.left = 0  # discovered hubs left after going silent
        self.malformed = MalformedCounter(f"directory of {spoke.ready.peer_id}")
        self._reported: list[HubEntry] = []
        self._tasks: list[asyncio.Task[None]] = []
        spoke.on_directory = self.on_directory

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._housekeeping())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def on_directory(self, via: str, msg: Directory) -> None:
        """A directory from the hub at ``via`` (or from a seed): join the hubs that take this spoke."""
        for entry in msg.hubs:
            if entry.hub_id == msg.sender:
                self.known[entry.hub_id] = entry
                for link in self.spoke.links:
                    if link.endpoint == via:
                        link.hub_id = entry.hub_id
            if not self._wanted(entry, via):
                continue
            self.known.setdefault(entry.hub_id, entry)
            if self.spoke.add_hub(entry.endpoint):
                for link in self.spoke.links:
                    if link.endpoint == entry.endpoint:
                        link.hub_id = entry.hub_id
                self.joined += 1
                log.info("%s %s: discovered %s %s at %s: registering there", self.role, self.spoke.ready.peer_id,
                         entry.kind or "hub", entry.hub_id, entry.endpoint)  # fmt: skip
        if msg.sender:
            self._report(force=True)

    def _wanted(self, entry: HubEntry, via: str) -> bool:
        if entry.accepts != self.role or (entry.model and self.model and entry.model != self.model):
            return False
        if any(link.hub_id == entry.hub_id for link in self.spoke.links):
            return False
        if self.local_only and is_remote(entry.endpoint):
            return False
        return usable_from(entry.endpoint, via) and not self.spoke.linked(entry.endpoint)

    def links(self) -> list[HubEntry]:
        """The hubs this spoke is linked to and hears from, as it dials them."""
        now = asyncio.get_running_loop().time()
        entries = []
        for link in self.spoke.links:
            known = self.known.get(link.hub_id)
            if known is not None and link.heard and now - link.last_seen < self.spoke.liveness.expiry_s:
                entries.append(msgspec.structs.replace(known, endpoint=link.endpoint))
        return entries

    def _report(self, force: bool = False) -> None:
        links = self.links()
        if force or links != self._reported:
            self._reported = links
            self.spoke.tell_hubs(Directory(hubs=links))

    def _forget_silent(self) -> None:
        now = asyncio.get_running_loop().time()
        for link in list(self.spoke.links):
            silent_s = now - max(link.last_seen if link.heard else 0.0, link.opened_at)
            if link.discovered and silent_s > FORGET_AFTER_S:
                self.left += 1
                log.info("discovered hub %s at %s silent for %.0fs: leaving it", link.hub_id or "?", link.endpoint,
                         silent_s)  # fmt: skip
                self.spoke.remove_hub(link.endpoint)

    def _from(self, seed: str) -> Callable[[bytes, Directory], None]:
        def answer(identity: bytes, msg: Directory) -> None:
            self.on_directory(seed, msg)

        return answer

    async def _housekeeping(self) -> None:
        socks = {seed: make_socket(self.ctx, zmq.DEALER, seed, bind=False) for seed in self.seeds}
        readers = [
            asyncio.get_running_loop().create_task(read_messages(sock, {Directory: self._from(seed)}, self.malformed))
            for seed, sock in socks.items()
        ]
        asked = 0.0
        try:
            while True:
                if time.monotonic() - asked > ASK_SEEDS_S:
                    asked = time.monotonic()
                    for sock in socks.values():
                        send(sock, Directory()).add_done_callback(ignore_result)
                self._report()
                self._forget_silent()
                await asyncio.sleep(1.0)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for sock in socks.values():
                sock.close(linger=0)
