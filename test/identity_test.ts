/**
 * Who is calling: sign-in with username:password, several users and password hashes, and the lockout
 * after failed sign-ins, counted per user name and client address.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import {
  constantTimeEqual,
  type CounterStore,
  hashPassword,
  MemoryCounterStore,
  parseConfig,
  parsePasswordHash,
  readCredentials,
  type RelayConfig,
  startCheck,
} from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  decoder,
  embeddingsUpstream,
  encoder,
  GOOD_BEARER,
  installed,
  manualClock,
  openAiLikeUpstream,
  parseTrustProxyForTest,
  processEnv,
  relayFromEnv,
  runRelayProcess,
  sleep,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
} from "./testing.ts";

/** A user with a PBKDF2 hash of `iterations` (the decoy check costs as much as the slowest hash). */
async function hashedUser(name: string, password: string, iterations = 20_000) {
  return { name, hash: parsePasswordHash(await hashPassword(password, iterations))! };
}

/** A number from the Prometheus text, e.g. `mc_relay_password_hash_checks_total`. */
function metricValue(text: string, name: string): number {
  return Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1]);
}

/** A memory store that answers like a remote one (not `synchronous`), so sign-ins take the general path. */
function remoteLikeStore(): CounterStore {
  const memory = new MemoryCounterStore();
  return {
    wait: (key, rule) => Promise.resolve(memory.wait(key, rule)),
    take: (key, rule) => Promise.resolve(memory.take(key, rule)),
    give: (key, rule) => Promise.resolve(memory.give(key, rule)),
    remaining: (key, rule) => Promise.resolve(memory.remaining(key, rule)),
    add: (key, amount, expiresAt) => Promise.resolve(memory.add(key, amount, expiresAt)),
    get: (key) => Promise.resolve(memory.get(key)),
    recordUsage: (entry) => Promise.resolve(memory.recordUsage(entry)),
    keepsLedger: memory.keepsLedger,
    readUsage: (since, until) => Promise.resolve(memory.readUsage(since, until)),
    startCheck: (key, rule, expiresAt) => Promise.resolve(startCheck(memory, key, rule, expiresAt)),
  };
}

