/**
 * Bring your own key: a caller's provider key (raw or sealed) goes to its upstream and nowhere else.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { parseConfig } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_CALLER_KEY,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  GOOD_BEARER,
  manualClock,
  openAiLikeUpstream,
  runRelayProcess,
  startRelay,
  startUpstream,
  USERNAME,
} from "./testing.ts";

Deno.test("byok: bring your own key [security]", async (t) => {
  /** Answers as the model in the body says: ok, or a failure that echoes the caller's key in some form. */
  const echoing = startUpstream((request, seen) => {
    const model = seen.method === "POST" ? JSON.parse(seen.body).model as string : "list";
    const auth = request.headers.get("authorization") ?? request.headers.get("x-api-key") ??
      request.headers.get("api-key") ?? "";
    const key = auth.replace(/^Bearer /, "");
    switch (model) {
      case "echo-401":
        return Response.json({
          error: {
            message: `Incorrect API key ${key}; as JSON ${JSON.stringify(key).replaceAll("-", "\\u002d")}; base64 ${
              btoa(key)
            }`,
          },
        }, { status: 401 });
      case "echo-redirect":
        return new Response(null, {
          status: 302,
          headers: { location: `https://elsewhere.example/?key=${encodeURIComponent(key)}` },
        });
      case "echo-header":
        return new Response("{}", {
          status: 500,
          headers: { "x-debug-auth": auth, "www-authenticate": `Bearer error="${key}"` },
        });
      case "echo-gzip":
        return new Response(new Blob([key]).stream().pipeThrough(new CompressionStream("gzip")), {
          status: 403,
          headers: { "content-encoding": "gzip" },
        });
      case "echo-stream":
        return new Response(`data: {"error":"${key}"}\n\n`, {
          status: 401,
          headers: { "content-type": "text/event-stream" },
        });
      default:
        return openAiLikeUpstream(request, seen);
    }
  });
  await using _echoing = echoing;
  await using keyed = startUpstream(openAiLikeUpstream);
  const sealSecret = "seal-secret-for-tests-0123456789abcdef";
  const upstreamsJson = JSON.stringify([
    { name: "keyed", baseUrl: keyed.url, apiKey: CANARY_KEY },
    { name: "openai", baseUrl: `${echoing.url}/openai`, byok: true, keyPattern: "^sk-" },
    { name: "anthropic", baseUrl: `${echoing.url}/anthropic`, byok: true, authHeader: "x-api-key", authPrefix: "" },
    { name: "azure", baseUrl: `${echoing.url}/azure`, byok: true, authHeader: "api-key", authPrefix: "" },
  ]);
  const byokConfig = (env: Record<string, string> = {}) => {
    const result = parseConfig({
      UPSTREAMS_JSON: upstreamsJson,
      MC_RELAY_USERNAME: USERNAME,
      MC_RELAY_PASSWORD: CANARY_PASSWORD,
      SEAL_SECRET: sealSecret,
      ...env,
    });
    assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
    return { ...result.config, authFailuresPerMinute: 0, allowedOrigins: [ALLOWED] };
  };
  const clock = manualClock();
  await using relay = startRelay(byokConfig(), undefined, clock.now);
  const chat = (headers: Record<string, string>, model = "gpt-test", target = relay) =>
    target.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody({ model }),
    });
  const endpoint = (name: string) => ({ "x-relay-endpoint": name === "keyed" ? keyed.url : `${echoing.url}/${name}` });

  await t.step("a caller's key goes in each upstream's own header: Bearer, x-api-key, api-key", async () => {
    const cases: [string, Record<string, string>, string, string][] = [
      ["openai", { authorization: `Bearer ${CANARY_CALLER_KEY}` }, "authorization", `Bearer ${CANARY_CALLER_KEY}`],
      ["anthropic", { "x-api-key": CANARY_CALLER_KEY }, "x-api-key", CANARY_CALLER_KEY],
      ["azure", { authorization: `Bearer ${CANARY_CALLER_KEY}` }, "api-key", CANARY_CALLER_KEY],
    ];
    for (const [name, headers, header, value] of cases) {
      const response = await chat({ ...headers, ...endpoint(name) });
      assert.equal(response.status, 200, name);
      const seen = echoing.requests.at(-1)!;
      assert.equal(seen.path, `/${name}/chat/completions`);
      assert.equal(seen.headers.get(header), value, name);
      if (header !== "authorization") assert.equal(seen.headers.get("authorization"), null);
      assert.equal(seen.headers.get("x-relay-endpoint"), null);
    }
    assert.equal((await chat({ "x-api-key": CANARY_CALLER_KEY }, "anthropic/claude")).status, 200, "by model prefix");
    assert.equal(echoing.requests.at(-1)!.headers.get("x-api-key"), CANARY_CALLER_KEY);
    assert.equal(JSON.parse(echoing.requests.at(-1)!.body).model, "claude");
  });

  await t.step("a missing, malformed or other provider's key gets 401 before any upstream call", async () => {
    const before = echoing.requests.length;
    for (
      const [headers, message] of [
        [{}, /send your own key for the upstream "openai"/],
        [{ authorization: "Bearer " }, /send your own key/],
        [{ "x-api-key": "sk-has a space" }, /spaces, control or non-ASCII/],
        [{ "x-api-key": `sk-${"x".repeat(9000)}` }, /longer than 8192 characters/],
        [{ authorization: "Bearer gsk_a-groq-key" }, /not a key for the upstream "openai" \(its keys match \^sk-\)/],
      ] as [Record<string, string>, RegExp][]
    ) {
      const response = await chat({ ...headers, ...endpoint("openai") });
      assert.equal(response.status, 401, JSON.stringify(headers).slice(0, 80));
      assert.match(response.json().error.message, message);
      assert.equal(response.json().error.code, "invalid_api_key");
    }
    assert.equal(echoing.requests.length, before, "nothing left the relay");
  });

  await t.step(
    "beside a keyed upstream: the relay's key never goes to a BYOK one, a caller's key never to the keyed one",
    async () => {
      const keyedBefore = keyed.requests.length;
      const refused = await chat({ authorization: `Bearer ${CANARY_CALLER_KEY}`, ...endpoint("keyed") });
      assert.equal(refused.status, 401);
      assert.match(refused.json().error.message, /uses this relay's own key: sign in with username:password/);
      assert.equal(keyed.requests.length, keyedBefore);
      assert.equal(
        (await chat({ authorization: GOOD_BEARER, "x-api-key": CANARY_CALLER_KEY, ...endpoint("keyed") })).status,
        200,
      );
      const toKeyed = keyed.requests.at(-1)!;
      assert.equal(toKeyed.headers.get("authorization"), `Bearer ${CANARY_KEY}`);
      assert.ok(!JSON.stringify([...toKeyed.headers]).includes(CANARY_CALLER_KEY), "the caller's key stays away");
      assert.equal(
        (await chat({ authorization: GOOD_BEARER, "x-api-key": CANARY_CALLER_KEY, ...endpoint("openai") })).status,
        200,
      );
      assert.equal(
        echoing.requests.at(-1)!.headers.get("authorization"),
        `Bearer ${CANARY_CALLER_KEY}`,
        "a user's own key",
      );
      for (const seen of echoing.requests) {
        assert.ok(
          !JSON.stringify([...seen.headers]).includes(CANARY_KEY),
          "the relay's key never reached a BYOK upstream",
        );
      }
      const before = echoing.requests.length;
      assert.equal(
        (await chat({ authorization: "Bearer nobody:some-password", ...endpoint("openai") })).status,
        401,
        "name:password is sign-in",
      );
      assert.equal(echoing.requests.length, before);
    },
  );

  await t.step(
    "the caller's key is in no log line, error body, header or metric, whatever the upstream echoes",
    async () => {
      const key = CANARY_CALLER_KEY;
      const forms = [key, encodeURIComponent(key), btoa(key).slice(0, -4), key.replaceAll("-", "\\u002d")];
      for (const mode of ["echo-401", "echo-redirect", "echo-header", "echo-gzip", "echo-stream"]) {
        const response = await chat({ authorization: `Bearer ${key}`, ...endpoint("openai") }, mode);
        assert.ok(response.status >= 400, mode);
        const everything = `${response.text} ${JSON.stringify([...response.headers])}`;
        for (const form of forms) assert.ok(!everything.includes(form), `${mode}: ${everything}`);
      }
      await using withMetrics = startRelay({ ...byokConfig(), metricsUsers: [USERNAME] });
      await chat({ authorization: `Bearer ${key}`, ...endpoint("openai") }, "gpt-test", withMetrics);
      const metrics = await withMetrics.call("/metrics", { headers: { authorization: GOOD_BEARER } });
      for (const form of forms) assert.ok(!metrics.text.includes(form));
      const logs = [...relay.logs, ...withMetrics.logs].join("\n");
      for (const form of forms) assert.ok(!logs.includes(form), `the log holds ${form}`);
    },
  );

  await t.step("sealed keys: a round trip, tampering, another upstream, expiry and rotation", async () => {
    const seal = (body: unknown, target = relay) =>
      target.call("/seal", {
        method: "POST",
        headers: { "content-type": "application/json", origin: ALLOWED },
        body: JSON.stringify(body),
      });
    const made = await seal({ key: CANARY_CALLER_KEY, upstream: "openai", expiresInDays: 2 });
    assert.equal(made.status, 200);
    assert.equal(made.headers.get("access-control-allow-origin"), ALLOWED);
    const { sealed } = made.json();
    assert.match(sealed, /^mcrs1\.[A-Za-z0-9_-]+$/);
    assert.ok(!sealed.includes(CANARY_CALLER_KEY));
    assert.equal((await chat({ authorization: `Bearer ${sealed}`, ...endpoint("openai") })).status, 200);
    assert.equal(
      echoing.requests.at(-1)!.headers.get("authorization"),
      `Bearer ${CANARY_CALLER_KEY}`,
      "opened by the relay",
    );

    const tampered = sealed.slice(0, -6) + (sealed.at(-6) === "A" ? "B" : "A") + sealed.slice(-5);
    const before = echoing.requests.length;
    const broken = await chat({ authorization: `Bearer ${tampered}`, ...endpoint("openai") });
    assert.equal(broken.status, 401);
    assert.match(broken.json().error.message, /damaged/);
    const elsewhere = await chat({ authorization: `Bearer ${sealed}`, ...endpoint("anthropic") });
    assert.equal(elsewhere.status, 401);
    assert.match(elsewhere.json().error.message, /sealed key is for the upstream "openai", not "anthropic"/);
    clock.advance(2 * 86_400_000 + 1000);
    const expired = await chat({ authorization: `Bearer ${sealed}`, ...endpoint("openai") });
    assert.equal(expired.status, 401);
    assert.match(expired.json().error.message, /has expired/);
    assert.equal(echoing.requests.length, before, "no refused sealed key reached the upstream");

    const fresh = (await seal({ key: CANARY_CALLER_KEY, upstream: "azure" })).json().sealed;
    const rotatedSecret = "a-new-seal-secret-for-tests-9876543210";
    await using rotated = startRelay(byokConfig({ SEAL_SECRET: rotatedSecret }), undefined, clock.now);
    const revoked = await chat({ authorization: `Bearer ${fresh}`, ...endpoint("azure") }, "gpt-test", rotated);
    assert.equal(revoked.status, 401, "a new secret alone revokes every sealed key");
    await using rolling = startRelay(
      byokConfig({ SEAL_SECRET: rotatedSecret, SEAL_SECRETS_PREVIOUS: sealSecret }),
      undefined,
      clock.now,
    );
    assert.equal(
      (await chat({ authorization: `Bearer ${fresh}`, ...endpoint("azure") }, "gpt-test", rolling)).status,
      200,
    );
    const resealed = (await seal({ key: CANARY_CALLER_KEY, upstream: "azure" }, rolling)).json().sealed;
    assert.equal(
      (await chat({ authorization: `Bearer ${resealed}`, ...endpoint("azure") }, "gpt-test", rotated)).status,
      200,
      "new seals use the new secret",
    );
  });

  await t.step(
    "/seal checks what it seals and is limited per address; mc-relay seal does the same from a terminal",
    async () => {
      await using fresh = startRelay(byokConfig(), undefined, clock.now);
      const seal = (body: unknown) =>
        fresh.call("/seal", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
        });
      assert.match(
        (await seal({ key: "gsk_other", upstream: "openai" })).json().error.message,
        /not a key for the upstream "openai"/,
      );
      assert.match((await seal({ key: "sk-x", upstream: "keyed" })).json().error.message, /must name a BYOK upstream/);
      assert.match(
        (await seal({ key: "sk-x", upstream: "openai", expiresInDays: 0 })).json().error.message,
        /expiresInDays/,
      );
      const statuses = [];
      for (let i = 0; i < 10; i++) statuses.push((await seal({ key: "sk-x", upstream: "openai" })).status);
      assert.deepEqual(new Set(statuses), new Set([200, 429]));
      assert.equal(statuses.filter((status) => status === 200).length, 7, "ten a minute, three used above");

      const output = await runRelayProcess(
        { UPSTREAMS_JSON: upstreamsJson, SEAL_SECRET: sealSecret },
        ["seal", "--upstream", "openai", "--days", "30"],
        { input: `${CANARY_CALLER_KEY}\n` },
      );
      const sealed = output.stdout.trim();
      assert.equal(output.code, 0, output.stderr);
      assert.match(sealed, /^mcrs1\./);
      await using now = startRelay(byokConfig());
      assert.equal(
        (await chat({ authorization: `Bearer ${sealed}`, ...endpoint("openai") }, "gpt-test", now)).status,
        200,
      );
    },
  );

  await t.step(
    "a relay with only BYOK upstreams needs no users, and lists a BYOK upstream's models only when named",
    async () => {
      const result = parseConfig({
        UPSTREAMS_JSON: JSON.stringify([
          { name: "openai", baseUrl: `${echoing.url}/openai`, byok: true },
          { name: "groq", baseUrl: `${echoing.url}/groq`, byok: true },
        ]),
      });
      assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
      await using onlyByok = startRelay({ ...result.config, authFailuresPerMinute: 0 });
      const auth = { authorization: `Bearer ${CANARY_CALLER_KEY}` };
      const unnamed = await onlyByok.call("/v1/models", { headers: auth });
      assert.equal(unnamed.status, 400);
      assert.match(unnamed.json().error.message, /name the provider whose models to list with X-Relay-Endpoint/);
      const named = await onlyByok.call("/v1/models", {
        headers: { ...auth, "x-relay-endpoint": `${echoing.url}/groq` },
      });
      assert.equal(named.status, 200);
      assert.equal(echoing.requests.at(-1)!.path, "/groq/models");
      const bad = parseConfig({
        UPSTREAMS_JSON: JSON.stringify([{ name: "x", baseUrl: echoing.url, byok: true, apiKey: "sk-1" }]),
      });
      assert.ok(!bad.ok);
      assert.match(bad.errors.join("\n"), /is "byok": its callers bring their own key, so it has no "apiKey"/);
    },
  );
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(100);
});
