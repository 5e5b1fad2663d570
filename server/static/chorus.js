// Chorus in the browser: the frame codec of spec/PROTOCOL.md and a small chat app, in one module.
//
// How this works. The first half is the codec, a JavaScript twin of proto/: the field types of §3 are
// written here; every constant, enum, frame type's version (§6) and body fields (§5, FIELDS) are
// generated from proto into the block marked GENERATED (spec/gen_js.py, `make js-tables`; a test fails
// when it is stale, so never edit it by hand). The same declaration encodes and decodes. decode()
// judges the header first as §2.3 says (length, type and its version, flags), then decompresses lz4
// bodies (§4; the block decoder is below, ~40 lines) and parses strictly: unknown enum values,
// booleans other than 0/1, invalid UTF-8, over-long strings and arrays and trailing bytes are all
// errors carrying the ErrorCode to report. encode() never compresses (§4 lets a sender choose).
// u64 fields are BigInt. tests/js/codec.test.mjs checks both directions against every
// hex example of the spec (tests/js/vectors.json, generated from the spec by tests/test_js_codec.py).
//
// The second half is the app (it starts only in a browser): WebSocket to /ws where one binary message
// is one frame (§1); HELLO, RESUME with the token kept in localStorage or LOGIN/REGISTER (§6, §9.1);
// after every AUTH_OK, LIST_CONVERSATIONS (every thread with the user's own read marker, so any device
// shows the same threads and unread counts, §5.38), then SYNC listing last_seq of every conversation
// held, so a reconnect misses nothing and duplicates are dropped by seq (§9.3, §9.5); HISTORY BEFORE
// when scrolled to the top (§9.7); unacknowledged SENDs resent with their client_msg_id after a
// reconnect (§9.4); PONG for PING and a PING of our own when the server goes quiet (§9.10); reconnect
// within a second, with jitter and a countdown, never sooner than GOAWAY's hint (§9.13). The view
// (ChatView) renders message text from tokenize()'s tokens as DOM text nodes, never as HTML.

// ------------------------------------------------------------------------------------------------
// Codec
// ------------------------------------------------------------------------------------------------

/** The name of an enum value (e.g. nameOf(ErrorCode, 301) === "NOT_MEMBER"), or String(value). */
export function nameOf(enumObject, value) {
  for (const [name, v] of Object.entries(enumObject)) if (v === value) return name;
  return String(value);
}

/** The peer broke the protocol; `code` is the ErrorCode to answer with (spec §7). */
export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }
}

const fail = (code, message) => { throw new ProtocolError(code, message); };
const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  need(n) {
    if (this.pos + n > this.bytes.length) fail(ErrorCode.MALFORMED_FRAME, "body ends inside a field");
  }
  u8() { this.need(1); return this.bytes[this.pos++]; }
  u16() { this.need(2); const v = this.view.getUint16(this.pos); this.pos += 2; return v; }
  u32() { this.need(4); const v = this.view.getUint32(this.pos); this.pos += 4; return v; }
  u64() { this.need(8); const v = this.view.getBigUint64(this.pos); this.pos += 8; return v; }
  take(n) { this.need(n); const v = this.bytes.subarray(this.pos, this.pos + n); this.pos += n; return v; }
}

class Writer {
  constructor(size = 256) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
    this.pos = 0;
  }
  room(n) {
    if (this.pos + n <= this.bytes.length) return;
    const bigger = new Uint8Array(Math.max(this.bytes.length * 2, this.pos + n));
    bigger.set(this.bytes);
    this.bytes = bigger;
    this.view = new DataView(bigger.buffer);
  }
  u8(v) { this.room(1); this.view.setUint8(this.pos, v); this.pos += 1; }
  u16(v) { this.room(2); this.view.setUint16(this.pos, v); this.pos += 2; }
  u32(v) { this.room(4); this.view.setUint32(this.pos, v); this.pos += 4; }
  u64(v) { this.room(8); this.view.setBigUint64(this.pos, v); this.pos += 8; }
  put(bytes) { this.room(bytes.length); this.bytes.set(bytes, this.pos); this.pos += bytes.length; }
  result() { return this.bytes.slice(0, this.pos); }
}

function checkedInt(value, max, what) {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(`${what}: ${value} is not an integer in 0..${max}`);
  }
  return value;
}

// Field types (spec §3). Each has read(reader) and write(writer, value).
const uint = (bits) => {
  const max = 2 ** bits - 1;
  return {
    maxBytes: bits / 8,
    read: (r) => r[`u${bits}`](),
    write: (w, v, path) => w[`u${bits}`](checkedInt(v, max, path)),
  };
};
const U8 = uint(8), U16 = uint(16), U32 = uint(32);
const U64_MAX = (1n << 64n) - 1n;
const U64 = {
  maxBytes: 8,
  read: (r) => r.u64(),
  write: (w, v, path) => {
    const big = BigInt(v); // numbers and decimal strings are accepted too
    if (big < 0n || big > U64_MAX) throw new RangeError(`${path}: ${v} is not a u64`);
    w.u64(big);
  },
};
const BOOL = {
  maxBytes: 1,
  read: (r) => {
    const b = r.u8();
    if (b > 1) fail(ErrorCode.INVALID_FIELD, `boolean byte ${b}`);
    return b === 1;
  },
  write: (w, v, path) => {
    if (typeof v !== "boolean") throw new TypeError(`${path}: expected a boolean`);
    w.u8(v ? 1 : 0);
  },
};
const text = (prefix, maxBytes) => ({
  maxBytes: prefix.maxBytes + Math.min(maxBytes, 2 ** (8 * prefix.maxBytes) - 1),
  read: (r, path) => {
    const raw = r.take(prefix.read(r));
    if (raw.length > maxBytes) fail(ErrorCode.FIELD_TOO_LARGE, `${path}: ${raw.length} bytes > ${maxBytes}`);
    try {
      return utf8Decoder.decode(raw);
    } catch {
      return fail(ErrorCode.INVALID_FIELD, `${path}: invalid UTF-8`);
    }
  },
  write: (w, v, path) => {
    if (typeof v !== "string") throw new TypeError(`${path}: expected a string`);
    if (/\p{Surrogate}/u.test(v)) throw new TypeError(`${path}: lone surrogate, not encodable as UTF-8`);
    const raw = utf8Encoder.encode(v);
    if (raw.length > maxBytes) throw new RangeError(`${path}: ${raw.length} bytes > ${maxBytes}`);
    prefix.write(w, raw.length, path);
    w.put(raw);
  },
});
const enumOf = (int, enumObject) => {
  const values = new Set(Object.values(enumObject));
  return {
    maxBytes: int.maxBytes,
    read: (r, path) => {
      const v = int.read(r);
      if (!values.has(v)) fail(ErrorCode.INVALID_FIELD, `${path}: ${v} is not a valid value`);
      return v;
    },
    write: (w, v, path) => {
      if (!values.has(v)) throw new RangeError(`${path}: ${v} is not a valid value`);
      int.write(w, v, path);
    },
  };
};
const record = (fields) => ({
  fields,
  maxBytes: fields.reduce((sum, [, type]) => sum + type.maxBytes, 0), // the largest legal body (spec §10)
  read: (r, path = "") => {
    const out = {};
    for (const [name, type] of fields) out[name] = type.read(r, path + "." + name);
    return out;
  },
  write: (w, v, path = "") => {
    if (v === null || typeof v !== "object") throw new TypeError(`${path}: expected an object`);
    for (const [name, type] of fields) {
      if (!(name in v)) throw new TypeError(`${path}.${name}: missing`);
      type.write(w, v[name], path + "." + name);
    }
  },
});
const array = (item, maxItems) => ({
  maxBytes: 2 + Math.min(maxItems, 0xffff) * item.maxBytes,
  read: (r, path) => {
    const count = r.u16();
    if (count > maxItems) fail(ErrorCode.FIELD_TOO_LARGE, `${path}: ${count} items > ${maxItems}`);
    const out = [];
    for (let i = 0; i < count; i++) out.push(item.read(r, `${path}[${i}]`));
    return out;
  },
  write: (w, v, path) => {
    if (!Array.isArray(v)) throw new TypeError(`${path}: expected an array`);
    if (v.length > maxItems) throw new RangeError(`${path}: ${v.length} items > ${maxItems}`);
    w.u16(v.length);
    v.forEach((x, i) => item.write(w, x, `${path}[${i}]`));
  },
});

// BEGIN GENERATED by spec/gen_js.py from chorus.proto: do not edit, run `make js-tables`
// Every number, enum and field table of the wire protocol, from proto/_const.py and proto/_wire.py
// (see those files for what each means). The field types are the codec's own, declared above.
export const PROTOCOL_VERSION = 2;
export const MIN_PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 10;
export const COMPRESSED_PREFIX_BYTES = 4;
export const DEFAULT_MAX_FRAME_BYTES = 1048576;
export const ABSOLUTE_MAX_FRAME_BYTES = 16777216;
export const COMPRESS_THRESHOLD_BYTES = 512;
export const MAX_NAME_BYTES = 32;
export const MAX_PASSWORD_BYTES = 128;
export const MAX_TOKEN_BYTES = 64;
export const MAX_CLIENT_NAME_BYTES = 64;
export const MAX_TEXT_BYTES = 255;
export const MAX_INVITE_BYTES = 64;
export const MAX_REACTION_BYTES = 32;
export const MAX_DISPLAY_NAME_BYTES = 64;
export const MAX_DISPLAY_NAME_CHARS = 32;
export const DISPLAY_NAME_RULE = "1-32 characters (at most 64 bytes), no control characters, not starting or ending with a space, not looking like another user's name";
export const MAX_BODY_BYTES = 65535;
export const MAX_LIST_ITEMS = 1000;
export const NAME_PATTERN = "[a-z0-9][a-z0-9_.-]{0,31}";
export const NAME_RULE = "1-32 of a-z 0-9 _ . - starting with a letter or digit";
export const MIN_PASSWORD_BYTES = 8;
export const PASSWORD_RULE = "8 to 128 bytes";
export const TYPING_INTERVAL_S = 3;
export const TYPING_SHOW_S = 5;
export const MAX_PORT = 65535;
export const KNOWN_FLAGS = 1;

export const FrameType = Object.freeze({
  HELLO: 0x01, WELCOME: 0x02, REGISTER: 0x03, LOGIN: 0x04, RESUME: 0x05, AUTH_OK: 0x06, LOGOUT: 0x07, OK: 0x08,
  REGISTER_INVITE: 0x09, JOIN: 0x10, JOINED: 0x11, LEAVE: 0x12, LIST_ROOMS: 0x13, ROOM_LIST: 0x14, MEMBERS: 0x15,
  MEMBER_LIST: 0x16, LIST_CONVERSATIONS: 0x17, CONVERSATION_LIST: 0x18, MEMBERSHIP: 0x19, NODES: 0x1a,
  CHANGE_PASSWORD: 0x1b, LOGOUT_ALL: 0x1c, LIST_SESSIONS: 0x1d, SESSION_LIST: 0x1e, REVOKE_SESSION: 0x1f,
  EVENTS: 0x50, KICK: 0x51, BAN: 0x52, UNBAN: 0x53, MUTE: 0x54, UNMUTE: 0x55, DELETE_MESSAGE: 0x56, SET_TOPIC: 0x57,
  SET_ROLE: 0x58, CREATE_ROOM: 0x59, INVITE: 0x5a, GET_ROOM: 0x5b, ROOM_DETAILS: 0x5c, EDIT_MESSAGE: 0x5d,
  REACT: 0x5e, SEND_ACTION: 0x5f, SET_DISPLAY_NAME: 0x60, GET_USERS: 0x61, USER_LIST: 0x62, SEND: 0x20, ACK: 0x21,
  MESSAGE: 0x22, SYNC: 0x23, SYNC_PAGE: 0x24, SYNC_DONE: 0x25, HISTORY: 0x26, HISTORY_PAGE: 0x27, DELIVERED: 0x28,
  READ: 0x29, RECEIPT: 0x2a, GET_CURSORS: 0x2b, CURSORS: 0x2c, PRESENCE: 0x30, TYPING: 0x31, USER_TYPING: 0x32,
  PING: 0x40, PONG: 0x41, ERROR: 0x42, GOAWAY: 0x43, BYE: 0x44,
});
export const Flags = Object.freeze({ COMPRESSED: 0x01 });
export const ErrorCode = Object.freeze({
  MALFORMED_FRAME: 100, FRAME_TOO_LARGE: 101, UNKNOWN_FRAME_TYPE: 102, INVALID_FIELD: 103, FIELD_TOO_LARGE: 104,
  DECOMPRESSION_FAILED: 105, WRONG_STATE: 106, UNSUPPORTED_VERSION: 107, HANDSHAKE_TIMEOUT: 108, AUTH_FAILED: 200,
  USERNAME_TAKEN: 201, INVALID_TOKEN: 202, INVALID_NAME: 203, WEAK_PASSWORD: 204, TOO_MANY_CONNECTIONS: 205,
  NOT_FOUND: 300, NOT_MEMBER: 301, TOO_MANY_ROOMS: 302, BODY_TOO_LARGE: 303, RATE_LIMITED: 304, INVALID_REQUEST: 305,
  SERVER_BUSY: 306, FORBIDDEN: 307, INTERNAL: 399,
});
export const CloseReason = Object.freeze({
  CLIENT_QUIT: 1, SHUTDOWN: 2, STALE: 3, SLOW_CONSUMER: 4, PROTOCOL_ERROR: 5, IDLE_TIMEOUT: 6, RATE_LIMITED: 7,
  LOGGED_OUT: 8, SERVER_FULL: 9, AUTH_TIMEOUT: 10, PEER_CLOSED: 11,
});
export const ConvKind = Object.freeze({ ROOM: 1, DIRECT: 2 });
export const Direction = Object.freeze({ BEFORE: 1, AFTER: 2 });
export const ReceiptKind = Object.freeze({ DELIVERED: 1, READ: 2 });
export const Status = Object.freeze({ OFFLINE: 0, ONLINE: 1 });
export const MembershipChange = Object.freeze({ JOINED: 1, LEFT: 2 });
export const RoomRole = Object.freeze({ MEMBER: 1, MODERATOR: 2, OWNER: 3 });
export const EventKind = Object.freeze({
  KICK: 1, BAN: 2, UNBAN: 3, MUTE: 4, UNMUTE: 5, DELETE: 6, DELETED: 7, TOPIC: 8, ROLE: 9, INVITE: 10, EDIT: 11,
  REACT: 12, UNREACT: 13, ACTION: 14,
});

