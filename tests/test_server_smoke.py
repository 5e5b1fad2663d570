from chorus import proto
from rawclient import RawClient


async def test_register_join_send_receive(server):
    alice = await RawClient.connect(server.port)
    bob = await RawClient.connect(server.port)
    await alice.register("alice")
    await bob.register("bob")
    joined = await alice.request(proto.Join, "lobby")
    assert joined == proto.Joined("lobby", 0, 1, request_id=joined.request_id)
    await bob.request(proto.Join, "lobby")
    ack = await alice.request(proto.Send, proto.Conversation.room("lobby"), 42, "hello bob")
    assert isinstance(ack, proto.Ack) and ack.seq == 1 and not ack.duplicate
    msg = await bob.next_of(proto.Message)
    assert (msg.conv, msg.seq, msg.sender, msg.body) == (proto.Conversation.room("lobby"), 1, "alice", "hello bob")
