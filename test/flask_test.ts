/**
 * A drop-in for MC's Flask relay (backend/relay/ in MC's repository): its environment names get a warning that
 * names mc-relay's equivalent, and `mc-relay migrate` turns its config.yaml into a .env the relay starts with.
 *
 * Proved through the real process and HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { FLASK_RELAY_VARS } from "../main.ts";
import {
  ALLOWED,
  CANARY_KEY,
  CANARY_PASSWORD,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  runRelayProcess,
  seenByClientsOrLogs,
  spawnRelay,
  startUpstream,
} from "./testing.ts";

Deno.test("flask: the Flask relay's environment names", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step("each, in the environment or an env file, gets a start-up warning naming what to set", async () => {
    const folder = await Deno.makeTempDir({ prefix: "mc-relay-flask-env-" });
    await Deno.writeTextFile(`${folder}/flask.env`, "UPSTREAM_PATH_PREFIX=/openai\nRELAY_HOSTNAME=relay.example.com\n");
    const relay = await spawnRelay(
      { ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, ENABLE_MODELS_PROXY: "false", ENABLE_STREAMING: "true" },
      ["--env-file", `${folder}/flask.env`],
    );
    try {
      const models = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
      assert.equal(models.status, 200, "the relay starts and serves as configured");
      await models.body?.cancel();
      const warnings = relay.output().stdout.split("\n").filter((line) => line.includes("MC's Flask relay"));
      const expect: [string, RegExp][] = [
        ["ENABLE_MODELS_PROXY", /the environment sets ENABLE_MODELS_PROXY, .*DISABLED_PATHS=\/v1\/models/],
        ["ENABLE_STREAMING", /the environment sets ENABLE_STREAMING, .*always streams/],
        ["UPSTREAM_PATH_PREFIX", /flask\.env sets UPSTREAM_PATH_PREFIX, .*in UPSTREAM_BASE_URL/],
        ["RELAY_HOSTNAME", /flask\.env sets RELAY_HOSTNAME, .*PUBLIC_URL=/],
      ];
      for (const [name, pattern] of expect) {
        assert.ok(name in FLASK_RELAY_VARS);
        assert.ok(warnings.some((line) => pattern.test(line) && /"level":"warn"/.test(line)), name);
      }
      assert.equal(warnings.length, expect.length, "one warning each, nothing for the relay's own variables");
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
      await Deno.remove(folder, { recursive: true });
    }
  });
});

Deno.test("flask: mc-relay migrate on MC's config.example.yaml, then the relay started with its output", async (t) => {
  await using first = startUpstream(openAiLikeUpstream);
  await using second = startUpstream(openAiLikeUpstream);
  const fixture = await Deno.readTextFile(new URL("./fixtures/flask-config.example.yaml", import.meta.url));
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-migrate-" });
  /** The fixture with its first two endpoints at the fake upstreams, migrated, and the relay started on the .env. */
  const migrateAndStart = async (yaml: string) => {
    await Deno.writeTextFile(`${folder}/config.yaml`, yaml);
    const migrated = await runRelayProcess({}, ["migrate", `${folder}/config.yaml`]);
    assert.equal(migrated.code, 0, migrated.stderr);
    // Standard output is the .env, which is meant to hold the file's secrets; stderr stays under the canary check.
    seenByClientsOrLogs.splice(seenByClientsOrLogs.lastIndexOf(migrated.stdout), 1);
    await Deno.writeTextFile(`${folder}/.env`, migrated.stdout);
    const relay = await spawnRelay({}, ["--env-file", `${folder}/.env`]);
    return { migrated, relay };
  };
  const mcChat = (url: string, authorization: string, endpoint: string) =>
    fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      // What MC sends (mc-facts): axios headers, the endpoint setting, always an Authorization header.
      headers: {
        authorization,
        origin: ALLOWED,
        "content-type": "application/json",
        accept: "application/json, text/plain, */*",
        "x-relay-endpoint": endpoint,
      },
      body: JSON.stringify({
        model: "alias-fast",
        messages: [{ role: "user", content: "hi" }],
        temperature: 0.2,
        max_tokens: 5000,
      }),
    });
  const atFakes = fixture.replace("https://api.perplexity.ai", `${first.url}/v1`)
    .replace("https://api.openai.com/v1", `${second.url}/v1`);

  await t.step('an open Flask relay (relay_password "") answers MC\'s chat with an empty key field', async () => {
    const { migrated, relay } = await migrateAndStart(atFakes);
    try {
      for (const secret of ["pplx-YOUR", "sk-YOUR", "sk-or-YOUR", "YOUR_HELMHOLTZ", "YOUR_ACADEMICCLOUD"]) {
        assert.ok(!migrated.stderr.includes(secret), `no key on stderr: ${secret}`);
      }
      const answer = await mcChat(relay.url, "Bearer", `${first.url}/v1/`);
      assert.equal(answer.status, 200);
      assert.equal(answer.headers.get("access-control-allow-origin"), ALLOWED);
      assert.equal((await answer.json()).choices[0].message.content, "hi");
      assert.equal(first.requests.at(-1)!.headers.get("authorization"), "Bearer pplx-YOUR_PERPLEXITY_KEY_HERE");
      assert.equal(JSON.parse(first.requests.at(-1)!.body).max_tokens, 5000, "under max_request_tokens, unchanged");
      const routed = await mcChat(relay.url, "Bearer", `${second.url}/v1`);
      assert.equal(routed.status, 200, "the endpoint setting picks another endpoint, as it did");
      await routed.body?.cancel();
      assert.equal(second.requests.at(-1)!.headers.get("authorization"), "Bearer sk-YOUR_OPENAI_KEY_HERE");
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
    }
  });

  await t.step("a closed one takes its users' relay password as they send it today", async () => {
    const closed = atFakes.replace('relay_password: ""', `relay_password: "${CANARY_PASSWORD}"`);
    const { migrated, relay } = await migrateAndStart(closed);
    try {
      assert.ok(!migrated.stderr.includes(CANARY_PASSWORD), "the password goes to the .env only");
      const answer = await mcChat(relay.url, `Bearer ${CANARY_PASSWORD}`, `${first.url}/v1`);
      assert.equal(answer.status, 200);
      await answer.body?.cancel();
      const without = await mcChat(relay.url, "Bearer", `${first.url}/v1`);
      assert.equal(without.status, 401);
      assert.match((await without.json()).error.message, /in MC: the API key field/);
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
      await Deno.remove(folder, { recursive: true });
    }
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned in the Flask tests", () => {
  const seen = seenByClientsOrLogs.join("\n");
  for (const secret of [CANARY_KEY, CANARY_PASSWORD, minimalEnv.MC_RELAY_PASSWORD]) assert.ok(!seen.includes(secret));
});