/** Frame type name → the protocol version that introduced it (spec §6). */
export const FRAME_VERSION = Object.freeze({
  HELLO: 1, WELCOME: 1, REGISTER: 1, LOGIN: 1, RESUME: 1, AUTH_OK: 1, LOGOUT: 1, OK: 1, REGISTER_INVITE: 2, JOIN: 1,
  JOINED: 1, LEAVE: 1, LIST_ROOMS: 1, ROOM_LIST: 1, MEMBERS: 1, MEMBER_LIST: 1, LIST_CONVERSATIONS: 2,
  CONVERSATION_LIST: 2, MEMBERSHIP: 2, NODES: 2, CHANGE_PASSWORD: 2, LOGOUT_ALL: 2, LIST_SESSIONS: 2, SESSION_LIST: 2,
  REVOKE_SESSION: 2, EVENTS: 2, KICK: 2, BAN: 2, UNBAN: 2, MUTE: 2, UNMUTE: 2, DELETE_MESSAGE: 2, SET_TOPIC: 2,
  SET_ROLE: 2, CREATE_ROOM: 2, INVITE: 2, GET_ROOM: 2, ROOM_DETAILS: 2, EDIT_MESSAGE: 2, REACT: 2, SEND_ACTION: 2,
  SET_DISPLAY_NAME: 2, GET_USERS: 2, USER_LIST: 2, SEND: 1, ACK: 1, MESSAGE: 1, SYNC: 1, SYNC_PAGE: 1, SYNC_DONE: 1,
  HISTORY: 1, HISTORY_PAGE: 1, DELIVERED: 1, READ: 1, RECEIPT: 1, GET_CURSORS: 1, CURSORS: 1, PRESENCE: 1, TYPING: 1,
  USER_TYPING: 1, PING: 1, PONG: 1, ERROR: 1, GOAWAY: 1, BYE: 1,
});

const ROOM_INFO = record([["name", text(U8, 32)], ["members", U32], ["last_seq", U64], ["joined", BOOL]]);
const MEMBER_INFO = record([["user", text(U8, 32)], ["status", enumOf(U8, Status)]]);
const CONVERSATION = record([["kind", enumOf(U8, ConvKind)], ["name", text(U8, 32)]]);
const CONVERSATION_INFO = record([
  ["conv", CONVERSATION], ["last_seq", U64], ["last_ts_ms", U64], ["delivered_seq", U64], ["read_seq", U64],
]);
const NODE_INFO = record([
  ["node", text(U8, 32)], ["host", text(U8, 255)], ["port", U16], ["ws_port", U16], ["connections", U32],
  ["draining", BOOL],
]);
const SESSION_INFO = record([["session_id", U64], ["created_ms", U64], ["last_used_ms", U64], ["current", BOOL]]);
const CONV_EVENT = record([
  ["seq", U64], ["ts_ms", U64], ["kind", enumOf(U8, EventKind)], ["actor", text(U8, 32)], ["target", text(U8, 32)],
  ["target_seq", U64], ["until_ms", U64], ["role", enumOf(U8, RoomRole)], ["text", text(U16, 65535)],
]);
const ROOM_MEMBER = record([
  ["user", text(U8, 32)], ["role", enumOf(U8, RoomRole)], ["status", enumOf(U8, Status)], ["muted", BOOL],
  ["muted_until_ms", U64],
]);
const BAN_INFO = record([["user", text(U8, 32)], ["until_ms", U64]]);
const USER_INFO = record([["user", text(U8, 32)], ["display_name", text(U8, 64)]]);
const POSITION = record([["conv", CONVERSATION], ["last_seq", U64]]);
const STORED_MESSAGE = record([
  ["seq", U64], ["ts_ms", U64], ["sender", text(U8, 32)], ["client_msg_id", U64], ["body", text(U16, 65535)],
]);
const CURSOR_INFO = record([["user", text(U8, 32)], ["delivered_seq", U64], ["read_seq", U64]]);

/** Frame type name → body fields in wire order (spec §5; proto/_wire.py FIELDS). */
export const FIELDS = Object.freeze({
  HELLO: [["min_version", U16], ["max_version", U16], ["client", text(U8, 64)]],
  WELCOME: [
    ["version", U16], ["server", text(U8, 64)], ["max_frame_bytes", U32], ["max_body_bytes", U32],
    ["ping_interval_ms", U32], ["rate_per_s", U16], ["rate_burst", U16], ["max_rooms", U16], ["max_page", U16],
  ],
  REGISTER: [["username", text(U8, 32)], ["password", text(U8, 128)]],
  LOGIN: [["username", text(U8, 32)], ["password", text(U8, 128)]],
  RESUME: [["token", text(U8, 64)]],
  AUTH_OK: [["username", text(U8, 32)], ["token", text(U8, 64)], ["expires_at_ms", U64]],
  LOGOUT: [],
  OK: [],
  REGISTER_INVITE: [["username", text(U8, 32)], ["password", text(U8, 128)], ["invite", text(U8, 64)]],
  JOIN: [["room", text(U8, 32)]],
  JOINED: [["room", text(U8, 32)], ["last_seq", U64], ["members", U32]],
  LEAVE: [["room", text(U8, 32)]],
  LIST_ROOMS: [],
  ROOM_LIST: [["rooms", array(ROOM_INFO, 1000)]],
  MEMBERS: [["room", text(U8, 32)]],
  MEMBER_LIST: [["room", text(U8, 32)], ["members", array(MEMBER_INFO, 1000)]],
  LIST_CONVERSATIONS: [],
  CONVERSATION_LIST: [["conversations", array(CONVERSATION_INFO, 1000)]],
  MEMBERSHIP: [["room", text(U8, 32)], ["user", text(U8, 32)], ["change", enumOf(U8, MembershipChange)]],
  NODES: [["nodes", array(NODE_INFO, 1000)]],
  CHANGE_PASSWORD: [["old_password", text(U8, 128)], ["new_password", text(U8, 128)]],
  LOGOUT_ALL: [],
  LIST_SESSIONS: [],
  SESSION_LIST: [["sessions", array(SESSION_INFO, 1000)]],
  REVOKE_SESSION: [["session_id", U64]],
  EVENTS: [["conv", CONVERSATION], ["events", array(CONV_EVENT, 1000)]],
  KICK: [["room", text(U8, 32)], ["user", text(U8, 32)], ["reason", text(U8, 255)]],
  BAN: [["room", text(U8, 32)], ["user", text(U8, 32)], ["until_ms", U64], ["reason", text(U8, 255)]],
  UNBAN: [["room", text(U8, 32)], ["user", text(U8, 32)]],
  MUTE: [["room", text(U8, 32)], ["user", text(U8, 32)], ["until_ms", U64], ["reason", text(U8, 255)]],
  UNMUTE: [["room", text(U8, 32)], ["user", text(U8, 32)]],
  DELETE_MESSAGE: [["conv", CONVERSATION], ["seq", U64]],
  SET_TOPIC: [["room", text(U8, 32)], ["topic", text(U8, 255)]],
  SET_ROLE: [["room", text(U8, 32)], ["user", text(U8, 32)], ["role", enumOf(U8, RoomRole)]],
  CREATE_ROOM: [["room", text(U8, 32)], ["private", BOOL]],
  INVITE: [["room", text(U8, 32)], ["user", text(U8, 32)]],
  GET_ROOM: [["room", text(U8, 32)]],
  ROOM_DETAILS: [
    ["room", text(U8, 32)], ["topic", text(U8, 255)], ["private", BOOL], ["members", array(ROOM_MEMBER, 1000)],
    ["bans", array(BAN_INFO, 1000)],
  ],
  EDIT_MESSAGE: [["conv", CONVERSATION], ["seq", U64], ["body", text(U16, 65535)]],
  REACT: [["conv", CONVERSATION], ["seq", U64], ["reaction", text(U8, 32)], ["add", BOOL]],
  SEND_ACTION: [["conv", CONVERSATION], ["client_msg_id", U64], ["body", text(U16, 65535)]],
  SET_DISPLAY_NAME: [["display_name", text(U8, 64)]],
  GET_USERS: [["users", array(text(U8, 32), 1000)]],
  USER_LIST: [["users", array(USER_INFO, 1000)]],
  SEND: [["conv", CONVERSATION], ["client_msg_id", U64], ["body", text(U16, 65535)]],
  ACK: [["conv", CONVERSATION], ["client_msg_id", U64], ["seq", U64], ["ts_ms", U64], ["duplicate", BOOL]],
  MESSAGE: [
    ["conv", CONVERSATION], ["seq", U64], ["ts_ms", U64], ["sender", text(U8, 32)], ["client_msg_id", U64],
    ["body", text(U16, 65535)],
  ],
  SYNC: [["positions", array(POSITION, 1000)]],
  SYNC_PAGE: [["conv", CONVERSATION], ["messages", array(STORED_MESSAGE, 1000)], ["has_more", BOOL]],
  SYNC_DONE: [],
  HISTORY: [["conv", CONVERSATION], ["direction", enumOf(U8, Direction)], ["seq", U64], ["limit", U16]],
  HISTORY_PAGE: [["conv", CONVERSATION], ["messages", array(STORED_MESSAGE, 1000)], ["has_more", BOOL]],
  DELIVERED: [["conv", CONVERSATION], ["seq", U64]],
  READ: [["conv", CONVERSATION], ["seq", U64]],
  RECEIPT: [["conv", CONVERSATION], ["user", text(U8, 32)], ["kind", enumOf(U8, ReceiptKind)], ["seq", U64]],
  GET_CURSORS: [["conv", CONVERSATION]],
  CURSORS: [["conv", CONVERSATION], ["cursors", array(CURSOR_INFO, 1000)]],
  PRESENCE: [["user", text(U8, 32)], ["status", enumOf(U8, Status)]],
  TYPING: [["conv", CONVERSATION]],
  USER_TYPING: [["conv", CONVERSATION], ["user", text(U8, 32)]],
  PING: [["nonce", U64]],
  PONG: [["nonce", U64]],
  ERROR: [["code", enumOf(U16, ErrorCode)], ["retry_after_ms", U32], ["message", text(U8, 255)]],
  GOAWAY: [["reason", enumOf(U8, CloseReason)], ["reconnect_after_ms", U32], ["message", text(U8, 255)]],
  BYE: [["reason", enumOf(U8, CloseReason)]],
});

/** Frame type name → its largest legal body in bytes (spec §10; proto.LARGEST_BODY_BYTES). */
export const LARGEST_BODY_BYTES = Object.freeze({
  HELLO: 69, WELCOME: 87, REGISTER: 162, LOGIN: 162, RESUME: 65, AUTH_OK: 106, LOGOUT: 0, OK: 0, REGISTER_INVITE: 227,
  JOIN: 33, JOINED: 45, LEAVE: 33, LIST_ROOMS: 0, ROOM_LIST: 46002, MEMBERS: 33, MEMBER_LIST: 34035,
  LIST_CONVERSATIONS: 0, CONVERSATION_LIST: 66002, MEMBERSHIP: 67, NODES: 298002, CHANGE_PASSWORD: 258, LOGOUT_ALL: 0,
  LIST_SESSIONS: 0, SESSION_LIST: 25002, REVOKE_SESSION: 8, EVENTS: 65637036, KICK: 322, BAN: 330, UNBAN: 66,
  MUTE: 330, UNMUTE: 66, DELETE_MESSAGE: 42, SET_TOPIC: 289, SET_ROLE: 67, CREATE_ROOM: 34, INVITE: 66, GET_ROOM: 33,
  ROOM_DETAILS: 85294, EDIT_MESSAGE: 65579, REACT: 76, SEND_ACTION: 65579, SET_DISPLAY_NAME: 65, GET_USERS: 33002,
  USER_LIST: 98002, SEND: 65579, ACK: 59, MESSAGE: 65628, SYNC: 42002, SYNC_PAGE: 65594037, SYNC_DONE: 0, HISTORY: 45,
  HISTORY_PAGE: 65594037, DELIVERED: 42, READ: 42, RECEIPT: 76, GET_CURSORS: 34, CURSORS: 49036, PRESENCE: 34,
  TYPING: 34, USER_TYPING: 67, PING: 8, PONG: 8, ERROR: 262, GOAWAY: 261, BYE: 1,
});
// END GENERATED

const FRAME_NAMES = new Map(Object.entries(FrameType).map(([name, code]) => [code, name]));
const BODIES = Object.fromEntries(Object.entries(FIELDS).map(([name, fields]) => [name, record(fields)]));

/**
 * Decompress an lz4 block (the bare block format, spec §4) into exactly `size` bytes.
 * Throws ProtocolError(DECOMPRESSION_FAILED) for a corrupt block or one of another size.
 */
export function lz4DecompressBlock(src, size) {
  const corrupt = () => fail(ErrorCode.DECOMPRESSION_FAILED, "corrupt lz4 block");
  const dst = new Uint8Array(size);
  const end = src.length;
  let s = 0;
  let d = 0;
  const length = (n) => { // lz4's length extension: 15, then bytes added while they are 255
    if (n !== 15) return n;
    let b;
    do {
      if (s >= end) corrupt();
      b = src[s++];
      n += b;
    } while (b === 255);
    return n;
  };
  if (end === 0) corrupt();
  for (;;) {
    const token = src[s++];
    const literals = length(token >> 4);
    if (s + literals > end || d + literals > size) corrupt();
    dst.set(src.subarray(s, s + literals), d);
    s += literals;
    d += literals;
    if (s === end) break; // the last sequence has literals only
    if (s + 2 > end) corrupt();
    const offset = src[s] | (src[s + 1] << 8);
    s += 2;
    if (offset === 0 || offset > d) corrupt();
    const match = length(token & 15) + 4;
    if (d + match > size) corrupt();
    if (offset >= match) {
      dst.copyWithin(d, d - offset, d - offset + match);
      d += match;
    } else { // overlapping: the copy reads what it has just written
      for (let i = 0; i < match; i++, d++) dst[d] = dst[d - offset];
    }
    if (s >= end) corrupt(); // a match is always followed by another sequence
  }
  if (d !== size) fail(ErrorCode.DECOMPRESSION_FAILED, "lz4 block length mismatch");
  return dst;
}

/**
 * Decode exactly one whole frame (one WebSocket message), with no state check. A frame type newer than
 * `version` (the negotiated protocol version) does not exist for it: UNKNOWN_FRAME_TYPE, as in proto.
 * Returns an event: {type: "MESSAGE", request_id, ...fields}, u64 fields as BigInt.
 * Throws ProtocolError with the ErrorCode of spec §2.3 / §7 for anything else.
 */
