/**
 * Security review 3 (issue 23), token budgets and the model allow-list, proved through the relay's HTTP surface:
 * a spent budget cannot be reset by one huge number, counters stay exact integers in every store whatever a client
 * or an upstream sends, `n`, `best_of` and prompt arrays count against MAX_TOKENS_PER_REQUEST and the reservation,
 * background responses are refused while a budget applies, and OpenRouter's `models` obeys ALLOWED_MODELS.
 *
 * The last test checks that no canary secret ever appeared in anything these tests saw.
 */
import assert from "node:assert/strict";
import { type CounterStore, MemoryCounterStore, openCounterStore, type RelayConfig } from "./main.ts";
import {
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  encoder,
  GOOD_BEARER,
  IN_CI,
  installed,
  seenByClientsOrLogs,
  sleep,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
} from "./testing.ts";

/** The three stores a budget may live in; each test below runs on every one of them that can start here. */
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

/** An upstream that answers every POST like OpenAI, reporting whatever usage `reported` holds at the time. */
function usageUpstream() {
  const state: { reported: Record<string, unknown> } = {
    reported: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
  };
  const upstream = startUpstream(() =>
    Response.json({
      id: "chatcmpl-1",
      object: "chat.completion",
      choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
      usage: state.reported,
    })
  );
  return Object.assign(upstream, { state, forwarded: () => JSON.parse(upstream.requests.at(-1)!.body) });
}

type Relay = ReturnType<typeof startRelay>;

const post = (relay: Relay, path: string, body: Record<string, unknown>) =>
  relay.call(path, {
    method: "POST",
    headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
    body: JSON.stringify({ model: "gpt-test", ...body }),
  });

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

Deno.test("[security] a spent budget stays spent whatever answer length the client asks for", async (t) => {
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
      assert.match(refused.json().error.message, new RegExp(`^mc-relay: "${field}" must be a whole number from 1 to`));
      assert.equal(await usedToday(relay), 1000, `${field}: ${value} left the spent budget as it was`);
    }
    assert.equal(upstream.requests.length, sent, "none of them reached the upstream");
    assert.equal((await post(relay, "/v1/chat/completions", { messages: [] })).status, 429, "still spent");
  });
});

Deno.test("[security] an answer length no provider takes is refused before anything is counted", async () => {
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

Deno.test("[security] counters stay exact integers whatever usage the upstream reports", async (t) => {
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
        assert.ok(Number.isSafeInteger(figure) && figure >= 0, `the ledger holds exact counts: ${JSON.stringify(row)}`);
      }
    }
  });
});

Deno.test("[security] n, best_of and prompt arrays count every answer against MAX_TOKENS_PER_REQUEST", async () => {
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
});

Deno.test("[security] a budget's reservation counts every answer a request asks for", async () => {
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

Deno.test("[security] a background response is refused while a token budget applies", async () => {
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

Deno.test("[security] with ALLOWED_MODELS, every model OpenRouter's `models` names must be allowed too", async () => {
  await using upstream = usageUpstream();
  await using relay = startRelay(testConfig(upstream.url, { allowedModels: ["gpt-test", "gpt-cheap"] }));
  const allowed = await post(relay, "/v1/chat/completions", {
    messages: [],
    models: ["gpt-test", "gpt-cheap"],
    route: "fallback",
  });
  assert.equal(allowed.status, 200);
  assert.deepEqual(upstream.forwarded().models, ["gpt-test", "gpt-cheap"]);
  assert.equal(upstream.forwarded().route, "fallback", "route only says how to use `models`: it passes");
  const sent = upstream.requests.length;
  for (const models of [["gpt-test", "gpt-expensive"], ["gpt-expensive"], "gpt-expensive", [42], [null]]) {
    const refused = await post(relay, "/v1/chat/completions", { messages: [], models });
    assert.equal(refused.status, 400, JSON.stringify(models));
    assert.equal(refused.json().error.code, "model_not_allowed");
    assert.match(refused.json().error.message, /^mc-relay: .*"models"/);
  }
  assert.equal(upstream.requests.length, sent);

  await using open = startRelay(testConfig(upstream.url));
  const any = await post(open, "/v1/chat/completions", { messages: [], models: ["anything", "else"] });
  assert.equal(any.status, 200, "without ALLOWED_MODELS, `models` is the provider's business");
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any budget test above", () => {
  assert.ok(seenByClientsOrLogs.length > 50, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
});
