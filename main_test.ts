/**
 * The relay's specification, proved through its real HTTP surface: the handler
 * served by `Deno.serve` on an ephemeral port, a fake upstream on another, and
 * real `fetch` (or raw TCP where `fetch` would tidy the request up first).
 *
 * Every test runs with recognisable fake secrets; the last test checks that
 * none of them ever appeared in anything the relay logged or returned.
 */
import assert from "node:assert/strict";
import {
  constantTimeEqual,
  ENV_VARS,
  hashPassword,
  MemoryCounterStore,
  parseConfig,
  parsePasswordHash,
  readCredentials,
  type RelayConfig,
  ThreadLock,
  type TrustedProxies,
  type Upstream,
} from "./main.ts";
import {
  ALLOWED,
  CANARY_CALLER_KEY,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  decoder,
  encoder,
  EVIL,
  freePort,
  GOOD_BEARER,
  IN_CI,
  installed,
  minimalEnv,
  openAiLikeUpstream,
  OTHER_ALLOWED,
  processEnv,
  rawRequest,
  rawUpstream,
  runRelayProcess,
  seenByClientsOrLogs,
  selfSignedCertificate,
  sleep,
  spawnRelay,
  startRedis,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  USERNAME,
  within,
} from "./testing.ts";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/** TRUST_PROXY as parseConfig reads it. */
function parseTrustProxyForTest(value: string): TrustedProxies {
  const result = parseConfig({ ...minimalEnv, TRUST_PROXY: value });
  assert.ok(result.ok);
  return result.config.trustProxy;
}

Deno.test("configuration", async (t) => {
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

  await t.step("deno.json grants exactly the environment variables the relay reads", async () => {
    const denoJson = JSON.parse(await Deno.readTextFile(new URL("./deno.json", import.meta.url)));
    assert.deepEqual([...denoJson.permissions.default.env].sort(), [...ENV_VARS].sort());
  });

  await t.step(
    "start, dev, demo and every compile task take their permissions from the one set in deno.json",
    async () => {
      const { tasks } = JSON.parse(await Deno.readTextFile(new URL("./deno.json", import.meta.url)));
      const commands = Object.entries(tasks as Record<string, { command?: string }>)
        .filter(([name]) => ["start", "dev", "demo"].includes(name) || name.startsWith("compile"))
        .filter(([, task]) => task.command !== undefined);
      assert.equal(commands.length, 9);
      for (const [name, task] of commands) {
        assert.match(task.command!, /^deno (run|compile) -P /, name);
        assert.doesNotMatch(task.command!, /--allow-|-A\b|--env-file=(?!\.env )/, name);
      }
      const dockerfile = await Deno.readTextFile(new URL("./Dockerfile", import.meta.url));
      assert.match(dockerfile, /deno task "compile:\$target"/);
      for (const target of ["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"]) {
        assert.ok(tasks[`compile:${target}`], `the Dockerfile's ${target} task exists`);
        assert.ok(dockerfile.includes(`target=${target}`));
      }
      assert.doesNotMatch(dockerfile, /^(ENV|ARG)\b.*(API_KEY|PASSWORD)/m, "no secret baked into the image");
      assert.doesNotMatch(dockerfile, /^(RUN|COPY)\b.*(\.env\b|--env-file)/m, "no .env baked into the image");
    },
  );

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

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

Deno.test("routes", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(`${upstream.url}/api/v1`));
  const auth = { authorization: GOOD_BEARER };

  await t.step("GET /health answers ok without credentials and never calls the upstream", async () => {
    const response = await relay.call("/health");
    assert.equal(response.status, 200);
    assert.deepEqual(response.json(), { status: "ok", ok: true, endpoints: 1, state: "ok" });
    assert.equal(upstream.requests.length, 0);
  });

  await t.step("GET /v1/models maps to UPSTREAM_BASE_URL + /models", async () => {
    const response = await relay.call("/v1/models", { headers: auth });
    assert.equal(response.status, 200);
    assert.equal(response.json().data[0].id, "gpt-test");
    assert.equal(upstream.requests.at(-1)!.path, "/api/v1/models");
    assert.equal(upstream.requests.at(-1)!.method, "GET");
  });

  await t.step("POST /v1/chat/completions passes body, status and headers through unchanged", async () => {
    const body = chatBody({ temperature: 0.2 });
    const response = await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { ...auth, "content-type": "application/json" },
      body,
    });
    assert.equal(response.status, 200);
    assert.equal(upstream.requests.at(-1)!.path, "/api/v1/chat/completions");
    assert.equal(upstream.requests.at(-1)!.body, body);
    assert.equal(response.json().echo.body, body);
    assert.equal(response.headers.get("x-request-id"), "req_upstream_1");
    assert.equal(response.headers.get("content-type"), "application/json");
    assert.match(response.headers.get("x-relay-request-id") ?? "", /^[0-9a-f-]{36}$/);
  });

  await t.step("the query string is passed to the upstream", async () => {
    await relay.call("/v1/models?limit=5", { headers: auth });
    assert.equal(upstream.requests.at(-1)!.search, "?limit=5");
  });

  await t.step("any other path is 404 in OpenAI's error shape", async () => {
    const before = upstream.requests.length;
    for (const path of ["/v1", "/v1/files", "/v1/models/", "/V1/models", "/admin"]) {
      const response = await relay.call(path, { headers: auth });
      assert.equal(response.status, 404, path);
      assert.equal(response.json().error.code, "unknown_url");
      assert.equal(typeof response.json().error.message, "string");
      assert.equal(response.json().error.type, "invalid_request_error");
    }
    assert.equal(upstream.requests.length, before);
  });

  await t.step("a known path with another method is 405 with Allow", async () => {
    const post = await relay.call("/v1/models", { method: "POST", headers: auth, body: "{}" });
    assert.equal(post.status, 405);
    assert.equal(post.headers.get("allow"), "GET, OPTIONS");
    const get = await relay.call("/v1/chat/completions", { headers: auth });
    assert.equal(get.status, 405);
    assert.equal(get.headers.get("allow"), "POST, OPTIONS");
    const del = await relay.call("/health", { method: "DELETE" });
    assert.equal(del.status, 405);
  });

  await t.step(
    "dot segments, encoded dots, double slashes and absolute targets never reach another path or host",
    async () => {
      const before = upstream.requests.length;
      const attacks = [
        "/v1/models/../../admin",
        "/v1/%2e%2e/%2e%2e/etc/passwd",
        "/v1/chat/completions/..%2f..%2fadmin",
        "/v1/%2E%2E/models",
        "//evil.example/v1/models",
        "/v1//models",
        "/v1/models%2f..",
        "/v1/models%00",
        "/v1/models;x",
        "/v1\\..\\..\\admin",
        "/%76%31/models",
        "http://evil.example/admin",
      ];
      for (const target of attacks) {
        const response = await rawRequest(
          relay.port,
          `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${GOOD_BEARER}\r\nConnection: close`,
        );
        assert.ok(response.status === 404 || response.status === 400, `${target} gave ${response.status}`);
      }
      assert.equal(upstream.requests.length, before, "no attack reached the upstream");
    },
  );

  await t.step(
    "a path that normalises to a real route is served as that route, at the configured upstream only",
    async () => {
      const response = await rawRequest(
        relay.port,
        `GET /v1/chat/../models HTTP/1.1\r\nHost: evil.example\r\nAuthorization: ${GOOD_BEARER}\r\nConnection: close`,
      );
      assert.equal(response.status, 200);
      assert.equal(upstream.requests.at(-1)!.path, "/api/v1/models");
    },
  );
});

// ---------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------

Deno.test("auth", async (t) => {
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

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

Deno.test("cors", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100 }));
  const preflight = (origin: string, requestHeaders: string, extra: Record<string, string> = {}) =>
    relay.call("/v1/chat/completions", {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": requestHeaders,
        ...extra,
      },
    });

  await t.step("a preflight from an allowed origin is answered before auth, echoing the origin", async () => {
    const response = await preflight(ALLOWED, "authorization,content-type,x-relay-endpoint");
    assert.equal(response.status, 204);
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.equal(response.headers.get("vary"), "Origin");
    assert.equal(response.headers.get("access-control-allow-methods"), "GET, POST, OPTIONS");
    const allowed = response.headers.get("access-control-allow-headers")!.split(", ");
    for (const name of ["authorization", "content-type", "x-relay-endpoint"]) assert.ok(allowed.includes(name), name);
    assert.ok(Number(response.headers.get("access-control-max-age")) > 0);
    assert.equal(upstream.requests.length, 0);
  });

  await t.step(
    "the OpenAI SDK's x-stainless-* and openai-* headers pass the preflight; unknown ones do not",
    async () => {
      const response = await preflight(
        OTHER_ALLOWED,
        "authorization,content-type,x-stainless-os,x-stainless-retry-count,openai-organization,x-custom-header",
      );
      assert.equal(response.headers.get("access-control-allow-origin"), OTHER_ALLOWED);
      const allowed = response.headers.get("access-control-allow-headers")!.split(", ");
      for (const name of ["x-stainless-os", "x-stainless-retry-count", "openai-organization"]) {
        assert.ok(allowed.includes(name), name);
      }
      assert.ok(!allowed.includes("x-custom-header"));
    },
  );

  await t.step("a Private Network Access preflight is allowed for allowed origins", async () => {
    const response = await preflight(ALLOWED, "authorization", { "access-control-request-private-network": "true" });
    assert.equal(response.headers.get("access-control-allow-private-network"), "true");
  });

  await t.step("a preflight from a disallowed origin gets no CORS headers at all", async () => {
    const response = await preflight(EVIL, "authorization,content-type");
    assert.equal(response.status, 403);
    for (const [name] of response.headers) assert.ok(!name.startsWith("access-control-"), name);
  });

  await t.step(
    "a request from a disallowed origin gets 403 without CORS headers and never reaches the upstream",
    async () => {
      for (const origin of [EVIL, "null", `${ALLOWED}.evil.example`, "http://www.metaconfigurator.org"]) {
        const response = await relay.call("/v1/models", { headers: { origin, authorization: GOOD_BEARER } });
        assert.equal(response.status, 403, origin);
        assert.equal(response.headers.get("access-control-allow-origin"), null);
      }
      assert.equal(upstream.requests.length, 0);
    },
  );

  await t.step("responses to an allowed origin echo it with Vary: Origin", async () => {
    const response = await relay.call("/v1/models", { headers: { origin: ALLOWED, authorization: GOOD_BEARER } });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.equal(response.headers.get("vary"), "Origin");
    assert.match(response.headers.get("access-control-expose-headers")!, /x-relay-request-id/);
  });

  await t.step("an upstream's own Vary is kept, with Origin added", async () => {
    await using varying = startUpstream(() =>
      new Response('{"data":[]}', { headers: { "content-type": "application/json", vary: "Authorization" } })
    );
    await using varyingRelay = startRelay(testConfig(varying.url));
    const response = await varyingRelay.call("/v1/models", {
      headers: { origin: ALLOWED, authorization: GOOD_BEARER },
    });
    assert.equal(response.headers.get("vary"), "Authorization, Origin");
  });

  await t.step("errors carry CORS headers too, so the page can show them (401, 404, 405, 413, 502)", async () => {
    await using unreachable = startRelay(testConfig("http://127.0.0.1:1/v1"));
    const cases: [string, RequestInit, number][] = [
      [`${relay.url}/v1/models`, { headers: { authorization: "Bearer team:wrong" } }, 401],
      [`${relay.url}/v2/nothing`, {}, 404],
      [`${relay.url}/v1/models`, { method: "DELETE" }, 405],
      [`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER },
        body: "x".repeat(101),
      }, 413],
      [`${unreachable.url}/v1/models`, { headers: { authorization: GOOD_BEARER } }, 502],
    ];
    for (const [url, init, status] of cases) {
      const response = await fetch(url, { ...init, headers: { ...init.headers, origin: ALLOWED } });
      seenByClientsOrLogs.push(await response.text());
      assert.equal(response.status, status, url);
      assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED, `${status}`);
      assert.equal(response.headers.get("vary"), "Origin");
    }
  });

  await t.step("the upstream's own CORS headers never reach the browser, and * never appears", async () => {
    await using loose = startUpstream(() =>
      Response.json({ data: [] }, {
        headers: { "access-control-allow-origin": "*", "access-control-allow-credentials": "true" },
      })
    );
    await using looseRelay = startRelay(testConfig(loose.url));
    const browser = await looseRelay.call("/v1/models", { headers: { origin: ALLOWED, authorization: GOOD_BEARER } });
    assert.equal(browser.headers.get("access-control-allow-origin"), ALLOWED);
    assert.equal(browser.headers.get("access-control-allow-credentials"), null);
    const server = await looseRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(server.headers.get("access-control-allow-origin"), null);
  });

  await t.step(
    "MC's X-Relay-Endpoint naming this relay's upstream is accepted, never forwarded; another endpoint gets 400",
    async () => {
      const chat = (endpoint: string) =>
        relay.call("/v1/chat/completions", {
          method: "POST",
          headers: {
            origin: ALLOWED,
            authorization: GOOD_BEARER,
            "content-type": "application/json",
            "x-relay-endpoint": endpoint,
          },
          body: chatBody(),
        });
      for (const endpoint of [upstream.url, `${upstream.url}/`, `${upstream.url}/chat/completions`]) {
        assert.equal((await chat(endpoint)).status, 200, endpoint);
        assert.equal(upstream.requests.at(-1)!.headers.get("x-relay-endpoint"), null);
      }
      const before = upstream.requests.length;
      const other = await chat("https://api.other.example/v1");
      assert.equal(other.status, 400);
      assert.equal(other.json().error.code, "unknown_upstream");
      assert.ok(other.json().error.message.includes(upstream.url), "names the endpoint this relay serves");
      assert.equal(other.headers.get("access-control-allow-origin"), ALLOWED, "MC can show the message");
      assert.equal(upstream.requests.length, before);
    },
  );
});

// ---------------------------------------------------------------------------
// Upstream request and response
// ---------------------------------------------------------------------------

Deno.test("upstream request and response", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url));

  await t.step(
    "the provider key, the extra headers, content-type and accept are sent; client secrets and hop-by-hop headers are not",
    async () => {
      await rawRequest(
        relay.port,
        [
          "POST /v1/chat/completions HTTP/1.1",
          "Host: relay.example",
          `Authorization: ${GOOD_BEARER}`,
          "Content-Type: application/json",
          "Accept: application/json",
          "Cookie: session=abc",
          "Connection: close, X-Hop",
          "X-Hop: 1",
          "Keep-Alive: timeout=5",
          "TE: trailers",
          "Proxy-Authorization: Basic eDp5",
          "X-Forwarded-For: 10.0.0.1",
          "Content-Length: 2",
        ].join("\r\n"),
        "{}",
      );
      const seen = upstream.requests.at(-1)!.headers;
      assert.equal(seen.get("authorization"), `Bearer ${CANARY_KEY}`);
      assert.equal(seen.get("x-title"), "mc-relay tests");
      assert.equal(seen.get("x-extra-secret"), CANARY_EXTRA);
      assert.equal(seen.get("content-type"), "application/json");
      assert.equal(seen.get("accept"), "application/json");
      assert.equal(seen.get("host"), new URL(upstream.url).host);
      for (const name of ["cookie", "x-hop", "keep-alive", "te", "proxy-authorization", "x-forwarded-for"]) {
        assert.equal(seen.get(name), null, name);
      }
    },
  );

  await t.step(
    "UPSTREAM_AUTH_HEADER and an empty UPSTREAM_AUTH_PREFIX send the raw key (Azure's api-key)",
    async () => {
      await using azure = startRelay(
        testConfig(upstream.url, {
          upstreams: [testUpstream("default", upstream.url, { authHeader: "api-key", authPrefix: "" })],
        }),
      );
      await azure.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      const seen = upstream.requests.at(-1)!.headers;
      assert.equal(seen.get("api-key"), CANARY_KEY);
      assert.equal(seen.get("authorization"), null);
    },
  );

  await t.step(
    "hop-by-hop headers, set-cookie and alt-svc from the upstream are dropped; content headers pass",
    async () => {
      await using chatty = startUpstream(() =>
        new Response('{"ok":true}', {
          status: 201,
          headers: {
            "content-type": "application/json; charset=utf-8",
            "set-cookie": "tracking=1",
            "alt-svc": 'h3=":443"',
            "x-ratelimit-remaining-requests": "99",
            "connection": "x-private-hop",
            "x-private-hop": "1",
            "keep-alive": "timeout=5",
          },
        })
      );
      await using chattyRelay = startRelay(testConfig(chatty.url));
      const response = await chattyRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      assert.equal(response.status, 201);
      assert.equal(response.text, '{"ok":true}');
      assert.equal(response.headers.get("content-type"), "application/json; charset=utf-8");
      assert.equal(response.headers.get("x-ratelimit-remaining-requests"), "99");
      for (const name of ["set-cookie", "alt-svc", "x-private-hop", "keep-alive"]) {
        assert.equal(response.headers.get(name), null, name);
      }
    },
  );

  await t.step("upstream errors pass through unchanged (status, headers and body)", async () => {
    const providerError = { error: { message: "The server is overloaded", type: "server_error", code: null } };
    await using failing = startUpstream(() =>
      Response.json(providerError, { status: 503, headers: { "retry-after": "7", "x-request-id": "req_9" } })
    );
    await using failingRelay = startRelay(testConfig(failing.url));
    const response = await failingRelay.chat(chatBody());
    assert.equal(response.status, 503);
    assert.deepEqual(response.json(), providerError);
    assert.equal(response.headers.get("retry-after"), "7");
    assert.equal(response.headers.get("x-request-id"), "req_9");
  });

  await t.step("a compressed upstream body passes through byte for byte", async () => {
    const original = JSON.stringify({ data: "compressible ".repeat(200) });
    const gzipped = new Uint8Array(
      await new Response(new Blob([original]).stream().pipeThrough(new CompressionStream("gzip"))).arrayBuffer(),
    );
    await using gzipUpstream = startUpstream(() =>
      new Response(gzipped, { headers: { "content-type": "application/json", "content-encoding": "gzip" } })
    );
    await using gzipRelay = startRelay(testConfig(gzipUpstream.url));
    const response = await fetch(`${gzipRelay.url}/v1/models`, {
      headers: { authorization: GOOD_BEARER, "accept-encoding": "gzip" },
    });
    assert.equal(response.headers.get("content-encoding"), "gzip");
    assert.equal(await response.text(), original, "the client decodes exactly the upstream's bytes");
    assert.equal(gzipUpstream.requests.at(-1)!.headers.get("accept-encoding"), "identity");
  });

  await t.step("a body of unknown length, in chunks of every size, passes through byte for byte", async () => {
    // From one byte to 200 KiB a chunk, so the relay's read buffer starts small, fills, and grows on the way.
    const sizes = [1, 7, 2048, 2047, 2049, 8192, 70_000, 3, 200_000, 65_536, 131_072, 5, 300_000];
    const chunks = sizes.map((size, index) => Uint8Array.from({ length: size }, (_, at) => (at * 31 + index) % 251));
    await using upstream = startUpstream(() =>
      new Response(
        new ReadableStream<Uint8Array>({
          start(controller) {
            for (const chunk of chunks) controller.enqueue(chunk);
            controller.close();
          },
        }),
        { headers: { "content-type": "application/octet-stream" } },
      )
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    const received = new Uint8Array(await response.arrayBuffer());
    const sent = new Uint8Array(await new Blob(chunks).arrayBuffer());
    assert.equal(received.byteLength, sent.byteLength);
    const digest = async (bytes: Uint8Array<ArrayBuffer>) =>
      new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)).join(",");
    assert.equal(await digest(received), await digest(sent), "every byte arrives as the upstream sent it");
    await sleep(20);
    assert.equal(relay.requestLogs().at(-1)?.bytes_out, sent.byteLength);
  });

  await t.step("an upstream redirect is not followed (the key must not travel elsewhere): 502", async () => {
    await using target = startUpstream(openAiLikeUpstream);
    await using redirecting = startUpstream(() =>
      new Response(null, { status: 307, headers: { location: `${target.url}/models` } })
    );
    await using redirectRelay = startRelay(testConfig(redirecting.url));
    const response = await redirectRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_redirect");
    assert.match(response.json().error.message, /redirected to 127\.0\.0\.1:\d+; set UPSTREAM_BASE_URL/);
    assert.equal(target.requests.length, 0);
  });
});

// ---------------------------------------------------------------------------
// Request size and upload limits
// ---------------------------------------------------------------------------

Deno.test("request limits", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 1000, requestTimeoutMs: 600 }));
  const post = relay.chat;

  await t.step("a body of exactly MAX_REQUEST_BYTES passes", async () => {
    const body = `{"pad":"${"x".repeat(1000 - 10)}"}`;
    assert.equal(body.length, 1000);
    assert.equal((await post(body)).status, 200);
    assert.equal(upstream.requests.at(-1)!.body, body);
  });

  await t.step("a larger body declared by Content-Length gets 413 and never reaches the upstream", async () => {
    const before = upstream.requests.length;
    const response = await post("x".repeat(1001));
    assert.equal(response.status, 413);
    assert.equal(response.json().error.code, "request_too_large");
    assert.match(response.json().error.message, /MAX_REQUEST_BYTES/);
    assert.equal(upstream.requests.length, before);
  });

  await t.step("a larger chunked body (no Content-Length) is cut while reading: 413, upstream untouched", async () => {
    const before = upstream.requests.length;
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent >= 5000) return controller.close();
        sent += 500;
        controller.enqueue(encoder.encode("y".repeat(500)));
      },
    });
    const response = await post(body);
    assert.equal(response.status, 413);
    assert.equal(upstream.requests.length, before);
  });

  await t.step("a Content-Length that lies low is still cut at the limit", async () => {
    const before = upstream.requests.length;
    const response = await rawRequest(
      relay.port,
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 10\r\nConnection: close`,
      "z".repeat(2000),
    );
    // The server reads only the declared 10 bytes as the body; the rest is not this request's body.
    assert.ok(response.status === 200 || response.status === 400 || response.status === 413);
    assert.ok(upstream.requests.length - before <= 1);
    if (upstream.requests.length > before) assert.equal(upstream.requests.at(-1)!.body.length, 10);
  });

  await t.step(
    "an upload that trickles in slower than REQUEST_TIMEOUT_SECONDS gets 408, upstream untouched",
    async () => {
      const before = upstream.requests.length;
      const connection = await Deno.connect({ hostname: "127.0.0.1", port: relay.port });
      try {
        await connection.write(encoder.encode(
          `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 100\r\n\r\n{`,
        ));
        const started = performance.now();
        const buffer = new Uint8Array(4096);
        const read = await within(5000, connection.read(buffer), "the relay never answered a trickling upload");
        const text = decoder.decode(buffer.subarray(0, read ?? 0));
        seenByClientsOrLogs.push(text);
        assert.match(text, /^HTTP\/1\.1 408/);
        assert.ok(performance.now() - started >= 400);
      } finally {
        connection.close();
      }
      assert.equal(upstream.requests.length, before);
    },
  );
});

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

