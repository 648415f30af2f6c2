/**
 * What a caller may take: request body sizes, request rates per window, concurrent requests, token
 * budgets, and the public relay that opens the relay to anyone within them.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { BARE_PASSWORD_USER } from "../src/config/parse.ts";
import { hashPassword, MemoryCounterStore, parseConfig, type RelayConfig } from "../main.ts";
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
  manualClock,
  openAiLikeUpstream,
  parseTrustProxyForTest,
  publicConfig,
  rawRequest,
  relayFromEnv,
  runRelayProcess,
  seenByClientsOrLogs,
  sleep,
  spawnRelay,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
  within,
} from "./testing.ts";

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

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(200);
});
