/**
 * `migrateFlaskConfig`, the pure part of `mc-relay migrate`: MC's Flask relay's config.yaml (parsed) to .env lines
 * the relay starts with, and notes on what differs that carry no secret. The command itself, end to end, is in
 * test/flask_test.ts.
 */
import assert from "node:assert/strict";
import { parseEnv } from "node:util";
import { parse } from "npm:yaml@2.9.1";
import { envValue, migrateFlaskConfig, parseConfig } from "../main.ts";

const FIXTURE = new URL("../test/fixtures/flask-config.example.yaml", import.meta.url);

/** The .env lines as the relay reads them (`--env-file` parses with node:util parseEnv). */
const envOf = (lines: string[]) => parseEnv(lines.join("\n")) as Record<string, string>;

const endpoint = { name: "local", url: "http://127.0.0.1:8000/v1", api_key: "sk-SECRET-endpoint-key" };

Deno.test("migrate: MC's own config.example.yaml becomes a .env the relay starts with as it is", async () => {
  const { lines, notes, problems } = migrateFlaskConfig(parse(await Deno.readTextFile(FIXTURE), { version: "1.1" }));
  assert.deepEqual(problems, []);
  const env = envOf(lines);
  assert.equal(env.PUBLIC_ACCESS, "true", 'relay_password "" is an open relay');
  assert.equal(
    env.ALLOWED_ORIGIN,
    "https://www.metaconfigurator.org,https://metaconfigurator.github.io,http://localhost:5173",
  );
  assert.deepEqual(
    [env.RATE_LIMIT_PER_MINUTE, env.RATE_LIMIT_PER_HOUR, env.RATE_LIMIT_PER_DAY],
    ["20", "200", "1000"],
  );
  assert.equal(env.MAX_TOKENS_PER_REQUEST, "10000");
  assert.equal(env.TOKEN_BUDGET_PER_DAY, "100000");
  assert.equal(env.MAX_REQUEST_BYTES, "2097152");
  assert.equal(env.REQUEST_TIMEOUT_SECONDS, "180");
  assert.equal(env.LOG_LEVEL, "info");
  assert.equal(env.UPSTREAM_BASE_URL, "https://api.perplexity.ai");
  assert.equal(env.UPSTREAM_API_KEY, "pplx-YOUR_PERPLEXITY_KEY_HERE");
  const others = JSON.parse(env.UPSTREAMS_JSON);
  assert.deepEqual(others.map((entry: { name: string }) => entry.name), [
    "openai",
    "openrouter",
    "helmholtz-blablador",
    "academiccloud",
  ]);
  assert.deepEqual(others[1].extraHeaders, {
    "HTTP-Referer": "https://www.metaconfigurator.org",
    "X-Title": "MetaConfigurator",
  });
  const config = parseConfig(env);
  assert.ok(config.ok, config.ok ? "" : config.errors.join("\n"));
  assert.equal(config.config.upstreams.length, 5);
  for (const secret of ["pplx-YOUR", "sk-YOUR", "sk-or-YOUR", "YOUR_HELMHOLTZ"]) {
    assert.ok(!notes.join("\n").includes(secret), "no key in a note");
  }
});

Deno.test("migrate: relay_password becomes a bare MC_RELAY_PASSWORD, and stays out of every note", () => {
  const password = "pass'with'\"quotes\"#and-a-hash";
  const { lines, notes } = migrateFlaskConfig({ relay_password: password, allowed_origins: [], endpoints: [endpoint] });
  const env = envOf(lines);
  assert.equal(env.MC_RELAY_PASSWORD, password);
  assert.equal(env.MC_RELAY_USERNAME, undefined);
  assert.equal(env.PUBLIC_ACCESS, undefined);
  assert.equal(env.UPSTREAM_API_KEY, endpoint.api_key);
  const config = parseConfig(env);
  assert.ok(config.ok, config.ok ? "" : config.errors.join("\n"));
  for (const secret of [password, endpoint.api_key]) assert.ok(!notes.join("\n").includes(secret));
});

