"""Streaming RPC over ROUTER/DEALER: a hub serves requests out to peers that registered with it.

A ``Hub`` (ROUTER, binds) is the processor's side of its workers, or the frontend's side of separate
processors. A ``Spoke`` (one DEALER per hub, connects) is the worker's or processor's side. Spokes announce
themselves with READY, both sides send heartbeats, and a peer silent for ``Liveness.expiry_s`` is dead: its
requests in flight end at once with a 503 error, and a spoke that loses its hub cancels that hub's requests
and announces itself again with a fresh socket (zguide's Paranoid Pirate).
"""

from zdyn.protocol import Request
from zdyn.rpc.hub import Hub, Peer, PeerEvent, PeerListener
from zdyn.rpc.spoke import Handler, RefusedError, Spoke
from zdyn.rpc.stream import merge_into

__all__ = ["Handler", "Hub", "Peer", "PeerEvent", "PeerListener", "RefusedError", "Request", "Spoke", "merge_into"]
