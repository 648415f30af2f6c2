/**
 * Durable and shared state: SQLite at STATE_PATH on one machine, Redis for several copies, and the
 * fallback to counting alone while Redis is away.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import {
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  IN_CI,
  installed,
  openAiLikeUpstream,
  runRelayProcess,
  seenByClientsOrLogs,
  sleep,
  spawnRelay,
  startRedis,
  startUpstream,
  within,
} from "../testing.ts";

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

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  // Each test file runs in an isolate of its own, so this is what this file's tests saw.
  assert.ok(seenByClientsOrLogs.length > 20, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
