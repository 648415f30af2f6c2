/**
 * What a caller may take: request body sizes, request rates per window, concurrent requests, token
 * budgets, and the public relay that opens the relay to anyone within them.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { BARE_PASSWORD_USER } from "../src/config/parse.ts";
import {
  type CounterStore,
  hashPassword,
  MemoryCounterStore,
  openCounterStore,
  parseConfig,
  type RelayConfig,
} from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatAs,
  chatBody,
  controlledStream,
  decoder,
  embeddingsUpstream,
  encoder,
  GOOD_BEARER,
  IN_CI,
  installed,
  manualClock,
  minimalEnv,
  openAiLikeUpstream,
  parseTrustProxyForTest,
  post,
  rawRequest,
  type Relay,
  relayFromEnv,
  runRelayProcess,
  seenByClientsOrLogs,
  sleep,
  spawnRelay,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  usageUpstream,
  USERNAME,
  within,
} from "./testing.ts";

/** A public relay in front of `upstreamUrl`: anyone may call, 20 a minute, 100,000 tokens a day, behind a proxy on loopback. */
function publicConfig(upstreamUrl: string, overrides: Partial<RelayConfig> = {}): RelayConfig {
  return testConfig(upstreamUrl, {
    publicAccess: true,
    rateLimitPerMinute: 20,
    tokenBudgetPerDay: 100_000,
    trustProxy: parseTrustProxyForTest("127.0.0.1"),
    ...overrides,
  });
}

