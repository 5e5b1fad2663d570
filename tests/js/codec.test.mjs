// The page's codec (server/static/chorus.js) against the spec's byte-exact examples.
// Run: node --test tests/js/codec.test.mjs   (vectors: tests/js/vectors.json, from `make js-vectors`)
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  ErrorCode, FIELDS, FRAME_VERSION, FrameType, HEADER_BYTES, LARGEST_BODY_BYTES, MAX_PASSWORD_BYTES, MAX_TEXT_BYTES,
  MIN_PASSWORD_BYTES, PASSWORD_RULE, PROTOCOL_VERSION, ProtocolError, clipUtf8, decode, encode, isName,
  lz4DecompressBlock, passwordProblem, toPlain,
} from "../../server/static/chorus.js";

const vectors = JSON.parse(readFileSync(new URL("./vectors.json", import.meta.url), "utf8"));
const fromHex = (hex) => Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Buffer.from(bytes).toString("hex");
const refusedWith = (name) => (err) => err instanceof ProtocolError && err.code === ErrorCode[name];

test("there are vectors for every frame type", () => {
  const types = new Set(vectors.examples.map((v) => v.event.type));
  assert.deepEqual([...types].sort(), Object.keys(FrameType).sort()); // the generated FrameType is proto's
  assert.ok(vectors.invalid.length >= 4);
});

test("every frame type has its fields, its version and its largest body", () => {
  for (const type of Object.keys(FrameType)) {
    assert.ok(Array.isArray(FIELDS[type]), type);
    assert.ok(FRAME_VERSION[type] >= 1 && FRAME_VERSION[type] <= PROTOCOL_VERSION, type);
    assert.ok(Number.isInteger(LARGEST_BODY_BYTES[type]), type);
  }
  assert.deepEqual(Object.keys(FIELDS).sort(), Object.keys(FrameType).sort());
});

const ANY_LENGTH = 2 ** 32 - 1;
const header = (length, code) => {
  const bytes = new Uint8Array(HEADER_BYTES);
  new DataView(bytes.buffer).setUint32(0, length);
  bytes[4] = code;
  return bytes;
};

test("the codec's largest body of each type is proto's (its own walk of FIELDS, spec §2.3 step 6)", () => {
  for (const [type, largest] of Object.entries(LARGEST_BODY_BYTES)) {
    // One byte more than the largest is refused from the header alone; the largest itself is not.
    assert.throws(() => decode(header(largest + 1, FrameType[type]), ANY_LENGTH), refusedWith("FRAME_TOO_LARGE"), type);
    try {
      decode(header(largest, FrameType[type]), ANY_LENGTH);
    } catch (err) {
      assert.notEqual(err.code, ErrorCode.FRAME_TOO_LARGE, `${type}: ${err.message}`);
    }
  }
});

test("a frame type newer than the negotiated version does not exist (spec §6)", () => {
  for (const [type, introduced] of Object.entries(FRAME_VERSION)) {
    const code = FrameType[type];
    if (introduced > 1) {
      assert.throws(() => decode(header(0, code), ANY_LENGTH, introduced - 1), refusedWith("UNKNOWN_FRAME_TYPE"), type);
      assert.throws(() => encode({ type }, introduced - 1), TypeError, type);
    }
    try {
      decode(header(0, code), ANY_LENGTH, introduced);
    } catch (err) {
      assert.notEqual(err.code, ErrorCode.UNKNOWN_FRAME_TYPE, `${type}: ${err.message}`);
    }
  }
  assert.throws(() => decode(header(0, FrameType.PING), 1 << 20, 0), refusedWith("UNKNOWN_FRAME_TYPE"));
  assert.throws(() => encode({ type: "constructor" }), TypeError);
});

test("names: the page judges them by proto's NAME_PATTERN alike", () => {
  for (const { name, valid } of vectors.names) assert.equal(isName(name), valid, JSON.stringify(name));
  assert.ok(vectors.names.some((n) => n.valid) && vectors.names.some((n) => !n.valid));
});

test("passwords: the page judges their UTF-8 length by proto's limits and words the rule from PASSWORD_RULE", () => {
  const refused = `Passwords are ${PASSWORD_RULE}.`;
  const short = "x".repeat(MIN_PASSWORD_BYTES - 1);
  assert.equal(passwordProblem(short, true), refused);
  assert.equal(passwordProblem(short, false), null); // a login may try; the server answers
  assert.equal(passwordProblem("x".repeat(MIN_PASSWORD_BYTES), true), null);
  assert.equal(passwordProblem("x".repeat(MAX_PASSWORD_BYTES), true), null);
  const wide = "é".repeat(MAX_PASSWORD_BYTES / 2 + 1); // few characters, too many bytes for the wire
  assert.equal(passwordProblem(wide, true), refused);
  assert.equal(passwordProblem(wide, false), refused);
});

