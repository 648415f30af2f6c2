/**
 * Security review 3 (issue 23), the request body and the counter store: uploads that stall cannot hold the relay's
 * body memory, one address cannot take more than its share of it, a flood of invalid requests from many addresses
 * does not turn away newcomers, forwarded addresses are counted without their port, and the upstream is told the
 * type of the body the relay actually sends. Proved over HTTP like main_test.ts; the last test checks that no
 * canary secret ever appeared in anything seen here.
 */
import assert from "node:assert/strict";
import { MemoryCounterStore, parseConfig, type RelayConfig, type TrustedProxies } from "./main.ts";
import {
  ALLOWED,
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  decoder,
  encoder,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  seenByClientsOrLogs,
  startRelay,
  startUpstream,
  testConfig,
} from "./testing.ts";

/** TRUST_PROXY as parseConfig reads it. */
function trustProxy(value: string): TrustedProxies {
  const result = parseConfig({ ...minimalEnv, TRUST_PROXY: value });
  assert.ok(result.ok);
  return result.config.trustProxy;
}

/** A public relay's settings (the guard rails PUBLIC_ACCESS requires), behind a proxy on loopback. */
function publicSettings(overrides: Partial<RelayConfig> = {}): Partial<RelayConfig> {
  return {
    publicAccess: true,
    allowedOrigins: [ALLOWED],
    rateLimitPerDay: 1000,
    tokenBudgetPerDay: 1_000_000,
    trustProxy: trustProxy("127.0.0.1"),
    ...overrides,
  };
}

/**
 * An upload over a raw connection that sends its head and `sent`, then nothing: what a slow or hostile client does.
 * `answer` reads the relay's response (head and Content-Length body), or what arrived when `ms` have passed.
 */
async function stalledUpload(port: number, head: string, sent: string) {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  await connection.write(encoder.encode(`${head}\r\n\r\n${sent}`));
  let open = true;
  const close = () => {
    if (!open) return;
    open = false;
    connection.close();
  };
  return {
    async answer(ms: number): Promise<string> {
      let text = "";
      const timer = setTimeout(close, ms);
      try {
        const buffer = new Uint8Array(16384);
        for (let reads = 0; reads < 1000 && !complete(text); reads++) {
          const read = await connection.read(buffer);
          if (read === null) break;
          text += decoder.decode(buffer.subarray(0, read));
        }
      } catch {
        // closed by the timer or reset by the relay: what arrived is the answer
      } finally {
        clearTimeout(timer);
      }
      seenByClientsOrLogs.push(text);
      return text;
    },
    [Symbol.dispose]: close,
  };
}

/** Whether `text` holds a whole response with a Content-Length body. */
function complete(text: string): boolean {
  const headEnd = text.indexOf("\r\n\r\n");
  const length = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, headEnd));
  return headEnd !== -1 && length !== null && encoder.encode(text.slice(headEnd + 4)).byteLength >= Number(length[1]);
}

/** A POST head with a declared length, from `address` (the proxy's X-Forwarded-For). */
const uploadHead = (address: string, length: number, path = "/v1/chat/completions") =>
  `POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Forwarded-For: ${address}\r\n` +
  `Content-Length: ${length}`;

