/**
 * SIGHUP reloads the env file: a valid one replaces the running configuration for new requests while streams in
 * flight finish, a broken one changes nothing and the log names each problem, and what only a restart changes is said.
 *
 * Proved on real relay processes (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { createHandler, hashPassword, metricsResponse, parsePasswordHash, RelayMetrics } from "../main.ts";
import {
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  decoder,
  eventually,
  freePort,
  sleep,
  spawnRelay,
  startUpstream,
  streamedAnswer,
  testConfig,
  USERNAME,
  within,
} from "./testing.ts";

const NEW_PASSWORD = "bob-password-reloaded-1";

/** The text of an env file from variables. */
const envFile = (env: Record<string, string>) =>
  Object.entries(env).map(([name, value]) => `${name}=${value}`).join("\n") + "\n";

Deno.test("reload: what the new configuration does not change is carried over", async (t) => {
  const metrics = new RelayMetrics();
  const hashed = async (name: string, password: string) => ({
    name,
    hash: parsePasswordHash(await hashPassword(password, 2000))!,
  });
  const config = testConfig("http://127.0.0.1:9/v1", { users: [await hashed("carol", "carol-password-1")] });
  const info = {
    remoteAddr: { transport: "tcp", hostname: "127.0.0.1", port: 40000 },
    completed: Promise.resolve(),
  } as Deno.ServeHandlerInfo;
  const usage = async (handler: ReturnType<typeof createHandler>, credentials: string) => {
    const response = await handler(
      new Request("http://127.0.0.1/usage", { headers: { authorization: `Bearer ${credentials}` } }),
      info,
    );
    await response.body?.cancel();
    return response.status;
  };
  const hashChecks = async () =>
    Number(/^mc_relay_password_hash_checks_total (\d+)$/m.exec(await metricsResponse(metrics).text())![1]);
  const first = createHandler(config, { metrics, log: () => {} });
  assert.equal(await usage(first, "carol:carol-password-1"), 200);
  const checked = await hashChecks();

  await t.step("the same users: a verified sign-in is not hashed again, the body allowance is the same", async () => {
    const second = createHandler({ ...config, rateLimitPerMinute: 5 }, { metrics, log: () => {}, previous: first });
    assert.equal(await usage(second, "carol:carol-password-1"), 200);
    assert.equal(await hashChecks(), checked, "carol's sign-in was remembered across the reload");
    assert.equal(second.relay?.bodyBudget, first.relay?.bodyBudget, "one MAX_BUFFERED_BYTES for old and new requests");
  });

  await t.step("an open breaker stays open across a reload that keeps the aliases, in /metrics too", () => {
    const aliased = { ...config, modelAliases: { "alias-x": ["default/a"] }, breakerFailures: 1 };
    const before = createHandler(aliased, { metrics, log: () => {} });
    before.relay!.breakers.failed("default/a", "user:carol", false);
    assert.deepEqual(before.relay!.breakers.open(), ["default/a"]);
    const after = createHandler({ ...aliased, rateLimitPerMinute: 5 }, { metrics, log: () => {}, previous: before });
    assert.deepEqual(after.relay!.breakers.open(), ["default/a"]);
    assert.equal(metrics.breakerOpen.get("default/a"), 1, "the gauge says what the breaker says");
    const moved = createHandler(
      { ...aliased, upstreams: [{ ...aliased.upstreams[0], baseUrl: "http://127.0.0.1:10/v1" }] },
      { metrics, log: () => {}, previous: after },
    );
    assert.deepEqual(moved.relay!.breakers.open(), [], "an upstream that moved starts with its breaker closed");
  });

  await t.step("changed users or limits: built anew", async () => {
    const third = createHandler(
      { ...config, users: [await hashed("carol", "carol-password-2")], maxBufferedBytes: 1 },
      {
        metrics,
        log: () => {},
        previous: first,
      },
    );
    assert.equal(await usage(third, "carol:carol-password-1"), 401, "the old password is gone");
    assert.equal(await usage(third, "carol:carol-password-2"), 200);
    assert.ok(await hashChecks() > checked);
    assert.notEqual(third.relay?.bodyBudget, first.relay?.bodyBudget);
  });
});