/** An answer that declares 100 bytes and sends a few: the upstream then stalls, or breaks off. */
const PARTIAL_JSON_ANSWER =
  'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"partial":';

Deno.test("streaming", async (t) => {
  await t.step("each chunk reaches the client before the upstream sends the next (no buffering)", async () => {
    const stream = controlledStream();
    await using upstream = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.fetchChat(chatBody({ stream: true }));
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.equal(response.headers.get("cache-control"), "no-cache, no-transform");
    assert.equal(response.headers.get("x-accel-buffering"), "no");
    const reader = response.body!.getReader();
    const delays: number[] = [];
    for (let i = 0; i < 5; i++) {
      const event = `data: {"choices":[{"delta":{"content":"token ${i}"}}]}\n\n`;
      const sentAt = performance.now();
      stream.send(event);
      // The upstream sends nothing more until this chunk has arrived: a buffering relay would hang here.
      const { value } = await within(3000, reader.read(), `chunk ${i} was held back by the relay`);
      delays.push(performance.now() - sentAt);
      assert.equal(decoder.decode(value), event);
    }
    stream.send("data: [DONE]\n\n");
    stream.close();
    assert.equal(decoder.decode((await reader.read()).value), "data: [DONE]\n\n");
    assert.ok((await reader.read()).done);
  });

  await t.step("a client that leaves mid-stream cancels the upstream at once", async () => {
    const stream = controlledStream();
    await using upstream = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(upstream.url));
    const client = new AbortController();
    const response = await fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
      signal: client.signal,
    });
    const reader = response.body!.getReader();
    stream.send("data: first\n\n");
    await reader.read();
    client.abort();
    await reader.read().catch(() => {});
    await within(3000, stream.cancelled, "the upstream stream was not cancelled after the client left");
    await sleep(50);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "client_gone");
  });

  await t.step("a client that leaves before the upstream answers cancels the upstream request", async () => {
    let upstreamSawAbort!: () => void;
    const aborted = new Promise<void>((resolve) => (upstreamSawAbort = resolve));
    await using upstream = startUpstream(async (request) => {
      request.signal.addEventListener("abort", () => upstreamSawAbort());
      await aborted;
      return new Response("too late");
    });
    await using relay = startRelay(testConfig(upstream.url));
    const client = new AbortController();
    const pending = fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody(),
      signal: client.signal,
    }).catch((error) => error);
    while (upstream.requests.length === 0) await sleep(10);
    client.abort();
    await pending;
    await within(3000, aborted, "the upstream request was not cancelled after the client left");
    await sleep(50);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "client_gone");
  });

  await t.step("a stream that keeps flowing is never cut, however much longer than the timeout it runs", async () => {
    await using upstream = startUpstream(() => {
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          await sleep(60);
          if (sent++ === 20) return controller.close();
          controller.enqueue(encoder.encode(`data: ${sent}\n\n`));
        },
      });
      return new Response(body, { headers: { "content-type": "text/event-stream" } });
    });
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 250 }));
    const started = performance.now();
    const response = await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
    });
    assert.ok(performance.now() - started > 4 * 250, "the stream ran well past the timeout");
    assert.equal(response.text.match(/data: /g)?.length, 20);
    assert.ok(response.text.endsWith("data: 20\n\n"));
  });

  await t.step(
    "a stream that stalls longer than the timeout is cut, visibly, and the upstream is cancelled",
    async () => {
      const stream = controlledStream();
      await using upstream = startUpstream(() =>
        new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
      );
      await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
      const response = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER },
        body: chatBody({ stream: true }),
      });
      const reader = response.body!.getReader();
      stream.send("data: first\n\n");
      assert.equal(decoder.decode((await reader.read()).value), "data: first\n\n");
      const ending = await within(
        3000,
        reader.read().then(() => "clean end", () => "error"),
        "the stalled stream hung",
      );
      assert.equal(ending, "error", "a cut stream must not look complete to the client");
      await within(3000, stream.cancelled, "the stalled upstream was not cancelled");
      await sleep(50);
      assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
    },
  );

  await t.step("a body of known length that stalls is cut after the timeout too", async () => {
    await using upstream = rawUpstream(PARTIAL_JSON_ANSWER);
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 200);
    const ending = await within(3000, response.text().then(() => "clean end", () => "error"), "the stalled body hung");
    assert.equal(ending, "error");
    await sleep(50);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
  });

  await t.step(
    "a non-streamed answer that stalls after its headers gets 504 with CORS headers, never a cut 200",
    async () => {
      await using upstream = rawUpstream(PARTIAL_JSON_ANSWER);
      await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
      const response = await relay.chat(chatBody(), { origin: ALLOWED });
      assert.equal(response.status, 504);
      assert.equal(response.json().error.code, "upstream_timeout");
      assert.match(
        response.json().error.message,
        /did not finish its answer within 0\.3 s \(REQUEST_TIMEOUT_SECONDS\)/,
      );
      assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
      assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
    },
  );

  await t.step("a non-streamed answer that breaks off before its end gets 502 upstream_stream_error", async () => {
    await using upstream = rawUpstream(PARTIAL_JSON_ANSWER, 50);
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.chat(chatBody(), { origin: ALLOWED });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_stream_error");
    assert.match(
      response.json().error.message,
      new RegExp(`^mc-relay: the upstream 127\\.0\\.0\\.1:${upstream.port} broke off`),
    );
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_stream_error");
  });

  await t.step("a non-streamed answer reaches the client byte for byte, small or large, its usage read", async () => {
    const answer = (content: string) =>
      `{ "id": "x",\n  "choices": [{"message": {"role": "assistant", "content": ${
        JSON.stringify(content)
      }}}],\n  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7} }\n`;
    const small = answer("grüße, 世界");
    const large = answer("x".repeat(300 * 1024)); // past the size read whole: relayed chunk by chunk
    await using upstream = startUpstream((_request, seen) =>
      new Response(JSON.parse(seen.body).model === "large" ? large : small, {
        headers: { "content-type": "application/json" },
      })
    );
    await using relay = startRelay(testConfig(upstream.url));
    for (const [model, text] of [["small", small], ["large", large]]) {
      const response = await relay.chat(chatBody({ model }));
      assert.equal(response.status, 200);
      assert.equal(response.text, text, model);
      assert.equal(Number(response.headers.get("content-length")), encoder.encode(text).byteLength, model);
      assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 });
      assert.equal(relay.requestLogs().at(-1)!.bytes_out, encoder.encode(text).byteLength, model);
    }
  });

  await t.step("an answer without a body (204, even with a Content-Length) to a POST passes on as it is", async () => {
    await using upstream = rawUpstream("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 0);
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.chat(chatBody());
    assert.equal(response.status, 204);
    assert.equal(response.text, "");
    assert.equal(relay.requestLogs().at(-1)?.status, 204);
  });

  await t.step("an upstream that resets mid-stream ends the client's stream with an error", async () => {
    await using upstream = rawUpstream(
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nd\r\ndata: first\n\n\r\n",
      100,
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
    });
    const reader = response.body!.getReader();
    assert.equal(decoder.decode((await reader.read()).value), "data: first\n\n");
    const ending = await within(3000, reader.read().then(() => "clean end", () => "error"), "the reset stream hung");
    assert.equal(ending, "error");
  });
});

// ---------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------

Deno.test("upstream failures", async (t) => {
  await t.step("an unreachable upstream gives 502 naming the host and the kind of failure", async () => {
    const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (closed.addr as Deno.NetAddr).port;
    closed.close();
    await using relay = startRelay(testConfig(`http://127.0.0.1:${port}/v1`));
    const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_unreachable");
    assert.equal(response.json().error.type, "server_error");
    assert.match(response.json().error.message, new RegExp(`127\\.0\\.0\\.1:${port}: connection refused`));
    assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_unreachable");
  });

  await t.step("an upstream that sends no headers within the timeout gives 504", async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    await using upstream = startUpstream(async () => {
      await released;
      return new Response("late");
    });
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
    const started = performance.now();
    const response = await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: GOOD_BEARER, origin: ALLOWED },
      body: chatBody(),
    });
    release();
    assert.equal(response.status, 504);
    assert.ok(performance.now() - started >= 280);
    assert.equal(response.json().error.code, "upstream_timeout");
    assert.match(
      response.json().error.message,
      /127\.0\.0\.1:\d+ sent no response within 0\.3 s \(REQUEST_TIMEOUT_SECONDS\)/,
    );
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
  });

  await t.step("after failures the relay keeps serving", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url));
    await relay.call("/v1/models", { headers: { authorization: "Bearer nope" } });
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
  });
});

// ---------------------------------------------------------------------------
// Hardening: brute force, quotas, secrets in error bodies, bad input, faults
// ---------------------------------------------------------------------------

/** A clock the test moves by hand, for the per-minute limits. */
function manualClock() {
  let now = 1_000_000;
  return { now: () => now, advance: (ms: number) => void (now += ms) };
}

Deno.test("hardening", async (t) => {
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

  await t.step("RATE_LIMIT_PER_MINUTE answers 429 in OpenAI's shape, naming the relay's own limit", async () => {
    const clock = manualClock();
    await using relay = startRelay(testConfig(upstream.url, { rateLimitPerMinute: 2 }), undefined, clock.now);
    const before = upstream.requests.length;
    const models = () => relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal((await models()).status, 200);
    assert.equal((await models()).status, 200);
    const limited = await models();
    assert.equal(limited.status, 429);
    assert.equal(limited.headers.get("retry-after"), "30");
    assert.equal(limited.json().error.code, "relay_rate_limit_exceeded");
    assert.match(limited.json().error.message, /^mc-relay: the relay's limit of 2 requests per minute/);
    assert.equal(upstream.requests.length - before, 2);
    assert.equal((await relay.call("/health")).status, 200, "health checks are not limited");
    clock.advance(30_000);
    assert.equal((await models()).status, 200);
  });

  await t.step("the provider's own 429 passes through, saying that it is the provider's quota", async () => {
    await using limited = startUpstream(() =>
      Response.json(
        { error: { message: "Rate limit reached for gpt-4o", type: "requests", code: "rate_limit_exceeded" } },
        { status: 429, headers: { "retry-after": "7", "x-ratelimit-remaining-requests": "0" } },
      )
    );
    await using relay = startRelay(testConfig(limited.url));
    const response = await relay.chat(chatBody());
    assert.equal(response.status, 429);
    assert.equal(response.headers.get("retry-after"), "7");
    assert.equal(response.headers.get("x-ratelimit-remaining-requests"), "0");
    const { error } = response.json();
    assert.equal(error.code, "rate_limit_exceeded");
    assert.equal(error.type, "requests");
    assert.match(error.message, /^The provider 127\.0\.0\.1:\d+ is rate-limiting the relay \(the provider's quota/);
    assert.match(error.message, /Rate limit reached for gpt-4o$/);
  });

  await t.step("a provider key that an upstream error echoes is masked before the client sees it", async () => {
    await using echoing = startUpstream((request) =>
      Response.json({
        error: { message: `Incorrect API key provided: ${request.headers.get("authorization")?.slice(7)}.` },
      }, { status: 401 })
    );
    await using relay = startRelay(testConfig(echoing.url));
    const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 401);
    assert.equal(response.json().error.message, "Incorrect API key provided: [REDACTED].");
  });

  await t.step("thousands of malformed requests get no 5xx from the relay, and it keeps serving", async () => {
    await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 4096, requestTimeoutMs: 200 }));
    const random = seededRandom(20261124);
    const pick = <T>(items: T[]) => items[Math.floor(random() * items.length)];
    const methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "G\u00c9T", "get", ""];
    const paths = [
      "/v1/chat/completions",
      "/v1/models",
      "/health",
      "/v1/%zz",
      "/v1/\u{1F600}",
      "/%",
      "*",
      "/v1/models?" + "q=".repeat(3000),
      "/" + "a".repeat(9000),
      "/v1/../../../etc/passwd",
      "//x",
      "/v1/chat/completions#frag",
      "http://[::1]/v1/models",
      "/\u0000",
    ];
    const headerLines = [
      `Authorization: ${GOOD_BEARER}`,
      "Authorization: Bearer \u00ff\u00fe",
      "Authorization: Basic ====",
      "Authorization: " + "B".repeat(20000),
      "Origin: null",
      `Origin: ${ALLOWED}`,
      "Content-Type: application/json",
      "Content-Length: -1",
      "Content-Length: 99999999999999999999",
      "Content-Length: 5",
      "Transfer-Encoding: chunked",
      "Transfer-Encoding: gzip, chunked",
      "X-Broken",
      ": no-name",
      "X-Unicode: \u2603",
      "Access-Control-Request-Method: POST",
      "Access-Control-Request-Headers: " + "x-stainless-a,".repeat(500),
      "X-Forwarded-For: ' OR 1=1",
    ];
    const bodies = [
      "",
      "{",
      '{"model":"gpt-test","messages":[]}',
      "\u0000\u0001\u0002",
      "x".repeat(5000),
      "0\r\n\r\n",
      "zz\r\n",
    ];
    const statuses = new Map<number, number>();
    const requests = 2000;
    let next = 0;
    const worker = async () => {
      while (next < requests) {
        next++;
        const lines = Array.from({ length: Math.floor(random() * 5) }, () => pick(headerLines));
        const head = [`${pick(methods)} ${pick(paths)} HTTP/1.1`, "Host: 127.0.0.1", ...lines, "Connection: close"]
          .join("\r\n");
        const response = await rawRequest(relay.port, head, pick(bodies)).catch(() => ({ status: 0, text: "" }));
        statuses.set(response.status || 0, (statuses.get(response.status || 0) ?? 0) + 1);
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    const serverErrors = [...statuses].filter(([status]) => status >= 500);
    assert.deepEqual(serverErrors, [], `5xx answers: ${JSON.stringify([...statuses])}`);
    assert.ok([...statuses.values()].reduce((a, b) => a + b) === requests);
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
  });
});