Deno.test("request bodies", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "[security] two uploads that declare 32 MB and stall do not turn away another caller's POST, and get 408 once idle for the idle limit (10 s)",
    async () => {
      await using relay = startRelay(
        testConfig(upstream.url, publicSettings({ maxRequestBytes: 32 * 1024 * 1024, requestTimeoutMs: 30_000 })),
        undefined,
        undefined,
        { bodyIdleMs: 600 },
      );
      using first = await stalledUpload(relay.port, uploadHead("203.0.113.1", 33_554_432), '{"model":"gpt-');
      using second = await stalledUpload(relay.port, uploadHead("203.0.113.2", 33_554_432), '{"model":"gpt-');
      const started = performance.now();
      const other = await relay.call("/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json", "x-forwarded-for": "198.51.100.9" },
        body: chatBody(),
      });
      assert.equal(other.status, 200, other.text);
      for (const upload of [first, second]) {
        const text = await upload.answer(5000);
        assert.match(text, /^HTTP\/1\.1 408/, "a stalled body is answered once it has been idle too long");
        assert.match(text, /connection: close/i);
        assert.match(text, /request_timeout/);
      }
      // 30 s is REQUEST_TIMEOUT_SECONDS here: the idle limit (0.6 s) cut them long before it.
      assert.ok(performance.now() - started < 5000);
      assert.ok(relay.requestLogs().some((entry) => entry.outcome === "body_idle"));
    },
  );

  await t.step("[security] one address holds at most its share of MAX_BUFFERED_BYTES", async () => {
    await using relay = startRelay(
      testConfig(upstream.url, publicSettings({ maxRequestBytes: 100_000, maxBufferedBytes: 400_000 })),
    );
    const pad = "x".repeat(60_000);
    // 203.0.113.5 sends 60,000 bytes of one body and stalls: within its share (a whole MAX_REQUEST_BYTES body).
    using first = await stalledUpload(relay.port, uploadHead("203.0.113.5", 90_000), `{"pad":"${pad}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
    // Its second body would take it past its share: refused, although the relay as a whole has room.
    using second = await stalledUpload(relay.port, uploadHead("203.0.113.5", 90_000), `{"pad":"${pad}`);
    const refused = await second.answer(3000);
    assert.match(refused, /^HTTP\/1\.1 503/, refused.slice(0, 200));
    assert.match(refused, /relay_busy/);
    assert.match(refused, /retry-after: 1/i);
    // Another address still has room.
    const other = await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", "x-forwarded-for": "198.51.100.5" },
      body: chatBody({ pad: "y".repeat(90_000) }),
    });
    assert.equal(other.status, 200, other.text);
    first[Symbol.dispose]();
  });

  await t.step(
    "the body is forwarded as application/json, the type of what the relay serialised, whatever the client said",
    async () => {
      await using relay = startRelay(testConfig(upstream.url));
      for (const type of ["text/plain;charset=iso-8859-1", "application/x-www-form-urlencoded", "application/json"]) {
        const response = await relay.chat(chatBody({ note: "caf\u00e9" }), { "content-type": type });
        assert.equal(response.status, 200);
        const seen = upstream.requests.at(-1)!;
        assert.equal(seen.headers.get("content-type"), "application/json", type);
        assert.equal(JSON.parse(seen.body).note, "caf\u00e9");
      }
    },
  );
});

Deno.test("the counter store under a flood", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "[security] invalid requests from more addresses than the memory store holds do not turn away a new caller",
    async () => {
      const now = 1_000_000;
      const counters = new MemoryCounterStore(() => now, 50);
      await using relay = startRelay(
        testConfig(upstream.url, publicSettings({ rateLimitPerDay: 3 })),
        undefined,
        () => now,
        { counters },
      );
      const post = (address: string, body: string) =>
        relay.call("/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json", "x-forwarded-for": address },
          body,
        });
      // A caller who spent its day's requests before the flood.
      for (let i = 0; i < 3; i++) assert.equal((await post("192.0.2.1", chatBody())).status, 200);
      assert.equal((await post("192.0.2.1", chatBody())).status, 429);
      // 120 /64s, one invalid request each: more than the 50 keys the store holds.
      for (let i = 0; i < 120; i++) {
        assert.equal((await post(`2001:db8:${i.toString(16)}::1`, "{")).status, 400);
      }
      const newcomer = await post("203.0.113.77", chatBody());
      assert.equal(newcomer.status, 200, newcomer.text);
      const another = await post("2001:db8:ffff::1", chatBody());
      assert.equal(another.status, 200, another.text);
      assert.equal((await post("192.0.2.1", chatBody())).status, 429, "the flood did not release a spent caller");
    },
  );
});

Deno.test("forwarded addresses", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step("[security] an X-Forwarded-For entry with a port is counted by its address alone", async () => {
    for (const trust of ["127.0.0.1", "true"]) {
      await using relay = startRelay(
        testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy: trustProxy(trust) }),
      );
      const attempt = (forwardedFor: string, authorization = "Bearer team:guess") =>
        relay.call("/v1/models", { headers: { authorization, "x-forwarded-for": forwardedFor } });
      for (
        const [first, second, third, address] of [
          ["203.0.113.8:50001", "203.0.113.8:50002", "203.0.113.8", "203.0.113.8"],
          ["[2001:db8::1]:443", "[2001:db8::1]:444", "2001:db8::1", "2001:db8::1"],
          ["[2001:db8:5::7]", "2001:db8:5::7", "[2001:db8:5::8]:8443", "2001:db8:5::7"],
        ]
      ) {
        await attempt(first);
        await attempt(second);
        assert.equal((await attempt(third, GOOD_BEARER)).status, 429, `${first}, ${second}, ${third} (${trust})`);
        assert.ok(relay.requestLogs().some((entry) => entry.client === address), address);
      }
      assert.equal((await attempt("203.0.113.9:50001", GOOD_BEARER)).status, 200, "another address is not locked");
    }
  });
});

Deno.test("[security] no secret ever appeared in anything the relay logged or returned in this file", () => {
  assert.ok(seenByClientsOrLogs.length > 50, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
