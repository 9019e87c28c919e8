"""Shared fixtures. Everything stays on loopback: HTTP on 127.0.0.1, mDNS on the 127.0.0.1 interface only."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import torch
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from gossipfl.config import NodeConfig

from .helpers import LOOPBACK, node_config

torch.set_num_threads(1)


@pytest.fixture
def cluster() -> str:
    """A cluster name of this test's own, so nodes of other tests or runs on this host stay out."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_config(cluster: str) -> Callable[..., NodeConfig]:
    return functools.partial(node_config, cluster=cluster)


@pytest.fixture
async def zc() -> AsyncIterator[AsyncZeroconf]:
    azc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    yield azc
    await azc.async_close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s
