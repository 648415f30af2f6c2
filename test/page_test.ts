/**
 * The relay's own page (GET /), MC's one-link settings document (/mc-settings.json), and the relay in the clients
 * people really use: headless Chromium (Debian's, driven by playwright-core) calling it from a page's own
 * JavaScript, MC's request shape, the official `openai` SDK's browser build, and HTTPS in the browser. Two loopback
 * servers on different ports are two origins: one is in ALLOWED_ORIGIN, one is not.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
/// <reference lib="dom" />
// (the DOM types are for the functions that run inside the page)
import assert from "node:assert/strict";
import { type Browser, chromium, type Page } from "npm:playwright-core@1.65.1";
// The browser tests serve the openai package's browser build from Deno's npm cache: this import puts it there.
import "npm:openai@7.57.0";
import { parseConfig } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_CALLER_KEY,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  encoder,
  IN_CI,
  minimalEnv,
  openAiLikeUpstream,
  rawRequest,
  type SeenRequest,
  selfSignedCertificate,
  startRelay,
  startUpstream,
  streamedAnswer,
  testConfig,
  USERNAME,
  within,
} from "./testing.ts";

const OPENAI_VERSION = "7.57.0";
const API_KEY = `${USERNAME}:${CANARY_PASSWORD}`;
/** Debian's Chromium (playwright never downloads a browser of its own here); CHROMIUM_PATH names another one. */
const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";

/** Whether the browser tests can run: outside CI they are skipped, with one line, when there is no Chromium. */
const HAVE_CHROMIUM = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();
if (!HAVE_CHROMIUM && !IN_CI) {
  console.error(`browser tests skipped: no Chromium at ${CHROMIUM} (set CHROMIUM_PATH, or install Debian's chromium)`);
}

/** The folder Deno unpacked an npm package into (the import above guarantees it is there). */
async function npmPackageFolder(name: string, version: string): Promise<string> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"], stdout: "piped" }).output();
  const { npmCache } = JSON.parse(new TextDecoder().decode(info.stdout));
  return `${npmCache}/registry.npmjs.org/${name}/${version}`;
}

/** Serves a test page, examples/chat.html and the openai package's ES modules from one origin. */
function startPageServer(openaiFolder: string) {
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const path = new URL(request.url).pathname;
    if (path === "/") return new Response("<!doctype html><title>mc-relay test page</title>", html);
    if (path === "/chat.html") {
      return new Response(await Deno.readTextFile(new URL("../examples/chat.html", import.meta.url)), html);
    }
    if (path.startsWith("/openai/") && !path.includes("..")) {
      try {
        const file = await Deno.readFile(`${openaiFolder}/${path.slice("/openai/".length)}`);
        return new Response(file, { headers: { "content-type": "text/javascript" } });
      } catch {
        return new Response("not found", { status: 404 });
      }
    }
    return new Response("not found", { status: 404 });
  });
  return {
    origin: `http://127.0.0.1:${server.addr.port}`,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}
const html = { headers: { "content-type": "text/html; charset=utf-8" } };

/** An upstream for the browser: OpenAI-like answers, SSE streams, and one stream the test releases chunk by chunk. */
function browserUpstream() {
  let controlled = controlledStream();
  const upstream = startUpstream((request: Request, seen: SeenRequest) => {
    if (seen.path === "/chat/completions" && seen.body.includes('"stream":true')) {
      if (seen.body.includes("release chunk by chunk")) {
        return new Response(controlled.body, { headers: { "content-type": "text/event-stream" } });
      }
      return streamedAnswer(["Hello", " from", " upstream"]);
    }
    return openAiLikeUpstream(request, seen);
  });
  return {
    upstream,
    /** A fresh stream for the next "release chunk by chunk" request. */
    nextControlled() {
      controlled = controlledStream();
      return controlled;
    },
  };
}

async function launchChromium(extraArgs: string[] = []): Promise<Browser> {
  try {
    return await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-gpu",
        "--no-first-run",
        ...extraArgs,
      ],
    });
  } catch (error) {
    throw new Error(
      `Chromium could not start from ${CHROMIUM} (install it with 'apt-get install chromium'; .ci/run does): ${error}`,
    );
  }
}

