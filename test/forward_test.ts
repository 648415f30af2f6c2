/**
 * The request to the upstream: its headers and key, failures and timeouts before an answer, and
 * failover with breakers across an alias's targets.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import {
  ALLOWED,
  answering,
  ask,
  assertNoSecretSeen,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  decoder,
  encoder,
  freePort,
  GOOD_BEARER,
  manualClock,
  openAiLikeUpstream,
  rawRequest,
  rawUpstream,
  relayWith,
  sleep,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  USERNAME,
  within,
} from "./testing.ts";

/** An upstream that never answers; it lets go when the relay gives up on it, so it can shut down. */
function hangingUpstream() {
  return startUpstream((request) =>
    new Promise<Response>((resolve) => request.signal.addEventListener("abort", () => resolve(new Response(null))))
  );
}

Deno.test("forward: the upstream request", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

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
});

Deno.test("forward: what reaches the upstream and where [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url));

  await t.step(
    "[security] an upstream on an internal address is named upstream:<name> in errors, never by its address",
    async () => {
      const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (closed.addr as Deno.NetAddr).port;
      closed.close();
      await using relay = startRelay(testConfig(`http://127.0.0.1:${port}/v1`, { publicAccess: true }));
      const response = await relay.chat(chatBody(), { authorization: "Bearer" });
      assert.equal(response.status, 502);
      const { message } = response.json().error;
      assert.match(message, /^mc-relay: could not reach the upstream upstream:default: connection refused/);
      assert.doesNotMatch(message, new RegExp(`127\\.0\\.0\\.1|${port}`));
      assert.match(JSON.stringify(relay.requestLogs().at(-1)), /upstream_unreachable/, "the log still says why");
    },
  );

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

  await t.step("an upstream redirect is not followed (the key must not travel elsewhere): 502", async () => {
    await using target = startUpstream(openAiLikeUpstream);
    await using redirecting = startUpstream(() =>
      new Response(null, { status: 307, headers: { location: `${target.url}/models` } })
    );
    // A published upstream (PUBLISH_UPSTREAM_URL=true): the message names where it redirected to.
    await using redirectRelay = startRelay(testConfig(redirecting.url, { publishUpstreamUrl: true }));
    const response = await redirectRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_redirect");
    assert.match(response.json().error.message, /redirected to 127\.0\.0\.1:\d+; set UPSTREAM_BASE_URL/);
    // An internal one, redirecting relatively (vLLM's trailing slash): no address in the message, only in the log.
    await using internal = startUpstream(() =>
      new Response(null, { status: 307, headers: { location: "/v1/models/" } })
    );
    await using internalRelay = startRelay(testConfig(internal.url));
    const hidden = await internalRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(hidden.status, 502);
    assert.match(hidden.json().error.message, /upstream:default redirected to another location; set UPSTREAM_BASE_URL/);
    assert.doesNotMatch(hidden.json().error.message, /127\.0\.0\.1/);
    assert.match(internalRelay.requestLogs().at(-1)?.error ?? "", /redirected to 127\.0\.0\.1:\d+/);
    assert.equal(target.requests.length, 0);
  });

  await t.step(
    "the body is forwarded as application/json, the type of what the relay serialised, whatever the client said",
    async () => {
      await using relay = startRelay(testConfig(upstream.url));
      for (const type of ["text/plain;charset=iso-8859-1", "application/x-www-form-urlencoded", "application/json"]) {
        const response = await relay.chat(chatBody({ note: "caf\u00e9" }), { "content-type": type });
        assert.equal(response.status, 200);
        const seen = upstream.requests.at(-1)!;
        assert.equal(seen.headers.get("content-type"), "application/json", type);
        assert.equal(JSON.parse(seen.body).note, "caf\u00e9");
      }
    },
  );
});

Deno.test("forward: upstream failures and timeouts", async (t) => {
  await t.step("an unreachable upstream gives 502 naming the host and the kind of failure", async () => {
    const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (closed.addr as Deno.NetAddr).port;
    closed.close();
    // A published upstream (PUBLISH_UPSTREAM_URL=true) is named by its host; an internal one, below, is not.
    await using relay = startRelay(testConfig(`http://127.0.0.1:${port}/v1`, { publishUpstreamUrl: true }));
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
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300, publishUpstreamUrl: true }));
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

  await t.step("an upstream that answers with garbage gives 502", async () => {
    await using upstream = rawUpstream("SSH-2.0-OpenSSH_9.6\r\n\x00\x01garbage\r\n\r\n", 0);
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_unreachable");
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
});

Deno.test("forward: failover and breakers", async (t) => {
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
});

Deno.test("forward: failover and breakers [security]", async (t) => {
  await t.step("[security] one caller's slow requests do not open the breakers of an alias for everybody", async () => {
    // A request that asks for a long answer, not streamed: its headers come only when the whole answer is ready.
    await using slow = startUpstream(async (request, seen) => {
      if (seen.body.includes("LONG")) await sleep(1500);
      return request.signal.aborted ? new Response(null) : openAiLikeUpstream(request, seen);
    });
    const other = { name: "other", password: "other-password-1" };
    await using relay = startRelay(testConfig(slow.url, {
      upstreams: [testUpstream("one", slow.url), testUpstream("two", slow.url)],
      modelAliases: { fast: ["one/a", "two/b"] },
      requestTimeoutMs: 800,
      breakerFailures: 3,
      users: [{ name: USERNAME, password: CANARY_PASSWORD }, other],
    }));
    for (let index = 0; index < 3; index++) {
      assert.equal((await relay.chat(chatBody({ model: "fast", user: "LONG" }))).status, 504);
    }
    assert.deepEqual((await relay.call("/health")).json().breakers_open, [], "no breaker is open");
    const theirs = await relay.chat(chatBody({ model: "fast" }), { authorization: "Bearer other:other-password-1" });
    assert.equal(theirs.status, 200, theirs.text);
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(100);
});
