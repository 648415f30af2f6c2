/**
 * Unit tests of src/usage.ts: token usage picked from an answer (`pickUsage`), read from server-sent events as they
 * pass over any chunk boundaries (`usageReader`), and the fast path's test for whole events (`endsAtEventBoundary`).
 */
import assert from "node:assert/strict";
import { endsAtEventBoundary, MAX_REPORTED_TOKENS, pickUsage, usageReader } from "./usage.ts";
import { parseJsonText } from "./text.ts";

const encode = (text: string) => new TextEncoder().encode(text);
const decode = (bytes: Uint8Array[]) => {
  const decoder = new TextDecoder();
  return bytes.map((chunk) => decoder.decode(chunk, { stream: true })).join("") + decoder.decode();
};

/** Passes `chunks` through a reader as relayBody does: what the client gets, the usage found, events counted. */
function pass(chunks: Uint8Array[], { strip = true, eventStream = true } = {}) {
  const reader = usageReader({ stripUsageEvent: strip }, eventStream);
  const out = chunks.map((chunk) => reader.transform(chunk));
  out.push(reader.flush());
  return { text: decode(out), usage: reader.result(), events: reader.events?.() };
}

/** `text` as bytes cut at each of `cuts` (byte offsets). */
function cutAt(text: string, ...cuts: number[]): Uint8Array[] {
  const bytes = encode(text);
  const points = [0, ...cuts, bytes.length];
  return points.slice(1).map((end, index) => bytes.slice(points[index], end));
}

const CHUNK = 'data: {"choices":[{"delta":{"content":"Grüße 👋"}}],"usage":null}';
const USAGE = 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}';
const DONE = "data: [DONE]";
const SEVEN_FIVE = { prompt_tokens: 7, completion_tokens: 5, total_tokens: 12 };

Deno.test("pickUsage: the usage an upstream reported, in each API's shape", async (t) => {
  await t.step("chat and completions: usage at the top", () => {
    assert.deepEqual(pickUsage({ usage: SEVEN_FIVE, choices: [] }), SEVEN_FIVE);
  });

  await t.step("embeddings report no completion: the total is the prompt", () => {
    assert.deepEqual(pickUsage({ usage: { prompt_tokens: 9, total_tokens: 9 } }), {
      prompt_tokens: 9,
      completion_tokens: undefined,
      total_tokens: 9,
    });
  });

  await t.step("the Responses API: input/output tokens, at the top or in the final event's response", () => {
    const usage = { input_tokens: 7, output_tokens: 5, total_tokens: 12 };
    assert.deepEqual(pickUsage({ usage }), SEVEN_FIVE);
    assert.deepEqual(pickUsage({ type: "response.completed", response: { usage } }), SEVEN_FIVE);
  });

  await t.step("a missing total is the sum of the parts", () => {
    assert.deepEqual(pickUsage({ usage: { prompt_tokens: 7, completion_tokens: 5 } }), SEVEN_FIVE);
    assert.deepEqual(pickUsage({ usage: {} }), {
      prompt_tokens: undefined,
      completion_tokens: undefined,
      total_tokens: 0,
    });
  });

  await t.step("no usage object is undefined", () => {
    for (const value of [undefined, null, 42, "usage", [], {}, { usage: null }, { usage: 5 }, { response: null }]) {
      assert.equal(pickUsage(value), undefined, JSON.stringify(value));
    }
  });

  await t.step("[security] unbelievable figures set the whole report aside (the answer is estimated instead)", () => {
    const unbelievable = [-1, 1.5, MAX_REPORTED_TOKENS + 1, 1e300, Infinity, NaN, "12", true, [1], { n: 1 }];
    const shapes = [
      (bad: unknown) => ({ usage: { prompt_tokens: bad, completion_tokens: 1, total_tokens: 1 } }),
      (bad: unknown) => ({ usage: { prompt_tokens: 1, completion_tokens: bad } }),
      (bad: unknown) => ({ usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: bad } }),
      (bad: unknown) => ({ usage: { input_tokens: bad, output_tokens: 1 } }),
      (bad: unknown) => ({ response: { usage: { input_tokens: 1, output_tokens: bad } } }),
    ];
    for (const bad of unbelievable) {
      for (const [index, shape] of shapes.entries()) {
        assert.equal(pickUsage(shape(bad)), undefined, `shape ${index + 1}: ${String(bad)}`);
      }
    }
  });

  await t.step("the largest believable figure is MAX_REPORTED_TOKENS, and 0 is believable", () => {
    const usage = { prompt_tokens: MAX_REPORTED_TOKENS, completion_tokens: 0 };
    assert.deepEqual(pickUsage({ usage }), { ...usage, total_tokens: MAX_REPORTED_TOKENS });
  });

  await t.step("[security] a number past a double's range in the JSON text is not believed", () => {
    assert.equal(pickUsage(parseJsonText('{"usage":{"prompt_tokens":1e999,"completion_tokens":1}}')), undefined);
  });

  await t.step("the chat name wins over the Responses name when both are there", () => {
    const usage = { prompt_tokens: 7, input_tokens: 100, completion_tokens: 5, output_tokens: 100 };
    assert.deepEqual(pickUsage({ usage }), SEVEN_FIVE);
  });
});