/** Runs `fetch` in the page and returns what the page's JavaScript could see. */
function pageFetch(page: Page, url: string, init: RequestInit) {
  return page.evaluate(async ({ url, init }) => {
    try {
      const response = await fetch(url, init);
      return { status: response.status, text: await response.text(), error: null };
    } catch (error) {
      return { status: 0, text: "", error: String(error) };
    }
  }, { url, init: init as Record<string, unknown> });
}

Deno.test("page: the relay's own page", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

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
    assert.match(page.text, /<code data-copy="Endpoint">upstream:default<\/code>/, "the endpoint to type into MC");
    assert.ok(page.text.includes("?settings=https%3A%2F%2Frelay.example.com%2Fmc-settings.json"));
    assert.match(page.text, /<ul id="models"><\/ul>/, "no model list before sign-in");
    assert.match(
      page.text,
      /<code data-copy="Model">gpt-test<\/code>/,
      "the model for MC, as /mc-settings.json has it",
    );
    assert.ok(!page.text.includes(CANARY_KEY) && !page.text.includes(CANARY_PASSWORD));
    await using noPage = startRelay(testConfig(upstream.url, { page: false }));
    assert.equal((await noPage.call("/")).status, 404);
  });
});

Deno.test("page: /mc-settings.json [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

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
          backend: { relay: "https://relay.example.com/relay", endpoint: "upstream:default" },
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
});

Deno.test("page: the model MC is told to use", async (t) => {
  await t.step(
    "without DEFAULT_MODEL, /mc-settings.json and the page name the upstream's first model, asked for once",
    async () => {
      await using upstream = startUpstream(openAiLikeUpstream);
      await using relay = startRelay(testConfig(upstream.url, { publicUrl: "https://relay.example.com" }));
      const settings = await relay.call("/mc-settings.json");
      assert.equal(settings.json().aiIntegration.model, "gpt-test");
      const page = await relay.call("/");
      assert.match(page.text, /<code data-copy="Model">gpt-test<\/code>/);
      await relay.call("/mc-settings.json");
      const asked = upstream.requests.filter((request) => request.path === "/models");
      assert.equal(asked.length, 1, "the model list is cached, not asked for per request");
      assert.equal(asked[0].headers.get("authorization"), `Bearer ${CANARY_KEY}`, "asked with the upstream's key");
    },
  );

  await t.step("DEFAULT_MODEL wins over the upstream's list, which is then not asked for", async () => {
    await using upstream = startUpstream(openAiLikeUpstream);
    await using relay = startRelay(
      testConfig(upstream.url, { defaultModel: "llama-3", publicUrl: "https://r.example" }),
    );
    assert.equal((await relay.call("/mc-settings.json")).json().aiIntegration.model, "llama-3");
    assert.equal(upstream.requests.length, 0);
  });

  await t.step("an upstream that lists no model (or does not answer) gives settings without a model", async () => {
    await using upstream = startUpstream(() => Response.json({ object: "list", data: [] }));
    await using relay = startRelay(testConfig(upstream.url, { publicUrl: "https://relay.example.com" }));
    const settings = (await relay.call("/mc-settings.json")).json();
    assert.equal(settings.aiIntegration.model, undefined);
    assert.equal(settings.aiIntegration.backend.relay, "https://relay.example.com");
  });
});

