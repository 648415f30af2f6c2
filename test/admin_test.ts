/**
 * The operator's view: /admin (the page: chart, callers, models, upstreams, health, refusals) and /admin/usage (the
 * ledger as JSON and CSV, as `mc-relay usage` prints it), for the users ADMINS names only.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { MemoryCounterStore, parseConfig, SqliteCounterStore, summariseUsage } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_PASSWORD,
  eventually,
  EVIL,
  GOOD_BEARER,
  minimalEnv,
  runRelayProcess,
  type SeenRequest,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
} from "./testing.ts";

const ADMIN_PASSWORD = "admin-password-9";
const ALICE_PASSWORD = "alice-password-9";
const ADMIN = `Bearer admin:${ADMIN_PASSWORD}`;
const ALICE = `Bearer alice:${ALICE_PASSWORD}`;

/** A model name a client chose to attack the page and a spreadsheet: markup, a formula, a terminal escape. */
const HOSTILE_MODEL = '=HYPERLINK("http://evil.example")<script>alert(1)</script>\x1b[31m';

/** An upstream whose usage depends on the model, so each row of the ledger has figures of its own. */
function usageByModel(_request: Request, seen: SeenRequest): Response {
  // The relay checks an upstream's model list (for /health and /admin): this one has one.
  if (seen.path === "/models") return Response.json({ object: "list", data: [{ id: "gpt-a", object: "model" }] });
  const model = JSON.parse(seen.body).model as string;
  const [prompt, completion] = model === "gpt-a" ? [7, 5] : model === "gpt-b" ? [20, 30] : [11, 2];
  return Response.json({
    id: "chatcmpl-1",
    object: "chat.completion",
    choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
  });
}

const users = [
  { name: USERNAME, password: CANARY_PASSWORD },
  { name: "alice", password: ALICE_PASSWORD, tokenBudgets: { month: 1000 } },
  { name: "admin", password: ADMIN_PASSWORD },
];

/** Sends one chat request for `model` with these credentials (none: anonymous) and returns the status. */
async function chatAs(url: string, authorization: string | undefined, model: string): Promise<number> {
  const response = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(authorization && { authorization }) },
    body: JSON.stringify({ model, messages: [{ role: "user", content: "hi" }] }),
  });
  await response.body?.cancel();
  return response.status;
}

/** The figures of a table row of the page, as the page formats them. */
function rowPattern(first: string, figures: number[]): RegExp {
  const cells = figures.map((value) => `<td class="num">${value.toLocaleString("en-US")}</td>`).join("");
  return new RegExp(`<tr><th scope="row">${first.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}</th>${cells}`);
}