export function decode(bytes, maxFrameBytes = ABSOLUTE_MAX_FRAME_BYTES, version = PROTOCOL_VERSION) {
  if (!(bytes instanceof Uint8Array)) bytes = new Uint8Array(bytes);
  if (bytes.length < HEADER_BYTES) fail(ErrorCode.MALFORMED_FRAME, "shorter than a frame header");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const length = view.getUint32(0);
  const code = bytes[4];
  const flags = bytes[5];
  const requestId = view.getUint32(6);
  if (length > maxFrameBytes) fail(ErrorCode.FRAME_TOO_LARGE, `frame length ${length} > ${maxFrameBytes}`);
  const type = FRAME_NAMES.get(code);
  if (type === undefined || FRAME_VERSION[type] > version) {
    const hex = code.toString(16).padStart(2, "0");
    fail(ErrorCode.UNKNOWN_FRAME_TYPE, `unknown frame type 0x${hex} in protocol version ${version}`);
  }
  if (flags & ~Flags.COMPRESSED) fail(ErrorCode.INVALID_FIELD, `unknown flag bits 0x${flags.toString(16)}`);
  const largest = BODIES[type].maxBytes; // §2.3 step 6: no longer than the type can ever be
  if (flags & Flags.COMPRESSED) {
    const bound = COMPRESSED_PREFIX_BYTES + largest + Math.floor(largest / 255) + 16; // 4 + lz4's worst case
    if (length > bound) fail(ErrorCode.FRAME_TOO_LARGE, `compressed ${type} body of ${length} bytes > ${bound}`);
  } else if (length > largest) {
    fail(ErrorCode.FRAME_TOO_LARGE, `${type} body of ${length} bytes > ${largest}, the largest ${type}`);
  }
  if (bytes.length !== HEADER_BYTES + length) fail(ErrorCode.MALFORMED_FRAME, "message is not exactly one frame");
  let body = bytes.subarray(HEADER_BYTES);
  if (flags & Flags.COMPRESSED) {
    if (body.length < COMPRESSED_PREFIX_BYTES) fail(ErrorCode.DECOMPRESSION_FAILED, "compressed frame without its length");
    const size = view.getUint32(HEADER_BYTES);
    if (size > maxFrameBytes) fail(ErrorCode.DECOMPRESSION_FAILED, `compressed body would expand to ${size} bytes`);
    if (size > largest) fail(ErrorCode.DECOMPRESSION_FAILED, `compressed ${type} body would expand to ${size} bytes > ${largest}`);
    body = lz4DecompressBlock(body.subarray(COMPRESSED_PREFIX_BYTES), size);
  }
  const reader = new Reader(body);
  const event = { type, request_id: requestId, ...BODIES[type].read(reader, type) };
  if (reader.pos !== body.length) fail(ErrorCode.MALFORMED_FRAME, `${type}: bytes after the last field`);
  return event;
}

/**
 * Encode an event ({type: "SEND", request_id, ...fields}) as one uncompressed frame of protocol `version`.
 * Throws TypeError / RangeError when the type is not in that version or a field is missing or out of range.
 */
export function encode(event, version = PROTOCOL_VERSION) {
  const code = Object.hasOwn(FrameType, event.type) ? FrameType[event.type] : undefined;
  if (code === undefined || FRAME_VERSION[event.type] > version) {
    throw new TypeError(`unknown frame type ${event.type} in version ${version}`);
  }
  const w = new Writer();
  w.pos = HEADER_BYTES;
  BODIES[event.type].write(w, event, event.type);
  const frame = w.result();
  const view = new DataView(frame.buffer);
  view.setUint32(0, frame.length - HEADER_BYTES);
  view.setUint8(4, code);
  view.setUint8(5, 0);
  view.setUint32(6, checkedInt(event.request_id ?? 0, 0xffffffff, "request_id"));
  return frame;
}

/** A copy of `value` fit for JSON: BigInt becomes a number when exact, else a decimal string. */
export function toPlain(value) {
  if (typeof value === "bigint") return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value.toString();
  if (Array.isArray(value)) return value.map(toPlain);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toPlain(v)]));
  }
  return value;
}

export const room = (name) => ({ kind: ConvKind.ROOM, name });
export const direct = (user) => ({ kind: ConvKind.DIRECT, name: user });
export const convKey = (conv) => `${conv.kind}:${conv.name}`;
export const convLabel = (conv) => (conv.kind === ConvKind.ROOM ? "#" : "@") + conv.name;

// ------------------------------------------------------------------------------------------------
// Rules (spec §9.1): checked and worded from the generated NAME_PATTERN, NAME_RULE, MIN_PASSWORD_BYTES,
// MAX_PASSWORD_BYTES and PASSWORD_RULE, never copied (STYLE.md §20; tests/test_js_codec.py checks)
// ------------------------------------------------------------------------------------------------

const NAME_RE = new RegExp(`^(?:${NAME_PATTERN})$`, "u");

/** Whether `name` is a user or room name by proto's NAME_PATTERN. */
export const isName = (name) => NAME_RE.test(name);

/** Why the server would refuse `password`, or null: for REGISTER the length rule, for LOGIN only a length the
 * wire cannot carry (as the terminal client, client/_rules.py). */
export function passwordProblem(password, register) {
  const size = utf8Encoder.encode(password).length;
  if (size > MAX_PASSWORD_BYTES || (register && size < MIN_PASSWORD_BYTES)) return `Passwords are ${PASSWORD_RULE}.`;
  return null;
}

/** `text` cut to at most `maxBytes` of UTF-8, never inside a character (e.g. an ERROR's message, MAX_TEXT_BYTES). */
export function clipUtf8(text, maxBytes) {
  const raw = utf8Encoder.encode(text);
  if (raw.length <= maxBytes) return text;
  return new TextDecoder().decode(raw.subarray(0, maxBytes), { stream: true }); // drops a cut character's bytes
}

// ------------------------------------------------------------------------------------------------
// App
// ------------------------------------------------------------------------------------------------

const TOKEN_KEY = "chorus.token";
const CLIENT_NAME = "chorus-web/0.1";
const HISTORY_PAGE = 50;
const TYPING_EVERY_MS = TYPING_INTERVAL_S * 1000; // send TYPING at most this often (spec §9.9)
const TYPING_SHOWN_MS = TYPING_SHOW_S * 1000; // show "… is typing" this long after USER_TYPING
const DELIVERED_EVERY_MS = 1000;
// Reconnect: the first retry after a quarter second, then every 0.6-1 s (jittered), so the page is back within 2 s
// of the server's return (a refused connection costs the server nothing); GOAWAY's hint still comes first (§9.13).
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 1000;
const COUNTDOWN_TICK_MS = 250;
const MAX_DETAILS_AT_START = 50; // rooms whose GET_ROOM is asked for after logging in (for the sidebar's lock)

/** A request refused with ERROR (request-level, spec §7): `code`, `retryAfterMs`. */
export class RequestError extends Error {
  constructor(event) {
    super(event.message || nameOf(ErrorCode, event.code));
    this.name = "RequestError";
    this.code = event.code;
    this.retryAfterMs = event.retry_after_ms;
  }
}

function randomU64() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}

/** What the page knows of one conversation: messages by seq and the gapless last_seq (spec §9.3). */
class ConversationState {
  constructor(conv) {
    this.conv = conv;
    this.key = convKey(conv);
    this.messages = new Map(); // seq (Number) → {seq, ts_ms, sender, client_msg_id, body}
    this.lastSeq = 0; // highest seq held with no gap before it, or the known end when history is not loaded
    this.latestSeq = 0; // highest seq known to exist (CONVERSATION_LIST, JOINED, MESSAGE), loaded or not
    this.readSeq = 0; // the user's read marker as far as this page knows (CONVERSATION_LIST, our own READ)
    this.lastTs = 0; // server time of the newest message known: sorts direct conversations
    this.oldest = Infinity; // lowest seq loaded
    this.hasOlder = true;
    this.loadingOlder = false;
    this.members = null; // Map user → Status, once MEMBERS answered (rooms only)
    this.missing = false; // a direct conversation whose user does not exist (SEND refused NOT_FOUND)
    this.typing = new Map(); // user → timeout id
    this.deliveredSent = 0;
    this.readSent = 0;
  }
  /** Add messages (any order, duplicates ignored); returns those that were new. */
  add(messages) {
    const added = [];
    for (const m of messages) {
      const seq = Number(m.seq);
      if (this.messages.has(seq)) continue;
      const msg = {
        seq, ts_ms: Number(m.ts_ms), sender: m.sender, client_msg_id: m.client_msg_id, body: m.body, event: m.event ?? null,
      };
      this.messages.set(seq, msg);
      this.oldest = Math.min(this.oldest, seq);
      this.latestSeq = Math.max(this.latestSeq, seq);
      this.lastTs = Math.max(this.lastTs, msg.ts_ms);
      added.push(msg);
    }
    while (this.messages.has(this.lastSeq + 1)) this.lastSeq += 1;
    return added;
  }
  sorted() {
    return [...this.messages.values()].sort((a, b) => a.seq - b.seq);
  }
  /** Messages after the read marker, less those of `me` that are loaded (one's own words are not news), and the
   * loaded edits and reactions (they change a message, they are not one). */
  unread(me) {
    let count = Math.max(0, this.latestSeq - this.readSeq);
    for (const msg of this.messages.values()) {
      if (msg.seq > this.readSeq && (msg.sender === me || !shown(msg))) count -= 1; // nor edits and reactions
    }
    return Math.max(0, count);
  }
}

const TOMBSTONE = "(message deleted)";
/** Events that change another message (its text, its reactions) rather than show as a line of their own. */
const AMENDING = new Set([EventKind.EDIT, EventKind.REACT, EventKind.UNREACT]);
const shown = (msg) => !(msg.event && AMENDING.has(msg.event.kind));
/** Live events after which a room's ROOM_DETAILS (roles, mutes, members, topic) is asked for again. */
const DETAILS_CHANGE = new Set([EventKind.ROLE, EventKind.KICK, EventKind.BAN, EventKind.UNBAN, EventKind.MUTE,
  EventKind.UNMUTE, EventKind.TOPIC, EventKind.INVITE]);
const OPERATOR = "the operator"; // an event's empty actor: chorus-admin (never a user name: it has a space)

/** A moderation event (version 2, spec §9.15) in words, as the server words it for a version 1 client. */
export function eventText(e) {
  const who = e.target || "someone";
  const until = e.until_ms ? ` until ${new Date(Number(e.until_ms)).toISOString().slice(0, 16).replace("T", " ")} UTC` : "";
  const because = e.text ? `: ${e.text}` : "";
  switch (e.kind) {
    case EventKind.KICK: return `removed ${who} from the room${because}`;
    case EventKind.BAN: return `banned ${who}${until}${because}`;
    case EventKind.UNBAN: return `lifted the ban on ${who}`;
    case EventKind.MUTE: return `muted ${who}${until}${because}`;
    case EventKind.UNMUTE: return `unmuted ${who}`;
    case EventKind.DELETE: return "deleted a message";
    case EventKind.DELETED: return TOMBSTONE;
    case EventKind.TOPIC: return e.text ? `set the topic: ${e.text}` : "cleared the topic";
    case EventKind.ROLE: return `made ${who} ${nameOf(RoomRole, e.role).toLowerCase()}`;
    case EventKind.INVITE: return `added ${who} to the room`;
    case EventKind.EDIT: return `edited a message: ${e.text}`;
    case EventKind.REACT: return `reacted ${e.text}`;
    case EventKind.UNREACT: return `took back ${e.text}`;
    case EventKind.ACTION: return `/me ${e.text}`; // shown as "* alice waves", like an action of a version 1 client
    default: return nameOf(EventKind, e.kind).toLowerCase();
  }
}

/**
 * What the page does with each frame the server sends unasked (spec §5 "push": request_id 0, or no request of
 * ours pending under its id): frame type → handler(client, event). tests/test_registry.py holds its keys
 * (HANDLED_PUSHES) against every push proto's state table and the spec let a server send.
 */
const PUSH_HANDLERS = Object.freeze({
  MESSAGE: (client, event) => client._message(event),
  EVENTS: (client, event) => client._events(event),  // version 2: moderation events, in seq order with messages
  PING: (client, event) => client._send({ type: "PONG", nonce: event.nonce, request_id: event.request_id }),
  PRESENCE: (client, event) => client._presence(event.user, event.status),
  USER_TYPING: (client, event) => client._emit("typing", { conv: event.conv, user: event.user }),
  RECEIPT: (client, event) => client._receipt(event),
  MEMBERSHIP: (client, event) => client._membership(event), // version 2: someone joined or left a room we are in
  // version 2, node mode: the cluster's live nodes. The page stays with the node that served it (its origin); a
  // load balancer in front of the web port is how browsers are spread. Kept for anyone who wants to show it.
  NODES: (client, event) => { client.nodes = event.nodes; },
  GOAWAY: (client, event) => {
    client._notBefore = Date.now() + event.reconnect_after_ms;
    client._setState(client.state, "server restarting");
  },
  BYE: (client, event) => client._bye(event),
  // NOT_MEMBER refusing a READ, DELIVERED or TYPING is a race with a KICK or BAN (spec §9.15), said in words already.
  ERROR: (client, event) => event.code !== ErrorCode.NOT_MEMBER &&
    client._emit("notice", `server: ${nameOf(ErrorCode, event.code)} ${event.message}`),
});
export const HANDLED_PUSHES = Object.freeze(Object.keys(PUSH_HANDLERS));

/**
 * The protocol side of the page: one WebSocket at a time, requests matched by request_id,
 * reconnect + RESUME + SYNC. It knows nothing of the DOM; the UI listens to its events.
 */