Deno.test("page: MC's endpoint [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const address = new URL(upstream.url).host;

  await t.step(
    "an upstream on a loopback address is named, never shown: upstream:default, which the relay accepts as X-Relay-Endpoint",
    async () => {
      await using relay = startRelay(testConfig(upstream.url, { publicUrl: "https://relay.example.com" }));
      const page = await relay.call("/");
      const settings = await relay.call("/mc-settings.json");
      assert.equal(settings.json().aiIntegration.backend.endpoint, "upstream:default");
      assert.match(page.text, /<code data-copy="Endpoint">upstream:default<\/code>/);
      assert.match(
        page.text,
        /<dt>Endpoint<\/dt><dd>.*<span class="note">[^<]+<\/span><\/dd>/,
        "one line says what it is",
      );
      for (const endpoint of ["upstream:default", " upstream:default/ ", `${upstream.url}/`]) {
        const answer = await relay.chat(chatBody(), { "x-relay-endpoint": endpoint });
        assert.equal(answer.status, 200, `X-Relay-Endpoint ${endpoint}`);
      }
      const wrong = await relay.chat(chatBody(), { "x-relay-endpoint": "upstream:elsewhere" });
      assert.equal(wrong.status, 400);
      assert.match(wrong.json().error.message, /is not the endpoint this relay serves \(upstream:default\)/);
      for (const text of [page.text, settings.text, wrong.text]) {
        assert.ok(!text.includes(address), "the upstream's address is not published");
      }
    },
  );

  await t.step("PUBLISH_UPSTREAM_URL=true shows it, as configured; =false names a public one", async () => {
    const shown = parseConfig({
      UPSTREAM_BASE_URL: `${upstream.url}/`,
      UPSTREAM_API_KEY: CANARY_KEY,
      PUBLIC_ACCESS: "true",
      RATE_LIMIT_PER_MINUTE: "5",
      TOKEN_BUDGET_PER_DAY: "1000",
      PUBLISH_UPSTREAM_URL: "true",
      PUBLIC_URL: "https://relay.example.com",
      ALLOWED_ORIGIN: ALLOWED,
    });
    assert.ok(shown.ok);
    await using relay = startRelay(shown.config);
    assert.equal((await relay.call("/mc-settings.json")).json().aiIntegration.backend.endpoint, `${upstream.url}/`);
    const named = parseConfig({ ...minimalEnv, PUBLISH_UPSTREAM_URL: "false", DEFAULT_MODEL: "m" });
    assert.ok(named.ok);
    await using namedRelay = startRelay({ ...named.config, publicUrl: "https://relay.example.com" });
    assert.equal(
      (await namedRelay.call("/mc-settings.json")).json().aiIntegration.backend.endpoint,
      "upstream:default",
    );
    assert.ok(!parseConfig({ ...minimalEnv, PUBLISH_UPSTREAM_URL: "maybe" }).ok);
  });

  await t.step(
    "a public upstream is shown exactly as configured, trailing slash kept (MC compares its preset as a string)",
    async () => {
      const blablador = "https://api.helmholtz-blablador.fz-juelich.de/v1/";
      const result = parseConfig({ ...minimalEnv, UPSTREAM_BASE_URL: blablador, DEFAULT_MODEL: "alias-fast" });
      assert.ok(result.ok);
      await using relay = startRelay({ ...result.config, publicUrl: "https://relay.example.com" });
      assert.deepEqual((await relay.call("/mc-settings.json")).json().aiIntegration, {
        model: "alias-fast",
        backend: { relay: "https://relay.example.com", endpoint: blablador },
      });
      assert.ok((await relay.call("/")).text.includes(`<code data-copy="Endpoint">${blablador}</code>`));
    },
  );
});

Deno.test("page: the status says whether the AI provider answers", async () => {
  await using upstream = startUpstream(openAiLikeUpstream);
  await using relay = startRelay(testConfig(upstream.url));
  assert.match((await relay.call("/")).text, /Status: <strong>running<\/strong>; its AI provider answers\./);
  const down = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (down.addr as Deno.NetAddr).port;
  down.close();
  await using lonely = startRelay(testConfig(`http://127.0.0.1:${port}/v1`));
  assert.match((await lonely.call("/")).text, /its AI provider does not answer right now/);
});

Deno.test("page: a public relay's page", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "it gives SDKs an apiKey that works (the SDKs refuse an empty one) and says no 'Sign in' where nothing is needed",
    async () => {
      await using relay = startRelay(testConfig(upstream.url, {
        publicAccess: true,
        rateLimitPerMinute: 10,
        tokenBudgetPerDay: 10_000,
      }));
      const page = await relay.call("/");
      const placeholder = /<dt><code>apiKey<\/code><\/dt><dd><code data-copy="apiKey">([^<]+)<\/code>/.exec(page.text)
        ?.[1];
      assert.equal(placeholder, "public");
      assert.doesNotMatch(page.text, /sign in/i);
      assert.match(page.text, /nothing is needed to try it/);
      const sdkCall = await relay.chat(chatBody(), { authorization: `Bearer ${placeholder}` });
      assert.equal(sdkCall.status, 200, "the placeholder is accepted");
      await using keyed = startRelay(testConfig(upstream.url));
      assert.match(
        (await keyed.call("/")).text,
        /<button type="submit">Sign in<\/button>/,
        "a relay with users asks to sign in",
      );
    },
  );
});

