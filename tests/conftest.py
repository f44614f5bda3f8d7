"""Fixtures shared by the tests: the tiny model, a ZeroMQ context of the test's own, endpoint factories."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from zdyn.models import build_tiny_llama, cache_dir
from zdyn.roles.common import freeze_startup_objects
from zdyn.transport import free_tcp_ports


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collection imported torch, vLLM and transformers: millions of objects the garbage collector would walk on
    every full collection, a pause of seconds on 2 busy cores, in the middle of an end-to-end test's client.
    They live for the whole run: exempt them, as every role does once started."""
    freeze_startup_objects()


_inproc_names = itertools.count()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random-weight Llama and its byte-level BPE tokenizer, built once and cached."""
    return build_tiny_llama(cache_dir() / "models" / "tiny-llama")


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    """A ZeroMQ context of this test only, terminated at teardown (sockets still open are closed first)."""
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)
    assert context.closed


@pytest.fixture
def tcp_endpoint() -> Callable[[], str]:
    """Makes ``tcp://127.0.0.1:PORT`` endpoints on ports that were free a moment ago."""

    def make() -> str:
        [port] = free_tcp_ports(1)
        return f"tcp://127.0.0.1:{port}"

    return make


@pytest.fixture
def inproc_endpoint(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Makes ``inproc://`` endpoints unique to this test (they work between sockets of one context)."""

    def make(name: str = "ep") -> str:
        return f"inproc://{request.node.name}-{name}-{next(_inproc_names)}"

    return make
