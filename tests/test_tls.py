"""Native TLS (issue 12; spec/PROTOCOL.md §1): the Chorus port and the web port over TLS, with throwaway
certificates made here by trustme. The server's side is server/_tls.py under the same write-through output.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trustme
import wsproto
from cryptography import x509
from wsproto.events import AcceptConnection, Request

from chorus import client, proto
from chorus.proto import CloseReason
from chorusproc import REPO, chorus_env
from rawclient import RawClient, alice_and_bob_in_lobby
from test_websocket_limits import read_to_end
from wsclient import WsClient

PASSWORD = "password-1"
LOBBY = proto.Conversation.room("lobby")
UNLIMITED = {"rate_per_s": 100_000, "rate_burst": 100_000, "user_send_rate_per_s": 100_000, "user_send_burst": 100_000}


class Certs:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, written where the server reads them."""

    def __init__(self, directory: Path):
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "cert.pem"
        self.key_file = directory / "key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.serial = self.issue()

    def issue(self) -> int:
        """A new server certificate in cert_file/key_file; its serial number."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key_file))
        return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def config(self) -> dict:
        return {"tls_cert_file": str(self.cert_file), "tls_key_file": str(self.key_file)}


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs(tmp_path)


async def tls_stream(certs: Certs, port: int, *, rcvbuf: int | None = None) -> trio.SSLStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SSLStream(trio.SocketStream(sock), certs.client_context(), server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


async def tls_raw(certs: Certs, port: int, **kw) -> RawClient:
    raw = RawClient(await tls_stream(certs, port, **kw))
    await raw.send(proto.Hello(1, 1, "tls-test"))
    assert isinstance(await raw.next(), proto.Welcome)
    return raw


def peer_serial(stream: trio.SSLStream) -> int:
    return int(stream.getpeercert()["serialNumber"], 16)


async def next_message(c: client.Client) -> proto.Message:
    with trio.fail_after(10):
        async for event in c.events():
            if isinstance(event, proto.Message):
                return event
    raise AssertionError("the event stream ended")


async def test_client_library_over_tls(start_server, certs):
    server = await start_server(**certs.config())
    async with client.open_client("127.0.0.1", server.port, username="alice", password=PASSWORD, register=True,
                                  ca_file=str(certs.ca_file), backoff_base_s=0.05) as alice, \
            client.open_client("127.0.0.1", server.port, username="bob", password=PASSWORD, register=True,
                               tls=certs.client_context()) as bob:
        await alice.join("#lobby")
        await bob.join("#lobby")
        await alice.send("#lobby", "over TLS")
        assert (await next_message(bob)).body == "over TLS"
        # The server drops alice's connection: she reconnects (TLS again), resumes and sends.
        for conn in list(server.connections):
            if conn.session.username == "alice":
                conn.close(CloseReason.STALE)
        with trio.fail_after(10):
            while alice.statistics().reconnects < 1 or not alice.connected:
                await trio.sleep(0.02)
        ack = await alice.send("#lobby", "after the reconnect")
        assert ack.seq == 2
        assert (await next_message(bob)).body == "after the reconnect"


async def test_client_refuses_a_certificate_it_does_not_trust(start_server, certs):
    server = await start_server(**certs.config())
    with pytest.raises(ssl.SSLCertVerificationError):
        async with client.open_client("127.0.0.1", server.port, username="alice", password=PASSWORD, register=True,
                                      tls=True):  # the system's CAs: the throwaway CA is not among them
            pass


async def test_plain_tcp_on_the_tls_port_is_closed_and_hurts_nobody(start_server, certs, caplog):
    server = await start_server(**certs.config())
    alice, bob = await alice_and_bob_in_lobby(await tls_raw(certs, server.port), await tls_raw(certs, server.port))
    caplog.set_level(logging.INFO, logger="chorus.server")
    plain = await RawClient.connect(server.port, hello=False)
    await plain.send(proto.Hello(1, 1, "plaintext"))
    with trio.fail_after(5):
        assert isinstance(await plain.next(), proto.ConnectionClosed)
    silent = await RawClient.connect(server.port, hello=False)  # says nothing: the handshake deadline applies too
    await alice.send(proto.Send(LOBBY, 1, "still here", request_id=1))
    assert (await bob.next_of(proto.Message)).body == "still here"
    failures = [r for r in caplog.records if "tls handshake failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None
    await silent.stream.aclose()
    assert len(server.connections) == 2


async def test_handshake_deadline(start_server, certs, autojump_clock):
    server = await start_server(handshake_timeout_s=2, **certs.config())
    silent = await RawClient.connect(server.port, hello=False)
    start = trio.current_time()
    assert isinstance(await silent.next(), proto.ConnectionClosed)
    assert 2 <= trio.current_time() - start < 3
    await trio.sleep(0.1)
    assert server.admission.total == 0


async def test_slow_tls_reader_is_cut_off_as_a_slow_consumer(start_server, certs):
    server = await start_server(outbound_buffer_bytes=64 * 1024, **UNLIMITED, **certs.config())
    alice, bob = await alice_and_bob_in_lobby(await tls_raw(certs, server.port), await tls_raw(certs, server.port))
    slow = await tls_raw(certs, server.port, rcvbuf=4096)
    await slow.register("slow")
    await slow.request(proto.Join, "lobby")
    await slow.go_live()  # ...and never reads again
    total = 1000
    bodies = [os.urandom(1500).hex() for _ in range(total)]  # 3 MB: more than the socket buffers hold

    async def read_all(reader):
        for i in range(1, total + 1):
            assert (await reader.next_of(proto.Message)).seq == i

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, bob)
        nursery.start_soon(read_all, alice)
        for i in range(1, total + 1):
            await alice.send(proto.Send(LOBBY, i, bodies[i - 1], request_id=i))
    assert server.close_reasons["SLOW_CONSUMER"] == 1
    assert len(server.connections) == 2
    for conn in server.connections:
        assert conn.output.buffered_bytes <= 64 * 1024


async def wss_connect(certs: Certs, port: int) -> WsClient:
    stream = await tls_stream(certs, port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws",
                                          extra_headers=[(b"origin", f"https://127.0.0.1:{port}".encode())])))
    events: list = []
    accepted = False
    while not accepted:
        data = await stream.receive_some(65536)
        assert data, "closed before the upgrade"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                accepted = True
            elif accepted:
                events.append(event)
            else:
                raise AssertionError(f"upgrade refused: {event!r}")
    ws_client = WsClient(stream, ws, events)
    await ws_client.send(proto.Hello(1, 1, "wss-test"))
    assert isinstance(await ws_client.next(), proto.Welcome)
    return ws_client


async def test_https_page_and_wss_session(start_server, certs):
    server = await start_server(ws_port=0, **certs.config())
    page = await tls_stream(certs, server.ws_port)
    await page.send_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    response = await read_to_end(page)
    assert response.startswith(b"HTTP/1.1 200") and b"<html" in response.lower()
    ws_alice, tcp_bob = await alice_and_bob_in_lobby(await wss_connect(certs, server.ws_port),
                                                     await tls_raw(certs, server.port))
    await ws_alice.send(proto.Send(LOBBY, 1, "from the browser side", request_id=1))
    assert (await tcp_bob.next_of(proto.Message)).body == "from the browser side"
    await tcp_bob.send(proto.Send(LOBBY, 1, "back over WSS", request_id=2))
    assert (await ws_alice.next_of(proto.Message)).body == "from the browser side"  # her own, then bob's
    assert (await ws_alice.next_of(proto.Message)).body == "back over WSS"
    await ws_alice.send(proto.Bye(CloseReason.CLIENT_QUIT))
    with trio.fail_after(5):
        assert isinstance(await ws_alice.next_of(proto.ConnectionClosed), proto.ConnectionClosed)
    assert ws_alice.close_code == 1000


async def test_plain_http_on_the_https_port_is_closed(start_server, certs):
    server = await start_server(ws_port=0, **certs.config())
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    with trio.fail_after(5):
        data = await read_to_end(stream)
    assert b"HTTP/1.1 200" not in data  # an alert at most, never the page in plaintext


async def test_reload_tls_swaps_the_certificate_for_new_connections(start_server, certs, caplog):
    server = await start_server(**certs.config())
    first = await tls_stream(certs, server.port)
    assert peer_serial(first) == certs.serial
    new_serial = certs.issue()
    assert server.reload_tls()
    second = await tls_stream(certs, server.port)
    assert peer_serial(second) == new_serial != certs.serial
    # A bad file: the old (new) context stays, one line says why.
    certs.cert_file.write_text("not a certificate\n")
    caplog.set_level(logging.WARNING, logger="chorus.server")
    assert not server.reload_tls()
    assert [r.getMessage() for r in caplog.records if "TLS reload failed" in r.getMessage()]
    third = await tls_stream(certs, server.port)
    assert peer_serial(third) == new_serial
    for stream in (first, second, third):
        await stream.aclose()


def _server_process(tmp_path: Path, certs: Certs) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "chorus.server", "--port", "0", "--data-dir", str(tmp_path / "data"),
           "--argon2-time-cost", "1", "--argon2-memory-kib", "1024",
           "--tls-cert-file", str(certs.cert_file), "--tls-key-file", str(certs.key_file)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("Chorus listening on"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split()[3].split(":")[-1].rstrip(","))


async def test_terminal_client_and_sighup(tmp_path, certs):
    proc, port = _server_process(tmp_path, certs)
    try:
        env = chorus_env(tmp_path / "config", CHORUS_PASSWORD=PASSWORD)
        base = [sys.executable, "-m", "chorus.client", "--server", f"127.0.0.1:{port}", "--user", "alice"]

        def run(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([*base, *args], cwd=REPO, env={**env, **(extra_env or {})}, capture_output=True,
                                  text=True, timeout=30)

        done = await trio.to_thread.run_sync(lambda: run("--register", "--tls", "--ca-file", str(certs.ca_file),
                                                         "send", "--create", "#lobby", "hello over TLS"))
        assert done.returncode == 0, done.stderr
        # Without the CA the certificate is refused: one line, no traceback.
        refused = await trio.to_thread.run_sync(lambda: run("--tls", "send", "#lobby", "nope"))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr and "certificate" in refused.stderr
        # The environment says the same as the flags.
        by_env = await trio.to_thread.run_sync(lambda: run("send", "#lobby", "again", extra_env={
            "CHORUS_TLS": "1", "CHORUS_CA_FILE": str(certs.ca_file)}))
        assert by_env.returncode == 0, by_env.stderr
        # SIGHUP: a new certificate for new connections.
        new_serial = certs.issue()
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while True:
                stream = await tls_stream(certs, port)
                serial = peer_serial(stream)
                await stream.aclose()
                if serial == new_serial:
                    break
                await trio.sleep(0.05)
        assert proc.poll() is None  # SIGHUP did not stop it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "TLS certificate reloaded" in stderr


async def test_partly_sent_records_reach_the_peer_whole_and_in_order(certs):
    """Output over TLSStream with a tiny send buffer: records the kernel takes in pieces are offered again and
    skipped (server/_tls.py), so the peer decrypts exactly the bytes written, in order."""
    from chorus.server._output import Output
    from chorus.server._tls import TLSStream, load_context
    from chorus.server._transport import SocketStream

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server_side = TLSStream(SocketStream(ours), load_context(str(certs.cert_file), str(certs.key_file)))
    client_side = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)), certs.client_context(),
                                 server_hostname="127.0.0.1")
    payload = os.urandom(3 << 20)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side.do_handshake)
        await server_side.handshake()
        output = Output(server_side, 8 << 20, lambda flush: nursery.start_soon(flush))
        i = 0
        for size in itertools.cycle((1, 1000, 40_000, 300, 16_384)):  # some frames span records
            if i >= len(payload):
                break
            assert output.write(payload[i:i + size])
            i += size
        with trio.fail_after(20):
            while len(received) < len(payload):
                received += await client_side.receive_some(7000)
                await trio.sleep(0)
            await output.wait_drained()
        await server_side.aclose(linger_s=0)
    assert bytes(received) == payload