Deno.test("page: a relay migrated from MC's Flask relay asks for the relay password, not a user name", async () => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const config = parseConfig({
    UPSTREAM_BASE_URL: upstream.url,
    UPSTREAM_API_KEY: CANARY_KEY,
    MC_RELAY_PASSWORD: CANARY_PASSWORD,
    PUBLISH_UPSTREAM_URL: "true",
  });
  assert.ok(config.ok);
  await using relay = startRelay(config.config);
  const page = (await relay.call("/")).text;
  assert.match(page, /the relay password, from whoever runs this relay/);
  assert.match(page, /<label for="key">API key \(the relay password\)<\/label>/);
  assert.doesNotMatch(page, /username:password/);
});

/**
 * The options of a test in Chromium: skipped where there is none (but never in CI). playwright-core keeps pipes to
 * Chromium open across steps; each test closes its browser in `finally`.
 */
const IN_CHROMIUM = { ignore: !HAVE_CHROMIUM && !IN_CI, sanitizeOps: false, sanitizeResources: false };

Deno.test({
  name: "page: in the browser",
  ...IN_CHROMIUM,
}, async (t) => {
  const openaiFolder = await npmPackageFolder("openai", OPENAI_VERSION);
  await using allowedPage = startPageServer(openaiFolder);
  const { upstream, nextControlled } = browserUpstream();
  await using _upstream = upstream;
  await using relay = startRelay(testConfig(upstream.url, { allowedOrigins: [allowedPage.origin] }));
  await using tls = await selfSignedCertificate();
  await using tlsRelay = startRelay(testConfig(upstream.url, { allowedOrigins: [allowedPage.origin] }), tls);

  // Only this test's browser trusts the self-signed certificate.
  const browser = await launchChromium(["--ignore-certificate-errors"]);
  try {
    const page = await browser.newPage();
    await page.goto(`${allowedPage.origin}/`);
    const auth = { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" };

    await t.step("an allowed page lists the models", async () => {
      const result = await pageFetch(page, `${relay.url}/v1/models`, { headers: auth });
      assert.equal(result.error, null);
      assert.equal(result.status, 200);
      assert.equal(JSON.parse(result.text).data[0].id, "gpt-test");
    });

    await t.step("an allowed page gets a non-streamed chat answer", async () => {
      const result = await pageFetch(page, `${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: auth,
        body: chatBody(),
      });
      assert.equal(result.status, 200);
      assert.equal(JSON.parse(result.text).choices[0].message.content, "hi");
    });

    await t.step("an allowed page reads a streamed chat chunk by chunk with fetch and ReadableStream", async () => {
      const stream = nextControlled();
      const status = await page.evaluate(async ({ url, headers, body }) => {
        const response = await fetch(url, { method: "POST", headers, body });
        (globalThis as unknown as { reader: ReadableStreamDefaultReader<Uint8Array> }).reader = response.body!
          .getReader();
        return response.status;
      }, {
        url: `${relay.url}/v1/chat/completions`,
        headers: auth,
        body: chatBody({ stream: true, messages: [{ role: "user", content: "release chunk by chunk" }] }),
      });
      assert.equal(status, 200);
      const readInPage = () =>
        page.evaluate(async () => {
          const { done, value } = await (globalThis as unknown as { reader: ReadableStreamDefaultReader<Uint8Array> })
            .reader.read();
          return done ? null : new TextDecoder().decode(value);
        });
      for (let i = 0; i < 3; i++) {
        const event = `data: {"choices":[{"delta":{"content":"part ${i}"}}]}\n\n`;
        stream.send(event);
        // The upstream sends the next chunk only after the page has this one.
        assert.equal(await within(5000, readInPage(), `chunk ${i} did not reach the page`), event);
      }
      stream.close();
      assert.equal(await readInPage(), null);
    });

    await t.step("a public relay's page reads its own /usage: '12,000 tokens left today'", async () => {
      await using publicRelay = startRelay(testConfig(upstream.url, {
        allowedOrigins: [allowedPage.origin],
        publicAccess: true,
        rateLimitPerMinute: 20,
        tokenBudgetPerDay: 12_010,
      }));
      const anonymous = { "content-type": "application/json", authorization: "Bearer " };
      const chat = await pageFetch(page, `${publicRelay.url}/v1/chat/completions`, {
        method: "POST",
        headers: anonymous,
        body: chatBody(),
      });
      assert.equal(chat.status, 200, "MC's public preset: no key typed");
      const shown = await page.evaluate(async (url) => {
        const usage = await (await fetch(url)).json();
        const day = usage.budgets.find((budget: { window: string }) => budget.window === "day");
        return `${day.remaining.toLocaleString("en-US")} tokens left today`;
      }, `${publicRelay.url}/usage`);
      assert.equal(shown, "12,000 tokens left today");
    });

    await t.step("a wrong password gives a 401 whose OpenAI-style message the page can read", async () => {
      const result = await pageFetch(page, `${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { ...auth, authorization: `Bearer ${USERNAME}:wrong` },
        body: chatBody(),
      });
      assert.equal(result.error, null, "CORS headers on the 401 let the page read it");
      assert.equal(result.status, 401);
      assert.equal(JSON.parse(result.text).error.message, "mc-relay: wrong username or password");
    });

    await t.step(
      "MC's request (axios's XHR: Bearer, JSON, X-Relay-Endpoint) passes the preflight and succeeds",
      async () => {
        // A fresh browser context has an empty preflight cache, so the preflight is really sent.
        const context = await browser.newContext();
        const mcPage = await context.newPage();
        await mcPage.goto(`${allowedPage.origin}/`);
        const before = relay.requestLogs().length;
        const result = await mcPage.evaluate(
          ({ url, apiKey, endpoint }) =>
            new Promise<{ status: number; text: string }>((resolve) => {
              const request = new XMLHttpRequest();
              request.open("POST", url);
              request.setRequestHeader("Authorization", `Bearer ${apiKey}`);
              request.setRequestHeader("Content-Type", "application/json");
              // MC's endpoint setting: the provider this relay serves, with MC's trailing slash.
              request.setRequestHeader("X-Relay-Endpoint", `${endpoint}/`);
              request.onloadend = () => resolve({ status: request.status, text: request.responseText });
              request.send(JSON.stringify({
                model: "gpt-4o-mini",
                messages: [{ role: "user", content: "Create a schema" }],
                max_tokens: 5000,
                temperature: 0,
              }));
            }),
          { url: `${relay.url}/v1/chat/completions`, apiKey: API_KEY, endpoint: upstream.url },
        );
        assert.equal(result.status, 200);
        assert.equal(JSON.parse(result.text).choices[0].message.content, "hi");
        const methods = relay.requestLogs().slice(before).map((entry) => `${entry.method} ${entry.status}`);
        await context.close();
        assert.deepEqual(methods, ["OPTIONS 204", "POST 200"], "a preflight, then the request");
      },
    );

    await t.step("the official openai SDK's browser build works through the relay, streamed and not", async () => {
      const result = await page.evaluate(async ({ baseURL, apiKey }) => {
        const { default: OpenAI } = await import("/openai/index.mjs" as string);
        const client = new OpenAI({ baseURL, apiKey, dangerouslyAllowBrowser: true, maxRetries: 0 });
        const models = await client.models.list();
        const answer = await client.chat.completions.create({
          model: "gpt-test",
          messages: [{ role: "user", content: "Hello" }],
        });
        const stream = await client.chat.completions.create({
          model: "gpt-test",
          stream: true,
          messages: [{ role: "user", content: "Hello" }],
        });
        let streamed = "";
        for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
        return {
          models: models.data.map((model: { id: string }) => model.id),
          answer: answer.choices[0].message.content,
          streamed,
        };
      }, { baseURL: `${relay.url}/v1`, apiKey: API_KEY });
      assert.deepEqual(result, { models: ["gpt-test"], answer: "hi", streamed: "Hello from upstream" });
    });

    await t.step(
      "BYOK: the openai browser build calls a BYOK upstream, streamed, with a raw key and then a sealed one",
      async () => {
        const result = parseConfig({
          UPSTREAMS_JSON: JSON.stringify([{ name: "provider", baseUrl: upstream.url, byok: true, keyPattern: "^sk-" }]),
          SEAL_SECRET: "seal-secret-for-the-browser-test-0123456789",
          ALLOWED_ORIGIN: allowedPage.origin,
        });
        assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
        await using byokRelay = startRelay(result.config);
        const streamed = await page.evaluate(async ({ baseURL, key }) => {
          const { default: OpenAI } = await import("/openai/index.mjs" as string);
          const ask = async (apiKey: string) => {
            const client = new OpenAI({ baseURL, apiKey, dangerouslyAllowBrowser: true, maxRetries: 0 });
            const stream = await client.chat.completions.create({
              model: "gpt-test",
              stream: true,
              messages: [{ role: "user", content: "Hello" }],
            });
            let text = "";
            for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
            return text;
          };
          const raw = await ask(key);
          const response = await fetch(`${baseURL.slice(0, -3)}/seal`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ key, upstream: "provider", expiresInDays: 90 }),
          });
          const { sealed } = await response.json();
          // From here on the page holds only the sealed string, useless anywhere but through this relay.
          return {
            raw,
            sealedLooksSealed: sealed.startsWith("mcrs1.") && !sealed.includes(key),
            sealed: await ask(sealed),
          };
        }, { baseURL: `${byokRelay.url}/v1`, key: CANARY_CALLER_KEY });
        assert.deepEqual(streamed, {
          raw: "Hello from upstream",
          sealedLooksSealed: true,
          sealed: "Hello from upstream",
        });
        const seen = upstream.requests.slice(-2).map((request) => request.headers.get("authorization"));
        assert.deepEqual(
          seen,
          [`Bearer ${CANARY_CALLER_KEY}`, `Bearer ${CANARY_CALLER_KEY}`],
          "the upstream got the key itself both times",
        );
      },
    );

    await t.step("examples/chat.html streams an answer through the relay", async () => {
      const chat = await browser.newPage();
      await chat.goto(`${allowedPage.origin}/chat.html`);
      await chat.fill("#relay", relay.url);
      await chat.fill("#key", API_KEY);
      await chat.fill("#model", "gpt-test");
      await chat.click("#send");
      await chat.waitForFunction(() => document.getElementById("status")?.textContent?.startsWith("done"), null, {
        timeout: 5000,
      });
      assert.equal(await chat.textContent("#output"), "Hello from upstream");
      assert.equal(await chat.textContent("#status"), "done, 3 chunk(s)");
      await chat.close();
    });

    await t.step("the same page calls the relay over HTTPS (self-signed certificate), streamed too", async () => {
      const models = await pageFetch(page, `${tlsRelay.url}/v1/models`, { headers: auth });
      assert.equal(models.error, null);
      assert.equal(models.status, 200);
      const streamed = await pageFetch(page, `${tlsRelay.url}/v1/chat/completions`, {
        method: "POST",
        headers: auth,
        body: chatBody({ stream: true }),
      });
      assert.equal(streamed.status, 200);
      assert.match(streamed.text, /"content":"Hello"[\s\S]*data: \[DONE\]\n\n$/);
    });
  } finally {
    await browser.close();
  }
});

