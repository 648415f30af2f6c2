/**
 * What a caller may take: request body sizes, request rates per window, concurrent requests, token
 * budgets, and the public relay that opens the relay to anyone within them.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { hashPassword, parseConfig, type RelayConfig } from "../main.ts";
import {
  ALLOWED,
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  decoder,
  encoder,
  GOOD_BEARER,
  manualClock,
  minimalEnv,
  openAiLikeUpstream,
  parseTrustProxyForTest,
  rawRequest,
  runRelayProcess,
  seenByClientsOrLogs,
  sleep,
  spawnRelay,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
  within,
} from "../testing.ts";

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
});

Deno.test("limits: request rates", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream((request, seen) =>
      seen.path === "/embeddings"
        ? Response.json({ object: "list", data: [{ embedding: [0.1] }] })
        : openAiLikeUpstream(request, seen)
    );
    const bobHash = await hashPassword("bob-password-456", 2000);
    /** A relay configured through parseConfig, as the real process is. */
    const relayFromEnv = (env: Record<string, string>, overrides: Partial<RelayConfig> = {}) => {
      const result = parseConfig({ UPSTREAM_BASE_URL: upstream.url, UPSTREAM_API_KEY: CANARY_KEY, ...env });
      assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
      return startRelay({ ...result.config, authFailuresPerMinute: 0, ...overrides });
    };

    await t.step("the limits apply per user: one user's quota does not block another", async () => {
      await using relay = relayFromEnv(
        { MC_RELAY_USERS: `alice:alice-password-123,bob:${bobHash}`, TRUST_PROXY: "true" },
        { rateLimitPerMinute: 1 },
      );
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
    const publicConfig = (overrides: Partial<RelayConfig> = {}) =>
      testConfig(upstream.url, {
        publicAccess: true,
        rateLimitPerMinute: 20,
        tokenBudgetPerDay: 100_000,
        trustProxy: parseTrustProxyForTest("127.0.0.1"),
        ...overrides,
      });
    const chatAs = (
      relay: { call: ReturnType<typeof startRelay>["call"] },
      headers: Record<string, string>,
      extra = {},
    ) =>
      relay.call("/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: chatBody(extra),
      });

    await t.step("limits count per address for anonymous callers and per user for signed-in ones", async () => {
      await using relay = startRelay(publicConfig({
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
          publicConfig({ rateLimitPerMinute: 0, ...overrides }),
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
  const chatAs = (
    relay: { call: ReturnType<typeof startRelay>["call"] },
    headers: Record<string, string>,
    extra = {},
  ) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody(extra),
    });

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
  const publicConfig = (overrides: Partial<RelayConfig> = {}) =>
    testConfig(upstream.url, {
      publicAccess: true,
      rateLimitPerMinute: 20,
      tokenBudgetPerDay: 100_000,
      trustProxy: parseTrustProxyForTest("127.0.0.1"),
      ...overrides,
    });
  const chatAs = (
    relay: { call: ReturnType<typeof startRelay>["call"] },
    headers: Record<string, string>,
    extra = {},
  ) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody(extra),
    });

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
      publicConfig({ rateLimitPerHour: 200, tokenBudgetPerMonth: 2_000_000, concurrentRequests: 3 }),
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
  const publicConfig = (overrides: Partial<RelayConfig> = {}) =>
    testConfig(upstream.url, {
      publicAccess: true,
      rateLimitPerMinute: 20,
      tokenBudgetPerDay: 100_000,
      trustProxy: parseTrustProxyForTest("127.0.0.1"),
      ...overrides,
    });
  const chatAs = (
    relay: { call: ReturnType<typeof startRelay>["call"] },
    headers: Record<string, string>,
    extra = {},
  ) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody(extra),
    });

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
    await using relay = startRelay(publicConfig());
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
  const publicConfig = (overrides: Partial<RelayConfig> = {}) =>
    testConfig(upstream.url, {
      publicAccess: true,
      rateLimitPerMinute: 20,
      tokenBudgetPerDay: 100_000,
      trustProxy: parseTrustProxyForTest("127.0.0.1"),
      ...overrides,
    });
  const chatAs = (
    relay: { call: ReturnType<typeof startRelay>["call"] },
    headers: Record<string, string>,
    extra = {},
  ) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody(extra),
    });

  await t.step(
    "MC's public preset passes as anonymous: an empty Bearer, or a leftover key never logged or forwarded",
    async () => {
      await using relay = startRelay(publicConfig());
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
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  // Each test file runs in an isolate of its own, so this is what this file's tests saw.
  assert.ok(seenByClientsOrLogs.length > 200, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
