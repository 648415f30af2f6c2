/**
 * Where a request goes: the upstream (by X-Relay-Endpoint, model prefix or list), ALLOWED_MODELS,
 * and model aliases.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { parseConfig } from "../main.ts";
import {
  ALLOWED,
  answering,
  ask,
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  embeddingsUpstream,
  freePort,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  post,
  relayFromEnv,
  relayWith,
  startRelay,
  startUpstream,
  testConfig,
  testUpstream,
  usageUpstream,
  USERNAME,
} from "./testing.ts";

Deno.test("choose: upstreams", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();

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
      await using second = startUpstream(() =>
        Response.json({ object: "list", data: [{ id: "gpt-4o" }, { id: "o3" }] })
      );
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
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 100 }));

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
        assert.ok(other.json().error.message.includes("(upstream:default)"), "names the endpoint this relay serves");
        assert.ok(!other.json().error.message.includes(upstream.url), "by name: a loopback address is not published");
        assert.equal(other.headers.get("access-control-allow-origin"), ALLOWED, "MC can show the message");
        assert.equal(upstream.requests.length, before);
      },
    );
  }
});

Deno.test("choose: ALLOWED_MODELS [security]", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();

    await t.step("ALLOWED_MODELS refuses other models with 400 before the upstream is called", async () => {
      await using relay = relayFromEnv(upstream.url, {
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
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);

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
  }

  await t.step(
    "[security] with ALLOWED_MODELS, every model OpenRouter's `models` names must be allowed too",
    async () => {
      await using upstream = usageUpstream();
      await using relay = startRelay(testConfig(upstream.url, { allowedModels: ["gpt-test", "gpt-cheap"] }));
      const allowed = await post(relay, "/v1/chat/completions", {
        messages: [],
        models: ["gpt-test", "gpt-cheap"],
        route: "fallback",
      });
      assert.equal(allowed.status, 200);
      assert.deepEqual(upstream.forwarded().models, ["gpt-test", "gpt-cheap"]);
      assert.equal(upstream.forwarded().route, "fallback", "route only says how to use `models`: it passes");
      const sent = upstream.requests.length;
      for (const models of [["gpt-test", "gpt-expensive"], ["gpt-expensive"], "gpt-expensive", [42], [null]]) {
        const refused = await post(relay, "/v1/chat/completions", { messages: [], models });
        assert.equal(refused.status, 400, JSON.stringify(models));
        assert.equal(refused.json().error.code, "model_not_allowed");
        assert.match(refused.json().error.message, /^mc-relay: .*"models"/);
      }
      assert.equal(upstream.requests.length, sent);

      await using open = startRelay(testConfig(upstream.url));
      const any = await post(open, "/v1/chat/completions", { messages: [], models: ["anything", "else"] });
      assert.equal(any.status, 200, "without ALLOWED_MODELS, `models` is the provider's business");
    },
  );
});

Deno.test("choose: model aliases", async (t) => {
  await using good = answering("good");

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

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(80);
});