Deno.test("faults", async (t) => {
  // Deno's sanitizers run on this test: a timer, stream or connection the relay left behind fails it.
  await t.step("an upstream that answers with garbage gives 502", async () => {
    await using upstream = rawUpstream("SSH-2.0-OpenSSH_9.6\r\n\x00\x01garbage\r\n\r\n", 0);
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_unreachable");
  });

  await t.step("an endless upstream body stops as soon as the client leaves", async () => {
    let cancelled!: () => void;
    const upstreamCancelled = new Promise<void>((resolve) => (cancelled = resolve));
    await using upstream = startUpstream(() =>
      new Response(
        new ReadableStream<Uint8Array>({
          pull: (controller) => controller.enqueue(new Uint8Array(65536)),
          cancel: () => cancelled(),
        }),
        { headers: { "content-type": "application/octet-stream" } },
      )
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    const reader = response.body!.getReader();
    let received = 0;
    while (received < 1024 * 1024) received += (await reader.read()).value!.byteLength;
    await reader.cancel();
    await within(3000, upstreamCancelled, "the endless upstream body went on after the client left");
  });

  await t.step("a client that leaves mid-upload never reaches the upstream", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url));
    const connection = await Deno.connect({ hostname: "127.0.0.1", port: relay.port });
    await connection.write(encoder.encode(
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 1000\r\n\r\n{"model":`,
    ));
    await sleep(50);
    connection.close();
    await within(
      3000,
      (async () => {
        while (relay.requestLogs().length === 0) await sleep(10);
      })(),
      "the relay did not notice the client leaving",
    );
    assert.equal(relay.requestLogs()[0].outcome, "client_gone");
    assert.equal(upstream.requests.length, 0);
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
  });

  await t.step("upstream 5xx answers pass through, and the relay keeps serving", async () => {
    let fail = true;
    await using upstream = startUpstream((request, seen) =>
      fail ? new Response("upstream exploded", { status: 500 }) : openAiLikeUpstream(request, seen)
    );
    await using relay = startRelay(testConfig(upstream.url));
    const failed = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(failed.status, 500);
    assert.equal(failed.text, "upstream exploded");
    fail = false;
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
  });
});

/** Re-chunks a byte stream into exactly the given text parts (the bytes are the same). */
function chunkEach(parts: string[]): TransformStream<Uint8Array, Uint8Array> {
  let index = 0;
  let buffered = new Uint8Array(0);
  return new TransformStream({
    transform(chunk, controller) {
      const joined = new Uint8Array(buffered.byteLength + chunk.byteLength);
      joined.set(buffered);
      joined.set(chunk, buffered.byteLength);
      buffered = joined;
      while (index < parts.length) {
        const size = encoder.encode(parts[index]).byteLength;
        if (buffered.byteLength < size) break;
        controller.enqueue(buffered.slice(0, size));
        buffered = buffered.slice(size);
        index++;
      }
    },
  });
}

/** A small deterministic pseudo-random generator (mulberry32), so a failing fuzz run can be repeated. */
function seededRandom(seed: number): () => number {
  return () => {
    seed = (seed + 0x6D2B79F5) | 0;
    let value = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    value = (value + Math.imul(value ^ (value >>> 7), 61 | value)) ^ value;
    return ((value ^ (value >>> 14)) >>> 0) / 4294967296;
  };
}

// ---------------------------------------------------------------------------
// Teams: several users, model allow-list, optional routes
// ---------------------------------------------------------------------------

Deno.test("teams", async (t) => {
  await using upstream = startUpstream((request, seen) =>
    seen.path === "/embeddings"
      ? Response.json({ object: "list", data: [{ embedding: [0.1] }] })
      : openAiLikeUpstream(request, seen)
  );
  const bobHash = await hashPassword("bob-password-456", 2000);
  /** A relay configured through parseConfig, as the real process is. */
  const relayFromEnv = (env: Record<string, string>, overrides: Partial<RelayConfig> = {}) => {
    const result = parseConfig({ UPSTREAM_BASE_URL: upstream.url, UPSTREAM_API_KEY: CANARY_KEY, ...env });
    assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
    return startRelay({ ...result.config, authFailuresPerMinute: 0, ...overrides });
  };

  await t.step(
    "every user of MC_RELAY_USERS signs in (plain or hashed), and each request is logged with its user",
    async () => {
      await using relay = relayFromEnv({ MC_RELAY_USERS: `alice:alice-password-123, bob:${bobHash}` });
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
    await using relay = relayFromEnv({
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

  await t.step("the limits apply per user: one user's quota does not block another", async () => {
    await using relay = relayFromEnv(
      { MC_RELAY_USERS: `alice:alice-password-123,bob:${bobHash}`, TRUST_PROXY: "true" },
      { rateLimitPerMinute: 1 },
    );
    const as = (credentials: string, address: string) =>
      relay.call("/v1/models", { headers: { authorization: `Bearer ${credentials}`, "x-forwarded-for": address } });
    assert.equal((await as("alice:alice-password-123", "198.51.100.1")).status, 200);
    assert.equal((await as("alice:alice-password-123", "198.51.100.2")).status, 429, "alice's own quota is used up");
    assert.equal((await as("bob:bob-password-456", "198.51.100.3")).status, 200, "bob still has his");
  });

  await t.step("ALLOWED_MODELS refuses other models with 400 before the upstream is called", async () => {
    await using relay = relayFromEnv({
      MC_RELAY_USERNAME: USERNAME,
      MC_RELAY_PASSWORD: CANARY_PASSWORD,
      ALLOWED_MODELS: "gpt-test, gpt-other",
    });
    const chat = relay.chat;
    const before = upstream.requests.length;
    const refused = await chat(chatBody({ model: "gpt-expensive" }));
    assert.equal(refused.status, 400);
    assert.equal(refused.json().error.code, "model_not_allowed");
    assert.match(refused.json().error.message, /"gpt-expensive" is not allowed here; allowed: gpt-test, gpt-other/);
    assert.equal((await chat("not json")).status, 400);
    assert.equal(upstream.requests.length, before);
    assert.equal((await chat(chatBody({ model: "gpt-test" }))).status, 200);
  });

  await t.step("with ALLOWED_MODELS, GET /v1/models lists only the allowed models", async () => {
    await using listing = startUpstream(() =>
      Response.json({ object: "list", data: ["gpt-test", "gpt-expensive", "gpt-other"].map((id) => ({ id })) })
    );
    const result = parseConfig({
      UPSTREAM_BASE_URL: listing.url,
      UPSTREAM_API_KEY: CANARY_KEY,
      MC_RELAY_USERNAME: USERNAME,
      MC_RELAY_PASSWORD: CANARY_PASSWORD,
      ALLOWED_MODELS: "gpt-test,gpt-other",
    });
    assert.ok(result.ok);
    await using relay = startRelay(result.config);
    const models = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.deepEqual(models.json().data.map((model: { id: string }) => model.id), ["gpt-test", "gpt-other"]);
    // An entry naming the upstream ("default/gpt-test") allows the same model in the list as in a chat.
    await using named = startRelay({ ...result.config, allowedModels: ["default/gpt-test"] });
    const namedModels = await named.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.deepEqual(namedModels.json().data.map((model: { id: string }) => model.id), ["gpt-test"]);
    const chat = await named.chat(chatBody({ model: "gpt-test" }));
    assert.equal(chat.status, 200, "the chat passes the same allow-list");
  });

  await t.step(
    "every route the common SDKs call is on: embeddings, completions, responses; DISABLED_PATHS switches them off",
    async () => {
      await using plain = relayFromEnv({ MC_RELAY_USERNAME: USERNAME, MC_RELAY_PASSWORD: CANARY_PASSWORD });
      const post = (relay: typeof plain, path: string) =>
        relay.call(path, {
          method: "POST",
          headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
          body: '{"model":"e","input":"hi"}',
        });
      for (const path of ["/v1/embeddings", "/v1/completions", "/v1/responses"]) {
        assert.equal((await post(plain, path)).status, 200, path);
        assert.equal(upstream.requests.at(-1)!.path, path.slice(3));
      }
      await using narrowed = relayFromEnv({
        MC_RELAY_USERNAME: USERNAME,
        MC_RELAY_PASSWORD: CANARY_PASSWORD,
        DISABLED_PATHS: "/v1/embeddings,/v1/responses",
      });
      assert.equal((await post(narrowed, "/v1/embeddings")).status, 404);
      assert.equal((await post(narrowed, "/v1/responses")).status, 404);
      assert.equal((await post(narrowed, "/v1/completions")).status, 200);
      const old = parseConfig({ ...minimalEnv, ALLOWED_PATHS: "/v1/embeddings" });
      assert.ok(old.ok, "ALLOWED_PATHS from 0.1 still starts");
      assert.match(old.warnings.join("\n"), /ALLOWED_PATHS is no longer needed/);
      const refused = parseConfig({ ...minimalEnv, ALLOWED_PATHS: "/v1/files" });
      assert.ok(!refused.ok);
      assert.match(refused.errors[0], /^ALLOWED_PATHS may list \/v1\/embeddings, \/v1\/completions, \/v1\/responses/);
    },
  );

  await t.step(
    "UPSTREAMS_JSON: MC's X-Relay-Endpoint picks the upstream by URL prefix, each gets its own key",
    async () => {
      await using second = startUpstream(openAiLikeUpstream);
      const result = parseConfig({
        ...minimalEnv,
        UPSTREAM_BASE_URL: `${upstream.url}/v1`,
        UPSTREAMS_JSON: JSON.stringify([
          {
            name: "azure",
            baseUrl: `${second.url}/openai/v1`,
            apiKey: `${CANARY_KEY}-azure`,
            authHeader: "api-key",
            authPrefix: "",
          },
        ]),
      });
      assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
      await using relay = startRelay(result.config);
      const chat = (endpoint?: string, model = "gpt-test") =>
        relay.call("/v1/chat/completions", {
          method: "POST",
          headers: {
            authorization: GOOD_BEARER,
            "content-type": "application/json",
            ...(endpoint && { "x-relay-endpoint": endpoint }),
          },
          body: chatBody({ model }),
        });

      assert.equal((await chat(`${second.url}/openai/v1/`)).status, 200);
      assert.equal(second.requests.at(-1)!.path, "/openai/v1/chat/completions");
      assert.equal(second.requests.at(-1)!.headers.get("api-key"), `${CANARY_KEY}-azure`);
      assert.equal(second.requests.at(-1)!.headers.get("authorization"), null);

      const before = second.requests.length;
      assert.equal((await chat(`${upstream.url}/v1/chat/completions`)).status, 200);
      assert.equal(upstream.requests.at(-1)!.headers.get("authorization"), `Bearer ${CANARY_KEY}`);
      assert.equal((await chat()).status, 200, "without the header the first upstream serves");
      assert.equal(upstream.requests.at(-1)!.path, "/v1/chat/completions");
      assert.equal(second.requests.length, before);

      const unknown = await chat("https://api.elsewhere.example/v1/");
      assert.equal(unknown.status, 400);
      assert.equal(unknown.json().error.code, "unknown_upstream");
      assert.match(unknown.json().error.message, /matches none of this relay's upstreams \(default, azure\)/);

      assert.equal((await chat(undefined, "azure/gpt-4o")).status, 200, "a model prefix picks the upstream too");
      assert.equal(JSON.parse(second.requests.at(-1)!.body).model, "gpt-4o", "and is taken off");
      assert.deepEqual(relay.requestLogs().map((entry) => entry.upstream), [
        "azure",
        "default",
        "default",
        undefined,
        "azure",
      ]);
    },
  );

  await t.step("GET /v1/models merges the upstreams' lists, ids prefixed with their names", async () => {
    await using second = startUpstream(() => Response.json({ object: "list", data: [{ id: "gpt-4o" }, { id: "o3" }] }));
    const closed = freePort();
    const config = testConfig(upstream.url, {
      upstreams: [
        testUpstream("default", upstream.url),
        testUpstream("azure", second.url),
        testUpstream("offline", `http://127.0.0.1:${closed}`),
      ],
    });
    await using relay = startRelay(config);
    const models = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(models.status, 200);
    assert.deepEqual(models.json().data.map((model: { id: string }) => model.id), [
      "default/gpt-test",
      "azure/gpt-4o",
      "azure/o3",
    ]);
    assert.match(relay.requestLogs().at(-1)!.error, /offline \(connection refused\)/);
    await using limited = startRelay({ ...config, allowedModels: ["azure/o3", "gpt-test"] });
    const allowed = await limited.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.deepEqual(allowed.json().data.map((model: { id: string }) => model.id), ["default/gpt-test", "azure/o3"]);
    const one = await relay.call("/v1/models", {
      headers: { authorization: GOOD_BEARER, "x-relay-endpoint": second.url },
    });
    assert.deepEqual(
      one.json().data.map((model: { id: string }) => model.id),
      ["gpt-4o", "o3"],
      "X-Relay-Endpoint: that list only",
    );
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

  await t.step("a non-streamed chat's token usage goes into the log line, with user and model", async () => {
    await using relay = relayFromEnv({ MC_RELAY_USERS: "alice:alice-password-123" });
    await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: "Bearer alice:alice-password-123", "content-type": "application/json" },
      body: chatBody({ model: "gpt-test" }),
    });
    const entry = relay.requestLogs().at(-1)!;
    assert.equal(entry.user, "alice");
    assert.equal(entry.model, "gpt-test");
    assert.deepEqual(entry.usage, { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 });
  });

  await t.step("a streamed chat: the relay asks for usage, logs it, and takes the extra event out again", async () => {
    const events = [
      'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n',
      'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
      "data: [DONE]\n\n",
    ];
    await using streaming = startUpstream((_request, seen) => {
      // The usage event arrives split across two chunks, as it can on a real network.
      const parts = [events[0], events[1].slice(0, 30), events[1].slice(30), events[2]];
      const body = seen.body.includes('"include_usage":true') ? parts : [events[0], events[2]];
      return new Response(new Blob(body).stream().pipeThrough(chunkEach(body)), {
        headers: { "content-type": "text/event-stream" },
      });
    });
    const result = parseConfig({ ...minimalEnv, UPSTREAM_BASE_URL: streaming.url });
    assert.ok(result.ok);
    await using relay = startRelay(result.config);
    const ask = (extra: Record<string, unknown>) => relay.chat(chatBody({ stream: true, ...extra }));

    const plain = await ask({});
    assert.deepEqual(JSON.parse(streaming.requests.at(-1)!.body).stream_options, { include_usage: true });
    assert.equal(plain.text, events[0] + events[2], "the client gets the stream it asked for, without the usage event");
    assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 });

    const asked = await ask({ stream_options: { include_usage: true } });
    assert.equal(asked.text, events.join(""), "a client that asked for usage keeps its event");
    assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 });
  });

  await t.step(
    "usage is read from CRLF-separated events too, and a usage:null on every chunk changes nothing",
    async () => {
      const events = [
        'data: {"choices":[{"delta":{"content":"\u00e9t\u00e9"}}],"usage":null}\r\n\r\n',
        'data: {"choices":[],"usage": {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\r\n\r\n',
        "data: [DONE]\r\n\r\n",
      ];
      await using crlf = startUpstream(() =>
        new Response(events.join(""), { headers: { "content-type": "text/event-stream" } })
      );
      await using relay = startRelay(testConfig(crlf.url));
      const response = await relay.chat(chatBody({ stream: true }));
      assert.equal(response.text, events[0] + events[2]);
      assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 });
    },
  );

  await t.step(
    "METRICS=alice: /metrics, for the users it names only, counts requests, latency, tokens and streams",
    async () => {
      await using relay = relayFromEnv({
        MC_RELAY_USERS: "alice:alice-password-123,bob:bob-password-1234",
        METRICS: "alice",
      });
      const alice = { authorization: "Bearer alice:alice-password-123", "content-type": "application/json" };
      await relay.call("/v1/chat/completions", { method: "POST", headers: alice, body: chatBody() });
      await relay.call("/v1/models", { headers: alice });
      await relay.call("/v1/models", { headers: { authorization: "Bearer alice:wrong" } });
      assert.equal((await relay.call("/metrics")).status, 401);
      const bob = await relay.call("/metrics", { headers: { authorization: "Bearer bob:bob-password-1234" } });
      assert.equal(bob.status, 403, "a user METRICS does not name reads no metrics");
      assert.doesNotMatch(bob.text, /mc_relay_/);
      const metrics = await relay.call("/metrics", { headers: alice });
      assert.equal(metrics.status, 200);
      assert.match(metrics.headers.get("content-type")!, /^text\/plain; version=0\.0\.4/);
      assert.match(
        metrics.text,
        /^mc_relay_requests_total\{route="\/v1\/chat\/completions",status="200",user="alice"\} 1$/m,
      );
      assert.match(metrics.text, /^mc_relay_requests_total\{route="\/v1\/models",status="401",user=""\} 1$/m);
      assert.match(metrics.text, /^mc_relay_upstream_latency_seconds_count 2$/m);
      assert.match(metrics.text, /^mc_relay_tokens_total\{user="alice",model="gpt-test",kind="prompt"\} 9$/m);
      assert.match(metrics.text, /^mc_relay_open_streams 0$/m);
    },
  );

  await t.step("METRICS_PORT serves /metrics on its own port without auth", async () => {
    const metricsPort = freePort();
    const relay = await spawnRelay({
      ...minimalEnv,
      UPSTREAM_BASE_URL: upstream.url,
      METRICS_PORT: String(metricsPort),
    });
    try {
      await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } }).then((r) => r.arrayBuffer());
      // The count is taken when the response has been delivered, a moment after the client has it.
      const line = /^mc_relay_requests_total\{route="\/v1\/models",status="200",user="team"\} 1$/m;
      let metrics = "";
      for (let tries = 0; tries < 50 && !line.test(metrics); tries++) {
        metrics = await fetch(`http://127.0.0.1:${metricsPort}/metrics`).then((r) => r.text());
        await sleep(20);
      }
      assert.match(metrics, line);
      assert.equal(
        await fetch(`${relay.url}/metrics`, { headers: { authorization: GOOD_BEARER } }).then((r) =>
          r.body?.cancel().then(() => r.status)
        ),
        404,
        "not on the main port unless METRICS names users",
      );
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
    }
  });

  await t.step("hash-password reads a password on stdin and prints a hash the relay accepts", async () => {
    const output = await runRelayProcess({}, ["hash-password"], { input: "carol-password-789\n" });
    assert.equal(output.code, 0, output.stderr);
    const hash = output.stdout.trim();
    assert.match(hash, /^pbkdf2-sha256:600000:[A-Za-z0-9_-]{22}:[A-Za-z0-9_-]{43}$/);
    assert.ok(!hash.includes("carol-password-789"));
    await using relay = relayFromEnv({ MC_RELAY_USERS: `carol:${hash}` });
    const response = await relay.call("/v1/models", { headers: { authorization: "Bearer carol:carol-password-789" } });
    assert.equal(response.status, 200);
  });
});

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

