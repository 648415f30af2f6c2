/**
 * The gate every request passes first: the Host, the routes and /health, browser origins (CORS and
 * preflights), BASE_PATH and DISABLED_PATHS, and request targets built to get past them.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { parseConfig } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_EXTRA,
  CANARY_PASSWORD,
  chatAs,
  chatBody,
  embeddingsUpstream,
  EVIL,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  OTHER_ALLOWED,
  rawRequest,
  type Relay,
  relayFromEnv,
  seenByClientsOrLogs,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
} from "./testing.ts";

/** A small deterministic pseudo-random generator (mulberry32), so a failing fuzz run can be repeated. */
function seededRandom(seed: number): () => number {
  return () => {
    seed = (seed + 0x6D2B79F5) | 0;
    let value = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    value = (value + Math.imul(value ^ (value >>> 7), 61 | value)) ^ value;
    return ((value ^ (value >>> 14)) >>> 0) / 4294967296;
  };
}

/** A browser's preflight for a POST to the chat route from `origin`, asking for `requestHeaders`. */
const preflight = (relay: Relay, origin: string, requestHeaders: string, extra: Record<string, string> = {}) =>
  relay.call("/v1/chat/completions", {
    method: "OPTIONS",
    headers: {
      origin,
      "access-control-request-method": "POST",
      "access-control-request-headers": requestHeaders,
      ...extra,
    },
  });

Deno.test("gate: /health and the upstreams", async (t) => {
  await t.step(
    "/health stays 200 while the only upstream is down and says so, from one cached check for many health checks",
    async () => {
      const down = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (down.addr as Deno.NetAddr).port;
      down.close();
      await using relay = startRelay(testConfig(`http://127.0.0.1:${port}/v1`));
      const answers = await Promise.all([1, 2, 3].map(() => relay.call("/health")));
      for (const answer of answers) {
        assert.equal(answer.status, 200);
        assert.equal(answer.json().ok, true);
      }
      const [state] = (await relay.call("/health")).json().upstreams;
      assert.deepEqual(state, { name: "default", answers: false, problem: "connection refused" });
    },
  );

  await t.step("the upstreams are probed at most once per 30 s, however often /health is asked", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url));
    for (let i = 0; i < 20; i++) assert.equal((await relay.call("/health")).status, 200);
    assert.equal(upstream.requests.length, 1);
  });

  await t.step("a BYOK upstream is never probed (it has no key of its own) and shows as unchecked", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(
      testConfig(upstream.url, {
        upstreams: [{
          name: "own",
          baseUrl: upstream.url,
          apiKey: "",
          byok: true,
          authHeader: "Authorization",
          authPrefix: "Bearer",
          extraHeaders: {},
        }],
      }),
    );
    assert.deepEqual((await relay.call("/health")).json().upstreams, [{ name: "own", answers: null }]);
    assert.equal(upstream.requests.length, 0);
  });

  await t.step("/v1/v1/... gets a 404 that says to remove the extra /v1 from the client's base URL", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url));
    const doubled = await relay.call("/v1/v1/chat/completions", {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
    });
    assert.equal(doubled.status, 404);
    assert.match(
      doubled.json().error.message,
      /^mc-relay: the path has \/v1 twice: remove the extra \/v1 from the client's base URL/,
    );
  });
});

Deno.test("gate: routes and /health", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(`${upstream.url}/api/v1`));
  const auth = { authorization: GOOD_BEARER };

  await t.step("GET /health answers ok without credentials and says whether the upstream answers", async () => {
    const response = await relay.call("/health");
    assert.equal(response.status, 200);
    assert.deepEqual(response.json(), {
      status: "ok",
      ok: true,
      endpoints: 1,
      state: "ok",
      upstreams: [{ name: "default", answers: true, status: 200 }],
    });
    assert.deepEqual(upstream.requests.map((request) => request.path), ["/api/v1/models"], "its model list, once");
    upstream.requests.length = 0;
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
});

Deno.test("gate: hostile request targets, hosts and headers [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(`${upstream.url}/api/v1`));

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

  await t.step("a 404 never tells whether the path matched a secret", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const secret = await relay.call(`/${CANARY_EXTRA}`);
    const other = await relay.call("/not-a-secret-at-all");
    assert.equal(secret.status, 404);
    assert.equal(secret.json().error.message, other.json().error.message);
    assert.ok(!secret.text.includes("REDACTED"));
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

Deno.test("gate: origins, CORS and preflight", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100 }));

  await t.step("a preflight from an allowed origin is answered before auth, echoing the origin", async () => {
    const response = await preflight(relay, ALLOWED, "authorization,content-type,x-relay-endpoint");
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
        relay,
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
    const response = await preflight(relay, ALLOWED, "authorization", {
      "access-control-request-private-network": "true",
    });
    assert.equal(response.headers.get("access-control-allow-private-network"), "true");
  });

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
});

Deno.test("gate: disallowed origins [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100 }));

  await t.step("a preflight from a disallowed origin gets no CORS headers at all", async () => {
    const response = await preflight(relay, EVIL, "authorization,content-type");
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

  await t.step("[security] the relay's own origin", async (t) => {
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
});

Deno.test("gate: BASE_PATH and DISABLED_PATHS", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);

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
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();

    await t.step(
      "every route the common SDKs call is on: embeddings, completions, responses; DISABLED_PATHS switches them off",
      async () => {
        await using plain = relayFromEnv(upstream.url, {
          MC_RELAY_USERNAME: USERNAME,
          MC_RELAY_PASSWORD: CANARY_PASSWORD,
        });
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
        await using narrowed = relayFromEnv(upstream.url, {
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
  }
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(1000);
});
