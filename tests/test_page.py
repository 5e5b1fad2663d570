"""The chat page's features (issue 13 "The page"), one test each, in headless Chromium (tests/pagekit.py) next to
TCP clients (tests/rawclient.py) on a real server with a real SQLite file."""
from __future__ import annotations

import time

import pytest
import trio

from chorus import proto
from pagekit import DESKTOP, PASSWORD, PHONE, Page, in_chromium, on_trio
from rawclient import RawClient

pytestmark = pytest.mark.timeout(90)

LOBBY = proto.Conversation.room("lobby")
UNLIMITED = {"rate_burst": 1000, "user_send_burst": 1000}


class Peer:
    """A user on a TCP connection: registers, joins and sends; what it receives is read on request."""

    def __init__(self, raw: RawClient, name: str):
        self.raw = raw
        self.name = name
        self._ids = iter(range(1, 1 << 30))

    @classmethod
    async def open(cls, port: int, name: str, *rooms: str, register: bool = True, version: int = 1) -> "Peer":
        raw = await RawClient.connect(port, hello=False)
        await raw.send(proto.Hello(1, version, "page-test"))
        assert isinstance(await raw.next(), proto.Welcome)
        if register:
            await raw.register(name)
        else:
            assert isinstance(await raw.request(proto.Login, name, PASSWORD), proto.AuthOk)
        await raw.go_live()
        for room in rooms:
            await raw.request(proto.Join, room)
        return cls(raw, name)

    async def say(self, conv: proto.Conversation | str, *bodies: str) -> int:
        """Send each body (pipelined) to ``conv`` ("#room", "@user" or a Conversation); the last seq."""
        conv = _conv(conv)
        rids = []
        for body in bodies:
            rids.append(self.raw.rid())
            await self.raw.send(proto.Send(conv, next(self._ids), body, request_id=rids[-1]))
        seq = 0
        while rids:
            event = await self.raw.next()
            if getattr(event, "request_id", 0) in rids:
                assert isinstance(event, proto.Ack), event
                rids.remove(event.request_id)
                seq = max(seq, event.seq)
        return seq

    async def receives(self, body: str) -> proto.Message:
        """The next MESSAGE with ``body`` (others before it are skipped)."""
        with trio.fail_after(10):
            while (message := await self.raw.next_of(proto.Message)).body != body:
                pass
        return message

    async def last_seq(self, conv: proto.Conversation | str) -> int:
        page = await self.raw.request(proto.History, _conv(conv), proto.Direction.BEFORE, 0, 1)
        return page.messages[-1].seq if page.messages else 0

    async def close(self) -> None:
        await self.raw.stream.aclose()


def _conv(conv: proto.Conversation | str) -> proto.Conversation:
    if isinstance(conv, proto.Conversation):
        return conv
    return proto.Conversation.room(conv[1:]) if conv.startswith("#") else proto.Conversation.direct(conv[1:])


def url(server, slot: str = "") -> str:
    return f"http://127.0.0.1:{server.ws_port}/" + (f"#{slot}" if slot else "")


def carol_in_lobby(browser, server, viewport: dict) -> Page:
    """A new page, registered as carol, in #lobby."""
    page = Page(browser.new_context(viewport=viewport), url(server))
    page.enter("carol")
    page.join("lobby")
    return page