Deno.test("logging", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "one JSON line per request with id, method, path, status, duration, bytes and upstream status",
    async () => {
      await using relay = startRelay(testConfig(upstream.url));
      const body = chatBody();
      const response = await relay.call("/v1/chat/completions", {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json", cookie: "session=secret-cookie" },
        body,
      });
      await sleep(20);
      assert.equal(relay.logs.length, 1);
      const entry = JSON.parse(relay.logs[0]);
      assert.equal(entry.msg, "request");
      assert.equal(entry.level, "info");
      assert.ok(!Number.isNaN(Date.parse(entry.time)));
      assert.equal(entry.request_id, response.headers.get("x-relay-request-id"));
      assert.equal(entry.method, "POST");
      assert.equal(entry.path, "/v1/chat/completions");
      assert.equal(entry.status, 200);
      assert.equal(entry.upstream_status, 200);
      assert.equal(entry.bytes_in, body.length);
      assert.equal(entry.bytes_out, response.text.length);
      assert.equal(typeof entry.duration_ms, "number");
      assert.ok(!relay.logs[0].includes("Hello"), "no body in the log");
      assert.ok(!relay.logs[0].includes("secret-cookie"), "no header in the log");
    },
  );

  await t.step("a secret that a client puts into the path is masked in the log line", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/${CANARY_KEY}`);
    await response.body?.cancel();
    assert.equal(response.status, 404);
    assert.match(relay.logs[0], /"path":"\/v1\/\[REDACTED\]"/);
  });

  await t.step("LOG_LEVEL=warn leaves out request lines", async () => {
    await using relay = startRelay(testConfig(upstream.url, { logLevel: "warn" }));
    await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(relay.logs.length, 0);
  });
});

// ---------------------------------------------------------------------------
// The real process: start-up, demo, shutdown, secrets
// ---------------------------------------------------------------------------

/** Sends SIGTERM, waits until the relay says it is shutting down, and checks that a new connection is refused. */
async function sigtermAndAskAgain(relay: Awaited<ReturnType<typeof spawnRelay>>) {
  relay.child.kill("SIGTERM");
  await within(
    5000,
    (async () => {
      while (!relay.output().stdout.includes("shutting down")) await sleep(20);
    })(),
    "the relay did not react to SIGTERM",
  );
  const answer = await fetch(`${relay.url}/health`).then(
    (response) => response.body?.cancel().then(() => response.status),
    () => "refused",
  );
  assert.equal(answer, "refused", "no new connections during shutdown");
}

Deno.test("process", async (t) => {
  await t.step("start-up prints the listening URL, the upstream host and the allowed origins", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: `${upstream.url}/v1`, ALLOWED_ORIGIN: ALLOWED });
    assert.match(relay.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(relay.listening.upstream, new URL(upstream.url).host);
    assert.deepEqual(relay.listening.allowed_origins, [ALLOWED]);
    relay.child.kill("SIGTERM");
    assert.equal((await relay.finished()).code, 0);
  });

  await t.step("SIGTERM stops new connections, lets in-flight streams finish, and exits 0", async () => {
    const stream = controlledStream();
    await using upstream = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, SHUTDOWN_TIMEOUT_SECONDS: "10" });
    const response = await fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
    });
    const reader = response.body!.getReader();
    stream.send("data: before\n\n");
    await reader.read();
    await sigtermAndAskAgain(relay);
    stream.send("data: after\n\n");
    assert.equal(decoder.decode((await reader.read()).value), "data: after\n\n");
    stream.close();
    assert.ok((await reader.read()).done, "the in-flight stream finished cleanly");
    const status = await within(5000, relay.finished(), "the relay did not exit after draining");
    assert.equal(status.code, 0);
  });

  await t.step("SIGTERM with 100 streams running: they all finish, new connections are refused, exit 0", async () => {
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    await using upstream = startUpstream(() => {
      let step = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (step++ === 0) return controller.enqueue(encoder.encode("data: start\n\n"));
          await gate;
          controller.enqueue(encoder.encode("data: end\n\n"));
          controller.close();
        },
      });
      return new Response(body, { headers: { "content-type": "text/event-stream" } });
    });
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, SHUTDOWN_TIMEOUT_SECONDS: "20" });
    const readers = await Promise.all(Array.from({ length: 100 }, async () => {
      const response = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER },
        body: chatBody({ stream: true }),
      });
      const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
      assert.equal((await reader.read()).value, "data: start\n\n");
      return reader;
    }));
    await sigtermAndAskAgain(relay);
    open();
    const endings = await Promise.all(readers.map(async (reader) => {
      let rest = "";
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) rest += chunk.value;
      return rest;
    }));
    assert.deepEqual(new Set(endings), new Set(["data: end\n\n"]), "every stream finished with its last event");
    assert.equal((await within(10000, relay.finished(), "the relay did not exit after draining")).code, 0);
  });

  await t.step(
    "the demo runs with nothing configured, prints URL, credentials and a curl line, and streams",
    async () => {
      const relay = await spawnRelay({}, ["demo"]);
      await within(
        5000,
        (async () => {
          while (!relay.output().stdout.includes("Stop with Ctrl+C")) await sleep(10);
        })(),
        "the demo printed no banner",
      );
      const { stdout } = relay.output();
      const apiKey = /API key \(username:password\):\s+(\S+)/.exec(stdout)![1];
      const port = new URL(relay.url).port;
      assert.match(stdout, new RegExp(`Relay URL http://localhost:${port}  \\(without /v1\\)`), "MC's value: no /v1");
      assert.match(stdout, new RegExp(`baseURL: +http://localhost:${port}/v1\n`), "an SDK's value: with /v1");
      assert.match(stdout, new RegExp(`settings=http%3A%2F%2Flocalhost%3A${port}%2Fmc-settings\\.json`));
      assert.match(stdout, /curl -N http:\/\/localhost:\d+\/v1\/chat\/completions -H "Authorization: Bearer demo:/);
      const response = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "echo", stream: true, messages: [{ role: "user", content: "ping pong" }] }),
      });
      const text = await response.text();
      const content = text.split("\n").filter((line) => line.startsWith("data: {"))
        .map((line) => JSON.parse(line.slice(6)).choices[0].delta.content ?? "").join("");
      assert.equal(content, "Echo: ping pong");
      assert.ok(text.endsWith("data: [DONE]\n\n"));
      assert.ok(!text.includes('"usage"'), "the usage event the relay asked for is not passed on");
      relay.child.kill("SIGTERM");
      assert.equal((await relay.finished()).code, 0);
      assert.match(
        relay.output().stdout,
        /"model":"echo","usage":\{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5\}/,
        "the demo's log line shows the stream's token usage",
      );
    },
  );

  await t.step("the demo refuses to start when UPSTREAM_BASE_URL is set", async () => {
    const output = await runRelayProcess({ UPSTREAM_BASE_URL: "https://api.openai.com/v1" }, ["demo"]);
    assert.equal(output.code, 1);
    assert.match(output.stderr, /UPSTREAM_BASE_URL is set, so the demo will not start/);
  });

  await t.step("--version and --help answer without configuration", async () => {
    const version = await runRelayProcess({}, ["--version"]);
    assert.equal(version.code, 0);
    const changelog = await Deno.readTextFile(new URL("./CHANGELOG.md", import.meta.url));
    const newest = /^## \[(\d+\.\d+\.\d+)\]/m.exec(changelog)![1];
    assert.equal(version.stdout.trim(), `mc-relay ${newest}`);
    const help = await runRelayProcess({}, ["--help"]);
    assert.equal(help.code, 0);
    for (const name of ENV_VARS) assert.ok(help.stdout.includes(name), `--help documents ${name}`);
  });

  await t.step("a real process with canary secrets prints and returns none of them", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    const relay = await spawnRelay({
      ...minimalEnv,
      UPSTREAM_BASE_URL: upstream.url,
      ALLOWED_ORIGIN: ALLOWED,
      LOG_LEVEL: "debug",
      UPSTREAM_EXTRA_HEADERS_JSON: JSON.stringify({ "X-Extra-Secret": CANARY_EXTRA }),
    });
    const requests: [string, RequestInit][] = [
      ["/v1/models", { headers: { authorization: GOOD_BEARER } }],
      ["/v1/models", { headers: { authorization: `Bearer ${USERNAME}:${CANARY_PASSWORD}-wrong` } }],
      ["/v1/models", { headers: { authorization: `Bearer ${CANARY_KEY}` } }],
      ["/v1/chat/completions", {
        method: "POST",
        headers: { authorization: GOOD_BEARER, origin: ALLOWED },
        body: chatBody(),
      }],
      ["/v1/chat/completions", {
        method: "POST",
        headers: { authorization: GOOD_BEARER, origin: EVIL },
        body: chatBody(),
      }],
    ];
    for (const [path, init] of requests) {
      const response = await fetch(`${relay.url}${path}`, init);
      seenByClientsOrLogs.push(await response.text(), JSON.stringify([...response.headers]));
    }
    relay.child.kill("SIGTERM");
    await relay.finished();
    const { stdout, stderr } = relay.output();
    for (const secret of [CANARY_KEY, CANARY_EXTRA]) {
      assert.ok(!stdout.includes(secret) && !stderr.includes(secret), "a secret was printed");
    }
    assert.ok(!stdout.includes(CANARY_PASSWORD) && !stderr.includes(CANARY_PASSWORD), "the password was printed");
  });
});

Deno.test("https and healthcheck", async (t) => {
  await using tls = await selfSignedCertificate();
  await using upstream = startUpstream((request, seen) =>
    seen.body.includes('"stream":true')
      ? new Response("data: one\n\ndata: [DONE]\n\n", { headers: { "content-type": "text/event-stream" } })
      : openAiLikeUpstream(request, seen)
  );
  const env = {
    ...minimalEnv,
    UPSTREAM_BASE_URL: upstream.url,
    TLS_CERT_FILE: tls.certFile,
    TLS_KEY_FILE: tls.keyFile,
  };

  await t.step("with TLS_CERT_FILE and TLS_KEY_FILE the relay serves HTTPS, streams included", async () => {
    const relay = await spawnRelay(env);
    try {
      assert.match(relay.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      using client = Deno.createHttpClient({ caCerts: [tls.cert] });
      const models = await fetch(`${relay.url}/v1/models`, { client, headers: { authorization: GOOD_BEARER } });
      assert.equal(models.status, 200);
      assert.equal((await models.json()).data[0].id, "gpt-test");
      const streamed = await fetch(`${relay.url}/v1/chat/completions`, {
        client,
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
        body: chatBody({ stream: true }),
      });
      assert.equal(streamed.headers.get("content-type"), "text/event-stream");
      assert.equal(await streamed.text(), "data: one\n\ndata: [DONE]\n\n");
      const port = new URL(relay.url).port;

      const healthy = await runRelayProcess({ ...env, PORT: port, HOST: "127.0.0.1" }, ["healthcheck"]);
      assert.equal(healthy.code, 0, healthy.stdout);
      assert.equal(healthy.stdout.trim(), "healthy");
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
    }
  });

  await t.step("healthcheck answers 0 for a running plain-HTTP relay and 1 when none answers", async () => {
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url });
    const port = new URL(relay.url).port;
    const healthy = await runRelayProcess({ PORT: port, HOST: "0.0.0.0" }, ["healthcheck"]);
    assert.equal(healthy.code, 0, healthy.stdout);
    relay.child.kill("SIGTERM");
    await relay.finished();
    const unhealthy = await runRelayProcess({ PORT: port }, ["healthcheck"]);
    assert.equal(unhealthy.code, 1);
    assert.match(unhealthy.stdout, /^unhealthy: /);
  });

  await t.step("an unreadable TLS file stops the start with exit code 1, naming the variable", async () => {
    const output = await runRelayProcess({ ...env, TLS_KEY_FILE: `${tls.keyFile}.missing` });
    assert.equal(output.code, 1);
    assert.match(output.stderr, /TLS_KEY_FILE names ".*key\.pem\.missing", which cannot be read \(NotFound\)/);
  });

  await t.step("a file that is not PEM is refused", async () => {
    const output = await runRelayProcess({ ...env, TLS_CERT_FILE: new URL("./deno.json", import.meta.url).pathname });
    assert.equal(output.code, 1);
    assert.match(output.stderr, /TLS_CERT_FILE must name a PEM file/);
  });
});

Deno.test({
  name: "deploy examples",
  // .ci/run installs caddy; elsewhere the test runs only where caddy is installed.
  ignore: !IN_CI && !installed("caddy"),
}, async (t) => {
  await t.step(
    "examples/Caddyfile with an internal certificate streams a chat over HTTPS, chunk by chunk",
    async () => {
      const stream = controlledStream();
      await using upstream = startUpstream((_request, seen) =>
        seen.path === "/chat/completions"
          ? new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
          : openAiLikeUpstream(_request, seen)
      );
      const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, ALLOWED_ORIGIN: ALLOWED });
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-caddy-" });
      const httpsPort = freePort();
      const config = `${folder}/Caddyfile`;
      // The example is used unchanged; only the test's global options (local CA, free ports) join its global block.
      const example = await Deno.readTextFile(new URL("./examples/Caddyfile", import.meta.url));
      const globalBlock = example.indexOf("\n{\n");
      assert.ok(globalBlock > 0, "the example opens with a global options block");
      await Deno.writeTextFile(
        config,
        `${
          example.slice(0, globalBlock)
        }\n{\n\tadmin off\n\tlocal_certs\n\tskip_install_trust\n\tauto_https disable_redirects\n\thttp_port ${freePort()}\n\thttps_port ${httpsPort}\n\tstorage file_system ${folder}/data\n${
          example.slice(globalBlock + 3)
        }`,
      );
      const caddy = new Deno.Command("caddy", {
        args: ["run", "--config", config, "--adapter", "caddyfile"],
        env: {
          MC_RELAY_DOMAIN: `localhost:${httpsPort}`,
          MC_RELAY_UPSTREAM: new URL(relay.url).host,
          XDG_DATA_HOME: folder,
          XDG_CONFIG_HOME: folder,
          HOME: folder,
        },
        stdout: "null",
        stderr: "piped",
      }).spawn();
      const caddyLog = caddy.stderr.pipeThrough(new TextDecoderStream()).pipeTo(new WritableStream());
      try {
        const rootFile = `${folder}/data/pki/authorities/local/root.crt`;
        const root = await within(
          15000,
          (async () => {
            while (true) {
              try {
                return await Deno.readTextFile(rootFile);
              } catch {
                await sleep(100);
              }
            }
          })(),
          "caddy did not create its local certificate authority",
        );
        using client = Deno.createHttpClient({ caCerts: [root] });
        const base = `https://localhost:${httpsPort}`;
        const models = await within(
          15000,
          (async () => {
            while (true) {
              try {
                return await fetch(`${base}/v1/models`, {
                  client,
                  headers: { authorization: GOOD_BEARER, origin: ALLOWED },
                });
              } catch {
                await sleep(200);
              }
            }
          })(),
          "caddy did not serve HTTPS",
        );
        assert.equal(models.status, 200);
        assert.equal(models.headers.get("access-control-allow-origin"), ALLOWED);
        assert.equal((await models.json()).data[0].id, "gpt-test");

        const response = await fetch(`${base}/v1/chat/completions`, {
          client,
          method: "POST",
          headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
          body: chatBody({ stream: true }),
        });
        assert.equal(response.status, 200);
        assert.match(response.headers.get("strict-transport-security") ?? "", /max-age=/);
        const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
        for (let i = 0; i < 3; i++) {
          stream.send(`data: chunk ${i}\n\n`);
          const { value } = await within(5000, reader.read(), `chunk ${i} was held back on the way through Caddy`);
          assert.equal(value, `data: chunk ${i}\n\n`);
        }
        stream.close();
        assert.ok((await reader.read()).done);

        // A client that stalls in its headers is closed by Caddy (read_header 10s), never reaching the relay.
        const stalled = await Deno.connectTls({ hostname: "localhost", port: httpsPort, caCerts: [root] });
        await stalled.write(encoder.encode("GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"));
        const closed = await within(20_000, stalled.read(new Uint8Array(1024)), "Caddy kept a stalled client open");
        assert.ok(closed === null || closed > 0, "closed, or answered with an error and then closed");
        stalled.close();
      } finally {
        caddy.kill("SIGTERM");
        await caddy.status;
        await caddyLog.catch(() => {});
        relay.child.kill("SIGTERM");
        await relay.finished();
        await Deno.remove(folder, { recursive: true });
      }
    },
  );
});