/** A public relay's settings (the guard rails PUBLIC_ACCESS requires), behind a proxy on loopback. */
function publicSettings(overrides: Partial<RelayConfig> = {}): Partial<RelayConfig> {
  return {
    publicAccess: true,
    allowedOrigins: [ALLOWED],
    rateLimitPerDay: 1000,
    tokenBudgetPerDay: 1_000_000,
    trustProxy: parseTrustProxyForTest("127.0.0.1"),
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
const uploadHead = (address: string, length: number, path = "/v1/chat/completions", more = "") =>
  `POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Forwarded-For: ${address}\r\n` +
  `${more}Content-Length: ${length}`;

/** The three stores a budget may live in; `onEveryStore` runs its steps on every one of them that can start here. */
const STORES: { name: string; open: (config: RelayConfig) => Promise<CounterStore & { close?(): unknown }> }[] = [
  { name: "memory", open: () => Promise.resolve(new MemoryCounterStore()) },
  {
    name: "SQLite",
    open: async (config) => {
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-budget-" });
      const store = await openCounterStore({ ...config, statePath: `${folder}/state.db` });
      if ("error" in store) throw new Error(store.error);
      const close = (store as { close(): void }).close.bind(store);
      return Object.assign(store, {
        async close() {
          close();
          await Deno.remove(folder, { recursive: true });
        },
      });
    },
  },
];

const usedToday = async (relay: Relay) =>
  (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json().budgets[0].used as number;

/** Runs `steps` once per store: memory, SQLite in a temporary folder, and Redis when redis-server is installed. */
async function onEveryStore(
  t: Deno.TestContext,
  what: string,
  steps: (store: CounterStore, name: string) => Promise<void>,
) {
  const stores = [...STORES];
  let redis: Awaited<ReturnType<typeof startRedis>> | undefined;
  if (installed("redis-server") || IN_CI) {
    redis = await startRedis();
    const url = redis.url;
    stores.push({
      name: "Redis",
      open: async (config) => {
        const store = await openCounterStore({ ...config, redisUrl: url });
        if ("error" in store) throw new Error(store.error);
        return store;
      },
    });
  }
  try {
    for (const { name, open } of stores) {
      await t.step(`${what} (${name} store)`, async () => {
        const store = await open(testConfig("http://127.0.0.1:9"));
        try {
          await steps(store, name);
        } finally {
          await store.close?.();
        }
      });
    }
  } finally {
    await redis?.stop();
  }
}

Deno.test("limits: request body size", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 1000, requestTimeoutMs: 600 }));
  const post = relay.chat;

  await t.step("a body of exactly MAX_REQUEST_BYTES passes", async () => {
    const body = `{"pad":"${"x".repeat(1000 - 10)}"}`;
    assert.equal(body.length, 1000);
    assert.equal((await post(body)).status, 200);
    assert.equal(upstream.requests.at(-1)!.body, body);
  });

  await t.step("a larger body declared by Content-Length gets 413 and never reaches the upstream", async () => {
    const before = upstream.requests.length;
    const response = await post("x".repeat(1001));
    assert.equal(response.status, 413);
    assert.equal(response.json().error.code, "request_too_large");
    assert.match(response.json().error.message, /MAX_REQUEST_BYTES/);
    assert.equal(upstream.requests.length, before);
  });

  await t.step("a larger chunked body (no Content-Length) is cut while reading: 413, upstream untouched", async () => {
    const before = upstream.requests.length;
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent >= 5000) return controller.close();
        sent += 500;
        controller.enqueue(encoder.encode("y".repeat(500)));
      },
    });
    const response = await post(body);
    assert.equal(response.status, 413);
    assert.equal(upstream.requests.length, before);
  });

  await t.step("a client that leaves mid-upload never reaches the upstream", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url));
    const connection = await Deno.connect({ hostname: "127.0.0.1", port: relay.port });
    await connection.write(encoder.encode(
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 1000\r\n\r\n{"model":`,
    ));
    await sleep(50);
    connection.close();
    await within(
      3000,
      (async () => {
        while (relay.requestLogs().length === 0) await sleep(10);
      })(),
      "the relay did not notice the client leaving",
    );
    assert.equal(relay.requestLogs()[0].outcome, "client_gone");
    assert.equal(upstream.requests.length, 0);
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
  });
});

Deno.test("limits: bounds against abuse [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 1000, requestTimeoutMs: 600 }));

  await t.step("a Content-Length that lies low is still cut at the limit", async () => {
    const before = upstream.requests.length;
    const response = await rawRequest(
      relay.port,
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 10\r\nConnection: close`,
      "z".repeat(2000),
    );
    // The server reads only the declared 10 bytes as the body; the rest is not this request's body.
    assert.ok(response.status === 200 || response.status === 400 || response.status === 413);
    assert.ok(upstream.requests.length - before <= 1);
    if (upstream.requests.length > before) assert.equal(upstream.requests.at(-1)!.body.length, 10);
  });

  await t.step(
    "an upload that trickles in slower than REQUEST_TIMEOUT_SECONDS gets 408, upstream untouched",
    async () => {
      const before = upstream.requests.length;
      const connection = await Deno.connect({ hostname: "127.0.0.1", port: relay.port });
      try {
        await connection.write(encoder.encode(
          `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 100\r\n\r\n{`,
        ));
        const started = performance.now();
        const buffer = new Uint8Array(4096);
        const read = await within(5000, connection.read(buffer), "the relay never answered a trickling upload");
        const text = decoder.decode(buffer.subarray(0, read ?? 0));
        seenByClientsOrLogs.push(text);
        assert.match(text, /^HTTP\/1\.1 408/);
        assert.ok(performance.now() - started >= 400);
      } finally {
        connection.close();
      }
      assert.equal(upstream.requests.length, before);
    },
  );

  await t.step("request bodies held at once are bounded by MAX_BUFFERED_BYTES: 503 with Retry-After", async () => {
    await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100_000, maxBufferedBytes: 150_000 }));
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const prefix = '{"model":"gpt-test","messages":[],"pad":"';
    const slowBody = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(encoder.encode(prefix + "x".repeat(90_000)));
        await released;
        controller.enqueue(encoder.encode('"}'));
        controller.close();
      },
    });
    const slow = fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: slowBody,
      duplex: "half",
    } as RequestInit);
    await sleep(100);
    const second = await relay.chat(chatBody({ pad: "y".repeat(90_000) }));
    assert.equal(second.status, 503);
    assert.equal(second.headers.get("retry-after"), "1");
    assert.equal(second.json().error.code, "relay_busy");
    release();
    const first = await slow;
    assert.equal(first.status, 200);
    await first.body?.cancel();
    const again = await relay.chat(chatBody({ pad: "y".repeat(90_000) }));
    assert.equal(again.status, 200, "the bytes are released once a body has been forwarded");
  });

  await t.step("RATE_LIMIT_PER_MINUTE answers 429 in OpenAI's shape, naming the relay's own limit", async () => {
    const clock = manualClock();
    await using relay = startRelay(testConfig(upstream.url, { rateLimitPerMinute: 2 }), undefined, clock.now);
    const before = upstream.requests.length;
    const models = () => relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal((await models()).status, 200);
    assert.equal((await models()).status, 200);
    const limited = await models();
    assert.equal(limited.status, 429);
    assert.equal(limited.headers.get("retry-after"), "30");
    assert.equal(limited.json().error.code, "relay_rate_limit_exceeded");
    assert.match(limited.json().error.message, /^mc-relay: the relay's limit of 2 requests per minute/);
    assert.equal(upstream.requests.length - before, 2);
    assert.equal((await relay.call("/health")).status, 200, "health checks are not limited");
    clock.advance(30_000);
    assert.equal((await models()).status, 200);
  });

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
    "[security] each holder of the bare relay password has its own share of MAX_BUFFERED_BYTES",
    async () => {
      const bare = "bare-relay-password-77";
      await using relay = startRelay(testConfig(upstream.url, {
        users: [{ name: BARE_PASSWORD_USER, password: bare }],
        trustProxy: parseTrustProxyForTest("127.0.0.1"),
        maxRequestBytes: 100_000,
        maxBufferedBytes: 400_000,
      }));
      const pad = "x".repeat(60_000);
      const signedIn = `Authorization: Bearer ${bare}\r\n`;
      // One holder fills its share with a stalled body; its second is refused.
      using first = await stalledUpload(
        relay.port,
        uploadHead("203.0.113.7", 90_000, undefined, signedIn),
        `{"pad":"${pad}`,
      );
      await new Promise((resolve) => setTimeout(resolve, 200));
      using second = await stalledUpload(
        relay.port,
        uploadHead("203.0.113.7", 90_000, undefined, signedIn),
        `{"pad":"${pad}`,
      );
      assert.match(await second.answer(3000), /^HTTP\/1\.1 503/);
      // Another holder of the same password, from another address, still has room: the share is per address.
      const other = await relay.call("/v1/chat/completions", {
        method: "POST",
        headers: {
          authorization: `Bearer ${bare}`,
          "content-type": "application/json",
          "x-forwarded-for": "198.51.100.7",
        },
        body: chatBody({ pad: "y".repeat(90_000) }),
      });
      assert.equal(other.status, 200, other.text);
      first[Symbol.dispose]();
    },
  );
});