Deno.test("endsAtEventBoundary: whether bytes end with a blank line", async (t) => {
  await t.step("\\n\\n and \\r\\n\\r\\n end an event", () => {
    for (const text of ["\n\n", "data: x\n\n", "data: x\r\n\r\n", "a\n\n\n", "data: x\r\n\n"]) {
      assert.ok(endsAtEventBoundary(encode(text)), JSON.stringify(text));
    }
  });

  await t.step("one line ending, a half CRLF, or nothing are not a boundary", () => {
    for (const text of ["", "\n", "data: x\n", "data: x\r\n", "data: x\r\n\r", "data: x\n\r", "data: x"]) {
      assert.ok(!endsAtEventBoundary(encode(text)), JSON.stringify(text));
    }
  });

  await t.step("lone CRs end an event too, but the fast path leaves them to the full scan", () => {
    // \r\r may still be followed by \n in the next chunk: only the scan that waits for it may decide.
    assert.ok(!endsAtEventBoundary(encode("data: x\r\r")));
  });
});

Deno.test("usageReader over server-sent events", async (t) => {
  const stream = [CHUNK, CHUNK, USAGE, DONE].map((event) => `${event}\n\n`).join("");
  const withoutUsage = [CHUNK, CHUNK, DONE].map((event) => `${event}\n\n`).join("");

  await t.step("the usage event the relay asked for is read and dropped, the rest passes on as it came", () => {
    const { text, usage, events } = pass([encode(stream)]);
    assert.equal(text, withoutUsage);
    assert.deepEqual(usage, SEVEN_FIVE);
    assert.equal(events, 4, "[DONE] and the usage event are events too");
  });

  await t.step("the same bytes come out whatever the chunk boundaries, even inside a character", () => {
    const length = encode(stream).length;
    for (let cut = 1; cut < length; cut++) {
      const { text, usage, events } = pass(cutAt(stream, cut));
      assert.equal(text, withoutUsage, `cut at ${cut}`);
      assert.deepEqual(usage, SEVEN_FIVE, `cut at ${cut}`);
      assert.equal(events, 4, `cut at ${cut}`);
    }
  });

  await t.step("an event split over many chunks, one byte each, is read once it is whole", () => {
    const bytes = encode(stream);
    const { text, usage } = pass(Array.from(bytes, (byte) => Uint8Array.of(byte)));
    assert.equal(text, withoutUsage);
    assert.deepEqual(usage, SEVEN_FIVE);
  });

  await t.step("CRLF and lone CR line endings end events as LF does, split anywhere", () => {
    for (const ending of ["\r\n", "\r"]) {
      const crStream = [CHUNK, USAGE, DONE].map((event) => `${event}${ending}${ending}`).join("");
      const expected = [CHUNK, DONE].map((event) => `${event}${ending}${ending}`).join("");
      for (let cut = 1; cut < encode(crStream).length; cut++) {
        const { text, usage } = pass(cutAt(crStream, cut));
        assert.equal(text, expected, `${JSON.stringify(ending)} cut at ${cut}`);
        assert.deepEqual(usage, SEVEN_FIVE, `${JSON.stringify(ending)} cut at ${cut}`);
      }
    }
  });

  await t.step("a CRLF split between two chunks stays one line ending, not an empty line", () => {
    // One event of two data lines, cut between "\r" and "\n": read as two line endings, the usage line would become
    // an event of its own, and be dropped.
    const crlf = `${CHUNK}\r\n${USAGE}\r\n\r\n`;
    const { text, usage } = pass(cutAt(crlf, encode(`${CHUNK}\r`).length));
    assert.equal(text, crlf, "the event is passed on whole");
    assert.equal(usage, undefined, "two data lines joined are not one JSON value");
  });

  await t.step("a final event without a blank line passes on unchanged, unread: SSE clients never dispatch it", () => {
    // The SSE standard discards an event the stream ends in the middle of; the relay reads usage only from events a
    // client sees, so such an answer is charged an estimate.
    for (const cut of [10, encode(`${CHUNK}\n\n`).length, encode(`${CHUNK}\n\n${USAGE}`).length - 3]) {
      const { text, usage, events } = pass(cutAt(`${CHUNK}\n\n${USAGE}`, cut));
      assert.equal(text, `${CHUNK}\n\n${USAGE}`, `cut at ${cut}`);
      assert.equal(usage, undefined, `cut at ${cut}`);
      assert.equal(events, 1, `cut at ${cut}`);
    }
    const ended = pass([encode(`${CHUNK}\n\n${USAGE}\n\n`)]);
    assert.deepEqual([ended.text, ended.usage], [`${CHUNK}\n\n`, SEVEN_FIVE], "with its blank line it is an event");
  });

  await t.step("without stripUsageEvent the usage event is read and passed on", () => {
    const { text, usage } = pass([encode(stream)], { strip: false });
    assert.equal(text, stream);
    assert.deepEqual(usage, SEVEN_FIVE);
  });

  await t.step("usage inside a chunk with choices is read but never dropped (the client asked for it)", () => {
    const both = `data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":7,"completion_tokens":5}}\n\n`;
    const { text, usage } = pass([encode(both)]);
    assert.equal(text, both);
    assert.deepEqual(usage, SEVEN_FIVE);
  });

  await t.step("an unbelievable usage event is not dropped and not believed", () => {
    const hostile = `data: {"choices":[],"usage":{"prompt_tokens":-5,"completion_tokens":1}}\n\n`;
    const { text, usage } = pass([encode(hostile)]);
    assert.equal(text, hostile);
    assert.equal(usage, undefined);
  });

  await t.step("the last usage reported wins; usage:null and [DONE] are not usage", () => {
    const later = USAGE.replace('"prompt_tokens":7', '"prompt_tokens":70').replace(
      '"total_tokens":12',
      '"total_tokens":75',
    );
    const { usage } = pass([encode(`${USAGE}\n\n${later}\n\n${CHUNK}\n\n${DONE}\n\n`)]);
    assert.deepEqual(usage, { prompt_tokens: 70, completion_tokens: 5, total_tokens: 75 });
    assert.equal(pass([encode(`${CHUNK}\n\n${DONE}\n\n`)]).usage, undefined);
  });

  await t.step("the Responses API's final event carries the usage in response", () => {
    const completed = 'event: response.completed\ndata: {"type":"response.completed","response":{"usage":' +
      '{"input_tokens":7,"output_tokens":5,"total_tokens":12}}}\n\n';
    const { text, usage } = pass(cutAt(completed, 20, 60));
    assert.equal(text, completed, "no choices: not the usage event the relay asked for, so it passes");
    assert.deepEqual(usage, SEVEN_FIVE);
  });

  await t.step("comments and events without data are passed on and not counted", () => {
    const text = ": keep-alive\n\nevent: ping\n\n";
    const result = pass([encode(text)]);
    assert.equal(result.text, text);
    assert.equal(result.events, 0);
  });
});

Deno.test("usageReader over a JSON answer", async (t) => {
  const answer = JSON.stringify({ choices: [{ message: { content: "hi" } }], usage: SEVEN_FIVE });

  await t.step("the body passes on unchanged and its usage is read at the end, across chunks", () => {
    for (let cut = 1; cut < answer.length; cut += 7) {
      const { text, usage, events } = pass(cutAt(answer, cut), { eventStream: false });
      assert.equal(text, answer);
      assert.deepEqual(usage, SEVEN_FIVE);
      assert.equal(events, undefined);
    }
  });

  await t.step("a body that is not JSON has no usage", () => {
    assert.equal(pass([encode("<html>bad gateway</html>")], { eventStream: false }).usage, undefined);
  });

  await t.step("a body past 4 MiB passes on, its usage unread", () => {
    const padding = "x".repeat(4 * 1024 * 1024);
    const big = JSON.stringify({ padding, usage: SEVEN_FIVE });
    const { text, usage } = pass(cutAt(big, 1024 * 1024), { eventStream: false });
    assert.equal(text.length, big.length);
    assert.equal(usage, undefined);
  });
});