// ---------------------------------------------------------------------------
// Canary: runs last, over everything every test above saw
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Security review findings (each step failed before its fix)
// ---------------------------------------------------------------------------

Deno.test("security review", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const hashedUser = async (name: string, password: string) => ({
    name,
    hash: parsePasswordHash(await hashPassword(password, 20_000))!,
  });
  const metricValue = (text: string, name: string) => Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1]);

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
    "a key that differs only in case is refused, and the upstream gets exactly the body that was checked",
    async () => {
      await using relay = startRelay(testConfig(upstream.url, { allowedModels: ["allowed"] }));
      const chat = relay.chat;
      const before = upstream.requests.length;
      for (
        const body of [
          '{"model":"allowed","MODEL":"forbidden","messages":[]}',
          '{"model":"allowed","stream":false,"Stream":true,"messages":[]}',
          '{"model":"allowed","stream":false,"\u017ftream":true,"messages":[]}',
          '{"model":"allowed","stream":1,"messages":[]}',
          '{"model":"allowed","messages":[],"temperature":NaN}',
          '["not", "an", "object"]',
        ]
      ) {
        const refused = await chat(body);
        assert.equal(refused.status, 400, body);
        assert.equal(refused.json().error.code, "invalid_request_body");
      }
      assert.equal(upstream.requests.length, before, "nothing ambiguous reached the upstream");
      assert.equal((await chat('{"model":"forbidden","model":"allowed","messages":[]}')).status, 200);
      const forwarded = upstream.requests.at(-1)!.body;
      assert.equal(JSON.parse(forwarded).model, "allowed");
      assert.ok(!forwarded.includes("forbidden"), "the duplicate key the relay did not check is not forwarded");
    },
  );

  await t.step("an ALLOWED_MODELS entry upstream/model allows that model on that upstream only", async () => {
    await using second = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url, {
      upstreams: [testUpstream("openai", upstream.url), testUpstream("router", second.url)],
      allowedModels: ["openai/gpt-4o", "router/cheap", "meta-llama/llama-3"],
    }));
    const chat = (model: string) => relay.chat(chatBody({ model }));
    const before = second.requests.length;
    assert.equal((await chat("router/openai/gpt-4o")).status, 400, "openai's model is not allowed on router");
    assert.equal(second.requests.length, before);
    assert.equal((await chat("openai/gpt-4o")).status, 200);
    assert.equal((await chat("router/cheap")).status, 200);
    assert.equal((await chat("router/meta-llama/llama-3")).status, 200, "an entry without an upstream prefix");
  });

  await t.step("request bodies held at once are bounded by MAX_BUFFERED_BYTES: 503 with Retry-After", async () => {
    await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100_000, maxBufferedBytes: 150_000 }));
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const prefix = '{"model":"gpt-test","messages":[],"pad":"';
    const slowBody = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(encoder.encode(prefix + "x".repeat(90_000)));
        await released;
        controller.enqueue(encoder.encode('"}'));
        controller.close();
      },
    });
    const slow = fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: slowBody,
      duplex: "half",
    } as RequestInit);
    await sleep(100);
    const second = await relay.chat(chatBody({ pad: "y".repeat(90_000) }));
    assert.equal(second.status, 503);
    assert.equal(second.headers.get("retry-after"), "1");
    assert.equal(second.json().error.code, "relay_busy");
    release();
    const first = await slow;
    assert.equal(first.status, 200);
    await first.body?.cancel();
    const again = await relay.chat(chatBody({ pad: "y".repeat(90_000) }));
    assert.equal(again.status, 200, "the bytes are released once a body has been forwarded");
  });

  await t.step(
    "a provider key echoed in any form, or in a body the relay cannot inspect, never reaches the client",
    async () => {
      const key = CANARY_KEY;
      const base64 = btoa(key);
      const cases: [string, () => Response][] = [
        ["JSON \\u escapes", () =>
          new Response(`{"error":{"message":"bad key ${key.replaceAll("-", "\\u002d")}"}}`, {
            status: 401,
            headers: { "content-type": "application/json" },
          })],
        [
          "JSON \\/ escapes",
          () =>
            new Response(JSON.stringify({ error: { message: `bad key ${key}` } }).replaceAll("-", "-"), {
              status: 401,
            }),
        ],
        ["URL-encoded", () => new Response(`key=${encodeURIComponent(key)}`, { status: 400 })],
        ["base64", () => new Response(`auth was ${base64}`, { status: 403 })],
        ["base64 after one byte", () => new Response(`auth ${btoa(`:${key}`)}`, { status: 403 })],
        ["a 401 sent as an event stream", () =>
          new Response(`data: {"error":"${key}"}\n\n`, {
            status: 401,
            headers: { "content-type": "text/event-stream" },
          })],
        ["a 300 without Location", () => new Response(`see ${key}`, { status: 300 })],
        ["response headers", () =>
          new Response("{}", {
            status: 401,
            headers: { "www-authenticate": `Bearer realm="${key}"`, "x-debug-auth": `Bearer ${key}` },
          })],
      ];
      for (const [label, answer] of cases) {
        await using echoing = startUpstream(() => answer());
        await using relay = startRelay(testConfig(echoing.url));
        const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
        const everything = `${response.text} ${JSON.stringify([...response.headers])}`;
        const unescaped = everything.replace(/\\u([0-9a-fA-F]{4})/g, (_, hex) => String.fromCharCode(parseInt(hex, 16)))
          .replaceAll("\\/", "/");
        for (const form of [key, base64.slice(0, -4), encodeURIComponent(key), btoa(`:${key}`).slice(4, -4)]) {
          assert.ok(
            !unescaped.includes(form) && !decodeURIComponent(everything).includes(key),
            `${label}: ${everything}`,
          );
        }
      }
      const replaced: [string, () => Response][] = [
        [
          "a gzip error body",
          () =>
            new Response(new Blob([`{"error":"${key}"}`]).stream().pipeThrough(new CompressionStream("gzip")), {
              status: 401,
              headers: { "content-encoding": "gzip", "content-type": "application/json" },
            }),
        ],
        ["an error body over 1 MiB", () => new Response(`${"x".repeat(1_100_000)} ${key}`, { status: 500 })],
      ];
      for (const [label, answer] of replaced) {
        await using echoing = startUpstream(() => answer());
        await using relay = startRelay(testConfig(echoing.url));
        const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
        assert.ok(response.status >= 400, label);
        assert.equal(response.json().error.code, "upstream_error", label);
        assert.match(response.json().error.message, /does not pass on/, label);
        assert.equal(response.headers.get("content-encoding"), null, label);
        assert.ok(!response.text.includes(key), label);
      }
    },
  );

  await t.step("routing and forwarding use only the request target: a Host with a path or query gets 400", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const before = upstream.requests.length;
    for (const host of ["x/v1/models?", "x/v1/models?a=1&", "x?y", "a b", "x#frag", "user@x"]) {
      const response = await rawRequest(
        relay.port,
        `GET /nope HTTP/1.1\r\nHost: ${host}\r\nAuthorization: ${GOOD_BEARER}\r\nConnection: close`,
      );
      assert.equal(response.status, 400, host);
      assert.match(response.text, /invalid_host/);
    }
    assert.equal(upstream.requests.length, before);
    for (const host of ["relay.example.com", "127.0.0.1:8080", "[::1]:8080"]) {
      const response = await rawRequest(
        relay.port,
        `GET /v1/models?limit=2 HTTP/1.1\r\nHost: ${host}\r\nAuthorization: ${GOOD_BEARER}\r\nConnection: close`,
      );
      assert.equal(response.status, 200, host);
      assert.equal(upstream.requests.at(-1)!.search, "?limit=2");
    }
  });

  await t.step(
    "every answered request is charged: usage of embeddings and responses, an estimate when none came",
    async () => {
      const stream = controlledStream();
      await using usageUpstream = startUpstream((_request, seen) => {
        if (seen.path === "/embeddings") {
          return Response.json({ object: "list", data: [], usage: { prompt_tokens: 7, total_tokens: 7 } });
        }
        if (seen.path === "/responses") {
          const events = [
            'event: response.output_text.delta\rdata: {"type":"response.output_text.delta","delta":"hi"}\r\r',
            'event: response.completed\rdata: {"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":3,"total_tokens":8}}}\r\r',
          ];
          return new Response(events.join(""), { headers: { "content-type": "text/event-stream" } });
        }
        return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
      });
      await using relay = startRelay(
        testConfig(usageUpstream.url),
      );
      const post = (path: string, body: string) =>
        relay.call(path, {
          method: "POST",
          headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
          body,
        });
      assert.equal((await post("/v1/embeddings", '{"model":"e","input":"x"}')).status, 200);
      const responses = await post("/v1/responses", '{"model":"r","input":"x","stream":true}');
      assert.equal(responses.status, 200);
      assert.match(responses.text, /response\.completed/, "the Responses API keeps its own usage event");

      const response = await relay.fetchChat(chatBody({ stream: true }));
      const reader = response.body!.getReader();
      stream.send('data: {"choices":[{"delta":{"content":"a"}}]}\n\n');
      stream.send('data: {"choices":[{"delta":{"content":"b"}}]}\n\n');
      await reader.read();
      await reader.cancel(); // the client leaves before the usage event
      await stream.cancelled;
      await sleep(20);
      const [embeddings, responsesLog, chat] = relay.requestLogs().slice(-3);
      assert.deepEqual(embeddings.usage, { prompt_tokens: 7, total_tokens: 7 });
      assert.deepEqual(responsesLog.usage, { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 });
      assert.equal(chat.outcome, "client_gone");
      assert.equal(chat.usage.estimated, true);
      assert.ok(chat.usage.prompt_tokens > 0 && chat.usage.completion_tokens >= 1, JSON.stringify(chat.usage));
    },
  );

  await t.step(
    "events separated by bare CRs are split, their usage read and the asked-for usage event removed",
    async () => {
      await using crUpstream = startUpstream(() =>
        new Response(
          'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\r\rdata: [DONE]\r\r',
          { headers: { "content-type": "text/event-stream" } },
        )
      );
      await using relay = startRelay(testConfig(crUpstream.url));
      const response = await relay.chat(chatBody({ stream: true }));
      assert.equal(response.text, 'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: [DONE]\r\r');
      assert.deepEqual(relay.requestLogs().at(-1).usage, { prompt_tokens: 2, completion_tokens: 1, total_tokens: 3 });
    },
  );

  await t.step("a 404 never tells whether the path matched a secret", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const secret = await relay.call(`/${CANARY_EXTRA}`);
    const other = await relay.call("/not-a-secret-at-all");
    assert.equal(secret.status, 404);
    assert.equal(secret.json().error.message, other.json().error.message);
    assert.ok(!secret.text.includes("REDACTED"));
  });

  await t.step("metric label sets: one user's junk models cannot push other users' tokens into 'other'", async () => {
    await using relay = startRelay(testConfig(upstream.url, {
      users: [{ name: USERNAME, password: CANARY_PASSWORD }, { name: "quiet", password: "quiet-password-123" }],
      metricsUsers: [USERNAME],
    }));
    const chat = (authorization: string, model: string) =>
      relay.call("/v1/chat/completions", {
        method: "POST",
        headers: { authorization, "content-type": "application/json" },
        body: chatBody({ model }),
      });
    for (let i = 0; i < 30; i++) await chat(GOOD_BEARER, `junk-${i}`);
    await chat("Bearer quiet:quiet-password-123", "real-model");
    const metrics = (await relay.call("/metrics", { headers: { authorization: GOOD_BEARER } })).text;
    assert.match(metrics, /^mc_relay_tokens_total\{user="quiet",model="real-model",kind="prompt"\} 9$/m);
    assert.match(metrics, /^mc_relay_tokens_total\{user="team",model="other",kind="prompt"\} 90$/m);
    assert.match(metrics, /^mc_relay_tokens_total\{user="team",model="other",kind="completion"\} 10$/m);
    assert.equal(
      (metrics.match(/^mc_relay_tokens_total\{user="team"/gm) ?? []).length,
      21 * 2,
      "20 models and other, two kinds each",
    );
  });

  await t.step("the metrics port listens on loopback unless METRICS_HOST names an address", async () => {
    const relay = await spawnRelay({
      ...minimalEnv,
      UPSTREAM_BASE_URL: upstream.url,
      HOST: "0.0.0.0",
      METRICS_PORT: String(freePort()),
    });
    try {
      const served = relay.output().stdout.split("\n").find((line) => line.includes('"metrics served"'));
      assert.match(served ?? "", /"url":"http:\/\/127\.0\.0\.1:\d+\/metrics"/);
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
    }
  });

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
    const process = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, AUTH_FAILURES_PER_MINUTE: "0" });
    process.child.kill("SIGTERM");
    await process.finished();
    assert.match(process.output().stdout, /"level":"warn","msg":"AUTH_FAILURES_PER_MINUTE=0/);
  });

  await t.step(
    "attacks that held stay held: smuggling, duplicate lengths, header floods, lookalike origins",
    async () => {
      await using relay = startRelay(testConfig(upstream.url));
      const before = upstream.requests.length;
      const smuggled = await rawRequest(
        relay.port,
        `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close`,
        "0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
      );
      assert.ok(smuggled.status === 400 || smuggled.status === 0, `CL+TE: ${smuggled.status}`);
      const twoLengths = await rawRequest(
        relay.port,
        `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: ${GOOD_BEARER}\r\nContent-Length: 2\r\nContent-Length: 40\r\nConnection: close`,
        "{}",
      );
      assert.ok(twoLengths.status === 400 || twoLengths.status === 0, `duplicate Content-Length: ${twoLengths.status}`);
      const manyHeaders = Array.from({ length: 1000 }, (_, i) => `X-Filler-${i}: ${i}`).join("\r\n");
      const flood = await rawRequest(
        relay.port,
        `GET /v1/models HTTP/1.1\r\nHost: x\r\n${manyHeaders}\r\nConnection: close`,
      );
      assert.ok(
        flood.status === 431 || flood.status === 400 || flood.status === 0 || flood.status === 401,
        `${flood.status}`,
      );
      assert.equal(upstream.requests.length, before, "none of them reached the upstream");
      for (
        const origin of [
          "https://www.metaconfigurator.org.evil.example",
          "https://evil-www.metaconfigurator.org",
          "http://www.metaconfigurator.org",
          "https://www.metaconfigurator.org:8443",
          "https://WWW.METACONFIGURATOR.ORG",
          "null",
        ]
      ) {
        const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER, origin } });
        assert.equal(response.status, 403, origin);
        assert.equal(response.headers.get("access-control-allow-origin"), null, origin);
      }
    },
  );
});

// ---------------------------------------------------------------------------
// Public relay: open access by choice, limits per window, token budgets
// ---------------------------------------------------------------------------

