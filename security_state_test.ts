/**
 * Security review 3 (issue 23), findings 5 and 8, proved through the relay's HTTP surface: what a request takes from
 * a counter store goes back to that store across a Redis outage, a flood of cheap requests does not send a copy over
 * to counting alone, and one caller's slow requests cannot open the breakers of an alias for everybody.
 *
 * Like main_test.ts, every test runs with recognisable fake secrets; the last test checks that none of them ever
 * appeared in anything the relay logged or returned.
 */
import assert from "node:assert/strict";
import { type CounterStore, openCounterStore, type RelayConfig } from "./main.ts";
import {
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  encoder,
  IN_CI,
  installed,
  openAiLikeUpstream,
  seenByClientsOrLogs,
  sleep,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  USERNAME,
  within,
} from "./testing.ts";

/** Makes Redis answer nothing for `ms` (CLIENT PAUSE): an outage that keeps Redis's data, unlike a restart. */
async function pauseRedis(port: number, ms: number): Promise<void> {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const args = ["CLIENT", "PAUSE", String(ms), "ALL"];
    await connection.write(
      encoder.encode(`*${args.length}\r\n${args.map((a) => `$${a.length}\r\n${a}\r\n`).join("")}`),
    );
    const answer = new Uint8Array(16);
    await connection.read(answer);
    assert.match(new TextDecoder().decode(answer), /^\+OK/);
  } finally {
    connection.close();
  }
}