Deno.test({
  name: "page: a page from another origin in the browser [security]",
  ...IN_CHROMIUM,
}, async (t) => {
  const openaiFolder = await npmPackageFolder("openai", OPENAI_VERSION);
  await using allowedPage = startPageServer(openaiFolder);
  await using otherPage = startPageServer(openaiFolder);
  const { upstream } = browserUpstream();
  await using _upstream = upstream;
  await using relay = startRelay(testConfig(upstream.url, { allowedOrigins: [allowedPage.origin] }));
  const browser = await launchChromium();
  try {
    const auth = { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" };

    await t.step(
      "a page from another origin is blocked by the browser itself, and the upstream never hears of it",
      async () => {
        const blocked = await browser.newPage();
        await blocked.goto(`${otherPage.origin}/`);
        const before = upstream.requests.length;
        const chat = await pageFetch(blocked, `${relay.url}/v1/chat/completions`, {
          method: "POST",
          headers: auth,
          body: chatBody(),
        });
        assert.equal(chat.status, 0);
        assert.match(chat.error!, /TypeError: Failed to fetch/);
        const simple = await pageFetch(blocked, `${relay.url}/health`, {});
        assert.match(simple.error!, /TypeError: Failed to fetch/, "even a simple request's answer is unreadable");
        assert.equal(upstream.requests.length, before);
        await blocked.close();
      },
    );
  } finally {
    await browser.close();
  }
});

Deno.test({
  name: "page: the relay's own page and one-link MC settings in Chromium",
  ...IN_CHROMIUM,
}, async (t) => {
  const openaiFolder = await npmPackageFolder("openai", OPENAI_VERSION);
  await using otherOrigin = startPageServer(openaiFolder);
  await using upstream = startUpstream((request, seen) => {
    if (seen.path !== "/chat/completions" || !seen.body.includes('"stream":true')) {
      return openAiLikeUpstream(request, seen);
    }
    const events = ["Hello", " from", " the page"].map((content) =>
      `data: {"choices":[{"delta":{"content":"${content}"}}]}\n\n`
    );
    return new Response(new Blob([...events, "data: [DONE]\n\n"]).stream(), {
      headers: { "content-type": "text/event-stream" },
    });
  });
  await using relay = startRelay(testConfig(upstream.url, {
    allowedOrigins: [otherOrigin.origin],
    defaultModel: "gpt-test",
    tokenBudgetPerDay: 12_000,
  }));
  const shots = await Deno.makeTempDir({ prefix: "mc-relay-page-shots-" });
  const browser = await launchChromium();
  try {
    const page = await browser.newPage();
    const problems: string[] = [];
    page.on("console", (message) => {
      if (message.type() === "error") problems.push(message.text());
    });
    page.on("pageerror", (error) => problems.push(String(error)));
    await page.goto(`${relay.url}/`);

    await t.step(
      "signed out, the page says what the relay is and the values to type into MC, with copy buttons",
      async () => {
        await page.screenshot({ path: `${shots}/signed-out.png`, fullPage: true });
        const text = await page.locator("main").innerText();
        assert.match(text, /Status: running/);
        assert.ok(text.includes(`Relay URL (without /v1)\n${relay.url}`), text);
        assert.ok(text.includes(`baseURL\n${relay.url}/v1`));
        assert.ok(text.includes("Endpoint\nupstream:default"), "the endpoint");
        assert.equal(await page.locator("#models li").count(), 0, "no model list before sign-in");
        assert.ok(text.includes("Model\ngpt-test"), "the model for MC");
        assert.equal(await page.getByRole("button", { name: "Copy the Relay URL" }).count(), 1);
        const link = await page.getByRole("link", { name: /Set up MetaConfigurator/ }).getAttribute("href");
        assert.equal(
          link,
          `https://www.metaconfigurator.org/?settings=${encodeURIComponent(`${relay.url}/mc-settings.json`)}`,
        );
        const unlabelled = await page.evaluate(() =>
          [...document.querySelectorAll("input, select")].filter((field) =>
            !document.querySelector(`label[for="${field.id}"]`)
          ).length
        );
        assert.equal(unlabelled, 0, "every field has a label");
      },
    );

    await t.step("signed in by keyboard alone, it lists the models and the caller's budget", async () => {
      await page.getByLabel(/API key/).focus();
      await page.keyboard.type(`${USERNAME}:${CANARY_PASSWORD}`);
      await page.keyboard.press("Enter");
      await page.locator("#models li").first().waitFor({ timeout: 5000 });
      assert.deepEqual(await page.locator("#models li").allInnerTexts(), ["gpt-test"]);
      assert.match(await page.locator("#usage").innerText(), /12,000 of 12,000 tokens left this UTC day/);
      await page.screenshot({ path: `${shots}/signed-in.png`, fullPage: true });
    });

    await t.step("the page runs a streamed test chat", async () => {
      await page.getByRole("button", { name: "Send" }).click();
      await page.waitForFunction(() => document.getElementById("answer")?.textContent === "Hello from the page", null, {
        timeout: 5000,
      });
      await page.screenshot({ path: `${shots}/chat.png`, fullPage: true });
      assert.deepEqual(problems, [], `no script error and no Content-Security-Policy violation: ${problems}`);
      for (const name of ["signed-out.png", "signed-in.png", "chat.png"]) {
        assert.ok((await Deno.stat(`${shots}/${name}`)).size > 1000, `screenshot ${name} in ${shots}`);
      }
    });

    await t.step(
      "an allowed origin (MC's) fetches the settings document cross-origin, in MC's settings shape",
      async () => {
        const mcPage = await browser.newPage();
        await mcPage.goto(`${otherOrigin.origin}/`);
        const result = await pageFetch(mcPage, `${relay.url}/mc-settings.json`, {});
        assert.equal(result.error, null);
        assert.deepEqual(JSON.parse(result.text), {
          aiIntegration: { model: "gpt-test", backend: { relay: relay.url, endpoint: "upstream:default" } },
        });
      },
    );
  } finally {
    await browser.close();
  }
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(50);
});