Deno.test("limits: request rates", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();
    const bobHash = await hashPassword("bob-password-456", 2000);

    await t.step("the limits apply per user: one user's quota does not block another", async () => {
      await using relay = relayFromEnv(upstream.url, {
        MC_RELAY_USERS: `alice:alice-password-123,bob:${bobHash}`,
        TRUST_PROXY: "true",
      }, { rateLimitPerMinute: 1 });
      const as = (credentials: string, address: string) =>
        relay.call("/v1/models", { headers: { authorization: `Bearer ${credentials}`, "x-forwarded-for": address } });
      assert.equal((await as("alice:alice-password-123", "198.51.100.1")).status, 200);
      assert.equal((await as("alice:alice-password-123", "198.51.100.2")).status, 429, "alice's own quota is used up");
      assert.equal((await as("bob:bob-password-456", "198.51.100.3")).status, 200, "bob still has his");
    });
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);

    await t.step("limits count per address for anonymous callers and per user for signed-in ones", async () => {
      await using relay = startRelay(publicConfig(upstream.url, {
        rateLimitPerMinute: 1,
        users: [{ name: USERNAME, password: CANARY_PASSWORD }, { name: "bob", password: "bob-password-456" }],
      }));
      const from = (address: string, authorization?: string) =>
        chatAs(relay, { "x-forwarded-for": address, ...(authorization && { authorization }) });
      assert.equal((await from("198.51.100.1")).status, 200);
      assert.equal((await from("198.51.100.1")).status, 429, "that address has used its minute");
      assert.equal((await from("198.51.100.2")).status, 200, "another address has its own");
      assert.equal((await from("198.51.100.1", GOOD_BEARER)).status, 200, "a user behind that address has their own");
      assert.equal((await from("198.51.100.1", GOOD_BEARER)).status, 429);
      assert.equal((await from("198.51.100.1", "Bearer bob:bob-password-456")).status, 200, "and so does bob");
    });

    await t.step("each window refuses with 429, naming the limit, and frees up as the clock moves", async () => {
      for (
        const [window, overrides, retryAfter] of [
          ["minute", { rateLimitPerMinute: 2 }, 30],
          ["hour", { rateLimitPerHour: 2 }, 1800],
          ["day", { rateLimitPerDay: 2 }, 43200],
        ] as const
      ) {
        const clock = manualClock();
        await using relay = startRelay(
          publicConfig(upstream.url, { rateLimitPerMinute: 0, ...overrides }),
          undefined,
          clock.now,
        );
        assert.equal((await chatAs(relay, {})).status, 200);
        assert.equal((await chatAs(relay, {})).status, 200);
        const refused = await chatAs(relay, {});
        assert.equal(refused.status, 429, window);
        assert.equal(refused.headers.get("retry-after"), String(retryAfter));
        assert.equal(refused.json().error.code, "relay_rate_limit_exceeded");
        assert.equal(
          refused.json().error.message,
          `mc-relay: the relay's limit of 2 requests per ${window} (RATE_LIMIT_PER_${window.toUpperCase()}) is reached for this address; one more is allowed in ${retryAfter} s`,
        );
        assert.doesNotMatch(refused.json().error.message, /provider/, "never reads like the provider's 429");
        clock.advance(retryAfter * 1000);
        assert.equal((await chatAs(relay, {})).status, 200, `${window}: free again`);
      }
    });
  }
});

Deno.test("limits: concurrency", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step("CONCURRENT_REQUESTS counts open streams: one more waits until a stream ends", async () => {
    const streams: ReturnType<typeof controlledStream>[] = [];
    await using streaming = startUpstream(() => {
      const stream = controlledStream();
      streams.push(stream);
      return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
    });
    await using relay = startRelay(testConfig(streaming.url, { concurrentRequests: 2, rateLimitPerMinute: 10 }));
    const open = () =>
      fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
        body: chatBody({ stream: true }),
      });
    const first = await open();
    const second = await open();
    const refused = await relay.chat(chatBody({ stream: true }));
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "relay_concurrency_limit_exceeded");
    assert.match(refused.json().error.message, /CONCURRENT_REQUESTS/);
    const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
    assert.deepEqual(usage.concurrent, { name: "CONCURRENT_REQUESTS", limit: 2, in_flight: 2 });
    assert.equal(usage.limits[0].used, 2, "the refused request gave its request event back");
    streams[0].send("data: [DONE]\n\n");
    streams[0].close();
    await first.text();
    await sleep(20);
    const third = await open();
    assert.equal(third.status, 200, "a place is free again");
    for (const stream of streams.slice(1)) stream.close();
    await second.text();
    await third.text();
  });

  await t.step("a request over its rate limit holds no in-flight place: nothing it took is kept", async () => {
    await using relay = startRelay(testConfig(upstream.url, { concurrentRequests: 5, rateLimitPerMinute: 1 }));
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200);
    const refused = await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "relay_rate_limit_exceeded");
    const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
    assert.equal(usage.concurrent.in_flight, 0);
    assert.equal(usage.limits[0].used, 1);
  });
});

