/**
 * Unit tests of src/text.ts: JSON text that may not parse (`parseJsonText`) and errors as one line (`errorText`).
 */
import assert from "node:assert/strict";
import { errorText, parseJsonText } from "./text.ts";

Deno.test("parseJsonText: any JSON value, undefined instead of an exception", async (t) => {
  await t.step("every JSON value parses, not only objects", () => {
    assert.deepEqual(parseJsonText('{"a":[1,"b",null]}'), { a: [1, "b", null] });
    assert.equal(parseJsonText("0"), 0);
    assert.equal(parseJsonText("null"), null);
    assert.equal(parseJsonText('"x"'), "x");
  });

  await t.step("malformed text is undefined", () => {
    for (const text of ["", "{", "undefined", "{a:1}", "[1,]", "\u0000", "1 2"]) {
      assert.equal(parseJsonText(text), undefined, JSON.stringify(text));
    }
  });

  await t.step("a byte order mark left in decoded text makes it malformed (decode bytes with TextDecoder)", () => {
    assert.equal(parseJsonText('\ufeff{"a":1}'), undefined);
  });

  await t.step("hostile numbers and nesting give values, never a throw", () => {
    assert.equal(parseJsonText("1e999"), Infinity);
    assert.equal(parseJsonText("-0"), -0);
    const depth = 200_000;
    assert.ok(Array.isArray(parseJsonText("[".repeat(depth) + "]".repeat(depth))));
  });
});

Deno.test("errorText: an error and its causes as one line", async (t) => {
  await t.step("the causes follow the message, joined by ': '", () => {
    const error = new TypeError("fetch failed", { cause: new Error("connect ECONNREFUSED", { cause: "socket" }) });
    assert.equal(errorText(error), "fetch failed: connect ECONNREFUSED: socket");
  });

  await t.step("anything thrown that is not an Error is shown as text", () => {
    assert.equal(errorText("plain"), "plain");
    assert.equal(errorText(42), "42");
    assert.equal(errorText(null), "null");
  });

  await t.step("a cycle of causes stops after five, never loops", () => {
    const first = new Error("a");
    const second = new Error("b", { cause: first });
    first.cause = second;
    assert.equal(errorText(first), "a: b: a: b: a");
  });
});