async def test_conversations_badges_and_title_after_a_reload_and_on_a_second_device(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    carol = await Peer.open(server.port, "carol", "lobby", "dev")
    bob = await Peer.open(server.port, "bob", "lobby", "dev")
    await bob.say("#lobby", "one", "two", "three")
    await bob.say("@carol", "psst, carol", "are you there?")
    await carol.close()

    def steps(browser):
        desk = Page(browser.new_context(viewport=DESKTOP), url(server))
        assert desk.is_disabled("#message-input") and desk.is_disabled("#send")  # no conversation open
        desk.enter("carol", register=False)
        # The direct conversation and both rooms, from CONVERSATION_LIST, with the unread counts the server knows.
        assert (desk.badge("@bob"), desk.badge("#lobby"), desk.badge("#dev")) == (2, 3, 0)
        desk.wait_for_function("() => document.title === '(5) Chorus'")
        assert desk.is_disabled("#message-input")

        desk.room_button("@bob").click()
        desk.wait_for_selector(".message .body >> text=are you there?")
        desk.wait_for_function("() => document.title === '(3) @bob · Chorus'")
        assert desk.badge("@bob") == 0 and desk.is_enabled("#message-input")

        # A reload reopens the last conversation; the read marker came back from the server.
        desk.reload()
        desk.wait_live()
        desk.wait_for_selector(".message .body >> text=are you there?")
        assert desk.text_content("#title") == "@bob"
        desk.wait_for_function("() => document.title === '(3) @bob · Chorus'")
        assert (desk.badge("@bob"), desk.badge("#lobby")) == (0, 3)

        # A second device (its own storage): the same threads and counts, nothing open.
        phone = Page(browser.new_context(viewport=PHONE), url(server))
        phone.enter("carol", register=False)
        assert (phone.badge("@bob"), phone.badge("#lobby"), phone.badge("#dev")) == (0, 3, 0)
        phone.wait_for_function("() => document.title === '(3) Chorus'")
        assert phone.get_attribute("#app", "data-view") == "rooms"
        # Read on the phone: the desktop's badge follows at once (the server's RECEIPT of the user's own READ).
        phone.room_button("#lobby").click()
        phone.wait_for_selector(".message .body >> text=three")
        desk.wait_for_function("() => document.title === '@bob · Chorus'")
        assert desk.badge("#lobby") == 0

        # Left on the phone: the desktop learns it when its window is next focused (LIST_CONVERSATIONS again; the
        # server tells the user's own connections nothing of a LEAVE, spec §5.39).
        phone.join("dev")
        phone.say("/leave")
        phone.wait_for_selector('#rooms .room-name:text-is("#dev")', state="detached")
        assert desk.room_button("#dev")
        desk.evaluate("window.dispatchEvent(new FocusEvent('focus'))")  # what the browser fires on focus
        desk.wait_for_selector('#rooms .room-name:text-is("#dev")', state="detached")

        # A direct conversation with a user who does not exist: said so, and the entry can be removed.
        desk.join("@nobody")
        desk.say("hello?")
        desk.wait_for_selector("#notice >> text=there is no user nobody")
        assert desk.room_button("@nobody").get_attribute("title") == "There is no user nobody"
        desk.click('#rooms .room-item:has(.room-name:text-is("@nobody")) .remove')
        desk.wait_for_selector('#rooms .room-name:text-is("@nobody")', state="detached")
        assert desk.is_disabled("#message-input")  # it was the open one: nothing is open now
        desk.reload()
        desk.wait_live()
        assert desk.query_selector('#rooms .room-name:text-is("@nobody")') is None
        assert desk.is_disabled("#message-input")  # the removed one is not reopened either
        desk.assert_no_errors()
        phone.assert_no_errors()

    await in_chromium(steps)


async def test_member_list_with_presence_leave_and_room_browser(start_server):
    server = await start_server(ws_port=0, presence_offline_delay_s=0.1, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", "random")
    peers = {}

    async def dave_joins() -> None:
        peers["dave"] = await Peer.open(server.port, "dave")
        await peers["dave"].raw.request(proto.Join, "lobby")

    async def dave_leaves() -> None:
        await peers["dave"].raw.request(proto.Leave, "lobby")

    def steps(browser):
        page = carol_in_lobby(browser, server, DESKTOP)
        page.click("#members-button")
        page.wait_for_selector('#members-panel .member[data-user="bob"][data-status="online"]')
        page.wait_for_selector('.member[data-user="carol"][data-status="online"] >> text=carol (you)')
        assert page.text_content("#members-title") == "#lobby: 2 online of 2"
        uncovered = "() => { const r = document.getElementById('send').getBoundingClientRect();" \
                    " return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2).id; }"
        assert page.evaluate(uncovered) == "send"  # the list is over the messages, never over the message box

        on_trio(bob.close)  # PRESENCE OFFLINE once the server's delay has passed
        page.wait_for_selector('.member[data-user="bob"][data-status="offline"]')
        on_trio(dave_joins)  # MEMBERSHIP JOINED
        page.wait_for_selector('.member[data-user="dave"][data-status="online"]')
        assert page.text_content("#members-title") == "#lobby: 2 online of 3"
        on_trio(dave_leaves)  # MEMBERSHIP LEFT
        page.wait_for_selector('.member[data-user="dave"]', state="detached")
        page.keyboard.press("Escape")
        page.wait_for_selector("#members-panel", state="hidden")

        # The room browser (LIST_ROOMS): the rooms with their member counts; joining one opens it.
        page.click("#browse")
        page.wait_for_selector('#room-browser .room-info[data-room="random"] >> text=1 member')
        assert page.text_content('.room-info[data-room="lobby"] button') == "Open"
        page.fill("#room-filter", "#ran")
        page.wait_for_selector('.room-info[data-room="lobby"]', state="hidden")
        assert page.is_visible('.room-info[data-room="random"]')
        page.click('.room-info[data-room="random"] button >> text=Join')
        page.wait_for_selector("#room-browser", state="hidden")
        page.wait_for_function("() => document.getElementById('title').textContent === '#random'")
        page.room_button("#random")

        # Leave: the room goes from the list, nothing is open, and the server agrees.
        page.click("#members-button")
        page.wait_for_selector('.member[data-user="bob"]')  # #random's members now
        page.click("#leave")
        page.wait_for_selector('#rooms .room-name:text-is("#random")', state="detached")
        assert page.is_disabled("#message-input")
        page.click("#browse")
        page.wait_for_selector('.room-info[data-room="random"] >> text=1 member')
        assert page.text_content('.room-info[data-room="random"] button') == "Join"
        page.assert_no_errors()

    await in_chromium(steps)


async def test_divider_jump_to_latest_news_elsewhere_and_compact_grouping(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", "dev")
    await bob.say("#lobby", *(f"earlier {i}" for i in range(1, 41)))

    def steps(browser):
        page = Page(browser.new_context(viewport=PHONE), url(server))
        page.enter("carol")
        page.join("lobby")  # 40 messages of the past: read on joining, no divider
        page.wait_for_selector(".message .body >> text=earlier 40")
        assert page.query_selector(".divider") is None
        page.join("dev")

        # News in another conversation, seen from inside this one: the back button counts it, and the title.
        on_trio(bob.say, "#lobby", *(f"new {i}" for i in range(1, 6)))
        page.wait_for_selector('#back[data-unread="5"]')
        page.wait_for_function("() => document.title === '(5) #dev · Chorus'")
        page.click("#back")
        assert page.badge("#lobby") == 5

        # Opening it: "New messages" right above the first unread, and it is read once seen to the end.
        page.room_button("#lobby").click()
        page.wait_for_selector(".message .body >> text=new 5")
        above = page.eval_on_selector(".divider", "d => d.nextElementSibling.querySelector('.body').textContent")
        assert above == "new 1"
        page.wait_for_function("() => document.title === '#lobby · Chorus'")

        # Compact: one header for a run of one sender, a line per message.
        headers = page.eval_on_selector_all(".message[data-sender=bob]",
                                            "ns => ns.filter(n => n.querySelector('.meta')).length")
        assert headers == 2  # the 40 earlier ones, then the 5 after the divider
        heights = page.eval_on_selector_all(".message.continued", "ns => ns.map(n => n.getBoundingClientRect().height)")
        assert len(heights) == 43 and max(heights) < 26, heights  # ~30 lines on a phone's screen

        # Scrolled up when a message arrives: a jump-to-latest button counts it; the view stays where it was.
        page.eval_on_selector("#messages", "box => { box.scrollTop = 0; }")
        page.wait_for_selector("#jump >> text=Jump to latest")
        on_trio(bob.say, "#lobby", "while you were scrolled up")
        page.wait_for_selector("#jump.news >> text=1 new message ↓")
        assert page.eval_on_selector("#messages", "box => box.scrollTop") < 100
        page.wait_for_function("() => document.title === '(1) #lobby · Chorus'")
        page.click("#jump")
        page.wait_for_selector("#jump", state="hidden")
        assert page.eval_on_selector("#messages", "b => b.scrollHeight - b.scrollTop - b.clientHeight") < 40
        page.wait_for_function("() => document.title === '#lobby · Chorus'")
        # The divider moved above what arrived while scrolled up only if there was none: it stays at "new 1".
        assert page.eval_on_selector(".divider", "d => d.nextElementSibling.textContent").endswith("new 1")
        page.assert_no_errors()

    await in_chromium(steps)


#: Message text → the hrefs the page makes of it: http and https only, trailing punctuation left out.
LINK_CASES = {
    "javascript:alert(1)": [],
    "JavaScript://example.org/%0Aalert(1)": [],
    "data:text/html,<script>alert(1)</script>": [],
    "vbscript:msgbox(1) file:///etc/passwd ftp://example.org": [],
    "https:// and http://": [],
    "HTTPS://Example.ORG/Path": ["https://example.org/Path"],
    "(see https://en.wikipedia.org/wiki/Foo_(bar)).": ["https://en.wikipedia.org/wiki/Foo_(bar)"],
    "at https://example.org/a?b=1&c=2, then http://127.0.0.1:7421/.": [
        "https://example.org/a?b=1&c=2", "http://127.0.0.1:7421/"],
    'https://example.org/a"onmouseover="alert(1)': ["https://example.org/a"],
    "`https://example.org/in-code` is code": [],
}


async def test_links_formatting_and_mentions_are_safe(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby")
    hostile = ("see https://example.org/a?b=1&c=2, *bold* _it_ `x<y>` my_var_name javascript:alert(1) "
               "<img src=x onerror=alert(1)> <a href='javascript:alert(2)'>x</a> hi @carol and @bob")

    def steps(browser):
        page = carol_in_lobby(browser, server, DESKTOP)
        on_trio(bob.say, "#lobby", hostile, "```\nfor x in y:\n    print('<b>', x)\n```", "no mention of carol here")
        page.wait_for_selector(".message .body >> text=no mention of carol here")
        body = page.query_selector('.message[data-seq="1"] .body')
        assert body.text_content() == hostile.replace("*bold*", "bold").replace("_it_", "it").replace("`x<y>`", "x<y>")
        links = body.eval_on_selector_all("a", "as => as.map(a => [a.getAttribute('href'), a.rel, a.target, a.text])")
        assert links == [["https://example.org/a?b=1&c=2", "noopener noreferrer", "_blank", "https://example.org/a?b=1&c=2"]]
        assert body.eval_on_selector("strong", "n => n.textContent") == "bold"
        assert body.eval_on_selector("em", "n => n.textContent") == "it"
        assert body.eval_on_selector("code", "n => n.textContent") == "x<y>"
        assert page.query_selector("#messages img") is None and page.query_selector("#messages [onerror]") is None
        mentions = body.eval_on_selector_all(".mention",
                                             "ns => ns.map(n => [n.textContent, n.classList.contains('of-me')])")
        assert mentions == [["@carol", True], ["@bob", False]]
        assert page.is_visible(".mention.of-me")
        page.set_viewport_size(PHONE)
        assert page.is_visible(".mention.of-me")  # at phone width too
        mentioned = page.eval_on_selector_all(".message.mentions-me", "ns => ns.map(n => n.dataset.seq)")
        assert mentioned == ["1"]  # a bare name is not a mention
        assert page.text_content('.message[data-seq="2"] pre code') == "for x in y:\n    print('<b>', x)"
        assert page.evaluate("typeof window.__pwned") == "undefined" and page.title().endswith("Chorus")
        # What the page's tokenizer makes a link, for text people and attackers write.
        links = page.evaluate("""cases => import('/chorus.js').then(m => cases.map(
            text => m.tokenize(text).filter(t => t.kind === 'link').map(t => t.href)))""", list(LINK_CASES))
        assert dict(zip(LINK_CASES, links, strict=True)) == LINK_CASES
        page.assert_no_errors()

    await in_chromium(steps)


async def test_slash_commands_are_never_posted_as_text(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby")
    await bob.say("#lobby", "hello")

    def steps(browser):
        page = carol_in_lobby(browser, server, DESKTOP)
        page.say("/join #random")
        page.wait_for_function("() => document.getElementById('title').textContent === '#random'")
        assert page.input_value("#message-input") == ""
        page.say("/me waves")
        page.wait_for_selector(".message.action .body >> text=* carol waves")
        page.say("/msg bob hi there")
        assert on_trio(bob.receives, "hi there").conv == proto.Conversation.direct("carol")
        page.wait_for_function("() => document.getElementById('title').textContent === '@bob'")
        # Alt+↑/↓ walk the list (#lobby, #random, then @bob), round the end.
        page.keyboard.press("Alt+ArrowDown")
        page.wait_for_function("() => document.getElementById('title').textContent === '#lobby'")
        page.keyboard.press("Alt+ArrowUp")
        page.wait_for_function("() => document.getElementById('title').textContent === '@bob'")
        page.say("/frobnicate now")
        page.wait_for_selector("#notice >> text=Unknown command /frobnicate")
        assert page.input_value("#message-input") == "/frobnicate now"  # kept, to be corrected
        page.say("/msg")
        page.wait_for_selector("#notice >> text=Usage: /msg user text")
        page.room_button("#random").click()
        page.say("/leave")
        page.wait_for_selector('#rooms .room-name:text-is("#random")', state="detached")
        page.room_button("#lobby").click()
        page.say("//slash, escaped")
        assert on_trio(bob.receives, "/slash, escaped").conv == LOBBY
        assert on_trio(bob.last_seq, "#lobby") == 2  # "hello" and the escaped one: no command went to #lobby
        page.assert_no_errors()

    await in_chromium(steps)


#: Records each Notification the page makes (the real constructor still runs): what a person would see.
RECORD_NOTIFICATIONS = """
window.__notifications = [];
window.__shown = [];
const Real = window.Notification;
window.Notification = class extends Real {
  constructor(title, options) {
    super(title, options);
    window.__notifications.push([title, options.body]);
    window.__shown.push(this);
  }
};
"""


async def test_notifications_on_a_mention_or_a_direct_message_when_permitted(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", "dev")

    def steps(browser):
        context = browser.new_context(viewport=DESKTOP)
        context.grant_permissions(["notifications"])  # CDP Browser.grantPermissions, as a person's "Allow"
        context.add_init_script(RECORD_NOTIFICATIONS)
        page = Page(context, url(server))
        page.enter("carol")
        assert page.evaluate("Notification.permission") == "granted" and page.is_hidden("#notify")
        page.join("lobby")
        page.join("dev")
        on_trio(bob.say, "#lobby", "nothing for carol here")
        on_trio(bob.say, "#lobby", "@carol can you look at this?")
        on_trio(bob.say, "@carol", "a word in private")
        on_trio(bob.say, "#dev", "@carol but you are watching #dev")  # the open conversation: no notification
        page.wait_for_selector(".message .body >> text=but you are watching")
        page.wait_for_function("() => window.__notifications.length >= 2")
        assert page.evaluate("window.__notifications") == [
            ["bob in #lobby", "@carol can you look at this?"], ["bob", "a word in private"]]
        page.evaluate("window.__shown[1].onclick()")  # clicking the DM's notification opens the conversation
        page.wait_for_function("() => document.getElementById('title').textContent === '@bob'")
        page.assert_no_errors()

        # Without permission nothing is shown, and the page offers to ask.
        other = Page(browser.new_context(viewport=DESKTOP), url(server, "dave"))
        other.wait_for_selector("#login:not([disabled])")
        assert other.evaluate("Notification.permission") == "default"
        other.enter("dave")
        assert other.is_visible("#notify")
        other.assert_no_errors()

    await in_chromium(steps)


def header_fits(page) -> dict:
    """At phone width: whether the conversation's name is shown whole, overlapped by nothing in the header."""
    return page.evaluate("""() => {
      const title = document.getElementById('title');
      const box = title.getBoundingClientRect();
      const hits = ['status', 'logout', 'me', 'members-button'].filter((id) => {
        const r = document.getElementById(id).getBoundingClientRect();
        return r.width && r.height && r.left < box.right && r.right > box.left
          && r.top < box.bottom && r.bottom > box.top;
      });
      return {text: title.textContent, whole: title.scrollWidth <= title.clientWidth, overlapped: hits};
    }""")


async def test_reconnect_within_two_seconds_with_a_countdown_and_the_phone_header(make_config, nursery):
    from chorus.server import serve

    config = make_config(ws_port=0, reconnect_hint_ms=2500, shutdown_grace_s=0.5, **UNLIMITED)
    gone = trio.Event()

    async def first_run(*, task_status):
        async with trio.open_nursery() as inner:  # ends when serve() has closed its listeners
            task_status.started(await inner.start(serve, config))
        gone.set()

    first = await nursery.start(first_run)

    async def stop() -> None:
        first.shutdown()  # GOAWAY with a 2.5 s hint, then the listeners close
        await gone.wait()

    async def restart() -> float:
        await nursery.start(serve, make_config(ws_port=first.ws_port, port=first.port, **UNLIMITED))
        return time.monotonic()

    def steps(browser):
        page = Page(browser.new_context(viewport=PHONE, device_scale_factor=2), url(first))
        page.enter("carol")
        page.join("design-review")
        assert header_fits(page) == {"text": "#design-review", "whole": True, "overlapped": []}

        on_trio(stop)
        page.wait_for_selector("#status >> text=reconnecting in 3 s")  # GOAWAY's hint, counted down live
        page.wait_for_selector("#status >> text=reconnecting in 2 s")
        page.wait_for_selector("#status >> text=reconnecting in 1 s")
        assert header_fits(page) == {"text": "#design-review", "whole": True, "overlapped": []}
        # Clicking the status while it waits tries at once (caught between two tries, in one turn of the page's loop).
        click = "() => { const before = chorus.client.state; document.getElementById('status').click();" \
                " return [before, chorus.client.state]; }"
        page.wait_for_function("() => chorus.client.failedAttempts >= 2")  # GOAWAY's close, a try after the hint
        for _ in range(20):
            page.wait_for_function("() => chorus.client.state === 'offline'")
            if (with_click := page.evaluate(click))[0] == "offline":
                break
        assert with_click == ["offline", "connecting"]
        # The server still down: retries at the page's steady pace (refused at once, on loopback) once the back-off
        # has grown back to its cap (250, 500, 1000 ms).
        tries = page.evaluate("chorus.client.failedAttempts")
        page.wait_for_function(f"() => chorus.client.failedAttempts >= {tries + 4}")
        started = on_trio(restart)
        page.wait_live()
        took = time.monotonic() - started
        assert took < 2.0, f"live {took:.2f} s after the server came back"
        page.say("back again")
        page.wait_for_selector(".message[data-seq='1'] .body >> text=back again")
        page.assert_no_errors(but="net::ERR_CONNECTION_REFUSED")
        return took

    took = await in_chromium(steps)
    print(f"live again {took:.2f} s after the server's return")


def spki_sha256(cert_pem: bytes) -> str:
    """Base64 of the SHA-256 of a certificate's SubjectPublicKeyInfo: what Chromium's SPKI allow-list takes."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def test_the_page_over_https_and_wss_with_a_test_ca(start_server, tmp_path):
    from test_tls import Certs, tls_raw

    certs = Certs(tmp_path)
    server = await start_server(ws_port=0, **certs.config(), **UNLIMITED)
    bob = Peer(await tls_raw(certs, server.port), "bob")  # TLS on the Chorus port too
    await bob.raw.register("bob")
    await bob.raw.go_live()
    await bob.raw.request(proto.Join, "lobby")
    # Chromium trusts this one server certificate (by its key's hash) and nothing else: no "ignore all errors".
    trust = f"--ignore-certificate-errors-spki-list={spki_sha256(certs.cert_file.read_bytes())}"

    def steps(browser):
        page = Page(browser.new_context(viewport=DESKTOP), f"https://127.0.0.1:{server.ws_port}/")
        assert page.evaluate("location.protocol") == "https:"
        page.enter("carol")
        page.join("lobby")
        page.say("hello over wss")
        assert on_trio(bob.receives, "hello over wss").sender == "carol"
        on_trio(bob.say, "#lobby", "and back over TLS")
        page.wait_for_selector(".message .body >> text=and back over TLS")
        assert page.evaluate("chorus.client.url").startswith("wss://")
        page.assert_no_errors()

    await in_chromium(steps, args=(trust,))


async def test_chromium_refuses_the_test_server_without_trusting_it(start_server, tmp_path):
    from test_tls import Certs

    certs = Certs(tmp_path)
    server = await start_server(ws_port=0, **certs.config())

    def steps(browser):
        page = browser.new_page()
        with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(f"https://127.0.0.1:{server.ws_port}/")

    await in_chromium(steps)


async def test_moderation_events_show_as_lines_and_a_deleted_message_as_a_tombstone(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", version=2)  # the room's creator: its owner
    seq = await bob.say("#lobby", "a message bob regrets")

    async def moderate() -> None:
        assert isinstance(await bob.raw.request(proto.SetTopic, "lobby", "Release *Friday*"), proto.Ok)
        assert isinstance(await bob.raw.request(proto.DeleteMessage, LOBBY, seq), proto.Ok)
        await bob.say("#lobby", "carry on")

    def steps(browser):
        page = carol_in_lobby(browser, server, DESKTOP)
        page.wait_for_selector(".message .body >> text=a message bob regrets")
        on_trio(moderate)
        page.wait_for_selector(".message .body >> text=carry on")
        assert page.text_content(".message.event .body") == "bob set the topic: Release *Friday*"  # as typed
        assert page.query_selector(".message.event strong") is None
        assert page.text_content(f'.message[data-seq="{seq}"] .body') == "(message deleted)"
        assert page.get_attribute(f'.message[data-seq="{seq}"]', "class").split() == ["message", "deleted"]
        # The event line breaks the run: "carry on" has bob's header again.
        assert page.eval_on_selector(".message:last-child", "n => !!n.querySelector('.meta')")
        page.reload()  # and the same from history
        page.wait_live()
        page.wait_for_selector(".message .body >> text=carry on")
        assert page.text_content(f'.message[data-seq="{seq}"] .body') == "(message deleted)"
        assert page.text_content(".message.event .body") == "bob set the topic: Release *Friday*"
        page.assert_no_errors()

    await in_chromium(steps)
