/**
 * The configuration: variables read at once with every problem named, the defaults, the permissions
 * deno.json grants, and secrets never repeated in an error.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { ENV_VARS, FLASK_RELAY_VARS, hashPassword, parseConfig, YAML_PACKAGE_VARS } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  embeddingsUpstream,
  minimalEnv,
  openAiLikeUpstream,
  OTHER_ALLOWED,
  runRelayProcess,
  spawnRelay,
  startUpstream,
  USERNAME,
} from "./testing.ts";

Deno.test("config: variables, defaults and errors", async (t) => {
  await t.step("a minimal environment gets the documented defaults", () => {
    const result = parseConfig(minimalEnv);
    assert.ok(result.ok);
    const { config } = result;
    assert.equal(config.upstreams.length, 1);
    assert.equal(config.upstreams[0].name, "default");
    assert.equal(config.upstreams[0].baseUrl, "https://api.openai.com/v1");
    assert.equal(config.port, 8080);
    assert.equal(config.host, "0.0.0.0");
    assert.equal(config.requestTimeoutMs, 180_000);
    assert.equal(config.maxRequestBytes, 32 * 1024 * 1024);
    assert.equal(config.upstreams[0].authHeader, "Authorization");
    assert.equal(config.upstreams[0].authPrefix, "Bearer");
    assert.equal(config.logLevel, "info");
    assert.deepEqual(config.allowedOrigins, []);
    assert.match(result.warnings.join("\n"), /ALLOWED_ORIGIN is not set: no browser origin/);
  });

  await t.step("several exact origins are accepted, comma-separated", () => {
    const result = parseConfig({
      ...minimalEnv,
      ALLOWED_ORIGIN: ` ${ALLOWED} , ${OTHER_ALLOWED},http://localhost:5173`,
    });
    assert.ok(result.ok);
    assert.deepEqual(result.config.allowedOrigins, [ALLOWED, OTHER_ALLOWED, "http://localhost:5173"]);
  });

  await t.step("an origin that is * or not an exact origin is refused", () => {
    for (
      const origin of [
        "*",
        "https://www.metaconfigurator.org/",
        "www.metaconfigurator.org",
        "https://x.org/path",
        "null",
        "ftp://x.org",
      ]
    ) {
      const result = parseConfig({ ...minimalEnv, ALLOWED_ORIGIN: origin });
      assert.ok(!result.ok, `ALLOWED_ORIGIN=${origin} should be refused`);
      assert.match(result.errors[0], /^ALLOWED_ORIGIN entries must be exact origins/);
    }
  });

  await t.step("every problem is reported at once, one line each, naming the variable", () => {
    const result = parseConfig({
      UPSTREAM_BASE_URL: "api.openai.com",
      PORT: "eighty",
      REQUEST_TIMEOUT_SECONDS: "0",
      MAX_REQUEST_BYTES: "-5",
      UPSTREAM_EXTRA_HEADERS_JSON: "{not json",
      UPSTREAM_AUTH_HEADER: "bad header",
      LOG_LEVEL: "loud",
      TLS_CERT_FILE: "/tmp/cert.pem",
    });
    assert.ok(!result.ok);
    const named = result.errors.map((line) => line.split(" ")[0]);
    assert.deepEqual(named, [
      "UPSTREAM_BASE_URL",
      "UPSTREAM_API_KEY",
      "UPSTREAM_AUTH_HEADER",
      "UPSTREAM_EXTRA_HEADERS_JSON",
      "MC_RELAY_USERNAME",
      "MC_RELAY_PASSWORD",
      "PORT",
      "REQUEST_TIMEOUT_SECONDS",
      "MAX_REQUEST_BYTES",
      "LOG_LEVEL",
      "TLS_CERT_FILE",
    ]);
    for (const line of result.errors) assert.ok(!line.includes("\n"));
    assert.match(result.errors.join("\n"), /e\.g\./);
  });

  await t.step("an empty UPSTREAM_AUTH_PREFIX means the raw key", () => {
    const result = parseConfig({ ...minimalEnv, UPSTREAM_AUTH_HEADER: "api-key", UPSTREAM_AUTH_PREFIX: "" });
    assert.ok(result.ok);
    assert.equal(result.config.upstreams[0].authHeader, "api-key");
    assert.equal(result.config.upstreams[0].authPrefix, "");
  });

  await t.step("a user name with a colon, a base URL with a query and reserved extra headers are refused", () => {
    const result = parseConfig({
      ...minimalEnv,
      MC_RELAY_USERNAME: "a:b",
      UPSTREAM_BASE_URL: "https://x.example/v1?api-version=1",
      UPSTREAM_EXTRA_HEADERS_JSON: '{"Host":"x","Content-Length":"1"}',
    });
    assert.ok(!result.ok);
    assert.equal(result.errors.length, 4);
  });

  await t.step("a start-up with bad configuration exits 1 naming every bad variable", async () => {
    const output = await runRelayProcess({ UPSTREAM_BASE_URL: "localhost:11434", PORT: "99999", ALLOWED_ORIGIN: "*" });
    assert.equal(output.code, 1);
    const lines = output.stderr.split("\n").filter((line) => line.startsWith("  "));
    assert.deepEqual(lines.map((line) => line.trim().split(" ")[0]), [
      "UPSTREAM_BASE_URL",
      "UPSTREAM_API_KEY",
      "MC_RELAY_USERNAME",
      "MC_RELAY_PASSWORD",
      "ALLOWED_ORIGIN",
      "PORT",
    ]);
    assert.doesNotMatch(output.stderr, /\bat .*main\.ts:\d+/, "no stack trace");
    assert.equal(output.stdout, "");
  });
});

Deno.test("config: deno.json and the Dockerfile", async (t) => {
  await t.step("deno.json grants exactly the environment variables the relay reads", async () => {
    const denoJson = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
    // Besides its own: the Flask relay's names, read only to warn about them, and the YAML package's (migrate).
    const read = [...ENV_VARS, ...Object.keys(FLASK_RELAY_VARS), ...YAML_PACKAGE_VARS];
    assert.deepEqual([...denoJson.permissions.default.env].sort(), read.sort());
  });

  await t.step(
    "start, dev, demo and every compile task take their permissions from the one set in deno.json",
    async () => {
      const { tasks } = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
      const commands = Object.entries(tasks as Record<string, { command?: string }>)
        .filter(([name]) => ["start", "dev", "demo"].includes(name) || name.startsWith("compile"))
        .filter(([, task]) => task.command !== undefined);
      assert.equal(commands.length, 9);
      for (const [name, task] of commands) {
        assert.match(task.command!, /^deno (run|compile) -P /, name);
        assert.doesNotMatch(task.command!, /--allow-|-A\b|--env-file=(?!\.env )/, name);
      }
      const dockerfile = await Deno.readTextFile(new URL("../Dockerfile", import.meta.url));
      assert.match(dockerfile, /deno task "compile:\$target"/);
      for (const target of ["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"]) {
        assert.ok(tasks[`compile:${target}`], `the Dockerfile's ${target} task exists`);
        assert.ok(dockerfile.includes(`target=${target}`));
      }
      assert.doesNotMatch(dockerfile, /^(ENV|ARG)\b.*(API_KEY|PASSWORD)/m, "no secret baked into the image");
      assert.doesNotMatch(dockerfile, /^(RUN|COPY)\b.*(\.env\b|--env-file)/m, "no .env baked into the image");
    },
  );
});

Deno.test("config: the release ships what the docs download", async (t) => {
  const read = (path: string) => Deno.readTextFile(new URL(`../${path}`, import.meta.url));

  await t.step(
    "release.yml attaches env.example and SHA256SUMS over every asset, and tags the image latest",
    async () => {
      const workflow = await read(".github/workflows/release.yml");
      assert.match(workflow, /cp examples\/\.env\.example dist\/env\.example/);
      assert.match(workflow, /sha256sum mc-relay-\* env\.example > SHA256SUMS/);
      assert.match(workflow, /files: dist\/\*/);
      assert.match(workflow, /type=raw,value=latest/);
    },
  );

  await t.step("the deploy docs download from releases/latest and run the image's latest tag", async () => {
    for (const path of ["docs/deploy.md", "README.md"]) {
      const text = await read(path);
      assert.match(text, /releases\/latest\/download\/env\.example/, path);
      assert.doesNotMatch(text, /releases\/download\/v\d/, `${path} names no fixed version to download`);
      assert.match(
        text,
        /docker run --rm -p 8080:8080 --env-file \.env .*ghcr\.io\/metaconfigurator\/mc-relay:latest/,
        path,
      );
      assert.match(text, /xattr -d com\.apple\.quarantine/, path);
      assert.match(text, /local network/i, path);
    }
  });
});