Deno.test("identity: sign-in", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url));
  const models = (headers: Record<string, string>) => relay.call("/v1/models", { headers });

  await t.step("Bearer username:password is accepted (what MC and OpenAI SDKs send)", async () => {
    assert.equal((await models({ authorization: GOOD_BEARER })).status, 200);
  });

  await t.step("Basic base64(username:password) is accepted", async () => {
    const basic = `Basic ${btoa(`${USERNAME}:${CANARY_PASSWORD}`)}`;
    assert.equal((await models({ authorization: basic })).status, 200);
  });

  await t.step("the scheme is case-insensitive", async () => {
    assert.equal((await models({ authorization: `bearer ${USERNAME}:${CANARY_PASSWORD}` })).status, 200);
    assert.equal((await models({ authorization: `BASIC ${btoa(`${USERNAME}:${CANARY_PASSWORD}`)}` })).status, 200);
  });

  await t.step(
    "missing credentials get 401 in OpenAI's shape with a Basic challenge for non-browser clients",
    async () => {
      const response = await models({});
      assert.equal(response.status, 401);
      assert.deepEqual(Object.keys(response.json().error).sort(), ["code", "message", "type"]);
      assert.equal(response.json().error.code, "invalid_api_key");
      assert.match(response.json().error.message, /username>:<password/);
      assert.match(response.headers.get("www-authenticate") ?? "", /^Basic realm="mc-relay"/);
    },
  );

  await t.step("browser requests (with Origin) get no Basic challenge, so no login dialog pops up", async () => {
    const response = await models({ origin: ALLOWED, authorization: "Bearer team:wrong" });
    assert.equal(response.status, 401);
    assert.equal(response.headers.get("www-authenticate"), null);
  });

  await t.step(
    "a bare 'Bearer' (what MC sends with an empty API key field) is missing credentials, naming MC's API key field",
    async () => {
      for (const authorization of ["Bearer", "Bearer ", "bearer  "]) {
        const response = await models({ origin: ALLOWED, authorization });
        assert.equal(response.status, 401, authorization);
        assert.match(response.json().error.message, /^mc-relay: missing credentials: .*in MC: the API key field/);
      }
    },
  );

  await t.step(
    "a page's own fetch() (Sec-Fetch-Mode cors or same-origin, no Origin) gets no Basic challenge; a navigation does",
    async () => {
      for (const mode of ["cors", "same-origin", "no-cors"]) {
        const response = await models({ "sec-fetch-mode": mode, authorization: "Bearer team:wrong" });
        assert.equal(response.status, 401, mode);
        assert.equal(response.headers.get("www-authenticate"), null, mode);
      }
      const navigation = await models({ "sec-fetch-mode": "navigate" });
      assert.equal(navigation.status, 401);
      assert.match(navigation.headers.get("www-authenticate") ?? "", /^Basic realm="mc-relay"/);
    },
  );

  await t.step("a wrong password or a wrong user name gets 401", async () => {
    for (
      const authorization of [
        `Bearer ${USERNAME}:wrong`,
        `Bearer other:${CANARY_PASSWORD}`,
        `Bearer ${USERNAME}:${CANARY_PASSWORD}x`,
        `Bearer ${USERNAME}:`,
      ]
    ) {
      const response = await models({ authorization });
      assert.equal(response.status, 401, authorization);
      assert.equal(response.json().error.message, "mc-relay: wrong username or password");
    }
  });

  await t.step("malformed credentials get 401, never 500", async () => {
    const malformed = [
      "Bearer",
      "Bearer ",
      `Bearer ${CANARY_PASSWORD}`,
      "Basic !!!not-base64!!!",
      `Basic ${btoa("no-colon")}`,
      "Basic /w==",
      "Digest username=x",
      `Token ${USERNAME}:${CANARY_PASSWORD}`,
      `Bearer ${USERNAME}:${CANARY_PASSWORD} extra`,
      "x".repeat(8000),
    ];
    for (const authorization of malformed) {
      const response = await models({ authorization });
      assert.equal(response.status, 401, authorization);
      assert.equal(response.json().error.code, "invalid_api_key");
    }
  });

  await t.step("a password containing a colon works with Bearer and Basic", async () => {
    await using colonRelay = startRelay(
      testConfig(upstream.url, { users: [{ name: USERNAME, password: `${CANARY_PASSWORD}:with:colons` }] }),
    );
    const credentials = `${USERNAME}:${CANARY_PASSWORD}:with:colons`;
    assert.equal(
      (await colonRelay.call("/v1/models", { headers: { authorization: `Bearer ${credentials}` } })).status,
      200,
    );
    assert.equal(
      (await colonRelay.call("/v1/models", { headers: { authorization: `Basic ${btoa(credentials)}` } })).status,
      200,
    );
  });

  await t.step("failed authentication never reaches the upstream", async () => {
    const before = upstream.requests.length;
    await models({ authorization: "Bearer team:wrong" });
    await relay.call("/v1/chat/completions", { method: "POST", body: chatBody() });
    assert.equal(upstream.requests.length, before);
  });

  await t.step("the comparison helpers behave as specified", () => {
    assert.ok(constantTimeEqual("a:b", "a:b"));
    assert.ok(!constantTimeEqual("a:b", "a:c"));
    assert.ok(!constantTimeEqual("a:bc", "a:b"));
    assert.ok(!constantTimeEqual("", "a:b"));
    assert.deepEqual(readCredentials("Bearer a:b:c"), { credentials: "a:b:c" });
    assert.ok("problem" in readCredentials(null));
  });
});

