/**
 * Durable and shared state: SQLite at STATE_PATH on one machine, Redis for several copies, and the
 * fallback to counting alone while Redis is away; the memory store keeps no usage ledger.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { type CounterStore, MemoryCounterStore, openCounterStore, type RelayConfig } from "../main.ts";
import {
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  encoder,
  GOOD_BEARER,
  IN_CI,
  installed,
  openAiLikeUpstream,
  runRelayProcess,
  sleep,
  spawnRelay,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
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
  name: "stores: SQLite and Redis",
  ignore: !installed("redis-server") && !IN_CI,
}, async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-state-" });
  // "team" has no budget of its own (day=0), so only the rate limit decides for it.
  const users = "team;day=0:" + CANARY_PASSWORD + ",spender:spender-password-1,guesser:guesser-password-1";
  const baseEnv = {
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_USERS: users,
  };
  const as = (name: string, password: string) => ({
    authorization: `Bearer ${name}:${password}`,
    "content-type": "application/json",
  });
  const chat = (url: string, headers: Record<string, string>) =>
    fetch(`${url}/v1/chat/completions`, { method: "POST", headers, body: chatBody() }).then(async (response) => {
      await response.body?.cancel();
      return response.status;
    });
  const spender = as("spender", "spender-password-1");
  const guess = as("guesser", "wrong-guess");
  const stopAll = async (relays: Awaited<ReturnType<typeof spawnRelay>>[]) => {
    for (const relay of relays) relay.child.kill("SIGTERM");
    for (const relay of relays) await relay.finished();
  };
  const usageCommand = async (env: Record<string, string>, args: string[]) => {
    const result = await runRelayProcess(env, ["usage", ...args]);
    assert.equal(result.code, 0, result.stderr);
    return result.stdout;
  };

  await t.step("SQLite at STATE_PATH: budgets, lockouts and the ledger survive a restart", async () => {
    const env = {
      ...baseEnv,
      STATE_PATH: `${folder}/state.db`,
      TOKEN_BUDGET_PER_DAY: "15",
      AUTH_FAILURES_PER_MINUTE: "2",
    };
    let relay = await spawnRelay(env);
    assert.equal(await chat(relay.url, spender), 200);
    assert.equal(await chat(relay.url, spender), 200);
    assert.equal(await chat(relay.url, guess), 401);
    assert.equal(await chat(relay.url, guess), 401);
    await stopAll([relay]);
    relay = await spawnRelay(env);
    try {
      assert.equal(await chat(relay.url, spender), 429, "the spent budget is remembered");
      assert.equal(await chat(relay.url, as("guesser", "guesser-password-1")), 429, "so is the lockout");
      assert.equal(await chat(relay.url, as("team", CANARY_PASSWORD)), 200);
    } finally {
      await stopAll([relay]);
    }
    const report = JSON.parse(await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--format", "json"]));
    assert.deepEqual(
      report.rows.map((
        row: { user: string; requests: number; total_tokens: number },
      ) => [row.user, row.requests, row.total_tokens]),
      [
        ["user:spender", 2, 20],
        ["user:team", 1, 10],
      ],
    );
    const table = await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--by", "model"]);
    assert.match(table, /^gpt-test +3 +27 +3 +30 +0$/m);
    assert.match(table, /^total +3 +27 +3 +30 +0$/m);
    const csv = await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--by", "upstream", "--format=csv"]);
    assert.equal(
      csv.trim(),
      "upstream,requests,prompt_tokens,completion_tokens,total_tokens,estimated_requests\ndefault,3,27,3,30,0",
    );
  });

  await t.step("a STATE_PATH that cannot be opened stops the start, naming the variable", async () => {
    const started = await runRelayProcess({ ...baseEnv, STATE_PATH: `${folder}/missing-folder/state.db` });
    assert.equal(started.code, 1);
    assert.match(started.stderr, /STATE_PATH names ".*missing-folder\/state\.db", which cannot be opened/);
    const bad = await runRelayProcess({}, ["usage", "--by", "week"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--by takes \(user\|model\|upstream\|day\), got "week"/);
  });

  await using redis = await startRedis();
  const sharedEnv = {
    ...baseEnv,
    REDIS_URL: redis.url,
    RATE_LIMIT_PER_MINUTE: "10",
    TOKEN_BUDGET_PER_DAY: "15",
    AUTH_FAILURES_PER_MINUTE: "3",
    METRICS: "team",
  };
  let copies = await Promise.all([0, 1, 2].map(() => spawnRelay(sharedEnv)));
  const roundRobin = (index: number) => copies[index % copies.length].url;
  // The store's part of /health (`upstreams`, whether the upstream answers, is not the store's).
  const health = (url: string) =>
    fetch(`${url}/health`).then((response) => response.json()).then(({ upstreams: _, ...rest }) => rest);

  await t.step("three copies on one Redis: RATE_LIMIT_PER_MINUTE=10 lets exactly 10 through in all", async () => {
    const team = as("team", CANARY_PASSWORD);
    const statuses = await Promise.all(Array.from({ length: 30 }, (_, i) => chat(roundRobin(i), team)));
    assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
    assert.equal(statuses.filter((status) => status === 429).length, 20);
  });

  await t.step(
    "a stage's calls go to Redis together: per-minute, per-hour and in-flight counts stay exact across copies",
    async () => {
      const batcher = as("batcher", "batcher-password-1");
      const env = {
        ...sharedEnv,
        MC_RELAY_USERS: `${users},batcher;day=0:batcher-password-1`,
        RATE_LIMIT_PER_HOUR: "100",
        CONCURRENT_REQUESTS: "50",
      };
      const batching = await Promise.all([0, 1, 2].map(() => spawnRelay(env)));
      try {
        const statuses = await Promise.all(
          Array.from({ length: 30 }, (_, i) => chat(batching[i % batching.length].url, batcher)),
        );
        assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
        const usage = await fetch(`${batching[1].url}/usage`, { headers: batcher }).then((response) => response.json());
        assert.deepEqual(usage.limits.map((limit: { used: number }) => limit.used), [10, 10], "refusals gave back");
        assert.equal(usage.concurrent.in_flight, 0, "every place was given back");
      } finally {
        await stopAll(batching);
      }
    },
  );

  await t.step("a token budget spent through one copy is refused by the others", async () => {
    assert.equal(await chat(copies[0].url, spender), 200);
    assert.equal(await chat(copies[0].url, spender), 200);
    assert.equal(await chat(copies[1].url, spender), 429);
    assert.equal(await chat(copies[2].url, spender), 429);
  });

  await t.step("a lockout earned on one copy holds on the others, however many guesses arrive at once", async () => {
    const statuses = await Promise.all(Array.from({ length: 12 }, (_, i) => chat(roundRobin(i), guess)));
    assert.equal(statuses.filter((status) => status === 401).length, 3, `statuses: ${statuses}`);
    assert.equal(statuses.filter((status) => status === 429).length, 9);
    for (const copy of copies) assert.equal(await chat(copy.url, as("guesser", "guesser-password-1")), 429);
  });

  await t.step("all copies restarted: counts and the ledger are kept", async () => {
    await stopAll(copies);
    copies = await Promise.all([0, 1, 2].map(() => spawnRelay(sharedEnv)));
    assert.equal(await chat(copies[2].url, spender), 429, "the budget is still spent");
    assert.equal(await chat(copies[1].url, as("guesser", "guesser-password-1")), 429, "the lockout still holds");
    const report = JSON.parse(await usageCommand({ REDIS_URL: redis.url }, ["--format", "json", "--by", "user"]));
    const byUser = Object.fromEntries(
      report.rows.map((row: { user: string; requests: number }) => [row.user, row.requests]),
    );
    assert.deepEqual(byUser, { "user:batcher": 10, "user:spender": 2, "user:team": 10 });
  });

  await t.step(
    "Redis stopped mid-run: every copy keeps answering, degraded, and shares counts again when it is back",
    async () => {
      const metrics = (url: string) =>
        fetch(`${url}/metrics`, { headers: as("team", CANARY_PASSWORD) }).then((response) => response.text());
      await redis.stop();
      for (const copy of copies) {
        assert.equal(await chat(copy.url, as("guesser", "guesser-password-1")), 200, "answers, counting alone");
        assert.deepEqual(await health(copy.url), { status: "ok", ok: true, endpoints: 1, state: "degraded" });
      }
      assert.match(await metrics(copies[0].url), /^mc_relay_store_degraded 1$/m);
      const warned = copies[0].output().stdout.split("\n").filter((line) => line.includes("Redis unreachable"));
      assert.equal(warned.length, 1, "the change is logged once");
      await redis.start();
      await within(
        10_000,
        (async () => {
          while ((await Promise.all(copies.map((copy) => health(copy.url)))).some((answer) => answer.state !== "ok")) {
            await sleep(200);
          }
        })(),
        "the copies did not go back to Redis",
      );
      assert.match(await metrics(copies[0].url), /^mc_relay_store_degraded 0$/m);
      assert.match(copies[0].output().stdout, /Redis answers again/);
      // Shared again: a fresh Redis, so ten requests in all pass, whichever copy they reach.
      const team = as("team", CANARY_PASSWORD);
      const statuses = await Promise.all(Array.from({ length: 15 }, (_, i) => chat(roundRobin(i), team)));
      assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
    },
  );
  await stopAll(copies);

  await t.step(
    "a copy that starts before Redis does says degraded from its first answer, then shares counts when Redis is up",
    async () => {
      await redis.stop();
      const report = await runRelayProcess({ REDIS_URL: redis.url }, ["usage"]);
      assert.equal(report.code, 1);
      assert.match(report.stderr, /mc-relay usage: Redis at REDIS_URL does not answer/);
      const early = await spawnRelay(sharedEnv);
      try {
        assert.match(early.output().stdout, /Redis unreachable.*"error":"not connected 3 s after the start"/);
        assert.equal((await health(early.url)).state, "degraded");
        assert.equal(await chat(early.url, as("team", CANARY_PASSWORD)), 200, "it answers meanwhile");
        await redis.start();
        await within(
          10_000,
          (async () => {
            while ((await health(early.url)).state !== "ok") await sleep(200);
          })(),
          "the copy did not go over to Redis",
        );
        assert.match(early.output().stdout, /Redis answers again/);
      } finally {
        await stopAll([early]);
      }
    },
  );

  await t.step(
    "200 requests at once against CONCURRENT_REQUESTS=50 across three copies: at most 50 in flight",
    async () => {
      let inFlight = 0;
      let most = 0;
      await using slow = startUpstream(async (request, seen) => {
        // Each copy's own check of the upstream (its model list) is no client request.
        if (seen.path.endsWith("/models")) return openAiLikeUpstream(request, seen);
        inFlight++;
        most = Math.max(most, inFlight);
        await sleep(300);
        inFlight--;
        return openAiLikeUpstream(request, seen);
      });
      const trio = await Promise.all(
        [0, 1, 2].map(() =>
          spawnRelay({ ...baseEnv, UPSTREAM_BASE_URL: slow.url, REDIS_URL: redis.url, CONCURRENT_REQUESTS: "50" })
        ),
      );
      try {
        const team = as("team", CANARY_PASSWORD);
        const statuses = await Promise.all(Array.from({ length: 200 }, (_, i) => chat(trio[i % 3].url, team)));
        const counts = JSON.stringify(Object.groupBy(statuses, (status) => status));
        assert.ok(most <= 50, `${most} requests were in flight at once`);
        assert.ok(most >= 40, `the limit was nearly used: ${most}, ${counts}`);
        assert.equal(
          statuses.filter((status) => status === 200).length + statuses.filter((s) => s === 429).length,
          200,
        );
      } finally {
        await stopAll(trio);
      }
    },
  );
  await Deno.remove(folder, { recursive: true });
});

Deno.test("stores: what a store keeps and gives back [security]", async (t) => {
  await t.step(
    "[security] the memory store keeps no usage ledger, so answered requests leave nothing behind",
    async () => {
      await using upstream = startUpstream(openAiLikeUpstream);
      const counters = new MemoryCounterStore();
      await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 1000 }), undefined, undefined, {
        counters,
      });
      for (let i = 0; i < 5; i++) {
        assert.equal((await relay.chat(chatBody({ model: `model-${i}` }))).status, 200);
      }
      assert.deepEqual(counters.readUsage("0000-01-01", "9999-12-31"), [], "nothing reads it without a store");
      const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
      assert.equal(usage.budgets[0].used, 50, "budgets are still counted");
    },
  );

  await t.step({
    name: "[security] counts taken before, during and after a Redis outage",
    ignore: !installed("redis-server") && !IN_CI,
    fn: async (t) => {
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
    },
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(20);
});