Deno.test("config: secrets in errors and risky settings [security]", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();

    await t.step("secret values are never repeated in an error", () => {
      const result = parseConfig({
        ...minimalEnv,
        UPSTREAM_BASE_URL: `https://user:${CANARY_KEY}@api.example.com/v1`,
        UPSTREAM_EXTRA_HEADERS_JSON: JSON.stringify({ "X-Secret": `${CANARY_EXTRA}\n`, Authorization: CANARY_EXTRA }),
        MC_RELAY_USERNAME: `a:${CANARY_PASSWORD}`,
      });
      assert.ok(!result.ok);
      assert.equal(result.errors.length, 4);
      for (const secret of [CANARY_KEY, CANARY_EXTRA, CANARY_PASSWORD]) {
        assert.ok(!result.errors.join("\n").includes(secret));
      }
    });

    await t.step("bad MC_RELAY_USERS entries are named by position, never with their secret", () => {
      const result = parseConfig({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        MC_RELAY_USERS:
          `alice:${CANARY_PASSWORD},nocolon${CANARY_PASSWORD},bob:pbkdf2-sha256:1:${CANARY_PASSWORD},alice:x2-${CANARY_PASSWORD}`,
      });
      assert.ok(!result.ok);
      assert.deepEqual(result.errors.map((line) => line.split(" has")[0].split(" must")[0]), [
        "MC_RELAY_USERS entry 2",
        "MC_RELAY_USERS entry 3",
        "MC_RELAY_USERS names a user twice: alice",
      ]);
      assert.ok(!result.errors.join("\n").includes(CANARY_PASSWORD));
    });

    await t.step("bad UPSTREAMS_JSON entries are named by position, never with their key", () => {
      const result = parseConfig({
        MC_RELAY_USERNAME: USERNAME,
        MC_RELAY_PASSWORD: CANARY_PASSWORD,
        UPSTREAMS_JSON: JSON.stringify([
          { name: "ok", baseUrl: "https://a.example/v1", apiKey: CANARY_KEY },
          { name: "bad name!", baseUrl: "ftp://b.example", apiKey: `${CANARY_KEY}\u0007` },
          {
            name: "ok",
            baseUrl: "https://c.example/v1",
            apiKey: CANARY_KEY,
            extraHeaders: { Authorization: CANARY_KEY },
          },
        ]),
      });
      assert.ok(!result.ok);
      assert.deepEqual(result.errors.map((line) => line.split(" ").slice(0, 4).join(" ")), [
        "UPSTREAMS_JSON entry 2 needs",
        "UPSTREAMS_JSON entry 2 baseUrl",
        "UPSTREAMS_JSON entry 2 apiKey",
        "UPSTREAMS_JSON entry 3 extraHeaders",
        "UPSTREAMS_JSON names an upstream",
      ]);
      assert.ok(!result.errors.join("\n").includes(CANARY_KEY));
    });

    await t.step("REDIS_URL wins over STATE_PATH with a warning, and a bad REDIS_URL is never repeated", () => {
      const both = parseConfig({ ...minimalEnv, STATE_PATH: "/data/state.db", REDIS_URL: "redis://127.0.0.1:6379" });
      assert.ok(both.ok);
      assert.equal(both.config.statePath, undefined);
      assert.match(both.warnings.join("\n"), /STATE_PATH is ignored: REDIS_URL is set/);
      const bad = parseConfig({ ...minimalEnv, REDIS_URL: "http://:CANARY-redis-secret@host" });
      assert.ok(!bad.ok);
      assert.match(bad.errors[0], /^REDIS_URL must be a redis:\/\/ or rediss:\/\/ URL/);
      assert.ok(!bad.errors.join("").includes("CANARY-redis-secret"));
    });
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);

    await t.step("the shipped compose + Caddy setup and a local keyless upstream start without warnings", async () => {
      const { parseEnv } = await import("node:util");
      const { parse } = await import("npm:yaml@2.9.1");
      const dotEnv = parseEnv(await Deno.readTextFile(new URL("../examples/.env.example", import.meta.url)));
      // The image's own ENV lines, under the .env and compose's environment as Docker layers them.
      const dockerfile = await Deno.readTextFile(new URL("../Dockerfile", import.meta.url));
      const image = Object.fromEntries(
        [...dockerfile.matchAll(/^ENV (.+)$/gm)].flatMap((line) => line[1].split(" ").map((pair) => pair.split("="))),
      );
      for (const file of ["docker-compose.yml", "docker-compose.redis.yml"]) {
        const compose = parse(await Deno.readTextFile(new URL(`../examples/${file}`, import.meta.url)));
        const service = compose.services["mc-relay"] ?? compose.services["relay-1"];
        // Compose fills ${MC_RELAY_DOMAIN:?...} from the shell, as the file's header says to run it.
        const environment = Object.fromEntries(
          Object.entries(service.environment as Record<string, string>).map((
            [name, value],
          ) => [name, String(value).replace(/\$\{MC_RELAY_DOMAIN[^}]*\}/, "relay.example.com")]),
        );
        const result = parseConfig({ ...image, ...dotEnv, ...environment });
        assert.ok(result.ok, file);
        assert.equal(result.config.publicUrl, "https://relay.example.com", `${file} passes PUBLIC_URL`);
        assert.deepEqual(result.warnings, [], file);
      }
      const local = { ...minimalEnv, HOST: "127.0.0.1", ALLOWED_ORIGIN: ALLOWED };
      for (
        const [url, key] of [
          ["http://10.0.0.5:8000/v1", "none"],
          ["http://vllm:8000/v1", "EMPTY"],
          ["http://192.168.1.20:11434/v1", "ollama"],
          ["http://[fd00::5]:8000/v1", "none"],
        ]
      ) {
        const result = parseConfig({ ...local, UPSTREAM_BASE_URL: url, UPSTREAM_API_KEY: key });
        assert.ok(result.ok);
        assert.deepEqual(result.warnings, [], `${url} with ${key}`);
      }
      const keyed = parseConfig({ ...local, UPSTREAM_BASE_URL: "http://10.0.0.5:8000/v1" });
      assert.ok(keyed.ok);
      assert.match(keyed.warnings.join(), /uses http:\/\/ to 10\.0\.0\.5:8000: the provider key travels/);
      const named = parseConfig({
        ...local,
        HOST: "0.0.0.0",
        TRUST_PROXY: "10.0.0.2",
        TLS_CERT_FILE: "c",
        TLS_KEY_FILE: "k",
      });
      assert.ok(named.ok);
      assert.deepEqual(named.warnings, [], "TRUST_PROXY naming the proxy is what the warning asks for");
      const exposed = parseConfig({ ...local, HOST: "0.0.0.0", TRUST_PROXY: "true" });
      assert.ok(exposed.ok);
      assert.match(exposed.warnings.join(), /TRUST_PROXY is set while HOST=0\.0\.0\.0/);
      assert.match(exposed.warnings.join(), /HOST=0\.0\.0\.0 without TLS_CERT_FILE/);
    });

    await t.step("risky configurations start with a warning naming the variable", async () => {
      const result = parseConfig({
        ...minimalEnv,
        UPSTREAM_BASE_URL: "http://llm.internal.example/v1",
        ALLOWED_ORIGIN: "http://mc.example.org",
        AUTH_FAILURES_PER_MINUTE: "0",
        TRUST_PROXY: "true",
        HOST: "0.0.0.0",
        METRICS_PORT: "9464",
        METRICS_HOST: "0.0.0.0",
        MC_RELAY_USERS: `weak:${await hashPassword("weak-hash-password", 1000)},same:same`,
      });
      assert.ok(result.ok);
      const warnings = result.warnings.join("\n");
      for (
        const expected of [
          /UPSTREAM_BASE_URL uses http:\/\/ to llm\.internal\.example/,
          /ALLOWED_ORIGIN allows http:\/\/mc\.example\.org/,
          /AUTH_FAILURES_PER_MINUTE=0/,
          /TRUST_PROXY is set while HOST=0\.0\.0\.0/,
          /METRICS_HOST=0\.0\.0\.0/,
          /user weak has a PBKDF2 hash of 1000 iterations/,
          /password of user same equals the user name/,
          /HOST=0\.0\.0\.0 without TLS_CERT_FILE/,
        ]
      ) assert.match(warnings, expected);
      assert.ok(!warnings.includes(CANARY_KEY) && !warnings.includes(CANARY_PASSWORD));
      const quiet = parseConfig({ ...minimalEnv, HOST: "127.0.0.1", ALLOWED_ORIGIN: "http://localhost:5173" });
      assert.ok(quiet.ok);
      assert.deepEqual(quiet.warnings, [], "a local setup starts without warnings");
      const process = await spawnRelay({
        ...minimalEnv,
        UPSTREAM_BASE_URL: upstream.url,
        AUTH_FAILURES_PER_MINUTE: "0",
      });
      process.child.kill("SIGTERM");
      await process.finished();
      assert.match(process.output().stdout, /"level":"warn","msg":"AUTH_FAILURES_PER_MINUTE=0/);
    });
  }
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(3);
});