Deno.test("limits: token budgets", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "a request reserves its tokens when it starts and is settled with the real usage at the end",
    async () => {
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      await using slow = startUpstream(async (request, seen) => {
        await held;
        return openAiLikeUpstream(request, seen);
      });
      await using relay = startRelay(testConfig(slow.url, { tokenBudgetPerDay: 1000, maxTokensPerRequest: 100 }));
      const usage = async () => (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
      const body = chatBody({ max_tokens: 500 });
      const pending = relay.chat(body);
      await sleep(50);
      const reservation = Math.ceil(encoder.encode(body).byteLength / 4) + 100;
      assert.equal((await usage()).budgets[0].used, reservation, "prompt estimate plus the capped max_tokens");
      release();
      assert.equal((await pending).status, 200);
      assert.equal(JSON.parse(slow.requests.at(-1)!.body).max_tokens, 100, "max_tokens lowered to the cap");
      assert.equal((await usage()).budgets[0].used, 10, "settled with the upstream's total_tokens");
    },
  );

  await t.step("a spent budget gets 429 token_budget_exceeded until the UTC day or month ends", async () => {
    let now = Date.UTC(2026, 10, 25, 23, 0, 0);
    await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 15 }), undefined, () => now);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "10 of 15 used");
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "20 of 15: one overshoot");
    const before = upstream.requests.length;
    const refused = await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "token_budget_exceeded");
    assert.equal(refused.headers.get("retry-after"), "3600");
    assert.match(
      refused.json().error.message,
      /15 tokens per UTC day \(TOKEN_BUDGET_PER_DAY\).*2026-11-26T00:00:00\.000Z/,
    );
    assert.equal(upstream.requests.length, before);
    now = Date.UTC(2026, 10, 26, 0, 0, 1);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "a new UTC day");

    now = Date.UTC(2026, 10, 30, 23, 59, 0);
    await using monthly = startRelay(testConfig(upstream.url, { tokenBudgetPerMonth: 5 }), undefined, () => now);
    assert.equal((await chatAs(monthly, { authorization: GOOD_BEARER })).status, 200);
    const spent = await chatAs(monthly, { authorization: GOOD_BEARER });
    assert.equal(spent.status, 429);
    assert.equal(spent.headers.get("retry-after"), "60", "until 1 December, 00:00 UTC");
  });

  await t.step("a user's own budget from MC_RELAY_USERS replaces the default one", async () => {
    const result = parseConfig({
      UPSTREAM_BASE_URL: upstream.url,
      UPSTREAM_API_KEY: CANARY_KEY,
      MC_RELAY_USERS: "big;day=1000000:big-password-1234,small:small-password-123,free;day=0:free-password-1234",
      TOKEN_BUDGET_PER_DAY: "15",
    });
    assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
    await using relay = startRelay({ ...result.config, authFailuresPerMinute: 0 });
    for (let i = 0; i < 3; i++) {
      assert.equal((await chatAs(relay, { authorization: "Bearer big:big-password-1234" })).status, 200);
      assert.equal((await chatAs(relay, { authorization: "Bearer free:free-password-1234" })).status, 200);
    }
    await chatAs(relay, { authorization: "Bearer small:small-password-123" });
    await chatAs(relay, { authorization: "Bearer small:small-password-123" });
    assert.equal((await chatAs(relay, { authorization: "Bearer small:small-password-123" })).status, 429);
    const bad = parseConfig({ ...minimalEnv, MC_RELAY_USERS: "x;week=5:secret-password-1" });
    assert.ok(!bad.ok);
    assert.match(bad.errors[0], /MC_RELAY_USERS entry 1 has "week=5" after its name/);
  });

  await t.step("streamed usage is counted, and a client that leaves mid-stream is charged an estimate", async () => {
    let stream = controlledStream();
    await using streaming = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(streaming.url, { tokenBudgetPerDay: 1_000_000 }));
    const used = async () =>
      (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json().budgets[0].used;
    const streamed = fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: chatBody({ stream: true }),
    }).then((response) => response.text());
    await sleep(30);
    stream.send('data: {"choices":[{"delta":{"content":"hi"}}]}\n\n');
    stream.send('data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":12,"total_tokens":42}}\n\n');
    stream.send("data: [DONE]\n\n");
    stream.close();
    await streamed;
    await sleep(20);
    assert.equal(await used(), 42);

    stream = controlledStream();
    const response = await relay.fetchChat(chatBody({ stream: true }));
    const reader = response.body!.getReader();
    stream.send('data: {"choices":[{"delta":{"content":"a"}}]}\n\n');
    await reader.read();
    await reader.cancel();
    await stream.cancelled;
    await sleep(20);
    const estimate = relay.requestLogs().at(-1).usage;
    assert.equal(estimate.estimated, true);
    assert.equal(await used(), 42 + estimate.total_tokens, "the estimate was charged");
  });

  await t.step(
    "a request no upstream answered is charged nothing: refused, down or timed out, budget and ledger unchanged",
    async () => {
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-uncharged-" });
      await using slow = startUpstream(async (request, seen) => {
        await sleep(1000);
        return request.signal.aborted ? new Response(null) : openAiLikeUpstream(request, seen);
      });
      const store = await openCounterStore({ ...testConfig(upstream.url), statePath: `${folder}/state.db` });
      if ("error" in store) throw new Error(store.error);
      try {
        const config = testConfig(upstream.url, {
          tokenBudgetPerDay: 100_000,
          maxTokensPerRequest: 50,
          requestTimeoutMs: 300,
          upstreams: [
            testUpstream("ok", upstream.url),
            testUpstream("down", "http://127.0.0.1:9"),
            testUpstream("slow", slow.url),
          ],
        });
        await using relay = startRelay(config, undefined, undefined, { counters: store });
        const used = async () =>
          (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json().budgets[0].used;
        const today = new Date().toISOString().slice(0, 10);
        const refused = await relay.chat(chatBody({ model: "down/gpt-test" }));
        assert.equal(refused.status, 502);
        assert.equal(refused.json().error.code, "upstream_unreachable");
        const timedOut = await relay.chat(chatBody({ model: "slow/gpt-test" }));
        assert.equal(timedOut.status, 504);
        assert.equal(timedOut.json().error.code, "upstream_timeout");
        await sleep(20);
        assert.equal(await used(), 0, "each reservation given back whole");
        assert.deepEqual(await store.readUsage(today, today), [], "no ledger row, not even an estimate");
        assert.equal((await relay.chat(chatBody({ model: "ok/gpt-test" }))).status, 200);
        await sleep(20);
        assert.equal(await used(), 10, "an answered request is still charged");
        assert.equal((await store.readUsage(today, today)).length, 1, "and recorded");
      } finally {
        await store.close?.();
        await Deno.remove(folder, { recursive: true });
      }
    },
  );

  await t.step("MAX_TOKENS_PER_REQUEST lowers, adds when missing, and refuses values that are not counts", async () => {
    await using relay = startRelay(
      testConfig(upstream.url, { maxTokensPerRequest: 1000 }),
    );
    const forwarded = () => JSON.parse(upstream.requests.at(-1)!.body);
    await chatAs(relay, { authorization: GOOD_BEARER }, { max_completion_tokens: 5000 });
    assert.equal(forwarded().max_completion_tokens, 1000);
    await chatAs(relay, { authorization: GOOD_BEARER }, { max_tokens: 200 });
    assert.equal(forwarded().max_tokens, 200, "below the cap: unchanged");
    await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(forwarded().max_tokens, 1000, "added for a chat upstream that is not OpenAI's");
    await relay.call("/v1/responses", {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: '{"model":"m","input":"x"}',
    });
    assert.equal(forwarded().max_output_tokens, 1000, "the Responses API's own field");
    const before = upstream.requests.length;
    for (const value of [0, -1, 2.5, "100"]) {
      const refused = await chatAs(relay, { authorization: GOOD_BEARER }, { max_tokens: value });
      assert.equal(refused.status, 400, String(value));
      assert.equal(refused.json().error.code, "invalid_max_tokens");
    }
    assert.equal(upstream.requests.length, before);
  });

  await t.step("GET /usage tells the caller every limit and budget: used, left and when it resets", async () => {
    const now = Date.UTC(2026, 10, 25, 12, 0, 0);
    await using relay = startRelay(
      publicConfig(upstream.url, { rateLimitPerHour: 200, tokenBudgetPerMonth: 2_000_000, concurrentRequests: 3 }),
      undefined,
      () => now,
    );
    await chatAs(relay, { "x-forwarded-for": "203.0.113.50" });
    const response = await relay.call("/usage", { headers: { origin: ALLOWED, "x-forwarded-for": "203.0.113.50" } });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.deepEqual(response.json(), {
      caller: { anonymous: true },
      limits: [
        { name: "RATE_LIMIT_PER_MINUTE", window: "minute", limit: 20, used: 1, remaining: 19, next_in_seconds: 0 },
        { name: "RATE_LIMIT_PER_HOUR", window: "hour", limit: 200, used: 1, remaining: 199, next_in_seconds: 0 },
      ],
      concurrent: { name: "CONCURRENT_REQUESTS", limit: 3, in_flight: 0 },
      budgets: [
        {
          name: "TOKEN_BUDGET_PER_DAY",
          window: "day",
          budget: 100_000,
          used: 10,
          remaining: 99_990,
          resets_at: "2026-11-26T00:00:00.000Z",
        },
        {
          name: "TOKEN_BUDGET_PER_MONTH",
          window: "month",
          budget: 2_000_000,
          used: 10,
          remaining: 1_999_990,
          resets_at: "2026-12-01T00:00:00.000Z",
        },
      ],
      max_tokens_per_request: null,
    });
    const other = (await relay.call("/usage", { headers: { "x-forwarded-for": "203.0.113.51" } })).json();
    assert.equal(other.budgets[0].used, 0, "another address sees its own");
  });
});