test("clipUtf8 keeps an ERROR's message within MAX_TEXT_BYTES, never cutting a character", () => {
  assert.equal(clipUtf8("short", MAX_TEXT_BYTES), "short");
  for (const text of ["x".repeat(MAX_TEXT_BYTES + 9), "☕".repeat(MAX_TEXT_BYTES), "a" + "é".repeat(MAX_TEXT_BYTES)]) {
    const clipped = clipUtf8(text, MAX_TEXT_BYTES);
    const size = new TextEncoder().encode(clipped).length;
    assert.ok(size <= MAX_TEXT_BYTES && size > MAX_TEXT_BYTES - 4, `${size} bytes`);
    assert.ok(text.startsWith(clipped) && !clipped.includes("\ufffd"));
  }
});

for (const v of vectors.examples) {
  test(`decode: ${v.name}`, () => {
    assert.deepEqual(toPlain(decode(fromHex(v.hex))), v.event);
  });
  test(`encode: ${v.name}`, () => {
    const bytes = encode(v.event); // u64 fields given as numbers or decimal strings
    assert.equal(toHex(bytes), v.plain_hex);
    assert.deepEqual(toPlain(decode(bytes)), v.event);
  });
}

for (const v of vectors.invalid) {
  test(`refuse ${v.error}: ${v.hex.slice(0, 20)}…`, () => {
    assert.throws(() => decode(fromHex(v.hex), 1 << 20), refusedWith(v.error));
  });
}

test("fed one byte short or long, a frame is malformed", () => {
  const frame = fromHex(vectors.examples[0].hex);
  assert.throws(() => decode(frame.subarray(0, frame.length - 1)), refusedWith("MALFORMED_FRAME"));
  const longer = new Uint8Array(frame.length + 1);
  longer.set(frame);
  assert.throws(() => decode(longer), refusedWith("MALFORMED_FRAME"));
  assert.throws(() => decode(frame.subarray(0, 9)), refusedWith("MALFORMED_FRAME"));
});

test("strict fields: bad boolean, bad enum, bad UTF-8, long name, too many items", () => {
  const ack = encode({ type: "ACK", request_id: 1, conv: { kind: 1, name: "a" }, client_msg_id: 1, seq: 2, ts_ms: 3, duplicate: false });
  ack[ack.length - 1] = 2;
  assert.throws(() => decode(ack), refusedWith("INVALID_FIELD"));
  const bye = encode({ type: "BYE", reason: 1 });
  bye[10] = 99;
  assert.throws(() => decode(bye), refusedWith("INVALID_FIELD"));
  const join = encode({ type: "JOIN", request_id: 1, room: "ab" });
  join[12] = 0xff;
  assert.throws(() => decode(join), refusedWith("INVALID_FIELD"));
  // a LOGIN whose username is 33 bytes (the body, 36 bytes, is within the largest LOGIN, so the field is judged)
  const long = fromHex("00000024" + "04" + "00" + "00000001" + "21" + "61".repeat(33) + "01" + "78");
  assert.throws(() => decode(long), refusedWith("FIELD_TOO_LARGE"));
  // a JOIN one byte longer than any JOIN can be is refused from its header (spec §2.3 step 6)
  const over = fromHex("00000022" + "10" + "00" + "00000001" + "21" + "61".repeat(33));
  assert.throws(() => decode(over), refusedWith("FRAME_TOO_LARGE"));
  const sync = fromHex("00000002" + "23" + "00" + "00000001" + "03e9");
  assert.throws(() => decode(sync), refusedWith("FIELD_TOO_LARGE"));
});

test("the encoder refuses what the wire cannot carry", () => {
  assert.throws(() => encode({ type: "JOIN", request_id: 1, room: "x".repeat(33) }), RangeError);
  assert.throws(() => encode({ type: "PING", request_id: 1, nonce: -1 }), RangeError);
  assert.throws(() => encode({ type: "PING", request_id: 1, nonce: 2n ** 64n }), RangeError);
  assert.throws(() => encode({ type: "BYE", reason: 12 }), RangeError);
  assert.throws(() => encode({ type: "SEND", request_id: 1, conv: { kind: 1, name: "a" }, client_msg_id: 1, body: "\ud800" }), TypeError);
  assert.throws(() => encode({ type: "NOPE" }), TypeError);
  assert.throws(() => encode({ type: "JOIN", request_id: 2 ** 32, room: "a" }), RangeError);
});

test("lz4: corrupt blocks are refused", () => {
  const bad = [
    [[], 1], // empty block
    [[0x10], 1], // literal run past the end
    [[0x10, 0x41, 0x00, 0x00], 5], // match offset 0
    [[0x10, 0x41, 0x05, 0x00, 0x00], 6], // match offset before the start
    [[0x10, 0x41, 0x01, 0x00], 5], // block ends after a match
    [[0x00, 0x00], 0], // trailing bytes after the last literals... then a token with no offset
    [[0x20, 0x41, 0x42], 3], // shorter than stated
  ];
  for (const [block, size] of bad) {
    assert.throws(() => lz4DecompressBlock(Uint8Array.from(block), size), refusedWith("DECOMPRESSION_FAILED"), JSON.stringify(block));
  }
  assert.deepEqual([...lz4DecompressBlock(Uint8Array.from([0x12, 0x41, 0x01, 0x00, 0x10, 0x42]), 8)],
    [0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x42]); // overlapping match "A" x 7, then "B"
});