export class ChorusClient extends EventTarget {
  constructor(url, { storage = globalThis.localStorage, tokenKey = TOKEN_KEY } = {}) {
    super();
    this.url = url;
    this.storage = storage;
    this.tokenKey = tokenKey;
    this.ws = null;
    this.state = "offline"; // offline | connecting | unauthenticated | syncing | live
    this.username = null;
    this.welcome = null;
    this.convs = new Map(); // key → ConversationState
    this.outbox = new Map(); // client_msg_id (string) → {conv, body, client_msg_id}
    this._pending = new Map(); // request_id → {resolve, reject, pages}
    this._nextId = 1;
    this._backoff = BACKOFF_MIN_MS;
    this._reconnectTimer = null;
    this._reconnectAt = 0; // when the scheduled reconnect fires (the status counts down to it)
    this._countdown = null;
    this.failedAttempts = 0; // connections lost or refused since the last time the page was live
    this.presence = new Map(); // user → Status, from MEMBER_LIST and PRESENCE
    this.displayNames = new Map(); // user → display name ("": none), from USER_LIST; kept for the page's life
    this._namesWanted = new Set(); // users to ask GET_USERS for in the next batch (or asked and not yet answered)
    this._namesQueued = [];
    this._notBefore = 0;
    this._lastHeard = 0;
    this._livenessTimer = null;
    this._deliveredTimer = null;
    this._stopped = true;
    this._authWaiters = [];
  }

  get token() { return this.storage?.getItem(this.tokenKey) ?? null; }
  set token(value) {
    if (value) this.storage?.setItem(this.tokenKey, value);
    else this.storage?.removeItem(this.tokenKey);
  }

  conversation(conv) {
    const key = convKey(conv);
    let state = this.convs.get(key);
    if (!state) {
      state = new ConversationState(conv);
      this.convs.set(key, state);
      this._emit("conversations");
    }
    return state;
  }

  _emit(name, detail = null) { this.dispatchEvent(new CustomEvent(name, { detail })); }

  _setState(state, note = "") {
    this.state = state;
    this._emit("state", { state, note });
  }

  // -- connection -------------------------------------------------------------------------------
  start() {
    this._stopped = false;
    this._connect();
  }

