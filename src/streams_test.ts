/**
 * Unit tests of the pure parts of src/streams.ts: JSON bodies (`parseJson`) on hostile input, the byte budget behind
 * MAX_BUFFERED_BYTES (`ByteBudget`), model-list rewriting (`filterModelList`), and `readBody`/`rewriteBody` over
 * in-memory streams (no server, no network). Server-sent events and usage are read in src/usage.ts: their tests are
 * in src/usage_test.ts.
 */
import assert from "node:assert/strict";
import { ByteBudget, filterModelList, parseJson, readBody, rewriteBody } from "./streams.ts";

const encode = (text: string) => new TextEncoder().encode(text);

/** A stream that yields `chunks` one read at a time, then ends. */
function streamOf(chunks: Uint8Array[]): ReadableStream<Uint8Array> {
  let index = 0;
  return new ReadableStream({
    pull(controller) {
      if (index < chunks.length) controller.enqueue(chunks[index++]);
      else controller.close();
    },
  });
}

const readText = (stream: ReadableStream<Uint8Array>) => new Response(stream).text();

Deno.test("parseJson: a JSON object body, or undefined for anything else", async (t) => {
  await t.step("an object is returned as parsed", () => {
    assert.deepEqual(parseJson(encode('{"model":"m","n":[1,2]}')), { model: "m", n: [1, 2] });
  });

  await t.step("arrays, strings, numbers, null and empty bodies are not objects", () => {
    for (const text of ["[]", '[{"a":1}]', '"text"', "42", "null", "true", "", "   "]) {
      assert.equal(parseJson(encode(text)), undefined, text);
    }
  });

  await t.step("malformed JSON is undefined, never an exception", () => {
    for (const text of ["{", '{"a":}', "{'a':1}", '{"a":1,}', "{}x", "NaN", '{"a":1}{"b":2}']) {
      assert.equal(parseJson(encode(text)), undefined, text);
    }
  });

  await t.step("a number past a double's range is Infinity, a long one is rounded: callers must check numbers", () => {
    assert.deepEqual(parseJson(encode('{"max_tokens":1e999}')), { max_tokens: Infinity });
    assert.deepEqual(parseJson(encode('{"n":-1e999}')), { n: -Infinity });
    const long = parseJson(encode('{"n":123456789012345678901234567890}'));
    assert.equal(typeof long?.n, "number");
    assert.ok(!Number.isSafeInteger(long?.n));
  });

  await t.step("deep nesting parses without a stack overflow", () => {
    const depth = 100_000;
    const body = parseJson(encode(`{"a":${"[".repeat(depth)}${"]".repeat(depth)}}`));
    assert.ok(body !== undefined && Array.isArray(body.a));
    assert.equal(parseJson(encode("[".repeat(depth) + "]".repeat(depth))), undefined, "an array is still no object");
  });

  await t.step("a UTF-8 byte order mark is dropped while decoding", () => {
    assert.deepEqual(parseJson(Uint8Array.from([0xef, 0xbb, 0xbf, ...encode('{"a":1}')])), { a: 1 });
  });

  await t.step("invalid UTF-8 in a string becomes U+FFFD; outside a string the body is not JSON", () => {
    const inString = Uint8Array.from([...encode('{"a":"x'), 0xff, 0xc3, ...encode('y"}')]);
    assert.deepEqual(parseJson(inString), { a: "x\ufffd\ufffdy" });
    assert.equal(parseJson(Uint8Array.from([...encode('{"a":1'), 0xff, ...encode("}")])), undefined);
  });

  await t.step("__proto__ in a body is an own key, not a prototype", () => {
    const body = parseJson(encode('{"__proto__":{"polluted":true}}'));
    assert.ok(body !== undefined);
    assert.equal(({} as Record<string, unknown>).polluted, undefined);
    assert.equal(Object.getPrototypeOf(body), Object.prototype);
  });
});