Deno.test("migrate: allowed_origins [] (any origin in Flask) gives MC's origins, commented, and says what to do", () => {
  const closed = migrateFlaskConfig({
    relay_password: "a-long-relay-password",
    allowed_origins: [],
    endpoints: [endpoint],
  });
  assert.equal(envOf(closed.lines).ALLOWED_ORIGIN, undefined, "never a wider list than the operator chose");
  const commented = closed.lines.find((line) => line.startsWith("# ALLOWED_ORIGIN="))!;
  for (
    const origin of ["https://www.metaconfigurator.org", "https://metaconfigurator.github.io", "http://localhost:5173"]
  ) {
    assert.ok(commented.includes(origin), origin);
  }
  assert.ok(closed.notes.some((note) => /never allows "\*".*uncomment ALLOWED_ORIGIN/.test(note)));
  const open = migrateFlaskConfig({ allowed_origins: [], endpoints: [endpoint] });
  assert.ok(
    open.notes.some((note) => /a public relay does not start without them, so uncomment ALLOWED_ORIGIN/.test(note)),
  );
  const uncommented = open.lines.map((line) => line.replace(/^# (ALLOWED_ORIGIN=)/, "$1"));
  assert.ok(parseConfig(envOf(uncommented)).ok, "uncommenting the line is all a public relay needs");
});

Deno.test("migrate: a public relay without rate limits or budget gets the lines to uncomment, named on stderr", () => {
  const { lines, notes } = migrateFlaskConfig({
    allowed_origins: ["https://mc.example.org"],
    rate_limits: { enabled: false },
    limits: { max_daily_tokens_per_ip: 0 },
    endpoints: [endpoint],
  });
  const env = envOf(lines);
  assert.equal(env.RATE_LIMIT_PER_MINUTE, undefined);
  assert.equal(env.TOKEN_BUDGET_PER_DAY, undefined);
  assert.ok(!parseConfig(env).ok, "as the notes say, it does not start so");
  assert.ok(notes.some((note) => /uncomment RATE_LIMIT_PER_MINUTE/.test(note)));
  assert.ok(notes.some((note) => /uncomment TOKEN_BUDGET_PER_DAY/.test(note)));
  const uncommented = lines.map((line) => line.replace(/^# ([A-Z_]+=)/, "$1"));
  assert.ok(parseConfig(envOf(uncommented)).ok);
});

Deno.test("migrate: keys the file leaves out take the Flask relay's defaults; the switches and log level map", () => {
  const { lines, notes } = migrateFlaskConfig({
    relay_password: "a-long-relay-password",
    enable_models_proxy: false,
    enable_streaming: false,
    log_level: "warning",
    surprise: 1,
    endpoints: [endpoint],
  });
  const env = envOf(lines);
  assert.deepEqual(
    [env.RATE_LIMIT_PER_MINUTE, env.RATE_LIMIT_PER_HOUR, env.RATE_LIMIT_PER_DAY, env.TOKEN_BUDGET_PER_DAY],
    ["10", "60", "200", "50000"],
  );
  assert.equal(env.DISABLED_PATHS, "/v1/models");
  assert.equal(env.LOG_LEVEL, "warn");
  assert.ok(notes.some((note) => /enable_streaming is false: mc-relay always streams/.test(note)));
  assert.ok(notes.some((note) => /"surprise" is no setting/.test(note)));
});

Deno.test("migrate: endpoints keep their auth header, raw-key prefix and extra headers", () => {
  const azure = {
    name: "azure openai",
    url: "https://res.openai.azure.com/openai/deployments/d/",
    api_key: "azure-SECRET",
    auth_header: "api-key",
    auth_prefix: "",
    extra_headers: { "X-Extra": "SECRET-header-value" },
  };
  const { lines, notes } = migrateFlaskConfig({
    relay_password: "a-long-relay-password",
    endpoints: [azure, { ...azure, name: "azure openai" }, { name: "ollama", url: "http://localhost:11434/v1" }],
  });
  const env = envOf(lines);
  assert.equal(env.UPSTREAM_BASE_URL, "https://res.openai.azure.com/openai/deployments/d");
  assert.equal(env.UPSTREAM_AUTH_HEADER, "api-key");
  assert.equal(env.UPSTREAM_AUTH_PREFIX, "", 'empty: the raw key, as auth_prefix "" was');
  assert.deepEqual(JSON.parse(env.UPSTREAM_EXTRA_HEADERS_JSON), azure.extra_headers);
  const others = JSON.parse(env.UPSTREAMS_JSON);
  assert.equal(others[0].name, "azure-openai-2", "renamed to a name UPSTREAMS_JSON accepts, and unique");
  assert.equal(others[1].apiKey, "none", "an endpoint without api_key gets a placeholder");
  const config = parseConfig(env);
  assert.ok(config.ok, config.ok ? "" : config.errors.join("\n"));
  assert.equal(config.config.upstreams[0].authPrefix, "");
  for (const secret of ["azure-SECRET", "SECRET-header-value"]) assert.ok(!notes.join("\n").includes(secret));
});

Deno.test("migrate: a relay_password with ':' or a space, which no caller could send as a bare password, is a problem", () => {
  for (const password of ["team:long-password-1", "long password 1"]) {
    const { lines, problems } = migrateFlaskConfig({ relay_password: password, endpoints: [endpoint] });
    assert.match(problems.join("\n"), /relay_password contains ':' or a space/);
    assert.ok(!problems.join("\n").includes(password), "the problem does not repeat the password");
    assert.ok(!lines.some((line) => line.startsWith("MC_RELAY_PASSWORD=")));
  }
});

Deno.test("migrate: a file the Flask relay would refuse gives problems and no .env", () => {
  assert.deepEqual(migrateFlaskConfig("just text").lines, []);
  assert.match(migrateFlaskConfig({ relay_password: "x" }).problems.join(), /no endpoints/);
  assert.match(migrateFlaskConfig({ endpoints: [{ name: "n" }] }).problems.join(), /entry 1 needs a "url"/);
});

Deno.test("migrate: values are quoted so that the relay's env-file parser reads them back as they were", () => {
  const values = [
    "plain",
    "a#b",
    "sp ace",
    "x'y",
    'x"y',
    "x`y'z",
    "$HOME",
    "a\\nb",
    "a\\nb'",
    '{"a":"b c"}',
    "=b==",
    "",
  ];
  for (const value of values) {
    const written = envValue(value)!;
    assert.equal(envOf([`K=${written}`, "L=after"]).K, value, written);
    assert.equal(envOf([`K=${written}`, "L=after"]).L, "after");
  }
  assert.equal(envValue("line\nbreak"), undefined);
  assert.equal(envValue(`all'"\`three`), undefined);
  assert.equal(envValue("a\\nb'`"), undefined, "double quotes would turn its \\n into a line break");
});