Deno.test("identity: users and password hashes", async (t) => {
  await using upstream = embeddingsUpstream();
  const bobHash = await hashPassword("bob-password-456", 2000);
  const here = new URL("..", import.meta.url).pathname;

  await t.step(
    "every user of MC_RELAY_USERS signs in (plain or hashed), and each request is logged with its user",
    async () => {
      await using relay = relayFromEnv(upstream.url, { MC_RELAY_USERS: `alice:alice-password-123, bob:${bobHash}` });
      const as = (credentials: string) =>
        relay.call("/v1/models", { headers: { authorization: `Bearer ${credentials}` } });
      assert.equal((await as("alice:alice-password-123")).status, 200);
      assert.equal((await as("bob:bob-password-456")).status, 200);
      assert.equal((await as("bob:bob-password-456")).status, 200, "the second time from the remembered check");
      assert.equal((await as("bob:bob-password-45")).status, 401, "a wrong password after a right one still fails");
      assert.equal((await as("alice:bob-password-456")).status, 401);
      assert.equal((await as("carol:alice-password-123")).status, 401);
      assert.deepEqual(relay.requestLogs().map((entry) => entry.user ?? null), [
        "alice",
        "bob",
        "bob",
        null,
        null,
        null,
      ]);
    },
  );

  await t.step("MC_RELAY_USERNAME/MC_RELAY_PASSWORD and MC_RELAY_USERS work together", async () => {
    await using relay = relayFromEnv(upstream.url, {
      MC_RELAY_USERNAME: USERNAME,
      MC_RELAY_PASSWORD: CANARY_PASSWORD,
      MC_RELAY_USERS: "alice:alice-password-123",
    });
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
    assert.equal(
      (await relay.call("/v1/models", { headers: { authorization: "Bearer alice:alice-password-123" } })).status,
      200,
    );
  });

  await t.step("hash-password reads a password on stdin and prints a hash the relay accepts", async () => {
    const output = await runRelayProcess({}, ["hash-password"], { input: "carol-password-789\n" });
    assert.equal(output.code, 0, output.stderr);
    const hash = output.stdout.trim();
    assert.match(hash, /^pbkdf2-sha256:600000:[A-Za-z0-9_-]{22}:[A-Za-z0-9_-]{43}$/);
    assert.ok(!hash.includes("carol-password-789"));
    await using relay = relayFromEnv(upstream.url, { MC_RELAY_USERS: `carol:${hash}` });
    const response = await relay.call("/v1/models", { headers: { authorization: "Bearer carol:carol-password-789" } });
    assert.equal(response.status, 200);
  });

  await t.step({
    name: "hash-password on a terminal asks twice without echo, and refuses two different passwords",
    ignore: !installed("script"),
    fn: async () => {
      const run = async (first: string, second: string) => {
        const child = new Deno.Command("script", {
          args: ["-qec", `${Deno.execPath()} run -P --quiet main.ts hash-password`, "/dev/null"],
          cwd: here,
          env: processEnv({}),
          clearEnv: true,
          stdin: "piped",
          stdout: "piped",
          stderr: "piped",
        }).spawn();
        const writer = child.stdin.getWriter();
        await sleep(1500);
        await writer.write(encoder.encode(`${first}\r`));
        await sleep(300);
        await writer.write(encoder.encode(`${second}\r`));
        const output = await child.output();
        await writer.close().catch(() => {});
        return { code: output.code, text: decoder.decode(output.stdout) };
      };
      const same = await run("terminal-password-42", "terminal-password-42");
      assert.equal(same.code, 0, same.text);
      assert.match(same.text, /Password for MC_RELAY_USERS: /);
      assert.match(same.text, /The same password again: /);
      assert.match(same.text, /pbkdf2-sha256:600000:/);
      assert.ok(!same.text.includes("terminal-password-42"), "the password is never echoed");
      const differ = await run("terminal-password-42", "terminal-password-43");
      assert.notEqual(differ.code, 0);
      assert.match(differ.text, /the two passwords differ; nothing was printed/);
      assert.doesNotMatch(differ.text, /pbkdf2-sha256:/);
    },
  });
});