Deno.test("ByteBudget: bodies held in memory, bounded in all and per holder", async (t) => {
  await t.step("a holder's share is a quarter of the limit, but at least one whole request body", () => {
    assert.equal(new ByteBudget(1000, 100).share, 250);
    assert.equal(new ByteBudget(1000, 400).share, 400);
    assert.equal(new ByteBudget(1000, 2000).share, 1000, "never more than the limit");
  });

  await t.step("one holder cannot take more than its share, however it splits the bytes", () => {
    const budget = new ByteBudget(1000, 100);
    assert.ok(budget.reserve("a", 200));
    assert.ok(budget.reserve("a", 50));
    assert.ok(!budget.reserve("a", 1), "the share is full");
    assert.ok(budget.reserve("b", 250), "another holder still has its own share");
  });

  await t.step("all holders together stay within the limit, whatever their shares", () => {
    const budget = new ByteBudget(1000, 100);
    for (const holder of ["a", "b", "c", "d"]) assert.ok(budget.reserve(holder, 250));
    assert.ok(!budget.reserve("e", 1), "the limit is reached");
  });

  await t.step("a refused reservation counts nothing", () => {
    const budget = new ByteBudget(1000, 100);
    assert.ok(!budget.reserve("a", 251));
    assert.ok(budget.reserve("a", 250), "the refused 251 bytes were not counted");
  });

  await t.step("released bytes can be reserved again, by the holder and by others", () => {
    const budget = new ByteBudget(1000, 100);
    for (const holder of ["a", "b", "c", "d"]) assert.ok(budget.reserve(holder, 250));
    budget.release("a", 100);
    assert.ok(!budget.reserve("e", 101));
    assert.ok(budget.reserve("e", 100));
    budget.release("b", 250);
    assert.ok(budget.reserve("b", 250));
  });

  await t.step("releasing more than was held never makes the count negative", () => {
    const budget = new ByteBudget(1000, 100);
    assert.ok(budget.reserve("a", 100));
    budget.release("a", 500);
    budget.release("nobody", 500);
    // Had the total gone below zero, more than the limit would now fit.
    for (const holder of ["a", "b", "c", "d"]) assert.ok(budget.reserve(holder, 250));
    assert.ok(!budget.reserve("e", 1), "the limit is still the limit");
    assert.ok(!budget.reserve("a", 1), "a's share is still its share");
  });

  await t.step("releasing zero bytes changes nothing", () => {
    const budget = new ByteBudget(1000, 100);
    assert.ok(budget.reserve("a", 250));
    budget.release("a", 0);
    assert.ok(!budget.reserve("a", 1));
  });
});

Deno.test("filterModelList: only allowed models, plus the aliases", async (t) => {
  const list = JSON.stringify({
    object: "list",
    data: [{ id: "gpt-4o", object: "model" }, { id: "secret-model" }, { id: 7 }, null, { name: "no id" }],
  });

  await t.step("models the predicate refuses, and entries without a string id, are dropped", () => {
    const filtered = JSON.parse(filterModelList(list, (model) => model === "gpt-4o"));
    assert.deepEqual(filtered, { object: "list", data: [{ id: "gpt-4o", object: "model" }] });
  });

  await t.step("the extra entries (aliases) are added after the allowed ones", () => {
    const filtered = JSON.parse(filterModelList(list, () => true, [{ id: "alias-fast", object: "model" }]));
    assert.deepEqual(filtered.data.map((model: { id: unknown }) => model.id), [
      "gpt-4o",
      "secret-model",
      "alias-fast",
    ]);
  });

  await t.step("a body that is not a model list passes on unchanged", () => {
    for (const text of ["not json", '{"error":{"message":"x"}}', '{"data":"x"}', "[1,2]", "null", ""]) {
      assert.equal(filterModelList(text, () => false, [{ id: "alias" }]), text);
    }
  });
});