Deno.test("public relay and budgets", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const publicConfig = (overrides: Partial<RelayConfig> = {}) =>
    testConfig(upstream.url, {
      publicAccess: true,
      rateLimitPerMinute: 20,
      tokenBudgetPerDay: 100_000,
      trustProxy: parseTrustProxyForTest("127.0.0.1"),
      ...overrides,
    });
  const chatAs = (
    relay: { call: ReturnType<typeof startRelay>["call"] },
    headers: Record<string, string>,
    extra = {},
  ) =>
    relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: chatBody(extra),
    });

  await t.step(
    "PUBLIC_ACCESS refuses to start without ALLOWED_ORIGIN, a request limit and a token budget",
    async () => {
      const result = parseConfig({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
      });
      assert.ok(!result.ok);
      assert.equal(result.errors.length, 3, result.errors.join("\n"));
      assert.match(result.errors[0], /^PUBLIC_ACCESS=true needs ALLOWED_ORIGIN/);
      assert.match(result.errors[1], /RATE_LIMIT_PER_MINUTE, RATE_LIMIT_PER_HOUR, RATE_LIMIT_PER_DAY or CONCURRENT/);
      assert.match(result.errors[2], /TOKEN_BUDGET_PER_DAY or TOKEN_BUDGET_PER_MONTH/);
      const started = await runRelayProcess({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
      });
      assert.equal(started.code, 1);
      assert.match(started.stderr, /RATE_LIMIT_PER_MINUTE/);
      assert.match(started.stderr, /TOKEN_BUDGET_PER_DAY/);
      const ok = parseConfig({
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
        RATE_LIMIT_PER_DAY: "1000",
        TOKEN_BUDGET_PER_MONTH: "1000000",
      });
      assert.ok(ok.ok, "no users are needed in public mode");
      assert.match(ok.warnings.join("\n"), /PUBLIC_ACCESS=true: anyone who can reach the relay/);
    },
  );

  await t.step(
    "MC's public preset passes as anonymous: an empty Bearer, or a leftover key never logged or forwarded",
    async () => {
      await using relay = startRelay(publicConfig());
      const leftover = "sk-LEFTOVER-provider-key-9d3e";
      for (const authorization of ["Bearer ", `Bearer ${leftover}`, undefined]) {
        const headers: Record<string, string> = { origin: ALLOWED };
        if (authorization !== undefined) headers.authorization = authorization;
        const response = await chatAs(relay, headers);
        assert.equal(response.status, 200, `${authorization}`);
        const seen = upstream.requests.at(-1)!;
        assert.ok(!JSON.stringify([...seen.headers]).includes(leftover), "the leftover key never goes upstream");
        assert.equal(seen.headers.get("authorization"), `Bearer ${CANARY_KEY}`);
      }
      const entries = relay.requestLogs().slice(-3);
      assert.deepEqual(entries.map((entry) => entry.user), [undefined, undefined, undefined]);
      assert.ok(!relay.logs.join("\n").includes("LEFTOVER"), "the leftover key is in no log line");
    },
  );

  await t.step("in public mode credentials that name a user are checked: the right password is that user", async () => {
    await using relay = startRelay(publicConfig());
    assert.equal((await chatAs(relay, { authorization: `Bearer ${USERNAME}:wrong-password` })).status, 401);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200);
    assert.equal(relay.requestLogs().at(-1).user, USERNAME);
  });

  await t.step("limits count per address for anonymous callers and per user for signed-in ones", async () => {
    await using relay = startRelay(publicConfig({
      rateLimitPerMinute: 1,
      users: [{ name: USERNAME, password: CANARY_PASSWORD }, { name: "bob", password: "bob-password-456" }],
    }));
    const from = (address: string, authorization?: string) =>
      chatAs(relay, { "x-forwarded-for": address, ...(authorization && { authorization }) });
    assert.equal((await from("198.51.100.1")).status, 200);
    assert.equal((await from("198.51.100.1")).status, 429, "that address has used its minute");
    assert.equal((await from("198.51.100.2")).status, 200, "another address has its own");
    assert.equal((await from("198.51.100.1", GOOD_BEARER)).status, 200, "a user behind that address has their own");
    assert.equal((await from("198.51.100.1", GOOD_BEARER)).status, 429);
    assert.equal((await from("198.51.100.1", "Bearer bob:bob-password-456")).status, 200, "and so does bob");
  });

  await t.step("each window refuses with 429, naming the limit, and frees up as the clock moves", async () => {
    for (
      const [window, overrides, retryAfter] of [
        ["minute", { rateLimitPerMinute: 2 }, 30],
        ["hour", { rateLimitPerHour: 2 }, 1800],
        ["day", { rateLimitPerDay: 2 }, 43200],
      ] as const
    ) {
      const clock = manualClock();
      await using relay = startRelay(
        publicConfig({ rateLimitPerMinute: 0, ...overrides }),
        undefined,
        clock.now,
      );
      assert.equal((await chatAs(relay, {})).status, 200);
      assert.equal((await chatAs(relay, {})).status, 200);
      const refused = await chatAs(relay, {});
      assert.equal(refused.status, 429, window);
      assert.equal(refused.headers.get("retry-after"), String(retryAfter));
      assert.equal(refused.json().error.code, "relay_rate_limit_exceeded");
      assert.equal(
        refused.json().error.message,
        `mc-relay: the relay's limit of 2 requests per ${window} (RATE_LIMIT_PER_${window.toUpperCase()}) is reached for this address; one more is allowed in ${retryAfter} s`,
      );
      assert.doesNotMatch(refused.json().error.message, /provider/, "never reads like the provider's 429");
      clock.advance(retryAfter * 1000);
      assert.equal((await chatAs(relay, {})).status, 200, `${window}: free again`);
    }
  });

  await t.step(
    "a request reserves its tokens when it starts and is settled with the real usage at the end",
    async () => {
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      await using slow = startUpstream(async (request, seen) => {
        await held;
        return openAiLikeUpstream(request, seen);
      });
      await using relay = startRelay(testConfig(slow.url, { tokenBudgetPerDay: 1000, maxTokensPerRequest: 100 }));
      const usage = async () => (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
      const body = chatBody({ max_tokens: 500 });
      const pending = relay.chat(body);
      await sleep(50);
      const reservation = Math.ceil(encoder.encode(body).byteLength / 4) + 100;
      assert.equal((await usage()).budgets[0].used, reservation, "prompt estimate plus the capped max_tokens");
      release();
      assert.equal((await pending).status, 200);
      assert.equal(JSON.parse(slow.requests.at(-1)!.body).max_tokens, 100, "max_tokens lowered to the cap");
      assert.equal((await usage()).budgets[0].used, 10, "settled with the upstream's total_tokens");
    },
  );

  await t.step("a spent budget gets 429 token_budget_exceeded until the UTC day or month ends", async () => {
    let now = Date.UTC(2026, 10, 25, 23, 0, 0);
    await using relay = startRelay(testConfig(upstream.url, { tokenBudgetPerDay: 15 }), undefined, () => now);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "10 of 15 used");
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "20 of 15: one overshoot");
    const before = upstream.requests.length;
    const refused = await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "token_budget_exceeded");
    assert.equal(refused.headers.get("retry-after"), "3600");
    assert.match(
      refused.json().error.message,
      /15 tokens per UTC day \(TOKEN_BUDGET_PER_DAY\).*2026-11-26T00:00:00\.000Z/,
    );
    assert.equal(upstream.requests.length, before);
    now = Date.UTC(2026, 10, 26, 0, 0, 1);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200, "a new UTC day");

    now = Date.UTC(2026, 10, 30, 23, 59, 0);
    await using monthly = startRelay(testConfig(upstream.url, { tokenBudgetPerMonth: 5 }), undefined, () => now);
    assert.equal((await chatAs(monthly, { authorization: GOOD_BEARER })).status, 200);
    const spent = await chatAs(monthly, { authorization: GOOD_BEARER });
    assert.equal(spent.status, 429);
    assert.equal(spent.headers.get("retry-after"), "60", "until 1 December, 00:00 UTC");
  });

  await t.step("a user's own budget from MC_RELAY_USERS replaces the default one", async () => {
    const result = parseConfig({
      UPSTREAM_BASE_URL: upstream.url,
      UPSTREAM_API_KEY: CANARY_KEY,
      MC_RELAY_USERS: "big;day=1000000:big-password-1234,small:small-password-123,free;day=0:free-password-1234",
      TOKEN_BUDGET_PER_DAY: "15",
    });
    assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
    await using relay = startRelay({ ...result.config, authFailuresPerMinute: 0 });
    for (let i = 0; i < 3; i++) {
      assert.equal((await chatAs(relay, { authorization: "Bearer big:big-password-1234" })).status, 200);
      assert.equal((await chatAs(relay, { authorization: "Bearer free:free-password-1234" })).status, 200);
    }
    await chatAs(relay, { authorization: "Bearer small:small-password-123" });
    await chatAs(relay, { authorization: "Bearer small:small-password-123" });
    assert.equal((await chatAs(relay, { authorization: "Bearer small:small-password-123" })).status, 429);
    const bad = parseConfig({ ...minimalEnv, MC_RELAY_USERS: "x;week=5:secret-password-1" });
    assert.ok(!bad.ok);
    assert.match(bad.errors[0], /MC_RELAY_USERS entry 1 has "week=5" after its name/);
  });

  await t.step("streamed usage is counted, and a client that leaves mid-stream is charged an estimate", async () => {
    let stream = controlledStream();
    await using streaming = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(streaming.url, { tokenBudgetPerDay: 1_000_000 }));
    const used = async () =>
      (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json().budgets[0].used;
    const streamed = fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: chatBody({ stream: true }),
    }).then((response) => response.text());
    await sleep(30);
    stream.send('data: {"choices":[{"delta":{"content":"hi"}}]}\n\n');
    stream.send('data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":12,"total_tokens":42}}\n\n');
    stream.send("data: [DONE]\n\n");
    stream.close();
    await streamed;
    await sleep(20);
    assert.equal(await used(), 42);

    stream = controlledStream();
    const response = await relay.fetchChat(chatBody({ stream: true }));
    const reader = response.body!.getReader();
    stream.send('data: {"choices":[{"delta":{"content":"a"}}]}\n\n');
    await reader.read();
    await reader.cancel();
    await stream.cancelled;
    await sleep(20);
    const estimate = relay.requestLogs().at(-1).usage;
    assert.equal(estimate.estimated, true);
    assert.equal(await used(), 42 + estimate.total_tokens, "the estimate was charged");
  });

  await t.step("CONCURRENT_REQUESTS counts open streams: one more waits until a stream ends", async () => {
    const streams: ReturnType<typeof controlledStream>[] = [];
    await using streaming = startUpstream(() => {
      const stream = controlledStream();
      streams.push(stream);
      return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
    });
    await using relay = startRelay(testConfig(streaming.url, { concurrentRequests: 2, rateLimitPerMinute: 10 }));
    const open = () =>
      fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
        body: chatBody({ stream: true }),
      });
    const first = await open();
    const second = await open();
    const refused = await relay.chat(chatBody({ stream: true }));
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "relay_concurrency_limit_exceeded");
    assert.match(refused.json().error.message, /CONCURRENT_REQUESTS/);
    const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
    assert.deepEqual(usage.concurrent, { name: "CONCURRENT_REQUESTS", limit: 2, in_flight: 2 });
    assert.equal(usage.limits[0].used, 2, "the refused request gave its request event back");
    streams[0].send("data: [DONE]\n\n");
    streams[0].close();
    await first.text();
    await sleep(20);
    const third = await open();
    assert.equal(third.status, 200, "a place is free again");
    for (const stream of streams.slice(1)) stream.close();
    await second.text();
    await third.text();
  });

  await t.step("a request over its rate limit holds no in-flight place: nothing it took is kept", async () => {
    await using relay = startRelay(testConfig(upstream.url, { concurrentRequests: 5, rateLimitPerMinute: 1 }));
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200);
    const refused = await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(refused.status, 429);
    assert.equal(refused.json().error.code, "relay_rate_limit_exceeded");
    const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
    assert.equal(usage.concurrent.in_flight, 0);
    assert.equal(usage.limits[0].used, 1);
  });

  await t.step("MAX_TOKENS_PER_REQUEST lowers, adds when missing, and refuses values that are not counts", async () => {
    await using relay = startRelay(
      testConfig(upstream.url, { maxTokensPerRequest: 1000 }),
    );
    const forwarded = () => JSON.parse(upstream.requests.at(-1)!.body);
    await chatAs(relay, { authorization: GOOD_BEARER }, { max_completion_tokens: 5000 });
    assert.equal(forwarded().max_completion_tokens, 1000);
    await chatAs(relay, { authorization: GOOD_BEARER }, { max_tokens: 200 });
    assert.equal(forwarded().max_tokens, 200, "below the cap: unchanged");
    await chatAs(relay, { authorization: GOOD_BEARER });
    assert.equal(forwarded().max_tokens, 1000, "added for a chat upstream that is not OpenAI's");
    await relay.call("/v1/responses", {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: '{"model":"m","input":"x"}',
    });
    assert.equal(forwarded().max_output_tokens, 1000, "the Responses API's own field");
    const before = upstream.requests.length;
    for (const value of [0, -1, 2.5, "100"]) {
      const refused = await chatAs(relay, { authorization: GOOD_BEARER }, { max_tokens: value });
      assert.equal(refused.status, 400, String(value));
      assert.equal(refused.json().error.code, "invalid_max_tokens");
    }
    assert.equal(upstream.requests.length, before);
  });

  await t.step("GET /usage tells the caller every limit and budget: used, left and when it resets", async () => {
    const now = Date.UTC(2026, 10, 25, 12, 0, 0);
    await using relay = startRelay(
      publicConfig({ rateLimitPerHour: 200, tokenBudgetPerMonth: 2_000_000, concurrentRequests: 3 }),
      undefined,
      () => now,
    );
    await chatAs(relay, { "x-forwarded-for": "203.0.113.50" });
    const response = await relay.call("/usage", { headers: { origin: ALLOWED, "x-forwarded-for": "203.0.113.50" } });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.deepEqual(response.json(), {
      caller: { anonymous: true },
      limits: [
        { name: "RATE_LIMIT_PER_MINUTE", window: "minute", limit: 20, used: 1, remaining: 19, next_in_seconds: 0 },
        { name: "RATE_LIMIT_PER_HOUR", window: "hour", limit: 200, used: 1, remaining: 199, next_in_seconds: 0 },
      ],
      concurrent: { name: "CONCURRENT_REQUESTS", limit: 3, in_flight: 0 },
      budgets: [
        {
          name: "TOKEN_BUDGET_PER_DAY",
          window: "day",
          budget: 100_000,
          used: 10,
          remaining: 99_990,
          resets_at: "2026-11-26T00:00:00.000Z",
        },
        {
          name: "TOKEN_BUDGET_PER_MONTH",
          window: "month",
          budget: 2_000_000,
          used: 10,
          remaining: 1_999_990,
          resets_at: "2026-12-01T00:00:00.000Z",
        },
      ],
      max_tokens_per_request: null,
    });
    const other = (await relay.call("/usage", { headers: { "x-forwarded-for": "203.0.113.51" } })).json();
    assert.equal(other.budgets[0].used, 0, "another address sees its own");
  });

  await t.step("BASE_PATH serves every route and preflight under the prefix, and nothing outside it", async () => {
    await using relay = startRelay(testConfig(upstream.url, { basePath: "/relay" }));
    assert.equal((await relay.call("/relay/health")).status, 200);
    assert.equal((await relay.call("/relay/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 200);
    assert.equal(upstream.requests.at(-1)!.path, "/models", "the prefix is not passed upstream");
    assert.equal((await relay.call("/relay/usage", { headers: { authorization: GOOD_BEARER } })).status, 200);
    const chat = await relay.call("/relay/v1/chat/completions", {
      method: "POST",
      headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
      body: chatBody(),
    });
    assert.equal(chat.status, 200);
    const preflight = await relay.call("/relay/v1/chat/completions", {
      method: "OPTIONS",
      headers: { origin: ALLOWED, "access-control-request-method": "POST" },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers.get("access-control-allow-origin"), ALLOWED);
    for (const outside of ["/v1/models", "/health", "/relayv1/models", "/other/v1/models"]) {
      const response = await relay.call(outside, { headers: { authorization: GOOD_BEARER } });
      assert.equal(response.status, 404, outside);
      assert.match(response.json().error.message, /\/relay\/v1\/models/, "the 404 names the routes with the prefix");
    }
  });

  await t.step("DISABLED_PATHS switches /v1/models off", async () => {
    await using relay = startRelay(testConfig(upstream.url, { disabledPaths: ["/v1/models"] }));
    assert.equal((await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } })).status, 404);
    assert.equal((await chatAs(relay, { authorization: GOOD_BEARER })).status, 200);
    const bad = parseConfig({ ...minimalEnv, DISABLED_PATHS: "/health" });
    assert.ok(!bad.ok);
    assert.match(bad.errors[0], /^DISABLED_PATHS may list/);
  });

  await t.step(
    "a relay process configured like MC's public relay answers under /relay and passes healthcheck",
    async () => {
      const env = {
        UPSTREAM_BASE_URL: upstream.url,
        UPSTREAM_API_KEY: CANARY_KEY,
        PUBLIC_ACCESS: "true",
        ALLOWED_ORIGIN: ALLOWED,
        RATE_LIMIT_PER_MINUTE: "20",
        RATE_LIMIT_PER_HOUR: "200",
        RATE_LIMIT_PER_DAY: "1000",
        MAX_TOKENS_PER_REQUEST: "10000",
        TOKEN_BUDGET_PER_DAY: "100000",
        BASE_PATH: "/relay",
        TRUST_PROXY: "127.0.0.1",
      };
      const relay = await spawnRelay(env);
      try {
        assert.match(relay.output().stdout, /"level":"warn","msg":"PUBLIC_ACCESS=true/);
        const health = await fetch(`${relay.url}/relay/health`).then((response) => response.json());
        assert.deepEqual(health, { status: "ok", ok: true, endpoints: 1, state: "ok" });
        const chat = await fetch(`${relay.url}/relay/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: "Bearer ", "content-type": "application/json", origin: ALLOWED },
          body: chatBody(),
        });
        assert.equal(chat.status, 200);
        await chat.body?.cancel();
        const port = new URL(relay.url).port;
        const check = await runRelayProcess({ ...env, PORT: port, HOST: "127.0.0.1" }, ["healthcheck"]);
        assert.equal(check.code, 0, check.stdout);
      } finally {
        relay.child.kill("SIGTERM");
        await relay.finished();
      }
    },
  );
});

// ---------------------------------------------------------------------------
// Durable and shared state: SQLite on one machine, Redis for several copies
// ---------------------------------------------------------------------------

Deno.test({
  name: "durable and shared state",
  ignore: !installed("redis-server") && !IN_CI,
}, async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-state-" });
  // "team" has no budget of its own (day=0), so only the rate limit decides for it.
  const users = "team;day=0:" + CANARY_PASSWORD + ",spender:spender-password-1,guesser:guesser-password-1";
  const baseEnv = {
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_USERS: users,
  };
  const as = (name: string, password: string) => ({
    authorization: `Bearer ${name}:${password}`,
    "content-type": "application/json",
  });
  const chat = (url: string, headers: Record<string, string>) =>
    fetch(`${url}/v1/chat/completions`, { method: "POST", headers, body: chatBody() }).then(async (response) => {
      await response.body?.cancel();
      return response.status;
    });
  const spender = as("spender", "spender-password-1");
  const guess = as("guesser", "wrong-guess");
  const stopAll = async (relays: Awaited<ReturnType<typeof spawnRelay>>[]) => {
    for (const relay of relays) relay.child.kill("SIGTERM");
    for (const relay of relays) await relay.finished();
  };
  const usageCommand = async (env: Record<string, string>, args: string[]) => {
    const result = await runRelayProcess(env, ["usage", ...args]);
    assert.equal(result.code, 0, result.stderr);
    return result.stdout;
  };

  await t.step("SQLite at STATE_PATH: budgets, lockouts and the ledger survive a restart", async () => {
    const env = {
      ...baseEnv,
      STATE_PATH: `${folder}/state.db`,
      TOKEN_BUDGET_PER_DAY: "15",
      AUTH_FAILURES_PER_MINUTE: "2",
    };
    let relay = await spawnRelay(env);
    assert.equal(await chat(relay.url, spender), 200);
    assert.equal(await chat(relay.url, spender), 200);
    assert.equal(await chat(relay.url, guess), 401);
    assert.equal(await chat(relay.url, guess), 401);
    await stopAll([relay]);
    relay = await spawnRelay(env);
    try {
      assert.equal(await chat(relay.url, spender), 429, "the spent budget is remembered");
      assert.equal(await chat(relay.url, as("guesser", "guesser-password-1")), 429, "so is the lockout");
      assert.equal(await chat(relay.url, as("team", CANARY_PASSWORD)), 200);
    } finally {
      await stopAll([relay]);
    }
    const report = JSON.parse(await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--format", "json"]));
    assert.deepEqual(
      report.rows.map((
        row: { user: string; requests: number; total_tokens: number },
      ) => [row.user, row.requests, row.total_tokens]),
      [
        ["user:spender", 2, 20],
        ["user:team", 1, 10],
      ],
    );
    const table = await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--by", "model"]);
    assert.match(table, /^gpt-test +3 +27 +3 +30 +0$/m);
    assert.match(table, /^total +3 +27 +3 +30 +0$/m);
    const csv = await usageCommand({ STATE_PATH: env.STATE_PATH }, ["--by", "upstream", "--format=csv"]);
    assert.equal(
      csv.trim(),
      "upstream,requests,prompt_tokens,completion_tokens,total_tokens,estimated_requests\ndefault,3,27,3,30,0",
    );
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

  await t.step("a STATE_PATH that cannot be opened stops the start, naming the variable", async () => {
    const started = await runRelayProcess({ ...baseEnv, STATE_PATH: `${folder}/missing-folder/state.db` });
    assert.equal(started.code, 1);
    assert.match(started.stderr, /STATE_PATH names ".*missing-folder\/state\.db", which cannot be opened/);
    const bad = await runRelayProcess({}, ["usage", "--by", "week"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--by takes \(user\|model\|upstream\|day\), got "week"/);
  });

  await using redis = await startRedis();
  const sharedEnv = {
    ...baseEnv,
    REDIS_URL: redis.url,
    RATE_LIMIT_PER_MINUTE: "10",
    TOKEN_BUDGET_PER_DAY: "15",
    AUTH_FAILURES_PER_MINUTE: "3",
    METRICS: "team",
  };
  let copies = await Promise.all([0, 1, 2].map(() => spawnRelay(sharedEnv)));
  const roundRobin = (index: number) => copies[index % copies.length].url;
  const health = (url: string) => fetch(`${url}/health`).then((response) => response.json());

  await t.step("three copies on one Redis: RATE_LIMIT_PER_MINUTE=10 lets exactly 10 through in all", async () => {
    const team = as("team", CANARY_PASSWORD);
    const statuses = await Promise.all(Array.from({ length: 30 }, (_, i) => chat(roundRobin(i), team)));
    assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
    assert.equal(statuses.filter((status) => status === 429).length, 20);
  });

  await t.step(
    "a stage's calls go to Redis together: per-minute, per-hour and in-flight counts stay exact across copies",
    async () => {
      const batcher = as("batcher", "batcher-password-1");
      const env = {
        ...sharedEnv,
        MC_RELAY_USERS: `${users},batcher;day=0:batcher-password-1`,
        RATE_LIMIT_PER_HOUR: "100",
        CONCURRENT_REQUESTS: "50",
      };
      const batching = await Promise.all([0, 1, 2].map(() => spawnRelay(env)));
      try {
        const statuses = await Promise.all(
          Array.from({ length: 30 }, (_, i) => chat(batching[i % batching.length].url, batcher)),
        );
        assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
        const usage = await fetch(`${batching[1].url}/usage`, { headers: batcher }).then((response) => response.json());
        assert.deepEqual(usage.limits.map((limit: { used: number }) => limit.used), [10, 10], "refusals gave back");
        assert.equal(usage.concurrent.in_flight, 0, "every place was given back");
      } finally {
        await stopAll(batching);
      }
    },
  );

  await t.step("a token budget spent through one copy is refused by the others", async () => {
    assert.equal(await chat(copies[0].url, spender), 200);
    assert.equal(await chat(copies[0].url, spender), 200);
    assert.equal(await chat(copies[1].url, spender), 429);
    assert.equal(await chat(copies[2].url, spender), 429);
  });

  await t.step("a lockout earned on one copy holds on the others, however many guesses arrive at once", async () => {
    const statuses = await Promise.all(Array.from({ length: 12 }, (_, i) => chat(roundRobin(i), guess)));
    assert.equal(statuses.filter((status) => status === 401).length, 3, `statuses: ${statuses}`);
    assert.equal(statuses.filter((status) => status === 429).length, 9);
    for (const copy of copies) assert.equal(await chat(copy.url, as("guesser", "guesser-password-1")), 429);
  });

  await t.step("all copies restarted: counts and the ledger are kept", async () => {
    await stopAll(copies);
    copies = await Promise.all([0, 1, 2].map(() => spawnRelay(sharedEnv)));
    assert.equal(await chat(copies[2].url, spender), 429, "the budget is still spent");
    assert.equal(await chat(copies[1].url, as("guesser", "guesser-password-1")), 429, "the lockout still holds");
    const report = JSON.parse(await usageCommand({ REDIS_URL: redis.url }, ["--format", "json", "--by", "user"]));
    const byUser = Object.fromEntries(
      report.rows.map((row: { user: string; requests: number }) => [row.user, row.requests]),
    );
    assert.deepEqual(byUser, { "user:batcher": 10, "user:spender": 2, "user:team": 10 });
  });

  await t.step(
    "Redis stopped mid-run: every copy keeps answering, degraded, and shares counts again when it is back",
    async () => {
      const metrics = (url: string) =>
        fetch(`${url}/metrics`, { headers: as("team", CANARY_PASSWORD) }).then((response) => response.text());
      await redis.stop();
      for (const copy of copies) {
        assert.equal(await chat(copy.url, as("guesser", "guesser-password-1")), 200, "answers, counting alone");
        assert.deepEqual(await health(copy.url), { status: "ok", ok: true, endpoints: 1, state: "degraded" });
      }
      assert.match(await metrics(copies[0].url), /^mc_relay_store_degraded 1$/m);
      const warned = copies[0].output().stdout.split("\n").filter((line) => line.includes("Redis unreachable"));
      assert.equal(warned.length, 1, "the change is logged once");
      await redis.start();
      await within(
        10_000,
        (async () => {
          while ((await Promise.all(copies.map((copy) => health(copy.url)))).some((answer) => answer.state !== "ok")) {
            await sleep(200);
          }
        })(),
        "the copies did not go back to Redis",
      );
      assert.match(await metrics(copies[0].url), /^mc_relay_store_degraded 0$/m);
      assert.match(copies[0].output().stdout, /Redis answers again/);
      // Shared again: a fresh Redis, so ten requests in all pass, whichever copy they reach.
      const team = as("team", CANARY_PASSWORD);
      const statuses = await Promise.all(Array.from({ length: 15 }, (_, i) => chat(roundRobin(i), team)));
      assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
    },
  );
  await stopAll(copies);

  await t.step(
    "a copy that starts before Redis does says degraded from its first answer, then shares counts when Redis is up",
    async () => {
      await redis.stop();
      const report = await runRelayProcess({ REDIS_URL: redis.url }, ["usage"]);
      assert.equal(report.code, 1);
      assert.match(report.stderr, /mc-relay usage: Redis at REDIS_URL does not answer/);
      const early = await spawnRelay(sharedEnv);
      try {
        assert.match(early.output().stdout, /Redis unreachable.*"error":"not connected 3 s after the start"/);
        assert.equal((await health(early.url)).state, "degraded");
        assert.equal(await chat(early.url, as("team", CANARY_PASSWORD)), 200, "it answers meanwhile");
        await redis.start();
        await within(
          10_000,
          (async () => {
            while ((await health(early.url)).state !== "ok") await sleep(200);
          })(),
          "the copy did not go over to Redis",
        );
        assert.match(early.output().stdout, /Redis answers again/);
      } finally {
        await stopAll([early]);
      }
    },
  );

  await t.step(
    "200 requests at once against CONCURRENT_REQUESTS=50 across three copies: at most 50 in flight",
    async () => {
      let inFlight = 0;
      let most = 0;
      await using slow = startUpstream(async (request, seen) => {
        inFlight++;
        most = Math.max(most, inFlight);
        await sleep(300);
        inFlight--;
        return openAiLikeUpstream(request, seen);
      });
      const trio = await Promise.all(
        [0, 1, 2].map(() =>
          spawnRelay({ ...baseEnv, UPSTREAM_BASE_URL: slow.url, REDIS_URL: redis.url, CONCURRENT_REQUESTS: "50" })
        ),
      );
      try {
        const team = as("team", CANARY_PASSWORD);
        const statuses = await Promise.all(Array.from({ length: 200 }, (_, i) => chat(trio[i % 3].url, team)));
        const counts = JSON.stringify(Object.groupBy(statuses, (status) => status));
        assert.ok(most <= 50, `${most} requests were in flight at once`);
        assert.ok(most >= 40, `the limit was nearly used: ${most}, ${counts}`);
        assert.equal(
          statuses.filter((status) => status === 200).length + statuses.filter((s) => s === 429).length,
          200,
        );
      } finally {
        await stopAll(trio);
      }
    },
  );
  await Deno.remove(folder, { recursive: true });
});

// ---------------------------------------------------------------------------
// The first hour: what a newcomer meets, from the quick start to the page
// ---------------------------------------------------------------------------

Deno.test("first hour", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const here = new URL(".", import.meta.url).pathname;
  const withoutTaskLine = (stderr: string) => stderr.split("\n").filter((line) => line && !/^Task /.test(line));

  await t.step("no command prints a warning: --version, --help, a start and the demo through the tasks", async () => {
    for (const flag of ["--version", "--help"]) {
      const output = await runRelayProcess({}, [flag], { deno: ["task", "start"] });
      assert.equal(output.code, 0);
      assert.deepEqual(withoutTaskLine(output.stderr), [], `deno task start ${flag} printed to stderr`);
    }
    const relay = await spawnRelay({
      ...minimalEnv,
      UPSTREAM_BASE_URL: upstream.url,
      HOST: "127.0.0.1",
      ALLOWED_ORIGIN: ALLOWED,
    });
    const demo = await spawnRelay({}, ["demo"]);
    for (const process of [relay, demo]) {
      process.child.kill("SIGTERM");
      await process.finished();
      assert.equal(process.output().stderr, "", "a start prints nothing on stderr");
      assert.doesNotMatch(process.output().stdout, /"level":"warn"/, "a local start with origins set has no warning");
    }
  });

  await t.step(
    "a port in use, an address not on this machine, a certificate that does not fit: one line, exit 1",
    async () => {
      const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (taken.addr as Deno.NetAddr).port;
      try {
        const busy = await runRelayProcess({ ...minimalEnv, HOST: "127.0.0.1", PORT: String(port) });
        assert.equal(busy.code, 1);
        assert.match(
          busy.stderr,
          new RegExp(`PORT ${port}: 127\\.0\\.0\\.1:${port} is already in use by another program`),
        );
        assert.doesNotMatch(busy.stderr, /^\s+at /m, "no stack trace");
      } finally {
        taken.close();
      }
      const elsewhere = await runRelayProcess({ ...minimalEnv, HOST: "192.0.2.1", PORT: "0" });
      assert.equal(elsewhere.code, 1);
      assert.match(elsewhere.stderr, /HOST 192\.0\.2\.1 is not an address of this machine/);
      await using first = await selfSignedCertificate();
      await using second = await selfSignedCertificate();
      const mismatched = await runRelayProcess({
        ...minimalEnv,
        HOST: "127.0.0.1",
        PORT: "0",
        TLS_CERT_FILE: first.certFile,
        TLS_KEY_FILE: second.keyFile,
      });
      assert.equal(mismatched.code, 1);
      assert.match(
        mismatched.stderr,
        /TLS_CERT_FILE and TLS_KEY_FILE do not hold a certificate chain and its private key/,
      );
      assert.doesNotMatch(mismatched.stderr, /^\s+at /m);
    },
  );

  await t.step("deno task start reads .env, --env-file reads any file, and the real environment wins", async () => {
    const folder = await Deno.makeTempDir({ prefix: "mc-relay-env-" });
    for (const file of ["deno.json", "deno.lock", "main.ts"]) {
      await Deno.copyFile(`${here}${file}`, `${folder}/${file}`);
    }
    await Deno.writeTextFile(
      `${folder}/.env`,
      [
        "# a comment",
        "UPSTREAM_BASE_URL=http://127.0.0.1:9/not-this-one",
        `UPSTREAM_API_KEY="${CANARY_KEY}"`,
        `MC_RELAY_USERNAME=${USERNAME}`,
        `MC_RELAY_PASSWORD='${CANARY_PASSWORD}'`,
        "HOST=127.0.0.1",
        "PORT=0",
        "ALLOWED_ORIGIN=http://localhost:5173",
        "UPSTREAM_BASE_URI=typo",
      ].join("\n"),
    );
    // HOST and PORT come from the .env file; the real environment sets only the upstream.
    const relay = await spawnRelay({ UPSTREAM_BASE_URL: upstream.url }, [], { cwd: folder, deno: ["task", "start"] });
    try {
      const models = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
      assert.equal(models.status, 200, "credentials from .env, upstream from the real environment");
      await models.body?.cancel();
      assert.match(relay.output().stdout, /\.env sets UPSTREAM_BASE_URI, which the relay does not read/);
    } finally {
      relay.child.kill("SIGTERM");
      await relay.finished();
    }
    const missing = await runRelayProcess({}, ["--env-file", `${folder}/nowhere.env`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /--env-file names ".*nowhere\.env", which cannot be read \(NotFound\)/);
    const unread = await runRelayProcess({}, [], { cwd: folder });
    assert.equal(unread.code, 1);
    assert.match(
      unread.stderr,
      /A \.env file is in this folder but was not read: run 'mc-relay --env-file \.env'/,
    );
    await Deno.remove(folder, { recursive: true });
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

  await t.step({
    name: "examples/nginx.conf passes nginx -t on the nginx installed here",
    ignore: !installed("nginx") && !IN_CI,
    fn: async () => {
      await using cert = await selfSignedCertificate();
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-nginx-" });
      const example = (await Deno.readTextFile(`${here}examples/nginx.conf`))
        .replaceAll("/etc/letsencrypt/live/relay.example.com/fullchain.pem", cert.certFile)
        .replaceAll("/etc/letsencrypt/live/relay.example.com/privkey.pem", cert.keyFile);
      await Deno.writeTextFile(`${folder}/site.conf`, example);
      await Deno.writeTextFile(
        `${folder}/nginx.conf`,
        `pid ${folder}/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n  access_log off;\n  include ${folder}/site.conf;\n}\n`,
      );
      const output = await new Deno.Command("nginx", { args: ["-t", "-p", folder, "-c", `${folder}/nginx.conf`] })
        .output();
      const text = decoder.decode(output.stderr);
      await Deno.remove(folder, { recursive: true });
      assert.equal(output.code, 0, text);
      assert.match(text, /test is successful/);
    },
  });

  await t.step("/health is logged at debug; answers the relay makes itself log their true bytes_out", async () => {
    await using relay = startRelay(testConfig(upstream.url, { logLevel: "debug" }));
    await relay.call("/health");
    const refused = await relay.call("/v1/models", { headers: { authorization: "Bearer team:wrong" } });
    const lines = relay.logs.map((line) => JSON.parse(line));
    const health = lines.find((line) => line.path === "/health");
    assert.equal(health.level, "debug");
    assert.equal(
      health.bytes_out,
      encoder.encode(JSON.stringify({ status: "ok", ok: true, endpoints: 1, state: "ok" })).byteLength,
    );
    const denied = lines.find((line) => line.status === 401);
    assert.equal(denied.level, "info");
    assert.equal(denied.bytes_out, encoder.encode(refused.text).byteLength);
  });

  await t.step("GET / is one self-contained page under a strict CSP; the models show only after sign-in", async () => {
    await using relay = startRelay(testConfig(upstream.url, { publicUrl: "https://relay.example.com", basePath: "" }));
    const page = await relay.call("/");
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type")!, /^text\/html; charset=utf-8/);
    const csp = page.headers.get("content-security-policy")!;
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /frame-ancestors 'none'/);
    assert.doesNotMatch(page.text, /<(script|link|img)[^>]+(src|href)="(?!data:)/i, "no external asset");
    for (const [tag, source] of [["script", "script-src"], ["style", "style-src"]]) {
      const inline = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(page.text)![1];
      const hash = btoa(
        String.fromCharCode(...new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(inline)))),
      );
      assert.ok(csp.includes(`${source} 'sha256-${hash}'`), `the ${tag} is allowed by its hash`);
    }
    assert.match(page.text, /<code data-copy="Relay URL">https:\/\/relay\.example\.com<\/code>/);
    assert.match(page.text, /<code data-copy="baseURL">https:\/\/relay\.example\.com\/v1<\/code>/);
    assert.ok(page.text.includes(upstream.url), "the endpoint to type into MC");
    assert.ok(page.text.includes("?settings=https%3A%2F%2Frelay.example.com%2Fmc-settings.json"));
    assert.ok(!page.text.includes("gpt-test"), "no model before sign-in");
    assert.ok(!page.text.includes(CANARY_KEY) && !page.text.includes(CANARY_PASSWORD));
    await using noPage = startRelay(testConfig(upstream.url, { page: false }));
    assert.equal((await noPage.call("/")).status, 404);
  });

  await t.step(
    "/mc-settings.json is MC's settings document for this relay: no credentials, CORS, nothing secret",
    async () => {
      await using relay = startRelay(
        testConfig(upstream.url, {
          publicUrl: "https://relay.example.com/relay",
          basePath: "/relay",
          defaultModel: "gpt-test",
        }),
      );
      const settings = await relay.call("/relay/mc-settings.json", { headers: { origin: ALLOWED } });
      assert.equal(settings.status, 200);
      assert.equal(settings.headers.get("access-control-allow-origin"), ALLOWED);
      assert.deepEqual(settings.json(), {
        aiIntegration: {
          model: "gpt-test",
          backend: { relay: "https://relay.example.com/relay", endpoint: upstream.url },
        },
      });
      await using loopback = startRelay(testConfig(upstream.url));
      const derived = await loopback.call("/mc-settings.json");
      assert.equal(
        derived.json().aiIntegration.backend.relay,
        `http://127.0.0.1:${loopback.port}`,
        "a loopback relay knows its address",
      );
      await using exposed = startRelay(testConfig(upstream.url, { host: "0.0.0.0" }));
      const unknown = await rawRequest(
        exposed.port,
        "GET /mc-settings.json HTTP/1.1\r\nHost: relay.attacker.example\r\nConnection: close",
      );
      assert.equal(unknown.status, 404);
      assert.match(unknown.text, /public_url_unknown/);
      assert.ok(!unknown.text.includes("attacker"), "a Host header from outside is never trusted for it");
    },
  );

  await t.step(
    "the deployments behind a proxy set TRUST_PROXY, and .env.example keeps the image's shutdown time",
    async () => {
      for (
        const file of ["examples/kubernetes.yaml", "examples/docker-compose.yml", "examples/docker-compose.redis.yml"]
      ) {
        assert.match(await Deno.readTextFile(`${here}${file}`), /TRUST_PROXY/, file);
      }
      const dockerfile = await Deno.readTextFile(`${here}Dockerfile`);
      const imageValue = /SHUTDOWN_TIMEOUT_SECONDS=(\d+)/.exec(dockerfile)![1];
      assert.match(
        await Deno.readTextFile(`${here}examples/.env.example`),
        new RegExp(`^SHUTDOWN_TIMEOUT_SECONDS=${imageValue}$`, "m"),
      );
    },
  );
});