Deno.test({
  name: "[security] counts taken before, during and after a Redis outage",
  ignore: !installed("redis-server") && !IN_CI,
}, async (t) => {
  // Requests whose body says HOLD wait at the upstream until the test lets them go.
  const gates: (() => void)[] = [];
  await using upstream = startUpstream(async (request, seen) => {
    if (seen.body.includes("HOLD")) await new Promise<void>((resolve) => gates.push(resolve));
    return openAiLikeUpstream(request, seen);
  });
  await using redis = await startRedis();
  const states: string[] = [];
  const relayOnRedis = async (overrides: Partial<RelayConfig>) => {
    const config = testConfig(upstream.url, { redisUrl: redis.url, ...overrides });
    const counters = await openCounterStore(config, (state) => states.push(state)) as CounterStore;
    const relay = startRelay(config, undefined, undefined, { counters });
    return {
      relay,
      /** Waits until the copy counts in Redis (`ok`) or alone (`degraded`). */
      until: (state: string) =>
        within(
          10_000,
          (async () => {
            while ((await relay.call("/health")).json().state !== state) await sleep(100);
          })(),
          `the copy did not become ${state}`,
        ),
      [Symbol.asyncDispose]: async () => {
        await relay.server.shutdown();
        await counters.close?.();
      },
    };
  };
  const auth = { authorization: `Bearer ${USERNAME}:${CANARY_PASSWORD}` };
  const held = async () => {
    const before = gates.length;
    await within(
      5000,
      (async () => {
        while (gates.length === before) await sleep(10);
      })(),
      "the request never reached the upstream",
    );
  };

  await t.step(
    "a reservation made in memory during an outage is settled in memory: a budget spent in Redis stays spent",
    async () => {
      await using copy = await relayOnRedis({ tokenBudgetPerDay: 15 });
      const { relay } = copy;
      await redis.stop();
      const during = relay.chat(chatBody({ user: "HOLD", max_tokens: 400 }));
      await held();
      assert.equal((await relay.call("/health")).json().state, "degraded");
      await redis.start();
      await copy.until("ok");
      // The budget is spent in Redis (10 tokens a chat) while the outage's request is still running.
      assert.equal((await relay.chat(chatBody())).status, 200);
      assert.equal((await relay.chat(chatBody())).status, 200);
      assert.equal((await relay.chat(chatBody())).status, 429);
      gates.shift()!();
      assert.equal((await during).status, 200);
      await sleep(300); // the settlement is written after the answer has gone
      const refused = await relay.chat(chatBody());
      assert.equal(refused.status, 429, "the reservation of 400 tokens and more was not taken back from Redis");
      assert.equal(refused.json().error.code, "token_budget_exceeded");
      const usage = (await relay.call("/usage", { headers: auth }))
        .json();
      assert.equal(usage.budgets[0].used, 20);
    },
  );

  await t.step(
    "a place taken in Redis is freed in Redis when it answers again, not in memory: the caller is not stuck at 429",
    async () => {
      await using copy = await relayOnRedis({ concurrentRequests: 1 });
      const { relay } = copy;
      const running = relay.chat(chatBody({ user: "HOLD" }));
      await held();
      await pauseRedis(redis.port, 2500);
      // The copy notices the silence at its next store call.
      assert.equal((await relay.call("/usage", { headers: auth })).status, 200);
      assert.equal((await relay.call("/health")).json().state, "degraded");
      gates.shift()!();
      assert.equal((await running).status, 200, "answered while Redis was silent");
      await copy.until("ok");
      const next = await relay.chat(chatBody());
      assert.equal(next.status, 200, `the place was given back to Redis: ${next.text}`);
      const usage = (await relay.call("/usage", { headers: auth }))
        .json();
      assert.equal(usage.concurrent.in_flight, 0);
    },
  );

  await t.step(
    "a place taken in Redis that restarts without its data is not given back twice (never below zero)",
    async () => {
      await using copy = await relayOnRedis({ concurrentRequests: 1 });
      const { relay } = copy;
      const running = relay.chat(chatBody({ user: "HOLD" }));
      await held();
      await redis.stop();
      gates.shift()!();
      assert.equal((await running).status, 200);
      await redis.start();
      await copy.until("ok");
      assert.equal((await relay.call("/usage", { headers: auth })).json().concurrent.in_flight, 0);
      const both = await Promise.all([
        relay.chat(chatBody({ user: "HOLD" })),
        (async () => {
          await held();
          const second = await relay.chat(chatBody());
          gates.shift()!();
          return second;
        })(),
      ]);
      assert.deepEqual(both.map((answer) => answer.status), [200, 429], "one place, not two");
    },
  );

  await t.step(
    "a flood of /usage requests on a public relay does not send the copy over to counting alone",
    async () => {
      await using copy = await relayOnRedis({
        publicAccess: true,
        rateLimitPerMinute: 100_000,
        rateLimitPerHour: 100_000,
        rateLimitPerDay: 100_000,
        concurrentRequests: 10,
        tokenBudgetPerDay: 100_000,
        tokenBudgetPerMonth: 1_000_000,
      });
      const { relay } = copy;
      states.length = 0;
      const statuses = await Promise.all(
        Array.from(
          { length: 3000 },
          () => fetch(`${relay.url}/usage`).then(async (r) => (await r.body?.cancel(), r.status)),
        ),
      );
      assert.ok(
        statuses.every((status) => status === 200),
        JSON.stringify(Object.groupBy(statuses, (s) => s)),
      );
      assert.deepEqual(states, [], "the copy never went degraded");
      assert.equal((await relay.call("/health")).json().state, "ok");
    },
  );
});

Deno.test("[security] one caller's slow requests do not open the breakers of an alias for everybody", async () => {
  // A request that asks for a long answer, not streamed: its headers come only when the whole answer is ready.
  await using slow = startUpstream(async (request, seen) => {
    if (seen.body.includes("LONG")) await sleep(1500);
    return request.signal.aborted ? new Response(null) : openAiLikeUpstream(request, seen);
  });
  const other = { name: "other", password: "other-password-1" };
  await using relay = startRelay(testConfig(slow.url, {
    upstreams: [testUpstream("one", slow.url), testUpstream("two", slow.url)],
    modelAliases: { fast: ["one/a", "two/b"] },
    requestTimeoutMs: 800,
    breakerFailures: 3,
    users: [{ name: USERNAME, password: CANARY_PASSWORD }, other],
  }));
  for (let index = 0; index < 3; index++) {
    assert.equal((await relay.chat(chatBody({ model: "fast", user: "LONG" }))).status, 504);
  }
  assert.deepEqual((await relay.call("/health")).json().breakers_open, [], "no breaker is open");
  const theirs = await relay.chat(chatBody({ model: "fast" }), { authorization: "Bearer other:other-password-1" });
  assert.equal(theirs.status, 200, theirs.text);
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assert.ok(seenByClientsOrLogs.length > 20, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