Deno.test("identity: lockout and client addresses [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "failed sign-ins are limited per user name and address: then 429 with Retry-After, before the password is checked",
    async () => {
      const clock = manualClock();
      const users = [{ name: USERNAME, password: CANARY_PASSWORD }, {
        name: "neighbour",
        password: "neighbour-pass-123",
      }];
      await using relay = startRelay(
        testConfig(upstream.url, { authFailuresPerMinute: 3, users }),
        undefined,
        clock.now,
      );
      const wrong = { authorization: `Bearer ${USERNAME}:guess` };
      for (let i = 0; i < 3; i++) assert.equal((await relay.call("/v1/models", { headers: wrong })).status, 401);
      const locked = await relay.call("/v1/models", { headers: wrong });
      assert.equal(locked.status, 429);
      assert.equal(locked.headers.get("retry-after"), "20");
      assert.deepEqual(locked.json().error, {
        message: "mc-relay: too many failed sign-ins for this user from this address; try again in 20 s",
        type: "rate_limit_error",
        code: "too_many_failed_sign_ins",
      });

      const before = upstream.requests.length;
      const right = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      assert.equal(right.status, 429, "a correct password for a locked-out name from that address still waits");
      assert.equal(upstream.requests.length, before);
      const neighbour = await relay.call("/v1/models", {
        headers: { authorization: "Bearer neighbour:neighbour-pass-123" },
      });
      assert.equal(neighbour.status, 200, "another user behind the same address is not locked out");

      clock.advance(20_000);
      assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
    },
  );

  await t.step(
    "X-Forwarded-For is ignored without TRUST_PROXY, so nobody escapes the lockout by forging it",
    async () => {
      await using relay = startRelay(testConfig(upstream.url, { authFailuresPerMinute: 2 }));
      for (const forged of ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) {
        await relay.call("/v1/models", { headers: { authorization: "Bearer team:guess", "x-forwarded-for": forged } });
      }
      const response = await relay.call("/v1/models", {
        headers: { authorization: GOOD_BEARER, "x-forwarded-for": "10.9.9.9" },
      });
      assert.equal(response.status, 429);
    },
  );

  await t.step(
    "with TRUST_PROXY the address is the proxy's X-Forwarded-For entry; entries left of it are not trusted",
    async () => {
      await using relay = startRelay(
        testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy: parseTrustProxyForTest("true") }),
      );
      const attempt = (forwardedFor: string, authorization = "Bearer team:guess") =>
        relay.call("/v1/models", { headers: { authorization, "x-forwarded-for": forwardedFor } });
      await attempt("forged-1, 203.0.113.7");
      await attempt("forged-2, 203.0.113.7");
      assert.equal((await attempt("forged-3, 203.0.113.7", GOOD_BEARER)).status, 429);
      assert.equal((await attempt("203.0.113.8", GOOD_BEARER)).status, 200, "another client is not locked out");
      assert.ok(relay.requestLogs().some((entry) => entry.client === "203.0.113.7"));
    },
  );

  await t.step(
    "60 wrong passwords at once for a hashed user: only the allowance is checked, and the right one still waits",
    async () => {
      const users = [await hashedUser("hashed", "the-right-password-1"), { name: "admin", password: CANARY_PASSWORD }];
      await using relay = startRelay(
        testConfig(upstream.url, { users, authFailuresPerMinute: 10, metricsUsers: ["admin"] }),
      );
      const attempt = (password: string) =>
        relay.call("/v1/models", { headers: { authorization: `Bearer hashed:${password}` } });
      const statuses = (await Promise.all(Array.from({ length: 60 }, (_, i) => attempt(`guess-${i}`))))
        .map((response) => response.status);
      assert.equal(statuses.filter((status) => status === 401).length, 10, `statuses: ${statuses}`);
      assert.equal(statuses.filter((status) => status === 429).length, 50);
      assert.equal((await attempt("the-right-password-1")).status, 429);
      const metrics = await relay.call("/metrics", { headers: { authorization: `Bearer admin:${CANARY_PASSWORD}` } });
      assert.equal(metricValue(metrics.text, "mc_relay_password_hash_checks_total"), 10, "ten checks, not sixty");
    },
  );

  await t.step("an unknown user name costs one password hash check, like a known one", async () => {
    const users = [await hashedUser("hashed", "the-right-password-1"), { name: "admin", password: CANARY_PASSWORD }];
    await using relay = startRelay(testConfig(upstream.url, { users, metricsUsers: ["admin"] }));
    const checks = async () =>
      metricValue(
        (await relay.call("/metrics", { headers: { authorization: `Bearer admin:${CANARY_PASSWORD}` } })).text,
        "mc_relay_password_hash_checks_total",
      );
    assert.equal((await relay.call("/v1/models", { headers: { authorization: "Bearer hashed:wrong" } })).status, 401);
    assert.equal(await checks(), 1);
    assert.equal((await relay.call("/v1/models", { headers: { authorization: "Bearer nobody:wrong" } })).status, 401);
    assert.equal(await checks(), 2, "the unknown name ran a decoy check");
  });

  await t.step(
    "a flood of sign-ins from many addresses is bounded (503) and never holds up a signed-in user",
    async () => {
      const users = [await hashedUser("hashed", "the-right-password-1")];
      const trustProxy = parseTrustProxyForTest("127.0.0.1");
      await using relay = startRelay(testConfig(upstream.url, { users, authFailuresPerMinute: 10, trustProxy }));
      const signedIn = { authorization: "Bearer hashed:the-right-password-1" };
      assert.equal((await relay.call("/v1/models", { headers: signedIn })).status, 200, "signed in once: remembered");
      let floodDone = false;
      const flood = Promise.all(
        Array.from({ length: 150 }, (_, i) =>
          relay.call("/v1/models", {
            headers: { authorization: `Bearer hashed:guess-${i}`, "x-forwarded-for": `198.51.100.${i}` },
          }).then((response) => response.status)),
      ).then((statuses) => {
        floodDone = true;
        return statuses;
      });
      await sleep(5);
      assert.equal((await relay.call("/v1/models", { headers: signedIn })).status, 200);
      assert.equal(floodDone, false, "the signed-in user was answered while the flood was still being checked");
      const statuses = await flood;
      assert.ok(statuses.includes(503), "checks past the queue are refused at once");
      assert.deepEqual([...new Set(statuses)].sort(), [401, 503]);
    },
  );

  await t.step(
    "IPv6 clients are counted by /64, and X-Forwarded-For counts only from TRUST_PROXY's addresses",
    async () => {
      const viaProxy = parseTrustProxyForTest("127.0.0.1");
      await using relay = startRelay(testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy: viaProxy }));
      const attempt = (address: string, authorization = "Bearer team:guess") =>
        relay.call("/v1/models", { headers: { authorization, "x-forwarded-for": address } });
      await attempt("2001:db8:1:2::1");
      await attempt("2001:db8:1:2::2");
      assert.equal((await attempt("2001:db8:1:2:ffff::99", GOOD_BEARER)).status, 429, "same /64");
      assert.equal((await attempt("2001:db8:1:3::1", GOOD_BEARER)).status, 200, "another /64");

      const otherProxy = parseTrustProxyForTest("10.0.0.0/8");
      await using direct = startRelay(testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy: otherProxy }));
      for (const forged of ["203.0.113.1", "203.0.113.2"]) {
        await direct.call("/v1/models", { headers: { authorization: "Bearer team:guess", "x-forwarded-for": forged } });
      }
      const locked = await direct.call("/v1/models", {
        headers: { authorization: GOOD_BEARER, "x-forwarded-for": "203.0.113.3" },
      });
      assert.equal(locked.status, 429, "a peer that is not a named proxy is counted as itself");
    },
  );

  await t.step("a full counter store never releases a locked-out client early", async () => {
    const clock = manualClock();
    const counters = new MemoryCounterStore(clock.now, 50);
    const trustProxy = parseTrustProxyForTest("127.0.0.1");
    await using relay = startRelay(
      testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy }),
      undefined,
      clock.now,
      { counters },
    );
    const attempt = (address: string, authorization = "Bearer team:guess") =>
      relay.call("/v1/models", { headers: { authorization, "x-forwarded-for": address } });
    await attempt("192.0.2.1");
    await attempt("192.0.2.1");
    for (let i = 0; i < 120; i++) await attempt(`198.51.100.${i}`);
    assert.equal((await attempt("192.0.2.1", GOOD_BEARER)).status, 429, "the victim's lockout outlived the flood");
    clock.advance(60_000);
    assert.equal((await attempt("192.0.2.1", GOOD_BEARER)).status, 200);
  });

  await t.step(
    "[security] a flood of unknown user names from one address leaves hashed sign-ins from other addresses working",
    async () => {
      await using upstream = startUpstream(openAiLikeUpstream);
      // A slow hash, as in production: each decoy check of the flood costs this much.
      const users = [await hashedUser("hashed", "the-right-password-1", 300_000)];
      await using relay = startRelay(
        testConfig(upstream.url, { users, trustProxy: parseTrustProxyForTest("127.0.0.1") }),
      );
      const fromAttacker = (i: number) =>
        relay.call("/v1/models", {
          headers: { authorization: `Bearer nobody-${i}:guess`, "x-forwarded-for": "198.51.100.66" },
        });
      const flood = Promise.all(Array.from({ length: 60 }, (_, i) => fromAttacker(i)));
      await sleep(30);
      const user = await relay.call("/v1/models", {
        headers: { authorization: "Bearer hashed:the-right-password-1", "x-forwarded-for": "203.0.113.5" },
      });
      assert.equal(user.status, 200, `the user from another address: ${user.text}`);
      const answers = await flood;
      const statuses = answers.map((answer) => answer.status);
      assert.deepEqual([...new Set(statuses)].sort(), [401, 429], `statuses: ${statuses}`);
      const refused = answers.find((answer) => answer.status === 429)!;
      assert.match(refused.json().error.message, /^mc-relay: too many sign-ins from this address/);
      assert.equal(refused.headers.get("retry-after"), "1");
    },
  );

  await t.step(
    "a dozen wrong passwords at once from one address are all checked: past its share of the hashing queue they wait",
    async () => {
      await using upstream = startUpstream(openAiLikeUpstream);
      const users = [await hashedUser("hashed", "the-right-password-1"), { name: "admin", password: CANARY_PASSWORD }];
      await using relay = startRelay(testConfig(upstream.url, { users, metricsUsers: ["admin"] }));
      const statuses = await Promise.all(
        Array.from(
          { length: 12 },
          (_, i) =>
            relay.call("/v1/models", { headers: { authorization: `Bearer hashed:guess-${i}` } }).then((r) => r.status),
        ),
      );
      assert.deepEqual(statuses, Array(12).fill(401), "a dozen at once from one address are all checked");
      const metrics = await relay.call("/metrics", { headers: { authorization: `Bearer admin:${CANARY_PASSWORD}` } });
      assert.equal(metricValue(metrics.text, "mc_relay_password_hash_checks_total"), 12);
    },
  );

  await t.step(
    "[security] with hashed users, a wrong plain password costs the same decoy hash check as an unknown name",
    async (t) => {
      await using upstream = startUpstream(openAiLikeUpstream);
      const users = [await hashedUser("hashed", "the-right-password-1"), { name: "admin", password: CANARY_PASSWORD }];
      for (const [store, counters] of [["memory", undefined], ["a remote store", remoteLikeStore()]] as const) {
        await t.step(`counted in ${store}`, async () => {
          const config: RelayConfig = testConfig(upstream.url, { users, metricsUsers: ["admin"] });
          await using relay = startRelay(config, undefined, undefined, { counters });
          const checks = async () =>
            metricValue(
              (await relay.call("/metrics", { headers: { authorization: `Bearer admin:${CANARY_PASSWORD}` } })).text,
              "mc_relay_password_hash_checks_total",
            );
          const signIn = (credentials: string) =>
            relay.call("/v1/models", { headers: { authorization: `Bearer ${credentials}` } });
          assert.equal(await checks(), 0);
          assert.equal((await signIn("nobody:wrong")).status, 401);
          assert.equal(await checks(), 1, "an unknown name: one decoy check");
          assert.equal((await signIn("admin:wrong")).status, 401);
          assert.equal(await checks(), 2, "a wrong plain password: one decoy check too");
          assert.equal((await signIn(`admin:${CANARY_PASSWORD}`)).status, 200);
          assert.equal(await checks(), 2, "the right plain password costs none");
        });
      }
    },
  );

  await t.step("without hashed users, a wrong plain password costs no hash check", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url, { metricsUsers: ["team"] }));
    assert.equal((await relay.call("/v1/models", { headers: { authorization: "Bearer team:wrong" } })).status, 401);
    const metrics = await relay.call("/metrics", { headers: { authorization: GOOD_BEARER } });
    assert.equal(metricValue(metrics.text, "mc_relay_password_hash_checks_total"), 0);
  });

  await t.step("[security] an X-Forwarded-For entry with a port is counted by its address alone", async () => {
    for (const trust of ["127.0.0.1", "true"]) {
      await using relay = startRelay(
        testConfig(upstream.url, { authFailuresPerMinute: 2, trustProxy: parseTrustProxyForTest(trust) }),
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

Deno.test("identity: a bare MC_RELAY_PASSWORD, as MC's Flask relay takes it [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const env = {
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_PASSWORD: CANARY_PASSWORD,
    ALLOWED_ORIGIN: ALLOWED,
  };
  const configFrom = (extra: Record<string, string>) => {
    const result = parseConfig({ ...env, ...extra });
    if (!result.ok) throw new Error(result.errors.join("\n"));
    return result.config;
  };
  const chat = (relay: ReturnType<typeof startRelay>, authorization: string, headers: Record<string, string> = {}) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization, "content-type": "application/json", origin: ALLOWED, ...headers },
      body: chatBody(),
    });

  await t.step("'Bearer <password>' is accepted without a user name; anything else gets 401", async () => {
    await using relay = startRelay(configFrom({}));
    assert.equal((await chat(relay, `Bearer ${CANARY_PASSWORD}`)).status, 200);
    for (const authorization of [`Bearer ${CANARY_PASSWORD}x`, "Bearer wrong", `Bearer x:${CANARY_PASSWORD}`]) {
      const refused = await chat(relay, authorization);
      assert.equal(refused.status, 401, authorization);
      assert.equal(refused.json().error.code, "invalid_api_key");
    }
    const missing = await chat(relay, "Bearer");
    assert.equal(missing.status, 401);
    assert.match(missing.json().error.message, /send 'Authorization: Bearer <password>' \(in MC: the API key field\)/);
    // Its holders are counted by address, and /usage says so: the relay's internal name for them shows nowhere.
    const usage = await relay.call("/usage", { headers: { authorization: `Bearer ${CANARY_PASSWORD}` } });
    assert.equal(usage.status, 200);
    assert.deepEqual(usage.json().caller, { anonymous: true });
    assert.doesNotMatch(usage.text, /relay;password/);
    await using budgeted = startRelay(configFrom({ TOKEN_BUDGET_PER_DAY: "1" }));
    assert.equal((await chat(budgeted, `Bearer ${CANARY_PASSWORD}`)).status, 200);
    const spent = await chat(budgeted, `Bearer ${CANARY_PASSWORD}`);
    assert.equal(spent.status, 429);
    assert.match(spent.json().error.message, /is used up for this address/);
  });

  await t.step("MC_RELAY_USERS work beside it, each with its own name:password", async () => {
    await using relay = startRelay(configFrom({ MC_RELAY_USERS: `alice:${CANARY_PASSWORD}-alice` }));
    assert.equal((await chat(relay, `Bearer ${CANARY_PASSWORD}`)).status, 200);
    assert.equal((await chat(relay, `Bearer alice:${CANARY_PASSWORD}-alice`)).status, 200);
    assert.equal((await chat(relay, `Bearer ${CANARY_PASSWORD}-alice`)).status, 401);
  });

  await t.step("wrong bare passwords use up the sign-in lockout like any failed sign-in", async () => {
    await using relay = startRelay({ ...configFrom({}), authFailuresPerMinute: 2 });
    for (let i = 0; i < 2; i++) assert.equal((await chat(relay, `Bearer guess-${i}`)).status, 401);
    assert.equal((await chat(relay, `Bearer guess-3`)).status, 429);
    assert.equal((await chat(relay, `Bearer ${CANARY_PASSWORD}`)).status, 429, "the lockout holds the right one too");
  });

  await t.step("its holders are limited per address, as MC's Flask relay limits them, not as one user", async () => {
    await using relay = startRelay(
      configFrom({ RATE_LIMIT_PER_MINUTE: "1", TRUST_PROXY: "127.0.0.1", AUTH_FAILURES_PER_MINUTE: "0" }),
    );
    const from = (address: string) => chat(relay, `Bearer ${CANARY_PASSWORD}`, { "x-forwarded-for": address });
    assert.equal((await from("192.0.2.1")).status, 200);
    assert.equal((await from("192.0.2.1")).status, 429);
    assert.equal((await from("192.0.2.2")).status, 200, "another address has its own limit");
  });

  await t.step("beside PUBLIC_ACCESS or a BYOK upstream it is a configuration error naming the fix", () => {
    const open = parseConfig({
      ...env,
      PUBLIC_ACCESS: "true",
      RATE_LIMIT_PER_MINUTE: "20",
      TOKEN_BUDGET_PER_DAY: "100000",
    });
    assert.ok(!open.ok && open.errors.some((error) => /PUBLIC_ACCESS=true opens it/.test(error)));
    const byok = parseConfig({
      ...env,
      UPSTREAMS_JSON: JSON.stringify([{ name: "own", baseUrl: "https://api.example.com/v1", byok: true }]),
    });
    assert.ok(!byok.ok && byok.errors.some((error) => /set MC_RELAY_USERNAME too/.test(error)));
    for (const result of [open, byok]) assert.ok(!JSON.stringify(result).includes(CANARY_PASSWORD));
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(500);
});