// ---------------------------------------------------------------------------
// Bring your own key
// ---------------------------------------------------------------------------

Deno.test("bring your own key", async (t) => {
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

// ---------------------------------------------------------------------------
// Failover and model aliases
// ---------------------------------------------------------------------------

/** An upstream that never answers; it lets go when the relay gives up on it, so it can shut down. */
function hangingUpstream() {
  return startUpstream((request) =>
    new Promise<Response>((resolve) => request.signal.addEventListener("abort", () => resolve(new Response(null))))
  );
}

Deno.test("failover and model aliases", async (t) => {
  /** A fake upstream that answers `status` (200: a chat answer naming itself) and counts what it got. */
  const answering = (name: string, status = 200) =>
    startUpstream((_request, seen) =>
      status === 200
        ? Response.json({
          choices: [{ message: { role: "assistant", content: `from ${name}` } }],
          model: JSON.parse(seen.body || "{}").model,
          usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
        })
        : Response.json({ error: { message: `${name} says ${status}` } }, { status })
    );
  const relayWith = (
    aliases: Record<string, string[]>,
    upstreams: Upstream[],
    overrides: Partial<RelayConfig> = {},
    now?: () => number,
  ) => startRelay(testConfig(upstreams[0].baseUrl, { upstreams, modelAliases: aliases, ...overrides }), undefined, now);
  const ask = (relay: ReturnType<typeof startRelay>, model = "alias-fast", extra = {}) =>
    relay.chat(chatBody({ model, ...extra }));
  await using good = answering("good");

  await t.step(
    "every failure before the first byte moves on to the next target, with the same body and its model",
    async () => {
      const refusedPort = freePort();
      const resetting = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const accepting = (async () => {
        for await (const connection of resetting) connection.close();
      })();
      await using plainHttp = startUpstream(() => new Response("not TLS"));
      await using hanging = hangingUpstream();
      const failures: [string, string][] = [
        ["connection refused", `http://127.0.0.1:${refusedPort}`],
        ["connection reset", `http://127.0.0.1:${(resetting.addr as Deno.NetAddr).port}`],
        ["DNS failure", "http://does-not-exist.invalid"],
        ["TLS failure", `https://127.0.0.1:${new URL(plainHttp.url).port}`],
        ["no response headers in time", hanging.url],
      ];
      for (const [kind, baseUrl] of failures) {
        await using relay = relayWith(
          { "alias-fast": ["broken/llama-a", "good/llama-b"] },
          [testUpstream("broken", baseUrl), testUpstream("good", good.url)],
          { requestTimeoutMs: 600 },
        );
        const before = good.requests.length;
        const response = await ask(relay);
        assert.equal(response.status, 200, kind);
        assert.equal(response.json().choices[0].message.content, "from good", kind);
        assert.equal(response.headers.get("x-relay-upstream"), "good/llama-b");
        assert.equal(good.requests.length, before + 1);
        const forwarded = JSON.parse(good.requests.at(-1)!.body);
        assert.equal(forwarded.model, "llama-b", "the target's model replaces the alias");
        assert.deepEqual(forwarded.messages, [{ role: "user", content: "Hello" }], "the same body");
        const line = relay.requestLogs().at(-1);
        assert.equal(line.alias, "alias-fast");
        assert.deepEqual(line.attempts.map((attempt: { target: string }) => attempt.target), [
          "broken/llama-a",
          "good/llama-b",
        ]);
        assert.equal(line.attempts[1].outcome, "200");
      }
      resetting.close();
      await accepting.catch(() => {});
      for (const status of [429, 500, 502, 503, 504]) {
        await using failing = answering("failing", status);
        await using relay = relayWith(
          { "alias-fast": ["failing/a", "good/b"] },
          [testUpstream("failing", failing.url), testUpstream("good", good.url)],
        );
        const response = await ask(relay);
        assert.equal(response.json().choices[0].message.content, "from good", String(status));
        assert.equal(relay.requestLogs().at(-1).attempts[0].outcome, String(status));
      }
    },
  );

  await t.step("a 400, 401, 403, 404, 413 or 422 is the request's problem: passed on, no failover", async () => {
    for (const status of [400, 401, 403, 404, 413, 422]) {
      await using refusing = answering("refusing", status);
      await using relay = relayWith(
        { "alias-fast": ["refusing/a", "good/b"] },
        [testUpstream("refusing", refusing.url), testUpstream("good", good.url)],
      );
      const before = good.requests.length;
      const response = await ask(relay);
      assert.equal(response.status, status);
      assert.match(response.text, new RegExp(`refusing says ${status}`));
      assert.equal(good.requests.length, before, `${status} did not fail over`);
    }
  });

  await t.step(
    "a stream that breaks after its first chunk is cut, never glued to another target's answer",
    async () => {
      await using breaking = startUpstream(() =>
        new Response(
          new ReadableStream({
            start(controller) {
              controller.enqueue(encoder.encode('data: {"choices":[{"delta":{"content":"half"}}]}\n\n'));
              setTimeout(() => controller.error(new Error("gone")), 20);
            },
          }),
          { headers: { "content-type": "text/event-stream" } },
        )
      );
      await using relay = relayWith(
        { "alias-fast": ["breaking/a", "good/b"] },
        [testUpstream("breaking", breaking.url), testUpstream("good", good.url)],
      );
      const before = good.requests.length;
      const response = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
        body: chatBody({ model: "alias-fast", stream: true }),
      });
      assert.equal(response.headers.get("x-relay-upstream"), "breaking/a");
      const reader = response.body!.getReader();
      let text = "";
      await assert.rejects(async () => {
        for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
          text += decoder.decode(chunk.value);
        }
      });
      assert.match(text, /half/);
      assert.doesNotMatch(text, /from good/);
      assert.equal(good.requests.length, before, "no second target after the first byte");
    },
  );

  await t.step("the breaker opens after failures in a row, skips, lets one probe through, and closes", async () => {
    let failing = true;
    await using flaky = startUpstream((request, seen) =>
      failing ? new Response("down", { status: 503 }) : openAiLikeUpstream(request, seen)
    );
    const clock = manualClock();
    await using relay = relayWith(
      { "alias-fast": ["flaky/a", "good/b"] },
      [testUpstream("flaky", flaky.url), testUpstream("good", good.url)],
      { breakerFailures: 2, breakerOpenMs: 30_000, metricsUsers: [USERNAME] },
      clock.now,
    );
    await ask(relay);
    await ask(relay);
    const health = await relay.call("/health");
    assert.deepEqual(health.json().breakers_open, ["flaky/a"]);
    const tried = flaky.requests.length;
    assert.equal((await ask(relay)).json().choices[0].message.content, "from good");
    assert.equal(flaky.requests.length, tried, "an open breaker skips its target");
    assert.equal(relay.requestLogs().at(-1).attempts[0].outcome, "breaker_open");
    const metrics = (await relay.call("/metrics", { headers: { authorization: GOOD_BEARER } })).text;
    assert.match(metrics, /^mc_relay_breaker_open\{target="flaky\/a"\} 1$/m);
    assert.match(metrics, /^mc_relay_failovers_total\{target="flaky\/a"\} 2$/m);
    clock.advance(30_000);
    await ask(relay);
    assert.equal(flaky.requests.length, tried + 1, "half-open: one probe");
    assert.deepEqual((await relay.call("/health")).json().breakers_open, ["flaky/a"], "the probe failed: open again");
    clock.advance(30_000);
    failing = false;
    assert.equal((await ask(relay)).headers.get("x-relay-upstream"), "flaky/a", "the probe succeeded");
    assert.deepEqual((await relay.call("/health")).json().breakers_open, []);
  });

  await t.step(
    "requests waiting on a target that goes down move on when its breaker opens, not at their timeout",
    async () => {
      await using hanging = hangingUpstream();
      // Timeouts open a breaker only when two callers have them (a caller's own timeouts say nothing of the target).
      const other = { name: "other", password: "other-password-1" };
      await using relay = relayWith(
        { "alias-fast": ["hanging/a", "good/b"] },
        [testUpstream("hanging", hanging.url), testUpstream("good", good.url)],
        { requestTimeoutMs: 2000, breakerFailures: 1, users: [{ name: USERNAME, password: CANARY_PASSWORD }, other] },
      );
      const first = [
        ask(relay),
        relay.chat(chatBody({ model: "alias-fast" }), { authorization: "Bearer other:other-password-1" }),
      ];
      await sleep(300);
      const later = Promise.all([ask(relay), ask(relay), ask(relay)]);
      const answers = [...await Promise.all(first), ...await later];
      assert.deepEqual(answers.map((answer) => answer.status), [200, 200, 200, 200, 200]);
      const outcomes = relay.requestLogs().slice(-5).map((line) => line.attempts[0].outcome).sort();
      assert.deepEqual(outcomes, [
        "breaker_open",
        "breaker_open",
        "breaker_open",
        "upstream_timeout",
        "upstream_timeout",
      ]);
      const afterwards = await ask(relay);
      assert.equal(relay.requestLogs().at(-1).attempts[0].ms, 0, "later requests skip it at once");
      assert.equal(afterwards.status, 200);
    },
  );

  await t.step("the whole attempt stays within REQUEST_TIMEOUT_SECONDS for the first byte", async () => {
    await using hanging = hangingUpstream();
    await using relay = relayWith(
      { "alias-slow": ["one/a", "two/b", "three/c"] },
      [testUpstream("one", hanging.url), testUpstream("two", hanging.url), testUpstream("three", hanging.url)],
      { requestTimeoutMs: 900 },
    );
    const started = performance.now();
    const response = await ask(relay, "alias-slow");
    const took = performance.now() - started;
    assert.equal(response.status, 504);
    assert.ok(took >= 850 && took < 1500, `took ${took} ms`);
    const attempts = relay.requestLogs().at(-1).attempts;
    assert.deepEqual(attempts.map((attempt: { outcome: string }) => attempt.outcome), [
      "upstream_timeout",
      "upstream_timeout",
      "upstream_timeout",
    ]);
  });

  await t.step(
    "aliases are listed and may be allow-listed; usage is charged to the target that answered, under the alias",
    async () => {
      await using failing = answering("failing", 503);
      await using relay = relayWith(
        { "alias-fast": ["failing/a", "good/b"] },
        [testUpstream("failing", failing.url), testUpstream("good", good.url)],
        { allowedModels: ["alias-fast"], tokenBudgetPerDay: 1000 },
      );
      const models = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      assert.ok(
        models.json().data.some((model: { id: string; owned_by: string }) =>
          model.id === "alias-fast" && model.owned_by === "mc-relay"
        ),
      );
      assert.equal((await ask(relay, "good/b")).status, 400, "the allow-list names the alias, not its targets");
      assert.equal((await ask(relay)).status, 200);
      const line = relay.requestLogs().at(-1);
      assert.equal(line.model, "alias-fast");
      assert.equal(line.upstream, "good/b");
      assert.equal(line.usage.total_tokens, 5);
      const usage = (await relay.call("/usage", { headers: { authorization: GOOD_BEARER } })).json();
      assert.equal(usage.budgets[0].used, 5, "charged what the answering target reported");
      const bad = parseConfig({ ...minimalEnv, MODEL_ALIASES_JSON: '{"x": ["nowhere/model"]}' });
      assert.ok(!bad.ok);
      assert.match(
        bad.errors[0],
        /MODEL_ALIASES_JSON alias "x": "nowhere\/model" must be a configured upstream's name/,
      );
    },
  );
});