  stop() {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._countdown);
    if (this.ws) this._quit();
  }

  _connect() {
    clearTimeout(this._reconnectTimer);
    clearInterval(this._countdown);
    if (this._stopped || this.ws) return;
    this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(String(err));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      this._lastHeard = Date.now();
      this._send({ type: "HELLO", min_version: MIN_PROTOCOL_VERSION, max_version: PROTOCOL_VERSION, client: CLIENT_NAME },
        true).then((welcome) => this._welcomed(welcome)).catch(() => {});
    };
    ws.onmessage = (message) => this._receive(message.data);
    ws.onclose = (closing) => this._closed(ws, closing);
    ws.onerror = () => {}; // onclose follows and says what to do
  }

  _closed(ws, closing) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearInterval(this._livenessTimer);
    for (const { reject } of this._pending.values()) reject(new Error("connection closed"));
    this._pending.clear();
    this.failedAttempts += 1;
    this._setState("offline", closing.code === 1000 || closing.code === 1001 ? "" : `closed (${closing.code})`);
    this._scheduleReconnect();
  }

  _scheduleReconnect(note = "") {
    if (this._stopped) return;
    // Back-off with jitter up to BACKOFF_MAX_MS, never sooner than GOAWAY asked (spec §9.13).
    const delay = Math.max(this._backoff * (0.6 + 0.4 * Math.random()), this._notBefore - Date.now());
    this._backoff = Math.min(this._backoff * 2, BACKOFF_MAX_MS);
    this._reconnectAt = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((this._reconnectAt - Date.now()) / 1000));
      this._setState("offline", `${note ? note + "; " : ""}reconnecting in ${left} s`);
    };
    tick();
    clearInterval(this._countdown);
    this._countdown = setInterval(tick, COUNTDOWN_TICK_MS);
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  /** Reconnect now (e.g. when the page becomes visible or the network returns). */
  reconnectNow() {
    if (!this._stopped && !this.ws && Date.now() >= this._notBefore) {
      this._backoff = BACKOFF_MIN_MS;
      this._connect();
    }
  }

  _quit() {
    const ws = this.ws;
    try {
      this._send({ type: "BYE", reason: CloseReason.CLIENT_QUIT });
    } catch { /* not open */ }
    this.ws = null;
    ws.close(1000);
    this._setState("offline");
  }

  _send(event, expectReply = false) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      return expectReply ? Promise.reject(new Error("not connected")) : undefined;
    }
    let promise;
    if (expectReply) {
      event.request_id = this._takeId();
      promise = new Promise((resolve, reject) => this._pending.set(event.request_id, { resolve, reject }));
    } else if (event.request_id === undefined) {
      // Frames without a reply still get an id, so that an ERROR refusing them names them (spec §2.2).
      event.request_id = event.type === "BYE" || event.type === "ERROR" ? 0 : this._takeId();
    }
    this.ws.send(encode(event)); // never compressed (spec §4 lets the sender choose)
    return promise;
  }

  _takeId() {
    const id = this._nextId;
    this._nextId = id >= 0xffffffff ? 1 : id + 1;
    return id;
  }

  /** Send a request and wait for its reply; rejects with RequestError on ERROR. */
  request(event) { return this._send(event, true); }

  _receive(data) {
    this._lastHeard = Date.now();
    let event;
    try {
      event = decode(new Uint8Array(data), Math.max(DEFAULT_MAX_FRAME_BYTES, this.welcome?.max_frame_bytes ?? 0));
    } catch (err) {
      // The server broke the protocol: say so and start over (spec §7).
      const code = err instanceof ProtocolError ? err.code : ErrorCode.MALFORMED_FRAME;
      try {
        this._send({ type: "ERROR", code, retry_after_ms: 0, message: clipUtf8(String(err.message), MAX_TEXT_BYTES) });
        this._send({ type: "BYE", reason: CloseReason.PROTOCOL_ERROR });
      } catch { /* closing anyway */ }
      this.ws?.close(1002);
      return;
    }
    if (event.type === "EVENTS") {  // live, or the events of the page that follows with the same request_id
      this._events(event);
      return;
    }
    const waiter = event.request_id ? this._pending.get(event.request_id) : undefined;
    if (waiter) {
      if (event.type === "ERROR") {
        this._pending.delete(event.request_id);
        waiter.reject(new RequestError(event));
        return;
      }
      if (event.type === "SYNC_PAGE") {
        this._page(event);
        return;
      }
      this._pending.delete(event.request_id);
      waiter.resolve(event);
      return;
    }
    this._push(event);
  }

  _push(event) {
    PUSH_HANDLERS[event.type]?.(this, event); // any other frame unasked for is dropped
  }

  _bye(event) {
    const reason = nameOf(CloseReason, event.reason);
    if (event.reason === CloseReason.LOGGED_OUT) {
      this.token = null;
      this.username = null;
      this._stopped = true;
      this._emit("loggedout");
    } else if (event.reason === CloseReason.PROTOCOL_ERROR || event.reason === CloseReason.SERVER_FULL) {
      this._backoff = Math.max(this._backoff, 5000); // not a tight loop (spec §7.2)
    }
    this._setState(this.state, reason.toLowerCase().replace("_", " "));
  }

  async _welcomed(welcome) {
    this.welcome = welcome;
    this._lastHeard = Date.now();
    clearInterval(this._livenessTimer);
    this._livenessTimer = setInterval(() => this._checkLiveness(), Math.min(welcome.ping_interval_ms, 15000) / 2);
    this._setState("unauthenticated");
    const token = this.token;
    if (token) {
      try {
        await this._authenticated(await this.request({ type: "RESUME", token }));
        return;
      } catch (err) {
        if (err instanceof RequestError && err.code === ErrorCode.INVALID_TOKEN) this.token = null;
        else return; // closed; the reconnect will try again
      }
    }
    this._emit("needlogin");
  }

  _checkLiveness() {
    // The server pings a quiet client; we do the same for a quiet server (spec §9.10).
    const interval = this.welcome?.ping_interval_ms ?? 15000;
    const quiet = Date.now() - this._lastHeard;
    if (quiet > 2 * interval) {
      this.ws?.close(4000, "server silent");
      if (this.ws) this._closed(this.ws, { code: 4000 });
    } else if (quiet > interval) {
      this._send({ type: "PING", nonce: randomU64() }, true)?.catch(() => {});
    }
  }

  /** LOGIN or REGISTER (when `register`) with a password; rejects with RequestError. */
  async login(username, password, register = false) {
    if (this.state !== "unauthenticated") throw new Error("not connected yet");
    const reply = await this.request({ type: register ? "REGISTER" : "LOGIN", username, password });
    await this._authenticated(reply);
  }

  async logout() {
    this.token = null;
    if (this.state === "live" || this.state === "syncing") {
      try {
        this._send({ type: "LOGOUT" });
      } catch { /* gone already */ }
    }
    this._stopped = true;
    this.username = null;
    this.convs.clear();
    this.outbox.clear();
    this._emit("loggedout");
  }

  async _authenticated(authOk) {
    if (this.username && this.username !== authOk.username) { // someone else on this page now
      this.convs.clear();
      this.outbox.clear();
    }
    this.username = authOk.username;
    this.token = authOk.token;
    this._backoff = BACKOFF_MIN_MS;
    this._setState("syncing");
    this._emit("authenticated", authOk.username);
    try {
      // The user's conversations first (rooms and direct ones, with the user's own cursors, spec §5.38), so that a
      // fresh page or a second device shows every thread and its unread count, says "up to now" for each and
      // loads history on demand instead of being paged everything since its delivered cursor.
      this._takeList(await this.request({ type: "LIST_CONVERSATIONS" }));
      // Every conversation held, from its last_seq; a direct one only once it exists (spec §9.5).
      const positions = [...this.convs.values()]
        .filter((s) => s.conv.kind === ConvKind.ROOM || s.lastSeq > 0)
        .map((s) => ({ conv: s.conv, last_seq: BigInt(s.lastSeq) }));
      try {
        await this.request({ type: "SYNC", positions: positions.slice(0, MAX_LIST_ITEMS) });
      } catch (err) {
        if (!(err instanceof RequestError)) throw err;
        await this.request({ type: "SYNC", positions: [] }); // a conversation vanished meanwhile
      }
      this.failedAttempts = 0;
      this._setState("live");
      this._emit("listed");
      for (const item of this.outbox.values()) this._sendOutboxItem(item); // resend, same ids (spec §9.4)
    } catch (err) {
      if (err instanceof RequestError) this._emit("notice", `sync refused: ${err.message}`);
    }
  }

  /** Take in a CONVERSATION_LIST (spec §5.38): new threads, each one's newest seq and the user's own read marker;
   * a room no longer listed was left on another device. */
  _takeList(list) {
    const listed = new Set();
    for (const info of list.conversations) {
      const state = this.conversation(info.conv);
      listed.add(state.key);
      const last = Number(info.last_seq);
      if (state.messages.size === 0 && state.lastSeq === 0) {
        state.lastSeq = last;
        state.oldest = last + 1;
      }
      state.latestSeq = Math.max(state.latestSeq, last);
      state.readSeq = Math.max(state.readSeq, Number(info.read_seq));
      state.readSent = Math.max(state.readSent, Number(info.read_seq));
      state.lastTs = Math.max(state.lastTs, Number(info.last_ts_ms));
    }
    for (const state of [...this.convs.values()]) {
      if (state.conv.kind === ConvKind.ROOM && !listed.has(state.key)) this.forget(state);
    }
    this._emit("conversations");
  }

  /** LIST_CONVERSATIONS again (the page came back into view): what was read on another device meanwhile is no
   * longer counted here. The server does not push read markers to the user's other devices (yet), so this is
   * when a badge learns of them. */
  async refreshConversations() {
    if (this.state !== "live") return;
    try {
      this._takeList(await this.request({ type: "LIST_CONVERSATIONS" }));
    } catch { /* closed: the next connection lists them anyway */ }
  }

  _page(event) {
    const state = this.conversation(event.conv);
    this._added(state, state.add(event.messages), false);
  }

  /** Events take their seqs like messages and show as lines in words; a DELETE turns its message into a tombstone. */
  _events(event) {
    const state = this.conversation(event.conv);
    const lines = event.events.map((e) => ({
      seq: e.seq, ts_ms: e.ts_ms, client_msg_id: 0n, body: eventText(e), event: e,
      sender: e.kind === EventKind.DELETED ? e.target : (e.actor || OPERATOR),
    }));
    for (const e of event.events) {
      const target = state.messages.get(Number(e.target_seq));
      if (target && e.kind === EventKind.DELETE) Object.assign(target, { body: TOMBSTONE, event: { ...e, kind: EventKind.DELETED } });
      if (target && e.kind === EventKind.EDIT) {  // the latest text, marked; an action stays one
        Object.assign(target, { body: target.event?.kind === EventKind.ACTION ? `/me ${e.text}` : e.text, edited: true });
      }
      if (target && (e.kind === EventKind.REACT || e.kind === EventKind.UNREACT)) {
        const counts = target.reactions ??= new Map();
        const n = (counts.get(e.text) ?? 0) + (e.kind === EventKind.REACT ? 1 : -1);
        if (n > 0) counts.set(e.text, n); else counts.delete(e.text);
      }
      if (e.kind === EventKind.TOPIC && event.request_id === 0) state.topic = e.text; // history has older ones
    }
    if (event.request_id === 0 && event.events.some((e) => DETAILS_CHANGE.has(e.kind))) this.refreshDetails(state);
    this._added(state, state.add(lines), event.request_id === 0);
  }

  _message(event) {
    const state = this.conversation(event.conv);
    const added = state.add([event]);
    if (event.sender === this.username) this.outbox.delete(String(event.client_msg_id));
    this._clearTyping(state, event.sender);
    this._added(state, added, true);
    if (state.messages.size && Number(event.seq) > state.lastSeq + 1 && this.state === "live") {
      // A gap (spec §9.3): fill it from history.
      this.loadAfter(state).catch(() => {});
    }
  }

  _added(state, added, live) {
    if (!added.length) return;
    this._emit("messages", { state, added, live });
    clearTimeout(this._deliveredTimer);
    this._deliveredTimer = setTimeout(() => this._sendDelivered(), DELIVERED_EVERY_MS);
  }

  _sendDelivered() {
    for (const state of this.convs.values()) {
      if (state.lastSeq > state.deliveredSent && state.messages.has(state.lastSeq)) {
        state.deliveredSent = state.lastSeq;
        this._send({ type: "DELIVERED", conv: state.conv, seq: BigInt(state.lastSeq) });
      }
    }
  }

  markRead(state) {
    if (!state || this.state !== "live" || state.lastSeq <= state.readSent || !state.messages.has(state.lastSeq)) return;
    state.readSent = state.lastSeq;
    state.readSeq = Math.max(state.readSeq, state.lastSeq);
    this._send({ type: "READ", conv: state.conv, seq: BigInt(state.lastSeq) });
    this._emit("read", state);
  }

  // -- requests the UI makes ----------------------------------------------------------------------
  async join(name) {
    const known = this.convs.has(convKey(room(name)));
    const joined = await this.request({ type: "JOIN", room: name });
    const state = this.conversation(room(joined.room));
    const last = Number(joined.last_seq);
    if (state.messages.size === 0) {
      state.lastSeq = Math.max(state.lastSeq, last);
      state.oldest = state.lastSeq + 1;
    }
    state.latestSeq = Math.max(state.latestSeq, last);
    if (!known && last > state.readSeq) {
      // A room's past is not unread news to someone who has just joined: move the read marker to the end,
      // or every other device (and the next reload) would count all of it as unread.
      state.readSeq = state.readSent = last;
      this._send({ type: "READ", conv: state.conv, seq: BigInt(last) });
    }
    this._emit("conversations");
    return state;
  }

  async leave(state) {
    await this.request({ type: "LEAVE", room: state.conv.name });
    this.forget(state);
  }

  /** Drop a conversation from the page (after LEAVE, or a direct one the user closes). */
  forget(state) {
    this.convs.delete(state.key);
    this.outbox.forEach((item, id) => convKey(item.conv) === state.key && this.outbox.delete(id));
    this._emit("conversations");
    this._emit("forgotten", state);
  }

  /** MEMBERS of a room: the member list with each one's status (spec §5.14). */
  async members(state) {
    const list = await this.request({ type: "MEMBERS", room: state.conv.name });
    state.members = new Map(list.members.map((m) => [m.user, m.status]));
    for (const m of list.members) if (m.user !== this.username) this.presence.set(m.user, m.status);
    this._emit("members", state);
    this.refreshDetails(state);
    return state.members;
  }

  // -- display names (version 2, spec §9.17) ---------------------------------------------------------------------
  /** `user`'s display name ("" when none or not known yet); an unknown one is asked for (batched). */
  displayName(user) {
    const known = this.displayNames.get(user);
    if (known !== undefined) return known;
    if ((this.welcome?.version ?? 1) >= 2 && !this._namesWanted.has(user)) {
      this._namesWanted.add(user);
      this._namesQueued.push(user);
      if (this._namesQueued.length === 1) queueMicrotask(() => this._askNames());
    }
    return "";
  }

  /** One GET_USERS for the users queued since the last (at most MAX_USERS_PER_ASK a request). */
  async _askNames() {
    const users = this._namesQueued.splice(0);
    for (let i = 0; i < users.length; i += MAX_USERS_PER_ASK) {
      const batch = users.slice(i, i + MAX_USERS_PER_ASK);
      try {
        const { users: infos } = await this.request({ type: "GET_USERS", users: batch });
        const names = new Map(infos.map((u) => [u.user, u.display_name]));
        for (const user of batch) this.displayNames.set(user, names.get(user) ?? "");
        this._emit("names");
      } catch { /* disconnected: asked again when next shown */ }
      for (const user of batch) this._namesWanted.delete(user);
    }
  }

  /** SET_DISPLAY_NAME ("" clears it); rejects with the server's reason when refused. Then asked for afresh. */
  async setDisplayName(name) {
    await this.request({ type: "SET_DISPLAY_NAME", display_name: name });
    this.displayNames.delete(this.username);
    this.displayName(this.username);
  }

  // -- roles, moderation and private rooms (version 2, spec §9.15) ------------------------------------------------
  get moderating() { return (this.welcome?.version ?? 1) >= 2; }

  /** GET_ROOM → state.details: {topic, private, members: Map user → {role, muted, until}, bans}; also sets
   * state.topic and state.private. Members only: NOT_MEMBER after a kick rejects. */
  async details(state) {
    const d = await this.request({ type: "GET_ROOM", room: state.conv.name });
    const wasPrivate = state.private;
    state.details = {
      topic: d.topic, private: d.private, bans: d.bans,
      members: new Map(d.members.map((m) => [m.user, { role: m.role, muted: m.muted, until: Number(m.muted_until_ms) }])),
    };
    state.topic = d.topic;
    state.private = d.private;
    if (wasPrivate !== d.private) this._emit("conversations");
    this._emit("details", state);
    return state.details;
  }

  /** details() in the background (a version 2 room only); a refusal (no longer a member) changes nothing. */
  refreshDetails(state) {
    if (this.moderating && state.conv.kind === ConvKind.ROOM && this.state === "live") this.details(state).catch(() => {});
  }

  /** The rooms whose details are not known yet, one GET_ROOM at a time (so the sidebar can mark private ones: the
   * conversation list does not say), at most MAX_DETAILS_AT_START of them, never a burst against the rate limit. */
  async detailsOfAll() {
    const rooms = [...this.convs.values()].filter((s) => s.conv.kind === ConvKind.ROOM && !s.details);
    for (const state of rooms.slice(0, MAX_DETAILS_AT_START)) {
      if (this.state !== "live" || !this.moderating) return;
      if (this.convs.get(state.key) === state) await this.details(state).catch(() => {});
    }
  }

  /** The user's role in a room, as far as its details say (MEMBER until they do). */
  roleIn(state, user = this.username) {
    return state?.details?.members.get(user)?.role ?? RoomRole.MEMBER;
  }

  /** A moderation request (KICK, BAN, MUTE, SET_ROLE, INVITE, DELETE_MESSAGE…): its reply, or a RequestError. */
  moderate(event) { return this.request(event); }

  /** CREATE_ROOM: a new room the user owns, invite-only when `isPrivate` (spec §5.55). */
  async createRoom(name, isPrivate) {
    const joined = await this.request({ type: "CREATE_ROOM", room: name, private: isPrivate });
    const state = this.conversation(room(joined.room));
    state.private = isPrivate;
    this._emit("conversations");
    return state;
  }

  /** MEMBERSHIP about the user itself: kicked or banned (LEFT) drops the room, invited (JOINED) lists it. True when
   * handled here. Other users' changes refresh the room's roles and mutes, and go on to the member list. */
  _membershipOfRoles(state, name, user, change) {
    if (user !== this.username) {
      if (state) this.refreshDetails(state);
      return false;
    }
    if (change === MembershipChange.LEFT && state) {
      // The KICK or BAN is the room's last event this connection gets (spec §9.15): say who and why.
      const why = state.sorted().reverse().find((m) => m.event?.target === user &&
        (m.event.kind === EventKind.KICK || m.event.kind === EventKind.BAN));
      this.forget(state);
      this._emit("notice", why ? `#${name}: ${why.sender} ${why.body}` : `You are no longer in #${name}.`);
    } else if (change === MembershipChange.JOINED) {  // an INVITE; its event may have listed the room already
      this.conversation(room(name));
      this.refreshConversations();
      this._emit("notice", `You were added to #${name}.`);
    }
    return true;
  }

  /** LIST_ROOMS: every room with a member, the user's own first (spec §5.13), for the room browser. */
  async rooms() {
    return (await this.request({ type: "LIST_ROOMS" })).rooms;
  }

  _receipt(event) {
    // Our own READ from another device (as the terminal client takes it, once the server sends it): what was read
    // there is not unread here. Until then LIST_CONVERSATIONS on focus does the same, later.
    const state = this.convs.get(convKey(event.conv));
    if (event.user === this.username && event.kind === ReceiptKind.READ && state && Number(event.seq) > state.readSeq) {
      state.readSeq = Number(event.seq);
      state.readSent = Math.max(state.readSent, state.readSeq);
      this._emit("read", state);
    }
    this._emit("receipt", event);
  }

  _presence(user, status) {
    this.presence.set(user, status);
    for (const state of this.convs.values()) if (state.members?.has(user)) state.members.set(user, status);
    this._emit("presence", { user, status });
  }

  _membership({ room: name, user, change }) {
    const state = this.convs.get(convKey(room(name)));
    if (this._membershipOfRoles(state, name, user, change)) return;
    if (!state?.members) return;
    if (change === MembershipChange.JOINED) {
      state.members.set(user, this.presence.get(user) ?? Status.ONLINE); // a JOIN needs a connection
      this.presence.set(user, state.members.get(user));
    } else {
      state.members.delete(user);
    }
    this._emit("members", state);
  }

  /** Load the page of history before the oldest loaded message (spec §9.7). */
  async loadOlder(state) {
    if (state.loadingOlder || !state.hasOlder || this.state !== "live") return [];
    state.loadingOlder = true;
    try {
      const before = Number.isFinite(state.oldest) ? state.oldest : 0;
      if (before === 1) {
        state.hasOlder = false;
        return [];
      }
      const page = await this.request({
        type: "HISTORY", conv: state.conv, direction: Direction.BEFORE, seq: BigInt(before), limit: HISTORY_PAGE,
      });
      state.hasOlder = page.has_more;
      const added = state.add(page.messages);
      if (!page.messages.length) state.hasOlder = false;
      this._emit("history", { state, added });
      return added;
    } finally {
      state.loadingOlder = false;
    }
  }

  async loadAfter(state) {
    const page = await this.request({
      type: "HISTORY", conv: state.conv, direction: Direction.AFTER, seq: BigInt(state.lastSeq), limit: 0,
    });
    this._added(state, state.add(page.messages), false);
  }

  /** Send a message: shown as pending until its MESSAGE arrives; kept and resent until acknowledged. */
  send(state, body, { action = false } = {}) {
    const item = { conv: state.conv, body, action, client_msg_id: randomU64(), sentAt: Date.now() };
    this.outbox.set(String(item.client_msg_id), item);
    this._emit("outbox", state);
    if (this.state === "live") this._sendOutboxItem(item);
    return item;
  }

  _sendOutboxItem(item) {
    // An action is SEND_ACTION from version 2 on (its kind in the frame, spec §9.16); a version 1 server gets "/me".
    const action = item.action && (this.welcome?.version ?? 1) >= 2;
    this.request({ type: action ? "SEND_ACTION" : "SEND", conv: item.conv, client_msg_id: item.client_msg_id,
      body: action ? item.body.slice(ACTION.length) : item.body })
      .then(() => {
        this.outbox.delete(String(item.client_msg_id));
        this._emit("outbox", this.conversation(item.conv));
      })
      .catch((err) => {
        if (!(err instanceof RequestError)) return; // connection lost: resent after the next SYNC
        if (err.code === ErrorCode.RATE_LIMITED || err.code === ErrorCode.SERVER_BUSY) {
          setTimeout(() => this.state === "live" && this._sendOutboxItem(item), err.retryAfterMs || 1000);
          return;
        }
        this.outbox.delete(String(item.client_msg_id));
        const state = this.conversation(item.conv);
        if (err.code === ErrorCode.NOT_FOUND && item.conv.kind === ConvKind.DIRECT) {
          state.missing = true;
          this._emit("conversations");
          this._emit("notice", `Not sent: there is no user ${item.conv.name}.`);
        } else {
          this._emit("notice", `Not sent: ${err.message}`);
        }
        this._emit("outbox", state);
      });
  }

  pendingFor(state) {
    return [...this.outbox.values()].filter((item) => convKey(item.conv) === state.key);
  }

  typing(state) {
    const now = Date.now();
    if (this.state !== "live" || now - (state.typingSentAt ?? 0) < TYPING_EVERY_MS) return;
    if (state.conv.kind === ConvKind.DIRECT && !state.messages.size) return; // not a conversation yet
    state.typingSentAt = now;
    this._send({ type: "TYPING", conv: state.conv });
  }

  _clearTyping(state, user) {
    if (state.typing.has(user)) {
      clearTimeout(state.typing.get(user));
      state.typing.delete(user);
      this._emit("typingchanged", state);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// UI
// ------------------------------------------------------------------------------------------------

// -- message text: a small markup, turned into DOM nodes, never into HTML ------------------------------------------
// ```block```, `code`, *bold*, _italic_, http(s) links and @mentions. Everything else is text, set with textContent.

const FENCE_RE = /```\n?([\s\S]*?)\n?```/g;
const INLINE_RE = new RegExp([
  "(`[^`\\n]+`)", // code
  "(\\bhttps?:\\/\\/[^\\s<>\"'`]+)", // a link (trailing punctuation is trimmed below)
  "((?<![\\w*])\\*(?=[^*\\s])[^*\\n]*?[^*\\s]\\*(?![\\w*]))", // *bold*
  "((?<![\\w_])_(?=[^_\\s])[^_\\n]*?[^_\\s]_(?![\\w_]))", // _italic_
  `((?<![\\w@])@${NAME_PATTERN})`, // @mention: a user name by proto's rule
].join("|"), "giu");
const MAX_USERS_PER_ASK = 1000; // GET_USERS' array limit (FIELDS)
const ACTION = "/me "; // a body starting so is an action, shown "* alice waves" (as the terminal client does)
const SAFE_PROTOCOLS = new Set(["http:", "https:"]);

/** The link in `candidate` (trailing punctuation and unbalanced ")" left out): {href, text}, or null if none. */
function linkOf(candidate) {
  let text = candidate;
  for (;;) {
    const last = text.at(-1);
    const unbalanced = last === ")" && text.split("(").length < text.split(")").length;
    if (!(".,;:!?'\"".includes(last) || unbalanced)) break;
    text = text.slice(0, -1);
  }
  let url;
  try {
    url = new URL(text);
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) && url.hostname ? { href: url.href, text } : null;
}

/**
 * A message body as tokens: [{kind, text, href?}] with kind text | code | pre | link | bold | italic | mention.
 * Pure (no DOM), so that what is a link is decided in one place; only http: and https: are ever links.
 */
export function tokenize(body) {
  const tokens = [];
  const inline = (part) => {
    let at = 0;
    for (const m of part.matchAll(INLINE_RE)) {
      let kind = m[1] ? "code" : m[2] ? "link" : m[3] ? "bold" : m[4] ? "italic" : "mention";
      let text = m[0];
      let href;
      if (kind === "link") {
        const link = linkOf(text);
        if (!link) continue;
        ({ text, href } = link);
      } else if (kind === "mention") {
        text = text.replace(/[.-]+$/, "");
      } else {
        text = text.slice(1, -1);
      }
      if (m.index > at) tokens.push({ kind: "text", text: part.slice(at, m.index) });
      tokens.push(href ? { kind, text, href } : { kind, text });
      at = m.index + (kind === "link" || kind === "mention" ? text.length : m[0].length);
    }
    if (at < part.length) tokens.push({ kind: "text", text: part.slice(at) });
  };
  let at = 0;
  for (const m of body.matchAll(FENCE_RE)) {
    if (m.index > at) inline(body.slice(at, m.index));
    tokens.push({ kind: "pre", text: m[1] });
    at = m.index + m[0].length;
  }
  if (at < body.length) inline(body.slice(at));
  return tokens;
}

/** Whether `body` mentions `user` (@user, any case). */
export function mentions(body, user) {
  return !!user && tokenize(body).some((t) => t.kind === "mention" && t.text.slice(1).toLowerCase() === user);
}

/** DOM nodes for a body's tokens; text only ever through textContent. */
function bodyNodes(body, me) {
  return tokenize(body).map((token) => {
    switch (token.kind) {
      case "text": return document.createTextNode(token.text);
      case "code": return element("code", null, token.text);
      case "pre": {
        const pre = element("pre");
        pre.append(element("code", null, token.text));
        return pre;
      }
      case "bold": return element("strong", null, token.text);
      case "italic": return element("em", null, token.text);
      case "mention":
        return element("span", "mention" + (token.text.slice(1).toLowerCase() === me ? " of-me" : ""), token.text);
      case "link": {
        const a = element("a", null, token.text);
        a.href = token.href;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        return a;
      }
    }
    return document.createTextNode(token.text);
  });
}

/** How a line shows: "text", "action" (/me), "event" (moderation, in words) or "deleted" (a tombstone). */
function lineKind(msg) {
  if (msg.event?.kind === EventKind.ACTION) return "action"; // its body is "/me " and the text (eventText)
  if (msg.event) return msg.event.kind === EventKind.DELETED ? "deleted" : "event";
  return msg.body.startsWith(ACTION) ? "action" : "text";
}

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: bodies are untrusted text
  return node;
}

const timeFormat = globalThis.Intl ? new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" }) : null;
const dayFormat = globalThis.Intl ? new Intl.DateTimeFormat(undefined, { dateStyle: "medium" }) : null;
const GROUP_WITHIN_MS = 5 * 60 * 1000; // consecutive messages of one sender this close share one header
const LAST_KEY = "chorus.last"; // the conversation open when the page was left, reopened on the next load
const NOTIFY_CHARS = 140;

/** The moderation commands (version 2, spec §9.15), as the terminal client spells them; DURATION is 30m, 2h, 7d… */
const MODERATION_COMMANDS = Object.freeze({
  create: "/create #room [private]: create a room you own; private: invite-only and unlisted",
  invite: "/invite user: add user to this room (the way into a private one)",
  topic: "/topic [text]: set this room's topic (moderators); with no text, show it",
  kick: "/kick user [reason]: remove user from this room; they may join again",
  ban: "/ban user [DURATION] [reason]: remove user and keep them out (none: until /unban)",
  unban: "/unban user: let a banned user join again",
  mute: "/mute user [DURATION] [reason]: refuse user's messages here (none: until /unmute)",
  unmute: "/unmute user: let a muted user talk again",
  op: "/op user: make user a moderator (the owner only)",
  deop: "/deop user: make a moderator a member again (the owner only)",
  owner: "/owner user: hand this room over to user; you become a moderator",
});
const DURATION_RE = /^([1-9][0-9]{0,5})([smhdw])$/i;
const UNIT_MS = Object.freeze({ s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 });
/** The ban and mute lengths the member menu offers (0: until lifted). */
const DURATIONS = Object.freeze([["1 hour", UNIT_MS.h], ["1 day", UNIT_MS.d], ["forever", 0]]);
const ROLE_BADGES = Object.freeze({ [RoomRole.OWNER]: "owner", [RoomRole.MODERATOR]: "mod" });

/** The slash commands of the message box; anything else starting with "/" is answered here, never sent. */
const COMMANDS = Object.freeze({
  join: "/join #room: join a room and open it",
  leave: "/leave [#room]: leave this room (or the one named)",
  msg: "/msg user text: send a direct message",
  me: "/me text: an action, shown as * you text",
  nick: "/nick [name]: set your display name, shown beside your user name (none: clear it)",
  help: "/help: this list",
  ...MODERATION_COMMANDS,
});
const COMMAND_ALIASES = Object.freeze({ part: "leave", query: "msg", j: "join" });

class ChatView {
  constructor(client, { lastKey = LAST_KEY } = {}) {
    this.client = client;
    this.lastKey = lastKey;
    this.current = null; // ConversationState shown
    this.dividerSeq = null; // "New messages" goes above the first message after this seq
    this.positioned = false; // scrolled to the divider or the end since the conversation opened
    this.newBelow = 0; // messages arrived while scrolled up (the jump-to-latest button counts them)
    this.app = $("app");
    this.messagesBox = $("messages");
    // The inputs' limits and hints come from proto too (names are ASCII, so characters are bytes; a password's
    // bytes are checked on submit). The join box takes a name after "#" or "@".
    Object.assign($("username"), { maxLength: MAX_NAME_BYTES, title: `User names are ${NAME_RULE}` });
    Object.assign($("password"), { maxLength: MAX_PASSWORD_BYTES, title: `Passwords are ${PASSWORD_RULE}` });
    Object.assign($("join-input"), { maxLength: MAX_NAME_BYTES + 1, title: `Names are ${NAME_RULE}` });
    this.bind();
  }

  bind() {
    const c = this.client;
    c.addEventListener("state", (e) => this.showState(e.detail));
    c.addEventListener("needlogin", () => this.showLogin());
    c.addEventListener("authenticated", (e) => this.showChat(e.detail));
    c.addEventListener("loggedout", () => {
      this.client.storage?.removeItem(this.lastKey); // the next person on this page starts with nothing open
      this.close();
      this.showLogin();
      this.renderRooms();
    });
    c.addEventListener("conversations", () => this.renderRooms());
    c.addEventListener("listed", () => this.restoreLast());
    c.addEventListener("read", () => this.renderRooms());
    c.addEventListener("forgotten", (e) => this.onForgotten(e.detail));
    c.addEventListener("messages", (e) => this.onMessages(e.detail));
    c.addEventListener("history", (e) => this.onHistory(e.detail));
    c.addEventListener("outbox", (e) => e.detail === this.current && this.renderMessages());
    c.addEventListener("typing", (e) => this.onTyping(e.detail));
    c.addEventListener("typingchanged", (e) => e.detail === this.current && this.renderTyping());
    c.addEventListener("members", (e) => e.detail === this.current && this.renderMembers());
    c.addEventListener("presence", () => {
      this.renderMembers();
      this.renderRooms();
    });
    c.addEventListener("notice", (e) => this.notice(e.detail));
    c.addEventListener("names", () => this.onNames());

    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.submitLogin(false);
    });
    $("register").addEventListener("click", () => this.submitLogin(true));
    $("username").addEventListener("input", (e) => { e.target.value = e.target.value.toLowerCase(); });
    $("logout").addEventListener("click", () => this.client.logout());
    $("back").addEventListener("click", () => this.setView("rooms"));
    $("status").addEventListener("click", () => this.client.reconnectNow());
    $("join-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.submitJoin();
    });
    $("browse").addEventListener("click", () => this.browseRooms());
    $("browser-close").addEventListener("click", () => $("room-browser").close());
    $("room-filter").addEventListener("input", () => this.filterRooms());
    $("members-button").addEventListener("click", () => this.toggleMembers());
    $("leave").addEventListener("click", () => this.current && this.leave(this.current));
    $("notify").addEventListener("click", () => this.askNotifications());
    $("jump").addEventListener("click", () => {
      this.scrollToBottom();
      this.client.markRead(this.current);
    });
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      this.submitMessage();
    });
    const input = $("message-input");
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.submitMessage();
      }
    });
    input.addEventListener("input", () => {
      input.style.height = "auto";
      input.style.height = Math.min(input.scrollHeight, 160) + "px";
      if (this.current && input.value && !input.value.startsWith("/")) this.client.typing(this.current);
    });
    this.messagesBox.addEventListener("scroll", () => {
      if (!this.current) return;
      if (this.messagesBox.scrollTop < 80) this.client.loadOlder(this.current).catch(() => {});
      if (this.atBottom()) {
        this.newBelow = 0;
        if (document.visibilityState !== "hidden") this.client.markRead(this.current);
      }
      this.renderJump();
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") {
        this.client.reconnectNow();
        this.client.refreshConversations();
        if (this.current && this.atBottom()) this.client.markRead(this.current);
      }
    });
    globalThis.addEventListener("focus", () => this.client.refreshConversations());
    globalThis.addEventListener("online", () => this.client.reconnectNow());
    document.addEventListener("keydown", (e) => {
      if (this.app.dataset.view === "login") return;
      if (e.altKey && (e.key === "ArrowUp" || e.key === "ArrowDown")) {
        e.preventDefault();
        this.step(e.key === "ArrowUp" ? -1 : 1);
      } else if (e.key === "Escape" && !$("members-panel").hidden) {
        this.toggleMembers();
      }
    });
    this.renderComposer();
    this.renderNotify();
    this.bindModeration();
  }

  setView(view) {
    this.app.dataset.view = view;
    $("back").hidden = view !== "conversation";
    $("title").textContent = view === "conversation" && this.current ? convLabel(this.current.conv) : "Chorus";
  }

  showState({ state, note }) {
    const status = $("status");
    const labels = { offline: "offline", connecting: "connecting…", unauthenticated: "connected", syncing: "syncing…", live: "online" };
    status.textContent = labels[state] + (note && state !== "live" ? ` · ${note}` : "");
    status.title = state === "offline" ? "Reconnect now" : "";
    status.dataset.state = state;
    $("login").disabled = $("register").disabled = state !== "unauthenticated";
  }

  showLogin() {
    this.setView("login");
    $("logout").hidden = true;
    $("password").value = "";
    if (this.client._stopped) this.client.start();
    $("username").focus();
  }

  showChat(username) {
    $("logout").hidden = false;
    $("me").textContent = username;
    $("login-error").textContent = "";
    $("password").value = "";
    if (this.app.dataset.view === "login") this.setView(this.current && this.isNarrow() ? "conversation" : "rooms");
    this.renderRooms();
  }

  isNarrow() { return globalThis.matchMedia?.("(max-width: 720px)").matches; }

  async submitLogin(register) {
    const user = $("username").value.trim();
    const password = $("password").value;
    const error = $("login-error");
    const problem = isName(user) ? passwordProblem(password, register) : `User names are ${NAME_RULE}.`;
    error.textContent = problem ?? "";
    if (problem) return;
    try {
      await this.client.login(user, password, register);
    } catch (err) {
      const messages = {
        [ErrorCode.AUTH_FAILED]: "Wrong user name or password.",
        [ErrorCode.USERNAME_TAKEN]: "That name is taken.",
        [ErrorCode.INVALID_NAME]: `User names are ${NAME_RULE}.`,
        [ErrorCode.WEAK_PASSWORD]: `Passwords are ${PASSWORD_RULE}.`,
        [ErrorCode.RATE_LIMITED]: "Too many attempts; wait a moment.",
      };
      error.textContent = messages[err.code] ?? err.message;
    }
  }

  /** Open "#room" / "room" (joined first) or "@user"; a notice and false when the name is not one. */
  async openByName(text) {
    const name = text.trim();
    const user = name.startsWith("@");
    const bare = user ? name.slice(1) : name.replace(/^#/, "");
    if (!isName(bare)) {
      this.notice(`${user ? "User" : "Room"} names are ${NAME_RULE}.`);
      return false;
    }
    if (user && bare === this.client.username) {
      this.notice("That is you: direct messages go to someone else.");
      return false;
    }
    try {
      this.open(user ? this.client.conversation(direct(bare)) : await this.client.join(bare));
      return true;
    } catch (err) {
      this.notice(err.message);
      return false;
    }
  }

  async submitJoin() {
    const input = $("join-input");
    if (input.value.trim() && await this.openByName(input.value)) input.value = "";
  }

  submitMessage() {
    const input = $("message-input");
    const body = input.value.trim();
    if (!body || !this.current) return;
    if (body.startsWith("/") && !body.startsWith("//")) {
      this.command(body).then((done) => {
        if (done) this.clearInput();
      });
      return;
    }
    if (this.post(this.current, body.startsWith("//") ? body.slice(1) : body)) this.clearInput();
  }

  clearInput() {
    const input = $("message-input");
    input.value = "";
    input.style.height = "auto";
  }

  /** Queue `body` in `state`; false (with a notice) when it is too long for the server. */
  post(state, body, options = {}) {
    const max = this.client.welcome?.max_body_bytes ?? MAX_BODY_BYTES; // the server's limit, once it has said
    if (utf8Encoder.encode(body).length > max) {
      this.notice(`Messages are at most ${max} bytes.`);
      return false;
    }
    if (state === this.current) {
      this.dividerSeq = null; // answering means the new ones are read
      this.scrollToBottom();
    }
    this.client.send(state, body, options);
    return true;
  }

  /** Run a slash command; resolves to whether it was done (the box is then cleared). Never sent as text. */
  async command(line) {
    const [, word, rest = ""] = line.match(/^\/(\S+)\s*([\s\S]*)$/);
    const name = COMMAND_ALIASES[word.toLowerCase()] ?? word.toLowerCase();
    const args = rest.trim();
    switch (name) {
      case "join":
        if (!args) break;
        return this.openByName(args.startsWith("@") ? args : "#" + args.replace(/^#/, ""));
      case "leave": {
        const state = args ? this.client.convs.get(convKey(room(args.replace(/^#/, "").toLowerCase()))) : this.current;
        if (!state || state.conv.kind !== ConvKind.ROOM) {
          this.notice(args ? `You are not in ${args}.` : "This is not a room: /leave leaves rooms.");
          return false;
        }
        return this.leave(state);
      }
      case "msg": {
        const m = args.match(/^@?(\S+)\s+([\s\S]+)$/);
        if (!m) break;
        if (!(await this.openByName("@" + m[1].toLowerCase()))) return false;
        return this.post(this.current, m[2].trim());
      }
      case "me":
        if (!args) break;
        return this.post(this.current, ACTION + args, { action: true });
      case "help":
        this.notice(Object.values(COMMANDS).join(" · "));
        return true;
      case "nick":
        return this.setDisplayName(args);
      default: {
        const done = await this.moderationCommand(name, args);
        if (done === null) break; // usage
        if (done !== undefined) return done;
        this.notice(`Unknown command /${word}. ${Object.keys(COMMANDS).map((c) => "/" + c).join(" ")}; ` +
          "start with // to send a slash.");
        return false;
      }
    }
    this.notice(`Usage: ${COMMANDS[name]}`);
    return false;
  }

  async leave(state) {
    try {
      await this.client.leave(state);
      this.notice(`You left ${convLabel(state.conv)}.`);
      return true;
    } catch (err) {
      this.notice(err.message);
      return false;
    }
  }

  async setDisplayName(name) {
    if ((this.client.welcome?.version ?? 1) < 2) {
      this.notice("/nick needs a server of protocol version 2.");
      return false;
    }
    try {
      await this.client.setDisplayName(name);
      this.notice(name ? `Your display name is ${name}.` : "Your display name is cleared.");
      return true;
    } catch (err) {
      this.notice(`Refused: ${err.message}`);
      return false;
    }
  }

  /** `user` as shown: "Display Name @user" (the login name smaller) when they have one, else the login name. */
  nameNodes(user) {
    const display = this.client.displayName(user);
    if (!display) return [user];
    return [element("span", "display-name", display), " ", element("span", "login", "@" + user)];
  }

  onNames() {
    const stick = this.atBottom();
    this.renderMessages();
    if (stick && this.positioned) this.scrollToBottom();
    this.renderMembers();
  }

  notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(this._noticeTimer);
    this._noticeTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  // -- rooms ----------------------------------------------------------------------------------------
  /** The conversations in the list's order: rooms by name, then direct ones, most recently active first. */
  listed() {
    return [...this.client.convs.values()].sort((a, b) => a.conv.kind - b.conv.kind ||
      (a.conv.kind === ConvKind.DIRECT ? b.lastTs - a.lastTs : 0) || a.conv.name.localeCompare(b.conv.name));
  }

  /** Alt+↑ / Alt+↓: the conversation above or below the open one in the list. */
  step(by) {
    const states = this.listed();
    if (!states.length) return;
    const at = states.indexOf(this.current);
    this.open(states[at < 0 ? 0 : (at + by + states.length) % states.length]);
  }

  renderRooms() {
    const list = $("rooms");
    list.replaceChildren();
    const me = this.client.username;
    // Rooms by name, then direct conversations, most recently active first.
    const states = this.listed();
    let total = 0;
    let elsewhere = 0;
    for (const state of states) {
      const unread = state.unread(me);
      total += unread;
      if (state !== this.current) elsewhere += unread;
      const item = element("li", "room-item");
      const button = element("button", "room" + (state === this.current ? " current" : "") + (unread ? " unread" : ""));
      button.type = "button";
      button.dataset.conv = state.key;
      const label = element("span", "room-name", convLabel(state.conv));
      if (state.missing) {
        button.classList.add("missing");
        button.title = `There is no user ${state.conv.name}`;
      }
      if (state.conv.kind === ConvKind.DIRECT && this.client.presence.has(state.conv.name)) {
        label.dataset.status = this.client.presence.get(state.conv.name) === Status.ONLINE ? "online" : "offline";
      }
      if (state.private) {
        label.dataset.private = "";
        button.title ||= `${convLabel(state.conv)} is invite-only`;
      }
      button.append(label);
      if (unread) button.append(element("span", "badge", String(unread)));
      button.addEventListener("click", () => this.open(state));
      item.append(button);
      if (state.conv.kind === ConvKind.DIRECT) { // a direct conversation can be closed (it returns with a message)
        const remove = element("button", "remove", "×");
        remove.type = "button";
        remove.title = remove.ariaLabel = `Close ${convLabel(state.conv)}`;
        remove.addEventListener("click", () => this.client.forget(state));
        item.append(remove);
      }
      list.append(item);
    }
    $("empty-rooms").hidden = states.length > 0;
    document.title = (total ? `(${total}) ` : "") + (this.current ? `${convLabel(this.current.conv)} · ` : "") + "Chorus";
    const back = $("back");
    back.dataset.unread = elsewhere ? String(elsewhere) : "";
    back.ariaLabel = "Back to the rooms" + (elsewhere ? ` (${elsewhere} unread)` : "");
  }

  async browseRooms() {
    const dialog = $("room-browser");
    const list = $("room-list");
    list.replaceChildren(element("li", "placeholder", "Loading…"));
    if (!dialog.open) {
      $("room-filter").value = "";
      dialog.showModal();
    }
    let rooms;
    try {
      rooms = await this.client.rooms();
    } catch (err) {
      list.replaceChildren(element("li", "placeholder", `Could not list the rooms: ${err.message}`));
      return;
    }
    list.replaceChildren(...rooms.map((info) => {
      const item = element("li", "room-info");
      item.dataset.room = info.name;
      const name = element("span", "room-name", "#" + info.name);
      const count = element("span", "count", `${info.members} member${info.members === 1 ? "" : "s"}`);
      const button = element("button", info.joined ? "secondary" : "", info.joined ? "Open" : "Join");
      button.type = "button";
      button.addEventListener("click", async () => {
        if (await this.openByName("#" + info.name)) dialog.close();
      });
      item.append(name, count, button);
      return item;
    }));
    if (!rooms.length) list.replaceChildren(element("li", "placeholder", "No rooms yet: join one by name."));
    this.filterRooms();
  }

  filterRooms() {
    const words = $("room-filter").value.trim().toLowerCase().replace(/^#/, "");
    for (const item of $("room-list").querySelectorAll(".room-info")) item.hidden = !item.dataset.room.includes(words);
  }

  /** Once live after (re)connecting: reopen the last conversation on a fresh page, or mark read what caught up. */
  restoreLast() {
    if (this.current) {
      if (this.atBottom() && document.visibilityState !== "hidden") this.client.markRead(this.current);
      if (this.current.conv.kind === ConvKind.ROOM) this.client.members(this.current).catch(() => {}); // missed
      return;
    }
    const key = this.client.storage?.getItem(this.lastKey);
    const state = key && this.client.convs.get(key);
    if (state) this.open(state, { focus: false });
  }

  open(state, { focus = true } = {}) {
    if (this.current !== state) {
      this.dividerSeq = state.unread(this.client.username) ? state.readSeq : null;
      this.positioned = false;
      this.newBelow = 0;
    }
    this.current = state;
    this.client.storage?.setItem(this.lastKey, state.key);
    this.renderRooms();
    this.setView("conversation");
    this.renderComposer();
    this.renderMessages();
    this.position();
    if (state.messages.size < HISTORY_PAGE && state.hasOlder) {
      this.client.loadOlder(state).catch(() => {});
    }
    if (state.conv.kind === ConvKind.ROOM) this.client.members(state).catch(() => {});
    this.renderMembers();
    if (this.atBottom()) this.client.markRead(state);
    if (focus && !this.isNarrow()) $("message-input").focus();
  }

  close() {
    this.current = null;
    this.dividerSeq = null;
    $("members-panel").hidden = true;
    this.renderComposer();
    this.renderMessages();
    this.renderRooms();
  }

  onForgotten(state) {
    if (this.client.storage?.getItem(this.lastKey) === state.key) this.client.storage.removeItem(this.lastKey);
    if (state !== this.current) return;
    this.close();
    this.setView("rooms");
  }

  renderComposer() {
    const open = !!this.current;
    $("message-input").disabled = $("send").disabled = !open;
    $("message-input").placeholder = open ? `Message ${convLabel(this.current.conv)}` : "Pick a conversation first";
    $("members-button").hidden = !open || this.current.conv.kind !== ConvKind.ROOM;
    this.renderTopic();
  }

  // -- members --------------------------------------------------------------------------------------
  toggleMembers() {
    const panel = $("members-panel");
    panel.hidden = !panel.hidden;
    $("members-button").ariaPressed = String(!panel.hidden);
    this.renderMembers();
  }

  renderMembers() {
    const state = this.current;
    const list = $("member-list");
    if (!state || state.conv.kind !== ConvKind.ROOM) {
      $("members-panel").hidden = true;
      return;
    }
    const members = [...(state.members ?? new Map()).entries()]
      .map(([user, status]) => [user, user === this.client.username ? Status.ONLINE : status])
      .sort(([a, s], [b, t]) => t - s || a.localeCompare(b)); // online first, then by name
    const online = members.filter(([, s]) => s === Status.ONLINE).length;
    $("members-title").textContent = `${convLabel(state.conv)}: ${online} online of ${members.length}`;
    $("members-button").textContent = state.members ? String(members.length) : "";
    $("members-button").ariaLabel = `Members of ${convLabel(state.conv)}` + (state.members ? ` (${members.length})` : "");
    list.replaceChildren(...members.map(([user, status]) => {
      const item = element("li", "member");
      item.dataset.user = user;
      item.dataset.status = status === Status.ONLINE ? "online" : "offline";
      const name = element("button", "link-button");
      name.append(...this.nameNodes(user), user === this.client.username ? " (you)" : "");
      name.type = "button";
      name.title = `Message ${user}`;
      name.disabled = user === this.client.username;
      name.addEventListener("click", () => this.openByName("@" + user));
      item.append(name, ...this.memberExtras(state, user));
      return item;
    }));
    $("leave").textContent = `Leave ${convLabel(state.conv)}`;
    this.renderBans(state);
  }

  // -- roles, moderation and private rooms (version 2, spec §9.15) ------------------------------------------------
  bindModeration() {
    const c = this.client;
    c.addEventListener("details", (e) => {
      if (e.detail !== this.current) return;
      this.renderTopic();
      this.renderMembers();
      const role = c.roleIn(e.detail);
      if (role !== this.shownRole) this.renderMessages(); // the delete control depends on it
    });
    c.addEventListener("listed", () => c.detailsOfAll());
    $("topic").addEventListener("click", () => this.editTopic());
    $("moderate-dialog").addEventListener("close", () => this._asked?.($("moderate-dialog").returnValue));
  }

  /** Whether the user may moderate the open room (its details say MODERATOR or OWNER). */
  moderates(state = this.current) {
    return state?.conv.kind === ConvKind.ROOM && this.client.roleIn(state) >= RoomRole.MODERATOR;
  }

  /** The topic under the title: a button for moderators (to edit it), text for everyone else. */
  renderTopic() {
    const state = this.current;
    const topic = $("topic");
    const room = state?.conv.kind === ConvKind.ROOM && state.details;
    const editable = room && this.moderates(state);
    topic.hidden = !room || (!state.topic && !editable);
    topic.textContent = state?.topic || (editable ? "Set a topic" : "");
    topic.disabled = !editable;
    topic.classList.toggle("empty", !state?.topic);
    topic.title = editable ? "Change the topic" : "";
  }

  async editTopic() {
    const state = this.current;
    if (!this.moderates(state)) return;
    const answer = await this.ask(`Topic of ${convLabel(state.conv)}`, { text: "Topic", value: state.topic ?? "", ok: "Set" });
    if (answer) await this.act({ type: "SET_TOPIC", room: state.conv.name, topic: clipUtf8(answer.text, MAX_TEXT_BYTES) });
  }

  /** A role badge, a muted mark and the actions menu for one member of the list. */
  memberExtras(state, user) {
    const extras = [];
    const info = state.details?.members.get(user);
    if (ROLE_BADGES[info?.role]) extras.push(element("span", `role ${ROLE_BADGES[info.role]}`, ROLE_BADGES[info.role]));
    if (info?.muted) {
      const mark = element("span", "muted", "muted");
      mark.title = info.until ? `muted until ${new Date(info.until).toLocaleString()}` : "muted until unmuted";
      extras.push(mark);
    }
    const items = this.memberActions(state, user, info);
    if (items.length) {
      const menu = element("details", "member-menu");
      menu.open = this.menuFor === user;
      const summary = element("summary", "", "⋯");
      summary.ariaLabel = summary.title = `Actions for ${user}`;
      const list = element("div", "menu");
      list.setAttribute("role", "menu");
      for (const [label, run] of items) {
        const item = element("button", "menu-item", label);
        item.type = "button";
        item.setAttribute("role", "menuitem");
        item.addEventListener("click", () => {
          menu.open = false;
          run();
        });
        list.append(item);
      }
      menu.addEventListener("toggle", () => {
        if (menu.open) this.menuFor = user;
        else if (this.menuFor === user) this.menuFor = null;
      });
      menu.append(summary, list);
      extras.push(menu);
    }
    return extras;
  }

  /** The room's active bans, each with Unban, under the member list: ROOM_DETAILS has them for moderators only. */
  renderBans(state) {
    const bans = this.moderates(state) ? state.details?.bans ?? [] : [];
    const list = $("ban-list");
    $("bans").hidden = !bans.length;
    list.replaceChildren(...bans.map((ban) => {
      const item = element("li", "banned");
      item.dataset.user = ban.user;
      const until = Number(ban.until_ms);
      item.append(element("span", "", ban.user), element("span", "until", until ? `until ${new Date(until).toLocaleString()}` : "for good"));
      const unban = element("button", "link-button unban", "Unban");
      unban.type = "button";
      unban.ariaLabel = `Unban ${ban.user}`;
      unban.addEventListener("click", () => this.act({ type: "UNBAN", room: state.conv.name, user: ban.user }));
      item.append(unban);
      return item;
    }));
  }

  /** [label, action] of what the user may do to `user` in `state`: nothing is offered that the server would refuse
   * by rank (spec §9.15's table): KICK, BAN, MUTE on lower ranks; UNMUTE by any moderator; SET_ROLE by the owner. */
  memberActions(state, user, info) {
    const me = this.client.username;
    if (user === me) return [];
    const room = state.conv.name;
    const mine = this.client.roleIn(state);
    const theirs = info?.role ?? RoomRole.MEMBER;
    const items = [["Message", () => this.openByName("@" + user)]];
    if (mine >= RoomRole.MODERATOR && theirs < mine) {
      items.push(["Kick", () => this.punish("KICK", room, user)]);
      items.push(["Ban…", () => this.punish("BAN", room, user)]);
      if (!info?.muted) items.push(["Mute…", () => this.punish("MUTE", room, user)]);
    }
    if (mine >= RoomRole.MODERATOR && info?.muted) items.push(["Unmute", () => this.act({ type: "UNMUTE", room, user })]);
    if (mine === RoomRole.OWNER) {
      const role = (r) => () => this.act({ type: "SET_ROLE", room, user, role: r });
      if (theirs === RoomRole.MEMBER) items.push(["Make moderator", role(RoomRole.MODERATOR)]);
      if (theirs === RoomRole.MODERATOR) items.push(["Make member", role(RoomRole.MEMBER)]);
      items.push(["Make owner", role(RoomRole.OWNER)]);
    }
    return items;
  }

  /** KICK (a reason), BAN or MUTE (a duration and a reason), asked in the dialog first. */
  async punish(type, room, user) {
    const titles = { KICK: `Remove ${user} from #${room}`, BAN: `Ban ${user} from #${room}`, MUTE: `Mute ${user} in #${room}` };
    const answer = await this.ask(titles[type], { text: "Reason (optional)", duration: type !== "KICK",
      ok: { KICK: "Kick", BAN: "Ban", MUTE: "Mute" }[type] });
    if (!answer) return;
    const event = { type, room, user, reason: clipUtf8(answer.text, MAX_TEXT_BYTES) };
    if (type !== "KICK") event.until_ms = BigInt(answer.untilMs);
    await this.act(event);
  }

  /** Send a moderation request; a refusal (FORBIDDEN, NOT_FOUND…) is a notice. True when it was done. */
  async act(event) {
    try {
      await this.client.moderate(event);
      return true;
    } catch (err) {
      this.notice(`Refused: ${err.message}`);
      return false;
    }
  }

  /** The moderation dialog: a title, optionally a duration and a text field; resolves to {untilMs, text} or null. */
  ask(title, { text = null, value = "", duration = false, ok = "OK" } = {}) {
    const dialog = $("moderate-dialog");
    this._asked?.("cancel");
    $("moderate-title").textContent = title;
    $("moderate-duration-row").hidden = !duration;
    $("moderate-duration").replaceChildren(...DURATIONS.map(([label, ms]) => Object.assign(element("option", "", label),
      { value: String(ms) })));
    $("moderate-text-row").hidden = text === null;
    $("moderate-text-label").textContent = text ?? "";
    Object.assign($("moderate-text"), { value, maxLength: MAX_TEXT_BYTES });
    $("moderate-ok").textContent = ok;
    return new Promise((resolve) => {
      this._asked = (answer) => {
        this._asked = null;
        if (dialog.open) dialog.close();
        const ms = Number($("moderate-duration").value);
        resolve(answer === "ok" ? { untilMs: ms ? Date.now() + ms : 0, text: $("moderate-text").value.trim() } : null);
      };
      dialog.returnValue = "";
      dialog.showModal();
      (text === null ? $("moderate-ok") : $("moderate-text")).focus();
    });
  }

  /** A message's delete control (shown on hover or focus): one's own, or any in a room one moderates; never an event,
   * a tombstone or a message not sent yet. */
  addDeleteControl(node, msg, kind) {
    const state = this.current;
    this.shownRole = this.client.roleIn(state);
    if (!this.client.moderating || !msg.seq || !(kind === "text" || kind === "action")) return;
    if (msg.sender !== this.client.username && !this.moderates(state)) return;
    const button = element("button", "delete-message", "Delete");
    button.type = "button";
    button.ariaLabel = `Delete message ${msg.seq}`;
    button.addEventListener("click", async () => {
      const whose = msg.sender === this.client.username ? "your message" : `${msg.sender}'s message`;
      if (await this.ask(`Delete ${whose}?`, { ok: "Delete" })) {
        await this.act({ type: "DELETE_MESSAGE", conv: state.conv, seq: BigInt(msg.seq) });
      }
    });
    node.append(button);
  }

  /** /create, /invite, /topic, /kick, /ban, /unban, /mute, /unmute, /op, /deop, /owner: resolves to whether it was
   * done, null for a usage error, undefined when `name` is not one of them. */
  async moderationCommand(name, args) {
    if (!(name in MODERATION_COMMANDS)) return undefined;
    if (!this.client.moderating) {
      this.notice(`/${name} needs a server of protocol version 2.`);
      return false;
    }
    if (name === "create") {
      const m = args.match(/^#?(\S+)(?:\s+(private|--private))?$/i);
      if (!m) return null;
      if (!isName(m[1].toLowerCase())) {
        this.notice(`Room names are ${NAME_RULE}.`);
        return false;
      }
      try {
        this.open(await this.client.createRoom(m[1].toLowerCase(), !!m[2]));
        return true;
      } catch (err) {
        this.notice(`Refused: ${err.message}`);
        return false;
      }
    }
    const state = this.current;
    if (state?.conv.kind !== ConvKind.ROOM) {
      this.notice(`/${name} works in a room.`);
      return false;
    }
    const room = state.conv.name;
    if (name === "topic") {
      if (!args) {
        this.notice(state.topic ? `Topic of #${room}: ${state.topic}` : `#${room} has no topic.`);
        return true;
      }
      return this.act({ type: "SET_TOPIC", room, topic: clipUtf8(args, MAX_TEXT_BYTES) });
    }
    const [, who = "", rest = ""] = args.match(/^@?(\S*)\s*([\s\S]*)$/);
    const user = who.toLowerCase();
    if (!user) return null;
    switch (name) {
      case "invite": {
        const done = await this.act({ type: "INVITE", room, user });
        if (done) this.notice(`${user} is in #${room} now.`);
        return done;
      }
      case "kick": return this.act({ type: "KICK", room, user, reason: clipUtf8(rest.trim(), MAX_TEXT_BYTES) });
      case "ban": case "mute": {
        const [first = "", after = ""] = rest.trim().split(/\s+([\s\S]*)/);
        const m = first.match(DURATION_RE);
        const untilMs = m ? Date.now() + Number(m[1]) * UNIT_MS[m[2].toLowerCase()] : 0;
        const reason = clipUtf8((m ? after : rest).trim(), MAX_TEXT_BYTES);
        return this.act({ type: name.toUpperCase(), room, user, until_ms: BigInt(untilMs), reason });
      }
      case "unban": case "unmute": return rest ? null : this.act({ type: name.toUpperCase(), room, user });
      default: {  // op, deop, owner
        const role = { op: RoomRole.MODERATOR, deop: RoomRole.MEMBER, owner: RoomRole.OWNER }[name];
        return rest ? null : this.act({ type: "SET_ROLE", room, user, role });
      }
    }
  }

  // -- notifications --------------------------------------------------------------------------------
  renderNotify() {
    $("notify").hidden = !("Notification" in globalThis) || Notification.permission !== "default";
  }

  async askNotifications() {
    try {
      await Notification.requestPermission();
    } finally {
      this.renderNotify();
    }
  }

  /** A system notification for a message from someone else that is direct or mentions the user, when permitted
   * and the user is not looking at that conversation. */
  notify(state, added) {
    if (!("Notification" in globalThis) || Notification.permission !== "granted") return;
    const me = this.client.username;
    const watching = state === this.current && document.visibilityState === "visible" && document.hasFocus();
    if (watching) return;
    for (const msg of added) {
      if (msg.sender === me || msg.event) continue;
      if (state.conv.kind !== ConvKind.DIRECT && !mentions(msg.body, me)) continue;
      const body = msg.body.startsWith(ACTION) ? `* ${msg.sender} ${msg.body.slice(ACTION.length)}` : msg.body;
      const title = state.conv.kind === ConvKind.DIRECT ? msg.sender : `${msg.sender} in ${convLabel(state.conv)}`;
      try {
        const note = new Notification(title, { body: [...body].slice(0, NOTIFY_CHARS).join(""), tag: `${state.key}:${msg.seq}` });
        note.onclick = () => {
          globalThis.focus();
          this.open(state);
          note.close();
        };
      } catch { /* e.g. a platform that wants a service worker: the badge and the title still tell */ }
    }
  }

  // -- messages -------------------------------------------------------------------------------------
  atBottom() {
    const box = this.messagesBox;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  }

  scrollToBottom() {
    this.messagesBox.scrollTop = this.messagesBox.scrollHeight;
    this.newBelow = 0;
    this.renderJump();
  }

  /** After opening: the "New messages" divider near the top if the unread do not fit, else the end. */
  position() {
    if (!this.current?.messages.size) return;
    this.positioned = true;
    this.scrollToBottom();
    const divider = this.messagesBox.querySelector(".divider");
    if (divider && divider.offsetTop < this.messagesBox.scrollTop) {
      this.messagesBox.scrollTop = divider.offsetTop - 8;
    }
  }

  renderJump() {
    const jump = $("jump");
    jump.hidden = !this.current || this.atBottom();
    jump.textContent = this.newBelow ? `${this.newBelow} new message${this.newBelow > 1 ? "s" : ""} ↓` : "Jump to latest ↓";
    jump.classList.toggle("news", this.newBelow > 0);
  }

  onMessages({ state, added, live }) {
    if (live) this.notify(state, added);
    if (state !== this.current) {
      this.renderRooms();
      return;
    }
    const mine = added.some((m) => m.sender === this.client.username);
    const stick = this.atBottom() || mine;
    const away = document.visibilityState === "hidden";
    if (live && !mine && (!stick || away) && this.dividerSeq === null) {
      this.dividerSeq = Math.min(...added.map((m) => m.seq)) - 1;
    }
    this.renderMessages();
    if (!this.positioned) {
      this.position();
    } else if (stick) {
      this.scrollToBottom();
    } else if (live) {
      this.newBelow += added.filter((m) => m.sender !== this.client.username).length;
      this.renderJump();
    }
    if (this.atBottom() && !away) this.client.markRead(state);
    this.renderRooms();
  }

  onHistory({ state, added }) {
    if (state !== this.current) return;
    // Keep what the reader sees in place while older messages appear above it.
    const box = this.messagesBox;
    const fromBottom = box.scrollHeight - box.scrollTop;
    this.renderMessages();
    if (!this.positioned) {
      this.position();
    } else {
      box.scrollTop = box.scrollHeight - fromBottom;
    }
    if (this.atBottom() && document.visibilityState !== "hidden") this.client.markRead(state);
    if (added.length && box.scrollHeight <= box.clientHeight + 80 && state.hasOlder) {
      this.client.loadOlder(state).catch(() => {}); // the page is not full yet
    }
  }

  renderMessages() {
    const state = this.current;
    const box = this.messagesBox;
    const nodes = [];
    if (!state) {
      box.replaceChildren(element("p", "placeholder", "Pick a room, or join one."));
      this.renderJump();
      return;
    }
    nodes.push(element("p", "history-edge", state.hasOlder ? "Scroll up for older messages" : "Beginning of the conversation"));
    let day = "";
    let previous = null;
    for (const msg of state.sorted().filter(shown)) {
      const date = new Date(msg.ts_ms);
      const thisDay = dayFormat ? dayFormat.format(date) : date.toDateString();
      if (thisDay !== day) {
        nodes.push(element("p", "day", thisDay));
        day = thisDay;
        previous = null;
      }
      if (this.dividerSeq !== null && msg.seq > this.dividerSeq && (!previous || previous.seq <= this.dividerSeq)) {
        nodes.push(element("p", "divider", "New messages"));
        previous = null;
      }
      nodes.push(this.messageNode(msg, previous, date));
      previous = msg;
    }
    for (const item of this.client.pendingFor(state)) {
      const msg = { sender: this.client.username, body: item.body, seq: "", ts_ms: item.sentAt };
      const node = this.messageNode(msg, previous, new Date(item.sentAt));
      node.classList.add("pending");
      node.title = "sending…";
      nodes.push(node);
      previous = msg;
    }
    box.replaceChildren(...nodes);
    this.renderTyping();
  }

  messageNode(msg, previous, date) {
    const me = this.client.username;
    const mine = msg.sender === me;
    const kind = lineKind(msg);
    const node = element("article", "message" + (mine ? " mine" : "") + (kind === "text" ? "" : ` ${kind}`));
    node.dataset.seq = String(msg.seq);
    node.dataset.sender = msg.sender;
    const time = timeFormat ? timeFormat.format(date) : date.toLocaleTimeString();
    // One header for a run of one sender's messages within a few minutes; an action or a moderation event is a
    // line of its own, "* alice waves", "bob set the topic: …".
    const continued = previous && previous.sender === msg.sender && (kind === "text" || kind === "deleted") &&
      ["text", "deleted"].includes(lineKind(previous)) && msg.ts_ms - previous.ts_ms < GROUP_WITHIN_MS;
    if (continued) {
      node.classList.add("continued");
    } else if (kind === "text" || kind === "deleted") {
      const meta = element("header", "meta");
      const sender = element("span", "sender");
      sender.append(...this.nameNodes(msg.sender));
      meta.append(sender, element("time", "time", time));
      node.append(meta);
    }
    const body = element("div", "body");
    if (kind === "action") {
      body.append(element("span", "sender", `* ${msg.sender} `), ...bodyNodes(msg.body.slice(ACTION.length), me));
    } else if (kind === "event") {
      body.append(element("span", "sender", msg.sender), ` ${msg.body}`); // a reason is shown as it was typed
    } else if (kind === "deleted") {
      body.textContent = msg.body;
    } else {
      body.append(...bodyNodes(msg.body, me));
    }
    if (kind === "action" || kind === "event") body.title = time;
    if (!mine && kind !== "event" && mentions(msg.body, me)) node.classList.add("mentions-me");
    if (msg.edited) body.append(element("span", "edited", " (edited)"));
    node.append(body);
    if (msg.reactions?.size) {  // counted from REACT/UNREACT events (spec §9.16)
      const list = element("div", "reactions");
      for (const [reaction, count] of msg.reactions) list.append(element("span", "reaction", `${reaction} ${count}`));
      node.append(list);
    }
    this.addDeleteControl(node, msg, kind);
    return node;
  }

  onTyping({ conv, user }) {
    const state = this.client.convs.get(convKey(conv));
    if (!state || user === this.client.username) return;
    clearTimeout(state.typing.get(user));
    state.typing.set(user, setTimeout(() => {
      state.typing.delete(user);
      if (state === this.current) this.renderTyping();
    }, TYPING_SHOWN_MS));
    if (state === this.current) this.renderTyping();
  }

  renderTyping() {
    const users = this.current ? [...this.current.typing.keys()] : [];
    $("typing").textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…` : "";
  }
}

/**
 * Start the page: connect to /ws on the host that served it. The URL's fragment names a separate
 * login slot (http://host:7421/#bob keeps its own token and last conversation), so two tabs can be two users.
 */
export function startApp() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const slot = decodeURIComponent(location.hash.slice(1));
  const suffix = slot ? `#${slot}` : "";
  const client = new ChorusClient(`${scheme}//${location.host}/ws`, { tokenKey: TOKEN_KEY + suffix });
  const view = new ChatView(client, { lastKey: LAST_KEY + suffix });
  globalThis.chorus = { client, view }; // for the curious, and for tests
  view.setView("login");
  view.renderMessages();
  client.start();
  globalThis.addEventListener("pagehide", () => client.stop());
  return client;
}

if (typeof document !== "undefined" && document.getElementById("app")) startApp();
