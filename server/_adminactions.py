"""Operators' actions (chorus-admin, server/_admin_cli.py) applied to a running node's live connections.

How this works. The CLI is another process, and in single-node mode there is no broker it could reach, so it goes
through the store both share: it makes its change there (a disabled account, deleted session tokens, a deleted
room) and then appends an ``AdminAction`` row. Every node runs ``poll_admin_actions`` in ``serve``'s timers nursery:
once a second one indexed range read (``admin_actions_after`` the last id it saw) and, for each new action, this
node's connections are changed: ``disable`` and ``revoke-sessions`` close every connection of the user with BYE
``LOGGED_OUT`` (the existing reason that tells a client not to reconnect with its token; a new reason would need a
protocol version), ``delete-room`` unsubscribes this node's members (the ``MemberLeft`` user event, applied to each
connection here only: every node polls for itself, so nothing goes through the broker), ``room-event`` (a ban, a
deleted message, a topic or a role the operator stored as a room's event, spec §9.15) has this node's subscribers
of the room read it from the store (the fan-out's resync, the path of a gap) and unsubscribes a banned user. New
LOGINs and RESUMEs are refused by the session from the store's state, so only connections already open need the
action.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from chorus.proto import CloseReason

from ._ports import AdminAction, MemberLeft, StoreError

if TYPE_CHECKING:
    from ._app import Server

log = logging.getLogger("chorus.server")

DISABLE = "disable"
REVOKE_SESSIONS = "revoke-sessions"
DELETE_ROOM = "delete-room"
#: chorus-admin stored a room's event (a ban, a deleted message, a topic, a role; spec §9.15): deliver it.
ROOM_EVENT = "room-event"
#: The kinds of ``AdminAction`` a node applies; others (written by a newer chorus-admin) are skipped.
KINDS = (DISABLE, REVOKE_SESSIONS, DELETE_ROOM, ROOM_EVENT)
#: Actions read in one poll, at most (a longer backlog is read in the next polls, without waiting).
_BATCH = 256


def apply_admin_action(server: Server, action: AdminAction) -> int:
    """Change this node's connections as ``action`` says; returns how many connections it touched."""
    touched = 0
    if action.kind == ROOM_EVENT and action.room_id is not None:
        # The event is in the store: this node's live subscribers read it from there, in seq order with the rest.
        server.broker.fanout.resync(action.room_id)
    for conn in list(server.connections):
        user_id = conn.user_id
        if user_id is None or conn.reason is not None:
            continue
        if action.kind in (DISABLE, REVOKE_SESSIONS) and user_id == action.user_id:
            conn.close(CloseReason.LOGGED_OUT)
            touched += 1
        elif action.kind == DELETE_ROOM and action.room_id is not None:
            conn.user_event(MemberLeft(user_id, action.room_id))  # a no-op for a connection not subscribed
            touched += 1
        elif action.kind == ROOM_EVENT and action.room_id is not None and user_id == action.user_id:
            conn.user_event(MemberLeft(user_id, action.room_id))  # banned from the room by the operator
            touched += 1
    return touched


async def poll_admin_actions(server: Server, period_s: float = 1.0) -> None:
    """Apply every action appended after this node started, within ``period_s`` of it being written."""
    store = server.store
    last = None
    while True:
        try:
            if last is None:
                last = await store.last_admin_action_id()
            else:
                while actions := await store.admin_actions_after(last, _BATCH):
                    for action in actions:
                        last = action.id
                        if action.kind not in KINDS:
                            log.warning("admin action %d of unknown kind %r skipped", action.id, action.kind)
                            continue
                        touched = apply_admin_action(server, action)
                        log.info("admin action %s user_id=%s room_id=%s: %d connections", action.kind,
                                 action.user_id, action.room_id, touched,
                                 extra={"event": "admin_action", "kind": action.kind})
                    if len(actions) < _BATCH:
                        break
        except StoreError as exc:  # the store is refusing: try again at the next poll
            log.warning("admin actions not read: %s", exc)
        await trio.sleep(period_s)