// ---------------------------------------------------------------------------
// Every core: WORKERS
// ---------------------------------------------------------------------------

Deno.test("workers", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step("WORKERS above 1 refuses to start without a shared store, naming both ways", async () => {
    const refused = await runRelayProcess({ ...minimalEnv, WORKERS: "2" });
    assert.equal(refused.code, 1);
    assert.match(
      refused.stderr,
      /WORKERS=2 needs STATE_PATH or REDIS_URL, so that all workers count limits and budgets together/,
    );
    const bad = parseConfig({ ...minimalEnv, WORKERS: "many" });
    assert.ok(!bad.ok);
    assert.match(bad.errors[0], /^WORKERS must be a number of threads, e.g. 2, or auto/);
    const auto = parseConfig({ ...minimalEnv, WORKERS: "auto", STATE_PATH: "/tmp/x.db" });
    assert.ok(auto.ok);
    assert.equal(auto.config.workers, navigator.hardwareConcurrency);
  });

  await t.step(
    "threads sharing a ThreadLock take turns: a waiting thread wakes when the lock is given up, or gives up itself",
    async () => {
      const lock = new ThreadLock();
      assert.ok(lock.acquire(0), "a free lock is taken at once");
      const source = `import { ThreadLock } from ${JSON.stringify(new URL("./main.ts", import.meta.url).href)};
        self.onmessage = (event) => {
          const lock = new ThreadLock(event.data);
          self.postMessage({ tookHeldLock: lock.acquire(50) });
          const started = performance.now();
          const took = lock.acquire(10_000);
          self.postMessage({ took, waitedMs: performance.now() - started });
          if (took) lock.release();
        };`;
      const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
      const worker = new Worker(url, { type: "module" });
      const messages: Record<string, unknown>[] = [];
      const next = () =>
        within(
          10_000,
          new Promise<Record<string, unknown>>((resolve) => (worker.onmessage = (event) => resolve(event.data))),
          "the thread did not answer",
        );
      try {
        worker.postMessage(lock.memory);
        messages.push(await next());
        assert.deepEqual(
          messages[0],
          { tookHeldLock: false },
          "a held lock is not taken; the wait ends at its timeout",
        );
        const answered = next();
        await sleep(200);
        lock.release();
        messages.push(await answered);
        assert.equal(messages[1].took, true);
        assert.ok((messages[1].waitedMs as number) >= 150, "it waited while the lock was held");
        assert.ok((messages[1].waitedMs as number) < 5_000, "it woke when the lock was given up, not at its timeout");
        assert.ok(lock.acquire(5_000), "the thread gave the lock up again");
        lock.release();
      } finally {
        worker.terminate();
        URL.revokeObjectURL(url);
      }
    },
  );

  await t.step(
    "two workers on one port and one SQLite file: limits stay exact, and SIGTERM stops them all",
    async () => {
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-workers-" });
      const relay = await spawnRelay({
        ...minimalEnv,
        UPSTREAM_BASE_URL: upstream.url,
        WORKERS: "2",
        STATE_PATH: `${folder}/state.db`,
        RATE_LIMIT_PER_MINUTE: "10",
      });
      try {
        assert.equal(relay.listening.workers, 2);
        // Fresh connections each, so the kernel spreads them over both threads.
        const statuses = await Promise.all(Array.from({ length: 30 }, async () => {
          using client = Deno.createHttpClient({ poolMaxIdlePerHost: 0 });
          const response = await fetch(`${relay.url}/v1/models`, { client, headers: { authorization: GOOD_BEARER } });
          await response.body?.cancel();
          return response.status;
        }));
        assert.equal(statuses.filter((status) => status === 200).length, 10, `statuses: ${statuses}`);
        assert.equal(statuses.filter((status) => status === 429).length, 20);
      } finally {
        relay.child.kill("SIGTERM");
        const status = await within(15_000, relay.finished(), "the relay did not stop");
        assert.equal(status.code, 0);
        await Deno.remove(folder, { recursive: true });
      }
    },
  );
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assert.ok(seenByClientsOrLogs.length > 100, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
});