Deno.test({
  name: "reload: SIGHUP reads the env file again",
  ignore: Deno.build.os === "windows",
}, async (t) => {
  let stream: ReturnType<typeof controlledStream> | undefined;
  await using upstream = startUpstream((_request, seen) => {
    if (JSON.parse(seen.body).stream === true) {
      stream = controlledStream();
      return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
    }
    return streamedAnswer(["hello"]);
  });
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-reload-" });
  const file = `${folder}/relay.env`;
  const port = String(freePort());
  const base = {
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_USERS: `${USERNAME}:${CANARY_PASSWORD}`,
    HOST: "127.0.0.1",
    PORT: port,
    RATE_LIMIT_PER_MINUTE: "100",
  };
  await Deno.writeTextFile(file, envFile(base));
  // HOST and PORT come from the file only (the test helper would set them in the environment, which wins).
  const relay = await spawnRelay({}, ["--env-file", file], { deno: ["run", "-P", "--quiet", "main.ts"] });
  const as = (name: string, password: string) => ({ authorization: `Bearer ${name}:${password}` });
  const signIn = async (headers: Record<string, string>) => {
    const response = await fetch(`${relay.url}/usage`, { headers });
    await response.body?.cancel();
    return response.status;
  };
  /** Sends SIGHUP and waits for the log line that ends the reload (`pattern`), returning the lines it wrote. */
  const reload = async (pattern: RegExp) => {
    const before = relay.output().stdout.length;
    relay.child.kill("SIGHUP");
    return await within(
      10_000,
      (async () => {
        while (!pattern.test(relay.output().stdout.slice(before))) await sleep(20);
        return relay.output().stdout.slice(before);
      })(),
      `no log line ${pattern} after SIGHUP`,
    );
  };

  try {
    await t.step("a reload adds a user while a stream in flight completes", async () => {
      assert.equal(await signIn(as("bob", NEW_PASSWORD)), 401, "bob is not a user yet");
      const streaming = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { ...as(USERNAME, CANARY_PASSWORD), "content-type": "application/json" },
        body: chatBody({ stream: true }),
      });
      assert.equal(streaming.status, 200);
      const reader = streaming.body!.getReader();
      await within(
        5000,
        (async () => {
          while (stream === undefined) await sleep(10);
        })(),
        "the stream reached the upstream",
      );
      stream!.send('data: {"choices":[{"delta":{"content":"before "}}]}\n\n');
      await Deno.writeTextFile(
        file,
        envFile({ ...base, MC_RELAY_USERS: `${USERNAME}:${CANARY_PASSWORD},bob:${NEW_PASSWORD}`, ADMINS: "bob" }),
      );
      const lines = await reload(/"msg":"configuration reloaded"/);
      assert.match(lines, /"msg":"configuration reloaded","changed":\["MC_RELAY_USERS","ADMINS"\]/);
      assert.ok(!lines.includes(NEW_PASSWORD), "the log names variables, never a value");
      assert.equal(await signIn(as("bob", NEW_PASSWORD)), 200, "bob signs in on the next request");
      const admin = await fetch(`${relay.url}/admin`, { headers: as("bob", NEW_PASSWORD) });
      await admin.body?.cancel();
      assert.equal(admin.status, 200, "and ADMINS took effect: /admin exists now");
      stream!.send('data: {"choices":[{"delta":{"content":"after"}}]}\n\ndata: [DONE]\n\n');
      stream!.close();
      let text = "";
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
        text += decoder.decode(chunk.value);
      }
      assert.match(text, /before .*after.*\[DONE\]/s, "the stream that began before the reload ended whole");
    });

    await t.step("a broken file keeps the running configuration and the log names the problem", async () => {
      await Deno.writeTextFile(
        file,
        envFile({
          ...base,
          MC_RELAY_USERS: `${USERNAME}:${CANARY_PASSWORD}`,
          RATE_LIMIT_PER_MINUTE: "lots",
          ADMINS: "carol",
        }),
      );
      const lines = await reload(
        /"msg":"reload refused: 2 configuration problem\(s\); the running configuration stays"/,
      );
      assert.match(
        lines,
        /"level":"error","msg":"reload refused: configuration problem","problem":"RATE_LIMIT_PER_MINUTE must be/,
      );
      assert.match(lines, /"problem":"ADMINS must name configured users/);
      assert.equal(await signIn(as("bob", NEW_PASSWORD)), 200, "bob, of the running configuration, still signs in");
    });

    await t.step("a reload that changes PORT says it needs a restart, and the relay keeps its port", async () => {
      await Deno.writeTextFile(file, envFile({ ...base, PORT: String(freePort()), RATE_LIMIT_PER_MINUTE: "50" }));
      const lines = await reload(/"msg":"configuration reloaded"/);
      assert.match(
        lines,
        /"msg":"reload: these variables changed but need a restart; their running values stay","variables":\["PORT"\]/,
      );
      // In the order of the table of variables.
      assert.match(lines, /"changed":\["MC_RELAY_USERS","RATE_LIMIT_PER_MINUTE","ADMINS"\]/);
      assert.equal(await signIn(as(USERNAME, CANARY_PASSWORD)), 200, "the relay still answers on its port");
      assert.equal(await signIn(as("bob", NEW_PASSWORD)), 401, "bob is gone with the new file");
    });
  } finally {
    relay.child.kill("SIGTERM");
    await relay.finished();
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test({
  name: "reload: with WORKERS=2 every thread takes the new configuration",
  ignore: Deno.build.os === "windows",
}, async () => {
  await using upstream = startUpstream(() => streamedAnswer(["hello"]));
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-reload-" });
  const file = `${folder}/relay.env`;
  const base = {
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_USERS: `${USERNAME}:${CANARY_PASSWORD}`,
    HOST: "127.0.0.1",
    PORT: String(freePort()),
    WORKERS: "2",
    STATE_PATH: `${folder}/state.db`,
  };
  await Deno.writeTextFile(file, envFile(base));
  const relay = await spawnRelay({}, ["--env-file", file], { deno: ["run", "-P", "--quiet", "main.ts"] });
  try {
    await Deno.writeTextFile(
      file,
      envFile({ ...base, MC_RELAY_USERS: `${USERNAME}:${CANARY_PASSWORD},bob:${NEW_PASSWORD}` }),
    );
    relay.child.kill("SIGHUP");
    await eventually(
      10_000,
      () => relay.output().stdout.includes('"msg":"configuration reloaded"'),
      "the reload was logged",
    );
    await sleep(200); // the message to the other thread is on its way
    // Separate connections land on either thread (SO_REUSEPORT): every one must know bob.
    const statuses = await Promise.all(Array.from({ length: 24 }, async () => {
      const client = Deno.createHttpClient({ poolMaxIdlePerHost: 0 });
      const response = await fetch(`${relay.url}/usage`, {
        headers: { authorization: `Bearer bob:${NEW_PASSWORD}` },
        client,
      });
      await response.body?.cancel();
      client.close();
      return response.status;
    }));
    assert.deepEqual(new Set(statuses), new Set([200]));
  } finally {
    relay.child.kill("SIGTERM");
    await relay.finished();
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(1, { "a password added by a reload leaked": NEW_PASSWORD });
});
