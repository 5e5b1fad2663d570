"""Login storms (issue 14) over real sockets: a login queued for a hashing thread is served, not timed out.

The auth deadline (spec §9.1) does not count the wait for a free hashing thread, nor the delay a SERVER_BUSY
refusal asks for (server/_auth.py ``HashQueue.slot``, server/_conn.py ``auth_waiting``). The tests hold every
hashing thread themselves, so the queue is full for as long as they say, whatever the machine's speed.
"""
from __future__ import annotations

import trio
from rawclient import RawClient

from chorus import proto

PASSWORD = "password123"


async def _registered(port: int, names: list[str]) -> None:
    for name in names:
        client = await RawClient.connect(port)
        await client.send(proto.Register(name, PASSWORD, request_id=client.rid()))
        assert isinstance(await client.next_of(proto.AuthOk, proto.Error), proto.AuthOk)
        await client.stream.aclose()


async def _wait_for(condition, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)


async def test_logins_waiting_for_a_hashing_thread_outlive_the_auth_deadline(start_server):
    server = await start_server(auth_timeout_s=1.0, handshake_timeout_s=1.0, max_pending_hashes=16)
    names = ["storm1", "storm2", "storm3"]
    await _registered(server.port, names)
    hashes = server.budgets.hashes
    holders = [object() for _ in range(int(hashes.threads.total_tokens))]
    for holder in holders:  # every hashing thread is busy (as in a storm) until the test lets go
        await hashes.threads.acquire_on_behalf_of(holder)
    logins = []
    for i, name in enumerate(names):  # from three addresses, so that all three are admitted and wait for a thread
        client = await RawClient.connect(server.port, source=f"127.0.0.{2 + i}")
        await client.send(proto.Login(name, PASSWORD, request_id=client.rid()))
        logins.append(client)
    await _wait_for(lambda: hashes.pending == len(names))
    # A connection opened after them, that never logs in, times out: their own deadlines have passed too.
    idle = await RawClient.connect(server.port, source="127.0.0.9")
    timed_out = await idle.next_of(proto.Error)
    assert timed_out.code == proto.ErrorCode.HANDSHAKE_TIMEOUT
    waiting = [c for c in server.connections if c.transport.address in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
    assert len(waiting) == 3 and not any(c.closing or c.user_id is not None for c in waiting)
    for holder in holders:
        hashes.threads.release_on_behalf_of(holder)
    for client in logins:  # each hash ran when a thread was free, and its deadline counted from then
        assert isinstance(await client.next_of(proto.AuthOk, proto.Error), proto.AuthOk)


async def test_a_refused_login_gets_the_delay_it_was_asked_to_wait(start_server):
    """SERVER_BUSY says "retry after N ms": the deadline moves by N, so an obedient client is not cut off."""
    server = await start_server(auth_timeout_s=1.0, handshake_timeout_s=1.0, max_pending_hashes=1)
    await _registered(server.port, ["waiter", "refused"])
    hashes = server.budgets.hashes
    holders = [object() for _ in range(int(hashes.threads.total_tokens))]
    for holder in holders:
        await hashes.threads.acquire_on_behalf_of(holder)
    hashes._took_s = 2.0  # what the queue has learnt a hash takes: its retry hint (seconds, at least 0.1)
    waiter = await RawClient.connect(server.port, source="127.0.0.2")
    await waiter.send(proto.Login("waiter", PASSWORD, request_id=waiter.rid()))
    await _wait_for(lambda: hashes.pending == 1)
    refused = await RawClient.connect(server.port, source="127.0.0.3")
    await refused.send(proto.Login("refused", PASSWORD, request_id=refused.rid()))
    busy = await refused.next_of(proto.Error)
    assert busy.code == proto.ErrorCode.SERVER_BUSY and busy.retry_after_ms >= 2000
    conn = next(c for c in server.connections if c.transport.address == "127.0.0.3")
    assert conn._auth_deadline() >= conn.opened_at + 1.0 + 2.0
    for holder in holders:
        hashes.threads.release_on_behalf_of(holder)
    assert isinstance(await waiter.next_of(proto.AuthOk, proto.Error), proto.AuthOk)
    # It comes back when told, past its first deadline, and is let in.
    await refused.send(proto.Login("refused", PASSWORD, request_id=refused.rid()))
    assert isinstance(await refused.next_of(proto.AuthOk, proto.Error), proto.AuthOk)


async def _token(port: int, name: str) -> str:
    client = await RawClient.connect(port)
    await client.send(proto.Register(name, PASSWORD, request_id=client.rid()))
    ok = await client.next_of(proto.AuthOk)
    await client.stream.aclose()
    return ok.token


async def test_resumes_the_server_cannot_take_yet_wait_their_turn_or_are_told_when(start_server):
    """After a restart everyone resumes at once: a few run, some wait (their deadline stopped), the rest get
    SERVER_BUSY with a hint, and every one of them gets in."""
    server = await start_server(auth_timeout_s=1.0, handshake_timeout_s=1.0)
    tokens = [await _token(server.port, f"back{i}") for i in range(3)]
    resumes = server.budgets.resumes
    resumes.max_waiting = 2
    holders = [object() for _ in range(int(resumes.limiter.total_tokens))]
    for holder in holders:  # every place is taken until the test lets go
        await resumes.limiter.acquire_on_behalf_of(holder)
    clients = [await RawClient.connect(server.port) for _ in tokens]
    for client, token in zip(clients[:2], tokens, strict=False):
        await client.send(proto.Resume(token, request_id=client.rid()))
    await _wait_for(lambda: resumes.waiting == 2)
    await clients[2].send(proto.Resume(tokens[2], request_id=clients[2].rid()))
    busy = await clients[2].next_of(proto.Error)
    assert busy.code == proto.ErrorCode.SERVER_BUSY and busy.retry_after_ms > 0
    refused = next(c for c in server.connections if c.opened_at == max(c.opened_at for c in server.connections))
    assert refused._auth_deadline() >= refused.opened_at + 1.0 + (busy.retry_after_ms - 1) / 1000
    await trio.sleep(busy.retry_after_ms / 1000)  # an obedient client comes back when told: now it may queue
    resumes.max_waiting = 3
    await clients[2].send(proto.Resume(tokens[2], request_id=clients[2].rid()))
    await _wait_for(lambda: resumes.waiting == 3)
    idle = await RawClient.connect(server.port)  # opened last, never authenticates: its deadline passes
    assert (await idle.next_of(proto.Error)).code == proto.ErrorCode.HANDSHAKE_TIMEOUT
    for holder in holders:
        resumes.limiter.release_on_behalf_of(holder)
    for client in clients:  # they waited past their first deadline and were served in turn
        assert isinstance(await client.next_of(proto.AuthOk, proto.Error), proto.AuthOk)
    assert resumes.statistics() == {"running": 0, "waiting": 0, "refused": 1}
