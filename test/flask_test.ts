/**
 * A drop-in for MC's Flask relay (backend/relay/ in MC's repository): its environment names get a warning that
 * names mc-relay's equivalent, and `mc-relay migrate` turns its config.yaml into a .env the relay starts with.
 *
 * Proved through the real process and HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { FLASK_RELAY_VARS } from "../main.ts";
import {
  CANARY_KEY,
  CANARY_PASSWORD,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  seenByClientsOrLogs,
  spawnRelay,
  startUpstream,
} from "../testing.ts";

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

Deno.test("no secret ever appeared in anything the relay logged or returned in the Flask tests", () => {
  const seen = seenByClientsOrLogs.join("\n");
  for (const secret of [CANARY_KEY, CANARY_PASSWORD, minimalEnv.MC_RELAY_PASSWORD]) assert.ok(!seen.includes(secret));
});