Deno.test("admin: the page and the export from a SQLite ledger", async (t) => {
  await using upstream = startUpstream(usageByModel);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-admin-" });
  const statePath = `${folder}/state.db`;
  const counters = await SqliteCounterStore.open(statePath);
  const config = testConfig(upstream.url, {
    users,
    admins: ["admin"],
    statePath,
    tokenBudgetPerDay: 500,
    rateLimitPerMinute: 7,
  });
  await using relay = startRelay(config, undefined, undefined, { counters });
  for (let i = 0; i < 3; i++) assert.equal(await chatAs(relay.url, GOOD_BEARER, "gpt-a"), 200);
  assert.equal(await chatAs(relay.url, GOOD_BEARER, HOSTILE_MODEL), 200);
  for (let i = 0; i < 2; i++) assert.equal(await chatAs(relay.url, ALICE, "gpt-b"), 200);
  assert.equal(await chatAs(relay.url, "Bearer alice:wrong-password", "gpt-b"), 401);
  // team's rate limit (7 a minute): 4 used, 3 more pass, the next is refused.
  for (let i = 0; i < 3; i++) assert.equal(await chatAs(relay.url, GOOD_BEARER, "gpt-a"), 200);
  assert.equal(await chatAs(relay.url, GOOD_BEARER, "gpt-a"), 429);
  const today = new Date().toISOString().slice(0, 10);
  const monthStart = `${today.slice(0, 7)}-01`;
  const ledger = await counters.readUsage(monthStart, today);

  await t.step("an admin sees the chart and every caller with the ledger's figures", async () => {
    const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type")!, /^text\/html/);
    const csp = page.headers.get("content-security-policy")!;
    assert.match(csp, /default-src 'none'; style-src 'sha256-[^']+'/);
    assert.doesNotMatch(csp, /script-src|unsafe/, "no script, nothing inline but the hashed style");
    assert.equal(page.headers.get("cache-control"), "no-store");
    assert.doesNotMatch(page.text, /<script|https?:\/\/(?!evil)/i, "no script and no outside asset");
    assert.match(
      page.text,
      new RegExp(`<h2>Usage <span class="budget">${monthStart}</span> to <span class="budget">${today}</span></h2>`),
      "this UTC month by default",
    );
    assert.match(page.text, /<svg viewBox="0 0 \d+ 100"[^>]* role="img" aria-labelledby="tokens-title tokens-desc">/);
    assert.match(page.text, /<desc id="tokens-desc">\d[\d,]* in all from/);
    assert.match(page.text, new RegExp(`<title>${today}: 93 prompt, 92 completion</title>`), "today's bar");
    const callers = summariseUsage(ledger, "user");
    assert.deepEqual(callers.map((caller) => caller.key), ["user:alice", "user:team"]);
    for (const caller of callers) {
      const figures = [caller.requests, caller.prompt_tokens, caller.completion_tokens, caller.total_tokens];
      assert.match(page.text, rowPattern(caller.key, figures), `${caller.key}'s row has the ledger's figures`);
    }
    assert.match(
      page.text,
      /<th scope="row">user:team<\/th>(<td[^>]*>[^<]*<\/td>){4}<td><span class="budget">85 of 500 this day \(17%\)/,
    );
    assert.match(
      page.text,
      /user:alice<\/th>.*100 of 500 this day \(20%\)<\/span><br><span class="budget">100 of 1,000 this month \(10%\)/,
    );
    for (const sum of summariseUsage(ledger, "upstream")) {
      assert.match(page.text, rowPattern(sum.key, [sum.requests, sum.prompt_tokens, sum.completion_tokens]));
    }
    assert.match(page.text, rowPattern("gpt-b", [2, 40, 60, 100]), "per model");
    assert.match(page.text, /<caption id="callers-caption">/, "tables carry captions");
  });

  await t.step("[security] every name a client chose is escaped on the page", async () => {
    const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
    assert.ok(!page.text.includes("<script>alert"), "the model name's markup is not markup");
    assert.ok(!page.text.includes("\x1b"), "no terminal escape");
    assert.match(
      page.text,
      /=HYPERLINK\(&#34;http:\/\/evil\.example&#34;\)&#60;script&#62;alert\(1\)&#60;\/script&#62;\\x1b\[31m/,
    );
  });

  await t.step("refusals since the start, by reason: 401, and 429 by the limit that refused", async () => {
    const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
    assert.match(
      page.text,
      /<tr><th scope="row">401<\/th><td>no credentials, or wrong ones<\/td><td class="num">1<\/td>/,
    );
    assert.match(
      page.text,
      /<th scope="row">429<\/th><td>request limit \(RATE_LIMIT_PER_MINUTE[^<]*<\/td><td class="num">1</,
    );
    assert.match(page.text, /<th scope="row">504<\/th><td>none<\/td><td class="num">0</);
    assert.match(page.text, /SQLite \(STATE_PATH\), ok/);
    assert.match(
      page.text,
      /<th scope="row">default<\/th><td>127\.0\.0\.1:\d+<\/td><td>answering<\/td><td class="num">9<\/td><td class="num">0</,
    );
  });

  await t.step("[security] other users get 403, nobody signed in 401, and no figure is in either", async () => {
    const other = await relay.call("/admin", { headers: { authorization: ALICE } });
    assert.equal(other.status, 403);
    assert.match(other.json().error.message, /^mc-relay: this user may not open \/admin; ADMINS names who may$/);
    const otherUsage = await relay.call("/admin/usage", { headers: { authorization: GOOD_BEARER } });
    assert.equal(otherUsage.status, 403);
    const nobody = await relay.call("/admin");
    assert.equal(nobody.status, 401);
    assert.match(nobody.headers.get("www-authenticate")!, /^Basic realm="mc-relay"/, "a browser asks for a sign-in");
    const wrong = await relay.call("/admin/usage", { headers: { authorization: "Bearer admin:wrong" } });
    assert.equal(wrong.status, 401);
    const basic = await relay.call("/admin", {
      headers: { authorization: `Basic ${btoa(`admin:${ADMIN_PASSWORD}`)}` },
    });
    assert.equal(basic.status, 200, "Basic credentials sign in as on the API");
    for (const refused of [other, otherUsage, nobody, wrong]) {
      assert.ok(!/alice|gpt-|user:|tokens/.test(refused.text), `no figure in a refusal: ${refused.text}`);
    }
    const logs = relay.logs.join("\n");
    assert.ok(!logs.includes("user:alice") && !logs.includes('total_tokens":100'), "no figure in the log");
  });

  await t.step("the JSON and CSV match mc-relay usage for the same period", async () => {
    const env = { STATE_PATH: statePath };
    for (const by of ["user", "model", "upstream", "day"]) {
      const cli = await runRelayProcess(env, ["usage", "--since", monthStart, "--by", by, "--format", "json"]);
      assert.equal(cli.code, 0, cli.stderr);
      const json = await relay.call(`/admin/usage?since=${monthStart}&by=${by}`, { headers: { authorization: ADMIN } });
      assert.equal(json.status, 200);
      assert.equal(json.headers.get("content-type"), "application/json");
      assert.deepEqual(json.json(), JSON.parse(cli.stdout), `by ${by}`);
    }
    const cli = await runRelayProcess(env, ["usage", "--by", "model", "--format", "csv"]);
    const csv = await relay.call("/admin/usage?by=model&format=csv", { headers: { authorization: ADMIN } });
    assert.equal(csv.status, 200);
    assert.match(csv.headers.get("content-type")!, /^text\/csv/);
    assert.equal(csv.text, cli.stdout, "byte for byte what the CLI prints");
    assert.match(
      csv.text,
      /^"'=HYPERLINK\(""http:\/\/evil\.example""\)<script>alert\(1\)<\/script>\\x1b\[31m",1,11,2,13,0$/m,
    );
    const rows = JSON.parse(
      (await relay.call(`/admin/usage?since=${today}&until=${today}`, { headers: { authorization: ADMIN } })).text,
    ).rows;
    assert.deepEqual(rows.map((row: { user: string }) => row.user), ["user:alice", "user:team"]);
  });

  await t.step("a wrong query is a 400 naming the parameter; CORS for allowed origins like /usage", async () => {
    for (
      const query of [
        "since=yesterday",
        "by=colour",
        "format=table",
        "since=2026-02-30",
        "since=2026-05-02&until=2026-05-01",
        "colour=red",
      ]
    ) {
      const answer = await relay.call(`/admin/usage?${query}`, { headers: { authorization: ADMIN } });
      assert.equal(answer.status, 400, query);
      assert.match(answer.json().error.message, /^mc-relay: /);
    }
    const page = await relay.call("/admin?since=2026-05-02&until=2026-05-01", { headers: { authorization: ADMIN } });
    assert.equal(page.status, 400);
    const allowed = await relay.call("/admin/usage", { headers: { authorization: ADMIN, origin: ALLOWED } });
    assert.equal(allowed.headers.get("access-control-allow-origin"), ALLOWED);
    const evil = await relay.call("/admin/usage", { headers: { authorization: ADMIN, origin: EVIL } });
    assert.equal(evil.status, 403);
    assert.equal(evil.headers.get("access-control-allow-origin"), null);
  });

  await t.step("reading /admin counts against no request limit", async () => {
    for (let i = 0; i < 10; i++) {
      assert.equal((await relay.call("/admin", { headers: { authorization: ADMIN } })).status, 200);
    }
  });
  counters.close();
  await Deno.remove(folder, { recursive: true });
});

Deno.test("admin: a public relay lists addresses as the ledger has them", async () => {
  await using upstream = startUpstream(usageByModel);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-admin-" });
  const counters = await SqliteCounterStore.open(`${folder}/state.db`);
  const config = testConfig(upstream.url, {
    users,
    admins: ["admin"],
    statePath: `${folder}/state.db`,
    publicAccess: true,
    rateLimitPerMinute: 100,
    tokenBudgetPerDay: 1000,
  });
  await using relay = startRelay(config, undefined, undefined, { counters });
  assert.equal(await chatAs(relay.url, undefined, "gpt-a"), 200);
  assert.equal(await chatAs(relay.url, "Bearer ", "gpt-a"), 200);
  const anonymous = await relay.call("/admin");
  assert.equal(anonymous.status, 401, "an anonymous caller of a public relay is nobody here");
  const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
  assert.match(page.text, rowPattern("address:127.0.0.1", [2, 14, 10, 24]));
  assert.match(
    page.text,
    /address:127\.0\.0\.1<\/th>(<td[^>]*>[^<]*<\/td>){4}<td><span class="budget">24 of 1,000 this day \(2%\)/,
  );
  counters.close();
  await Deno.remove(folder, { recursive: true });
});

Deno.test("admin: in memory there is no ledger; the page says so and still shows refusals and health", async () => {
  await using upstream = startUpstream(usageByModel);
  const config = testConfig(upstream.url, { users, admins: ["admin"] });
  await using relay = startRelay(config, undefined, undefined, { counters: new MemoryCounterStore() });
  assert.equal(await chatAs(relay.url, GOOD_BEARER, "gpt-a"), 200);
  assert.equal(await chatAs(relay.url, "Bearer team:wrong", "gpt-a"), 401);
  const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
  assert.equal(page.status, 200);
  assert.match(page.text, /keeps no usage ledger[^<]*<code>STATE_PATH<\/code>[^<]*<code>REDIS_URL<\/code>/);
  assert.match(page.text, /memory \(no ledger\), ok/);
  assert.match(
    page.text,
    /<th scope="row">401<\/th><td>no credentials, or wrong ones<\/td><td class="num">1</,
  );
  const usage = await relay.call("/admin/usage", { headers: { authorization: ADMIN } });
  assert.equal(usage.status, 404);
  assert.match(usage.json().error.message, /keeps no usage ledger.*set STATE_PATH or REDIS_URL/);
});

Deno.test("admin: an upstream that does not answer its check shows so before any call fails", async () => {
  const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (closed.addr as Deno.NetAddr).port;
  closed.close();
  await using relay = startRelay(testConfig(`http://127.0.0.1:${port}/v1`, { users, admins: ["admin"] }));
  const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
  assert.equal(page.status, 200);
  assert.match(page.text, /not answering its check<\/strong> \(connection refused\)/);
});

Deno.test("admin: a client that leaves before the answer does not count as its upstream failing", async () => {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  await using upstream = startUpstream(async (request, seen) => {
    if (seen.path === "/models") return Response.json({ object: "list", data: [{ id: "gpt-a", object: "model" }] });
    await released;
    return usageByModel(request, seen);
  });
  await using relay = startRelay(testConfig(upstream.url, { users, admins: ["admin"] }));
  const leaving = new AbortController();
  const chat = fetch(`${relay.url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
    body: JSON.stringify({ model: "gpt-a", messages: [] }),
    signal: leaving.signal,
  }).catch(() => undefined);
  await eventually(2000, () => upstream.requests.some((seen) => seen.path === "/chat/completions"), "the chat began");
  leaving.abort();
  await chat;
  await eventually(2000, () => relay.requestLogs().some((line) => line.outcome === "client_gone"), "the relay saw it");
  release();
  const page = await relay.call("/admin", { headers: { authorization: ADMIN } });
  assert.match(
    page.text,
    /<th scope="row">default<\/th><td>[^<]+<\/td><td>[^<]*<\/td><td class="num">0<\/td><td class="num">0</,
  );
});

Deno.test("admin: ADMINS names configured users; without it /admin does not exist", async () => {
  const refused = parseConfig({ ...minimalEnv, ADMINS: "team,nobody" });
  assert.ok(!refused.ok);
  assert.match(
    refused.errors.join("\n"),
    /ADMINS must name configured users .*e\.g\. ADMINS=admin; "nobody" is not one/,
  );
  const accepted = parseConfig({ ...minimalEnv, ADMINS: "team" });
  assert.ok(accepted.ok);
  assert.deepEqual(accepted.config.admins, ["team"]);
  await using upstream = startUpstream(usageByModel);
  await using relay = startRelay(testConfig(upstream.url));
  assert.equal((await relay.call("/admin", { headers: { authorization: GOOD_BEARER } })).status, 404);
  assert.equal((await relay.call("/admin/usage", { headers: { authorization: GOOD_BEARER } })).status, 404);
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(50, { "the admin's password leaked": ADMIN_PASSWORD });
});
