/**
 * Token budgets: reservations when a request starts, settled with the real usage when it ends, per user or address,
 * per UTC day and month, in every store; and the answer lengths and counts that decide a reservation.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { type CounterStore, MemoryCounterStore, openCounterStore, parseConfig, type RelayConfig } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_KEY,
  chatAs,
  chatBody,
  controlledStream,
  encoder,
  GOOD_BEARER,
  IN_CI,
  installed,
  minimalEnv,
  openAiLikeUpstream,
  post,
  publicConfig,
  type Relay,
  sleep,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  usageUpstream,
} from "./testing.ts";

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

Deno.test("budgets: token budgets", async (t) => {
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

Deno.test("budgets: token budgets [security]", async (t) => {
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

Deno.test("budgets: a memory store full of live counters says so, and spends nothing of the newcomer's", async () => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const store = new MemoryCounterStore(Date.now, 1000);
  // A thousand callers each hold a budget counter: the store cannot count one more.
  for (let index = 0; index < 1000; index++) store.add(`tokens-day:held:${index}`, 10, Date.now() + 3_600_000);
  // With CONCURRENT_REQUESTS the place in flight finds no room first; without it, the budget's reservation.
  for (const concurrentRequests of [5, 0]) {
    await using relay = startRelay(
      testConfig(upstream.url, { tokenBudgetPerDay: 1000, concurrentRequests }),
      undefined,
      undefined,
      { counters: store },
    );
    const refused = await relay.chat(chatBody());
    assert.equal(refused.status, 503, `CONCURRENT_REQUESTS=${concurrentRequests}`);
    assert.equal(refused.json().error.code, "relay_busy");
    assert.match(refused.json().error.message, /memory store is full \(MEMORY_STORE_KEYS\)/);
    assert.equal(refused.headers.get("retry-after"), "60");
  }
  assert.equal(upstream.requests.length, 0, "nothing reached the upstream");
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(20);
});
