/**
 * The relay's own start needs nothing the tests need: `deno task start` and `deno task demo` run on a machine with
 * an empty Deno cache and no package registry (the tests' packages live in test/deno.lock, read by the test task only).
 */
import assert from "node:assert/strict";
import { freePort, minimalEnv, seenByClientsOrLogs, spawnRelay } from "../testing.ts";

const PROJECT = new URL("..", import.meta.url).pathname;

/** An empty Deno cache and a registry address where nothing listens: any package fetch fails at once. */
async function offline(): Promise<Record<string, string>> {
  return {
    DENO_DIR: await Deno.makeTempDir({ prefix: "mc-relay-empty-cache-" }),
    NPM_CONFIG_REGISTRY: "http://127.0.0.1:9/",
  };
}

Deno.test("setup: the relay starts with no package registry and an empty cache", async (t) => {
  for (const task of ["start", "demo"]) {
    await t.step(`deno task ${task} fetches nothing before it listens`, async () => {
      // The demo brings its own upstream and refuses a configured one.
      const config = task === "demo" ? {} : minimalEnv;
      const env = { ...config, ...await offline(), HOST: "127.0.0.1", PORT: String(freePort()) };
      const relay = await spawnRelay(env, [], { cwd: PROJECT, deno: ["task", task] });
      try {
        const health = await fetch(`${relay.url}/health`);
        assert.equal(health.status, 200);
        await health.body?.cancel();
        assert.doesNotMatch(relay.output().stderr, /Download|Failed caching/);
      } finally {
        relay.child.kill("SIGTERM");
        await relay.finished();
      }
    });
  }

  await t.step(
    "the relay's lock holds only what the relay may load (npm:redis for REDIS_URL, npm:yaml for 'mc-relay migrate'); the tests' packages are in test/deno.lock",
    async () => {
      const relayLock = JSON.parse(await Deno.readTextFile(`${PROJECT}deno.lock`));
      assert.deepEqual(Object.keys(relayLock.specifiers), ["npm:redis@5.12.1", "npm:yaml@2.9.1"]);
      const packages = Object.keys(relayLock.npm).map((name) => name.replace(/^(@?[^@]+)@.*$/, "$1"));
      assert.deepEqual(
        [...new Set(packages)].sort(),
        [
          "@redis/bloom",
          "@redis/client",
          "@redis/json",
          "@redis/search",
          "@redis/time-series",
          "cluster-key-slot",
          "redis",
          "yaml",
        ],
      );
      const testLock = JSON.parse(await Deno.readTextFile(`${PROJECT}test/deno.lock`));
      for (const name of ["npm:openai@7.57.0", "npm:playwright-core@1.65.1", "npm:redis@5.12.1", "npm:yaml@2.9.1"]) {
        assert.ok(name in testLock.specifiers, name);
      }
      const { lock, tasks } = JSON.parse(await Deno.readTextFile(`${PROJECT}deno.json`));
      // `deno task` installs every npm package of the lock its config names before it runs anything: so none is named,
      // and each task names its own.
      assert.equal(lock, false);
      for (const name of ["start", "dev", "demo"]) assert.match(tasks[name].command, /--lock=deno\.lock --frozen/);
      assert.match(tasks.test.command, /--lock=test\/deno\.lock --frozen/);
    },
  );
});

Deno.test("no secret ever appeared in anything the relay logged or returned in the setup tests", () => {
  const seen = seenByClientsOrLogs.join("\n");
  for (const secret of [minimalEnv.UPSTREAM_API_KEY, minimalEnv.MC_RELAY_PASSWORD]) assert.ok(!seen.includes(secret));
});