Deno.test("limits: public relay", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "PUBLIC_ACCESS refuses to start without ALLOWED_ORIGIN, a request limit and a token budget",
    async () => {
      const result = parseConfig({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
      });
      assert.ok(!result.ok);
      assert.equal(result.errors.length, 3, result.errors.join("\n"));
      assert.match(result.errors[0], /^PUBLIC_ACCESS=true needs ALLOWED_ORIGIN/);
      assert.match(result.errors[1], /RATE_LIMIT_PER_MINUTE, RATE_LIMIT_PER_HOUR, RATE_LIMIT_PER_DAY or CONCURRENT/);
      assert.match(result.errors[2], /TOKEN_BUDGET_PER_DAY or TOKEN_BUDGET_PER_MONTH/);
      const started = await runRelayProcess({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
      });
      assert.equal(started.code, 1);
      assert.match(started.stderr, /RATE_LIMIT_PER_MINUTE/);
      assert.match(started.stderr, /TOKEN_BUDGET_PER_DAY/);
      const ok = parseConfig({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
        RATE_LIMIT_PER_DAY: "1000",
        TOKEN_BUDGET_PER_MONTH: "1000000",
      });
      assert.ok(ok.ok, "no users are needed in public mode");
      assert.match(ok.warnings.join("\n"), /PUBLIC_ACCESS=true: anyone who can reach the relay/);
    },
  );

  await t.step("in public mode credentials that name a user are checked: the right password is that user", async () => {
    await using relay = startRelay(publicConfig(upstream.url));
    assert.equal((await chatAs(relay, { authorization: `Bearer ${USERNAME}:wrong-password` })).status, 401);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200);
    assert.equal(relay.requestLogs().at(-1).user, USERNAME);
  });

  await t.step(
    "a relay process configured like MC's public relay answers under /relay and passes healthcheck",
    async () => {
      const env = {
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
        RATE_LIMIT_PER_MINUTE: "20",
        RATE_LIMIT_PER_HOUR: "200",
        RATE_LIMIT_PER_DAY: "1000",
        MAX_TOKENS_PER_REQUEST: "10000",
        TOKEN_BUDGET_PER_DAY: "100000",
        BASE_PATH: "/relay",
        TRUST_PROXY: "127.0.0.1",
      };
      const relay = await spawnRelay(env);
      try {
        assert.match(relay.output().stdout, /"level":"warn","msg":"PUBLIC_ACCESS=true/);
        const health = await fetch(`${relay.url}/relay/health`).then((response) => response.json());
        const { upstreams, ...rest } = health;
        assert.deepEqual(rest, { status: "ok", ok: true, endpoints: 1, state: "ok" });
        assert.equal(upstreams[0].name, "default");
        const chat = await fetch(`${relay.url}/relay/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: "Bearer ", "content-type": "application/json", origin: ALLOWED },
          body: chatBody(),
        });
        assert.equal(chat.status, 200);
        await chat.body?.cancel();
        const port = new URL(relay.url).port;
        const check = await runRelayProcess({ ...env, PORT: port, HOST: "127.0.0.1" }, ["healthcheck"]);
        assert.equal(check.code, 0, check.stdout);
      } finally {
        relay.child.kill("SIGTERM");
        await relay.finished();
      }
    },
  );
});

Deno.test("limits: public relay [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "MC's public preset passes as anonymous: an empty Bearer, or a leftover key never logged or forwarded",
    async () => {
      await using relay = startRelay(publicConfig(upstream.url));
      const leftover = "sk-LEFTOVER-provider-key-9d3e";
      for (const authorization of ["Bearer ", `Bearer ${leftover}`, undefined]) {
        const headers: Record<string, string> = { origin: ALLOWED };
        if (authorization !== undefined) headers.authorization = authorization;
        const response = await chatAs(relay, headers);
        assert.equal(response.status, 200, `${authorization}`);
        const seen = upstream.requests.at(-1)!;
        assert.ok(!JSON.stringify([...seen.headers]).includes(leftover), "the leftover key never goes upstream");
        assert.equal(seen.headers.get("authorization"), `Bearer ${CANARY_KEY}`);
      }
      const entries = relay.requestLogs().slice(-3);
      assert.deepEqual(entries.map((entry) => entry.user), [undefined, undefined, undefined]);
      assert.ok(!relay.logs.join("\n").includes("LEFTOVER"), "the leftover key is in no log line");
    },
  );

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

Deno.test("limits: token budgets [security]", async (t) => {
  await t.step("[security] a spent budget stays spent whatever answer length the client asks for", async (t) => {
    await using upstream = usageUpstream();
    await onEveryStore(t, "huge max_tokens, max_completion_tokens and max_output_tokens get 400", async (store) => {
      await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 1000 }), undefined, undefined, {
        counters: store,
      });
      upstream.state.reported = { prompt_tokens: 900, completion_tokens: 100, total_tokens: 1000 };
      assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 200);
      assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 429, "the budget is spent");
      const sent = upstream.requests.length;
      for (
        const [path, field, value] of [
          ["/v1/chat/completions", "max_tokens", 1e300],
          ["/v1/chat/completions", "max_completion_tokens", 1e21],
          ["/v1/responses", "max_output_tokens", 1e300],
          ["/v1/completions", "max_tokens", 1e300],
          ["/v1/chat/completions", "max_tokens", 2 ** 53],
          ["/v1/chat/completions", "max_tokens", 1_000_001],
        ] as const
      ) {
        const refused = await post(relay, path, { messages: [], input: "x", prompt: "x", [field]: value });
        assert.equal(refused.status, 400, `${field}: ${value}`);
        assert.equal(refused.json().error.code, "invalid_max_tokens");
        assert.match(
          refused.json().error.message,
          new RegExp(`^mc-relay: "${field}" must be a whole number from 1 to`),
        );
        assert.equal(await usedToday(relay), 1000, `${field}: ${value} left the spent budget as it was`);
      }
      assert.equal(upstream.requests.length, sent, "none of them reached the upstream");
      assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 429, "still spent");
    });
  });

  await t.step("[security] an answer length no provider takes is refused before anything is counted", async () => {
    await using upstream = usageUpstream();
    await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 1000 }));
    for (const value of [1e300, 1e21, -1e300, -5, 0, 1.5, 2 ** 53 + 2, "1e300", true, [100], { n: 1 }]) {
      const refused = await post(relay, "/v1/chat/completions", { messages: [], max_tokens: value });
      assert.equal(refused.status, 400, JSON.stringify(value));
      assert.equal(refused.json().error.code, "invalid_max_tokens");
    }
    assert.equal(await usedToday(relay), 0, "a refused request reserves nothing");
    assert.equal(upstream.requests.length, 0);
    const largest = await post(relay, "/v1/chat/completions", { messages: [], max_tokens: 1_000_000 });
    assert.equal(largest.status, 200, "the ceiling itself is a length a client may ask for");
  });

  await t.step("[security] counters stay exact integers whatever usage the upstream reports", async (t) => {
    await using upstream = usageUpstream();
    await onEveryStore(t, "1e300, negative and fractional usage", async (store, name) => {
      await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 100_000 }), undefined, undefined, {
        counters: store,
      });
      upstream.state.reported = { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 };
      assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 200);
      let used = await usedToday(relay);
      assert.equal(used, 10);
      for (
        const reported of [
          { prompt_tokens: 1e300, completion_tokens: 1e300, total_tokens: 1e300 },
          { prompt_tokens: 9, completion_tokens: 1, total_tokens: -1e12 },
          { prompt_tokens: -1e300, completion_tokens: 1 },
          { prompt_tokens: 2.5, completion_tokens: 1e21 },
          { input_tokens: 1e300, output_tokens: 1e300 },
        ]
      ) {
        upstream.state.reported = reported;
        assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 200);
        // account settles after the answer has gone out: give the store a moment.
        await sleep(50);
        const now = await usedToday(relay);
        assert.ok(Number.isSafeInteger(now), `${JSON.stringify(reported)}: ${now} is an exact integer`);
        assert.ok(now > used, `${JSON.stringify(reported)}: an estimate was charged, nothing given back (${now})`);
        assert.ok(now < used + 1000, `${JSON.stringify(reported)}: charged an estimate, not the claim (${now})`);
        used = now;
      }
      assert.ok(!relay.logs.some((line) => line.includes("could not settle")), "every settle reached the store");
      const today = new Date().toISOString().slice(0, 10);
      const rows = await store.readUsage(today, today);
      // The memory store keeps no ledger (nothing could read it); the durable ones hold every answer.
      const expected = name === "memory" ? 0 : 6;
      assert.equal(rows.reduce((sum, row) => sum + row.requests, 0), expected, "every answer is in the ledger");
      for (const row of rows) {
        for (const figure of [row.prompt_tokens, row.completion_tokens, row.total_tokens]) {
          assert.ok(
            Number.isSafeInteger(figure) && figure >= 0,
            `the ledger holds exact counts: ${JSON.stringify(row)}`,
          );
        }
      }
    });
  });

  await t.step(
    "[security] n, best_of and prompt arrays count every answer against MAX_TOKENS_PER_REQUEST",
    async () => {
      await using upstream = usageUpstream();
      await using relay = startRelay(testConfig(upstream.url, { maxTokensPerRequest: 100 }));
      const cases: [string, Record<string, unknown>, number][] = [
        ["/v1/chat/completions", { messages: [], n: 20 }, 5],
        ["/v1/chat/completions", { messages: [], n: 20, max_tokens: 1000 }, 5],
        ["/v1/chat/completions", { messages: [], n: 3, max_tokens: 10 }, 10],
        ["/v1/completions", { prompt: "x", best_of: 20 }, 5],
        ["/v1/completions", { prompt: "x", best_of: 20, n: 2 }, 5],
        ["/v1/completions", { prompt: Array(20).fill("x") }, 5],
        ["/v1/completions", { prompt: Array(20).fill([1, 2]) }, 5],
        ["/v1/completions", { prompt: [1, 2, 3, 4] }, 100],
        ["/v1/completions", { prompt: ["a", "b", "c", "d"], n: 5 }, 5],
        ["/v1/completions", { prompt: ["a", "b", "c"], n: 7 }, 4],
      ];
      for (const [path, body, perAnswer] of cases) {
        const answer = await post(relay, path, body);
        assert.equal(answer.status, 200, JSON.stringify(body));
        assert.equal(upstream.forwarded().max_tokens, perAnswer, JSON.stringify(body));
      }
      const sent = upstream.requests.length;
      for (
        const [path, body] of [
          ["/v1/chat/completions", { messages: [], n: 101 }],
          ["/v1/completions", { prompt: Array(11).fill("x"), n: 10 }],
          ["/v1/completions", { prompt: "x", best_of: 1e300 }],
          ["/v1/chat/completions", { messages: [], n: 0 }],
          ["/v1/chat/completions", { messages: [], n: 2.5 }],
          ["/v1/chat/completions", { messages: [], n: "20" }],
          ["/v1/chat/completions", { messages: [], n: -1 }],
        ] as const
      ) {
        const refused = await post(relay, path, body);
        assert.equal(refused.status, 400, JSON.stringify(body));
        assert.match(refused.json().error.message, /^mc-relay: /);
        assert.equal(refused.json().error.code, "invalid_answer_count", JSON.stringify(body));
      }
      assert.equal(upstream.requests.length, sent, "none of them reached the upstream");
    },
  );

  await t.step("[security] a budget's reservation counts every answer a request asks for", async () => {
    let release!: () => void;
    let held = new Promise<void>((resolve) => (release = resolve));
    await using upstream = startUpstream(async () => {
      await held;
      return Response.json({ choices: [], usage: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 } });
    });
    for (
      const [cap, body, answers] of [
        [100, { messages: [], n: 20 }, 100],
        [0, { messages: [], n: 20, max_tokens: 100 }, 2000],
        [0, { prompt: ["a", "b", "c"], best_of: 4, max_tokens: 50 }, 600],
      ] as const
    ) {
      await using relay = startRelay(
        testConfig(upstream.url, { tokenBudgetPerDay: 1_000_000, maxTokensPerRequest: cap }),
      );
      const path = "messages" in body ? "/v1/chat/completions" : "/v1/completions";
      const text = JSON.stringify({ model: "gpt-test", ...body });
      const pending = post(relay, path, body);
      try {
        await sleep(50);
        const reservation = Math.ceil(encoder.encode(text).byteLength / 4) + answers;
        assert.equal(await usedToday(relay), reservation, `${JSON.stringify(body)}, cap ${cap}`);
      } finally {
        release();
      }
      assert.equal((await pending).status, 200);
      await sleep(50);
      assert.equal(await usedToday(relay), 10, "settled with the upstream's usage");
      held = new Promise<void>((resolve) => (release = resolve));
    }
  });

  await t.step("[security] a background response is refused while a token budget applies", async () => {
    await using upstream = usageUpstream();
    await using budgeted = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 1000 }));
    for (const background of [true, "true", 1]) {
      const refused = await post(budgeted, "/v1/responses", { input: "x", background });
      assert.equal(refused.status, 400, JSON.stringify(background));
      assert.equal(refused.json().error.code, "background_not_allowed");
      assert.match(refused.json().error.message, /^mc-relay: .*TOKEN_BUDGET_PER_DAY.*"background"/);
    }
    assert.equal(await usedToday(budgeted), 0);
    assert.equal(upstream.requests.length, 0);
    assert.equal((await post(budgeted, "/v1/responses", { input: "x", background: false })).status, 200);

    await using unbudgeted = startRelay(testConfig(upstream.url, { maxTokensPerRequest: 100 }));
    assert.equal((await post(unbudgeted, "/v1/responses", { input: "x", background: true })).status, 200, "no budget");
    assert.equal(upstream.forwarded().max_output_tokens, 100, "the cap still bounds it");

    // A BYOK upstream spends the caller's own quota: no budget applies, so background passes.
    await using byok = startRelay(
      testConfig(upstream.url, {
        tokenBudgetPerDay: 1000,
        upstreams: [testUpstream("default", upstream.url, { byok: true, apiKey: "" })],
      }),
    );
    const own = await byok.call("/v1/responses", {
      method: "POST",
      headers: {
        authorization: GOOD_BEARER,
        "x-api-key": "sk-caller-own-key-123456",
        "content-type": "application/json",
      },
      body: JSON.stringify({ model: "gpt-test", input: "x", background: true }),
    });
    assert.equal(own.status, 200, own.text);
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(200);
});