Deno.test("readBody: a request body read within its limits", async (t) => {
  const limits = { maxRequestBytes: 10, requestTimeoutMs: 5_000, idleMs: 5_000 };
  const post = (chunks: Uint8Array[], headers: Record<string, string> = {}) =>
    new Request("http://relay.invalid/v1/chat/completions", { method: "POST", body: streamOf(chunks), headers });

  await t.step("chunks are joined into one body, each reserved as it arrives", async () => {
    const reserved: number[] = [];
    const read = await readBody(post([encode("hello"), encode(" you")]), limits, (bytes) => {
      reserved.push(bytes);
      return true;
    });
    assert.ok("body" in read);
    assert.equal(new TextDecoder().decode(read.body), "hello you");
    assert.deepEqual(reserved, [5, 4]);
  });

  await t.step("a declared Content-Length past MAX_REQUEST_BYTES is refused before a byte is read", async () => {
    let asked = false;
    const read = await readBody(post([encode("x")], { "content-length": "11" }), limits, () => (asked = true));
    assert.ok("status" in read && read.status === 413 && read.code === "request_too_large");
    assert.ok(!asked);
  });

  await t.step("a body that grows past MAX_REQUEST_BYTES is refused whatever it declared", async () => {
    const read = await readBody(post([encode("123456"), encode("78901")]), limits, () => true);
    assert.ok("status" in read && read.status === 413);
    assert.match(read.message, /MAX_REQUEST_BYTES/);
  });

  await t.step("bytes the budget refuses give 503 with Retry-After and a closed connection", async () => {
    const read = await readBody(post([encode("12"), encode("34")]), limits, (bytes) => bytes < 2);
    assert.ok("status" in read && read.status === 503 && read.code === "relay_busy");
    assert.equal(read.headers?.["retry-after"], "1");
    assert.equal(read.headers?.connection, "close");
  });

  await t.step("a body that fails while being read is a 400, not an exception", async () => {
    const failing = new ReadableStream({ pull: (controller) => controller.error(new Error("reset")) });
    const request = new Request("http://relay.invalid/", { method: "POST", body: failing });
    const read = await readBody(request, limits, () => true);
    assert.ok("status" in read && read.status === 400 && read.outcome === "client_gone");
  });

  await t.step("a stalled body is cut after idleMs with 408 (generous bound: never hangs)", async () => {
    const stalled = new ReadableStream<Uint8Array>({ start: (controller) => controller.enqueue(encode("1")) });
    const request = new Request("http://relay.invalid/", { method: "POST", body: stalled });
    const read = await readBody(request, { maxRequestBytes: 10, requestTimeoutMs: 5_000, idleMs: 50 }, () => true);
    assert.ok("status" in read && read.status === 408 && read.outcome === "body_idle");
    assert.equal(read.headers?.connection, "close");
  });
});

Deno.test("rewriteBody: small bodies rewritten, large ones passed on or replaced", async (t) => {
  await t.step("a small body is read whole, across chunks, and rewritten", async () => {
    const { body } = await rewriteBody(streamOf([encode("ab"), encode("cd")]), (text) => text.toUpperCase());
    assert.equal(await readText(body), "ABCD");
  });

  await t.step("a body the rewrite cannot make safe is replaced, with the reason", async () => {
    const { body } = await rewriteBody(streamOf([encode("x")]), () => undefined, (reason) => `replaced: ${reason}`);
    assert.match(await readText(body), /^replaced: it shows a secret/);
  });

  await t.step("a body past 1 MiB passes on unchanged without a replacement, and is replaced with one", async () => {
    const big = () => streamOf(Array.from({ length: 5 }, () => new Uint8Array(300_000).fill(0x61)));
    const passed = await rewriteBody(big(), () => "rewritten");
    assert.equal((await readText(passed.body)).length, 1_500_000);
    const replaced = await rewriteBody(big(), () => "rewritten", (reason) => `replaced: ${reason}`);
    assert.match(await readText(replaced.body), /^replaced: larger than/);
  });
});
