"""The client library's failover between nodes (issue 11): ``servers=`` names other nodes of one cluster.

Two servers here share one SQLite file (each its own store on it: SQLite serialises their writers and assigns seq
inside each transaction), which is enough to be one cluster for a client that moves between them: what it
checks is the client's part, moving at once to the next node when its node is lost or going away, and resuming
there by seq with nothing lost and nothing twice. Node mode with Redis and PostgreSQL is tests/test_cluster.py.
"""
from __future__ import annotations

from contextlib import AsyncExitStack

import trio
from conftest import test_config as config_in
from test_client_server import PASSWORD, messages

from chorus import client, proto
from chorus.server import serve
from chorus.server._store import open_store

ROOM = proto.Conversation.room("lobby")


async def start_node(stack: AsyncExitStack, nursery: trio.Nursery, tmp_path, db_path):
    """A server on its own store over the shared database file; stopped (cancelled) by ``cancel()``."""
    store = await stack.enter_async_context(open_store(db_path))
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve(config_in(tmp_path), store=store, task_status=task_status)

    server = await nursery.start(run)
    return server, scope


async def test_a_client_moves_to_the_next_node_and_resumes_by_seq(tmp_path, nursery):
    db_path = tmp_path / "shared.db"
    async with AsyncExitStack() as stack:
        a, _ = await start_node(stack, nursery, tmp_path, db_path)
        b, b_scope = await start_node(stack, nursery, tmp_path, db_path)
        servers = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
        alice = await stack.enter_async_context(client.open_client(
            "127.0.0.1", a.port, username="alice", password=PASSWORD, register=True))
        bob = await stack.enter_async_context(client.open_client(
            "127.0.0.1", b.port, servers=servers, username="bob", password=PASSWORD, register=True,
            backoff_base_s=0.01))
        await alice.join("lobby")
        await bob.join("lobby")
        assert bob.address == ("127.0.0.1", b.port)
        await alice.send(ROOM, "one")  # two nodes without a broker: b does not hear of it live

        b_scope.cancel()  # bob's node is gone; alice goes on sending on a meanwhile
        for body in ("two", "three"):
            await alice.send(ROOM, body)
        got = await messages(bob, 3)  # bob moved to a at once and caught up by seq
        assert [(m.seq, m.body) for m in got] == [(1, "one"), (2, "two"), (3, "three")]
        assert bob.address == ("127.0.0.1", a.port)
        assert bob.statistics().reconnects == 1
        ack = await bob.send(ROOM, "back")  # and sends there
        assert ack.seq == 4


async def test_the_first_connection_tries_each_node(tmp_path, server):
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    async with client.open_client("127.0.0.1", dead_port, servers=[("127.0.0.1", server.port)],
                                  username="carol", password=PASSWORD, register=True) as carol:
        assert carol.address == ("127.0.0.1", server.port)
        assert (await carol.join("lobby")).members == 1


def test_nodes_teach_the_client_the_cluster_and_it_moves_to_the_least_loaded():
    c = client.Client("10.0.0.1", 7420, username="dave", password=PASSWORD)
    assert c.address == ("10.0.0.1", 7420) and c.nodes == ()
    c._learn_nodes((
        proto.NodeInfo("n1", "10.0.0.1", 7420, 0, 900, False),
        proto.NodeInfo("n2", "10.0.0.2", 7420, 0, 300, True),  # draining: never chosen
        proto.NodeInfo("n3", "10.0.0.3", 7420, 0, 500, False),
        proto.NodeInfo("n4", "10.0.0.4", 7420, 0, 400, False),
    ))
    assert c.address == ("10.0.0.1", 7420)  # learning moves nothing
    c._next_address()
    assert c.address == ("10.0.0.4", 7420)  # the least loaded that is not draining
    c._next_address()  # n4 failed too: it is dropped until a NODES lists it again
    assert c.address == ("10.0.0.3", 7420)
    c._next_address()  # every node it left is dropped, n2 drains: the known addresses in turn, from n3
    assert c.address == ("10.0.0.4", 7420)
    c._next_address()
    assert c.address == ("10.0.0.1", 7420)
