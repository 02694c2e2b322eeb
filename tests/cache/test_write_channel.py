"""A session's write channel against a cache node played by the test, on a real nats-server:
what it says when the node is not there, and how a batch the node never answered ends."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from nats.aio.msg import Msg

from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient, WriteChannel
from shared.contracts.cache.wire import node_subject
from tests.conftest import wait_for


async def test_a_batch_a_dead_node_took_fails_as_lost_when_a_later_probe_is_answered(
    nats_url: str,
) -> None:
    node = f"test-node-{uuid.uuid4().hex[:8]}"
    batches: list[bytes] = []

    async def cache_node(msg: Msg) -> None:
        batches.append(msg.data)
        if len(batches) == 1:
            return  # taken off the bus by a process that died before answering
        _key, _writer, records = wire.parse_batch(msg.data)
        await msg.respond(b"process1" + bytes(len(records)))  # one 0 status per record

    server_nc, client_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        await server_nc.subscribe(node_subject(node, wire.V_WC_WRITE), cb=cache_node)
        await server_nc.flush()
        # A timeout far beyond the test: the lost batch must end by the probe, not by it.
        channel = CacheClient(client_nc, timeout_s=300).writer("k", node)
        lost = channel.submit(wire.OP_WRITE, 0, 4, b"abcd")
        await wait_for(lambda: len(batches) == 1, "the first batch to reach the node")
        await channel.probe(timeout_s=5)
        with pytest.raises(wire.CacheError) as failed:
            await asyncio.wait_for(lost, 5)
        assert failed.value.kind == "not_alive" and wire.transient(failed.value)
        assert f"cache node {node}: no answer to a batch (lost)" in str(failed.value)
        # The channel goes on: the next record is answered.
        await asyncio.wait_for(channel.submit(wire.OP_WRITE, 0, 4, b"efgh"), 5)
        assert len(batches) == 3  # the lost one, the probe (no records), the next one
        assert wire.parse_batch(batches[1]) == ("k", "", [])
    finally:
        await server_nc.close()
        await client_nc.close()


async def test_no_node_answering_is_a_transient_error_naming_the_node(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        channel = CacheClient(nc).writer("k", "test-nobody")
        with pytest.raises(wire.CacheError) as write_failed:
            await channel.submit(wire.OP_WRITE, 0, 4, b"abcd")
        with pytest.raises(wire.CacheError) as probe_failed:
            await channel.probe(timeout_s=5)
        for e in (write_failed.value, probe_failed.value):
            assert e.kind == "not_alive" and wire.transient(e)
            assert "cache node test-nobody holding write cache k is not alive" in str(e)
    finally:
        await nc.close()


async def reachable(channel: WriteChannel) -> None:
    for _ in range(50):
        try:
            return await channel.probe(timeout_s=1)
        except wire.CacheError as e:
            if e.kind != "not_alive":
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"cache node {channel.node} never answered")


async def test_an_answer_from_a_new_process_of_the_node_is_a_restart(nats_url: str) -> None:
    node = f"test-node-{uuid.uuid4().hex[:8]}"
    incarnation = [b"process1"]

    async def cache_node(msg: Msg) -> None:
        _key, _writer, records = wire.parse_batch(msg.data)
        await msg.respond(incarnation[0] + bytes(len(records)))

    server_nc, client_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        await server_nc.subscribe(node_subject(node, wire.V_WC_WRITE), cb=cache_node)
        await server_nc.flush()
        channel = CacheClient(client_nc).writer("k", node)
        channel.incarnation = b"process1"  # as wc.open said
        restarts: list[bytes] = []
        channel.on_restart = lambda: restarts.append(channel.incarnation)
        # Once in a full run the first request here got "no responders" although the
        # subscription was flushed on the other connection: wait until this one sees it.
        await reachable(channel)
        await channel.submit(wire.OP_WRITE, 0, 4, b"abcd")
        await channel.probe(timeout_s=5)
        assert restarts == []
        incarnation[0] = b"process2"  # the node restarted
        await channel.submit(wire.OP_FLUSH, 0, 0, None, True)
        await channel.submit(wire.OP_WRITE, 0, 4, b"efgh")
        await channel.probe(timeout_s=5)
        assert restarts == [b"process2"]
    finally:
        await server_nc.close()
        await client_nc.close()
