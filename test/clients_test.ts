/**
 * Proof in the SDKs people really use: the official `openai` SDK in Deno (its errors included), and each common SDK's
 * default call (openai in Deno and on Node.js, the Vercel AI SDK, LangChain) against the demo. The browser tests are
 * in page_test.ts.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import OpenAI from "npm:openai@7.57.0";
import {
  assertNoSecretSeen,
  CANARY_PASSWORD,
  decoder,
  eventually,
  installed,
  openAiLikeUpstream,
  seenByClientsOrLogs,
  sleep,
  spawnRelay,
  startRelay,
  startUpstream,
  streamedAnswer,
  testConfig,
  USERNAME,
} from "./testing.ts";

const API_KEY = `${USERNAME}:${CANARY_PASSWORD}`;

Deno.test("clients: the openai SDK in Deno", async (t) => {
  let release: () => void = () => {};
  await using upstream = startUpstream(async (request, seen) => {
    if (seen.body.includes("wait for release")) await new Promise<void>((resolve) => (release = resolve));
    if (seen.body.includes('"stream":true')) {
      return streamedAnswer(["one", " two"]);
    }
    return openAiLikeUpstream(request, seen);
  });
  await using relay = startRelay(testConfig(upstream.url, { maxRequestBytes: 2000, requestTimeoutMs: 300 }));
  const client = new OpenAI({ baseURL: `${relay.url}/v1`, apiKey: API_KEY, maxRetries: 0 });

  await t.step("models.list() works through the relay", async () => {
    const models = await client.models.list();
    assert.deepEqual(models.data.map((model) => model.id), ["gpt-test"]);
  });

  await t.step("chat.completions.create() works, streamed and not", async () => {
    const answer = await client.chat.completions.create({
      model: "gpt-test",
      messages: [{ role: "user", content: "Hi" }],
    });
    assert.equal(answer.choices[0].message.content, "hi");
    const stream = await client.chat.completions.create({
      model: "gpt-test",
      stream: true,
      messages: [{ role: "user", content: "Hi" }],
    });
    let text = "";
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    assert.equal(text, "one two");
  });

  await t.step("a wrong password is the SDK's AuthenticationError (401) with the relay's message", async () => {
    const wrong = new OpenAI({ baseURL: `${relay.url}/v1`, apiKey: `${USERNAME}:wrong`, maxRetries: 0 });
    const error = await wrong.models.list().then(() => null, (error) => error);
    assert.ok(error instanceof OpenAI.AuthenticationError, String(error));
    assert.equal(error.status, 401);
    assert.match(error.message, /mc-relay: wrong username or password/);
  });

  await t.step("a body over MAX_REQUEST_BYTES is an APIError with status 413", async () => {
    const error = await client.chat.completions.create({
      model: "gpt-test",
      messages: [{ role: "user", content: "x".repeat(3000) }],
    }).then(() => null, (error) => error);
    assert.ok(error instanceof OpenAI.APIError, String(error));
    assert.equal(error.status, 413);
    assert.match(error.message, /MAX_REQUEST_BYTES/);
  });

  await t.step("an unreachable upstream is the SDK's InternalServerError (502)", async () => {
    await using unreachable = startRelay(testConfig("http://127.0.0.1:9/v1"));
    const lost = new OpenAI({ baseURL: `${unreachable.url}/v1`, apiKey: API_KEY, maxRetries: 0 });
    const error = await lost.models.list().then(() => null, (error) => error);
    assert.ok(error instanceof OpenAI.InternalServerError, String(error));
    assert.equal(error.status, 502);
    assert.match(error.message, /mc-relay: could not reach the upstream/);
  });

  await t.step("a silent upstream is the SDK's InternalServerError (504)", async () => {
    const error = await client.chat.completions.create({
      model: "gpt-test",
      messages: [{ role: "user", content: "wait for release" }],
    }).then(() => null, (error) => error);
    release();
    assert.ok(error instanceof OpenAI.InternalServerError, String(error));
    assert.equal(error.status, 504);
    assert.match(error.message, /REQUEST_TIMEOUT_SECONDS/);
    await sleep(20);
  });
});

Deno.test("clients: each common SDK's default call works through the relay, against the demo", async (t) => {
  const demo = await spawnRelay({}, ["demo"]);
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-sdks-" });
  try {
    await eventually(5000, () => demo.output().stdout.includes("Stop with Ctrl+C"), "the demo printed no banner", 10);
    const key = /API key \(username:password\):\s+(\S+)/.exec(demo.output().stdout)![1];
    // LangChain resolves its own `openai` dependency only with a local node_modules; Node reads the same folder.
    await Deno.writeTextFile(`${folder}/deno.json`, '{ "nodeModulesDir": "auto" }');
    for (const file of ["openai-sdk.ts", "vercel-ai-sdk.ts", "langchain.ts", "openai-node.mjs"]) {
      await Deno.copyFile(new URL(`../examples/${file}`, import.meta.url), `${folder}/${file}`);
    }
    const env = { RELAY: demo.url, KEY: key, MODEL: "echo" };
    const run = async (command: string, args: string[], extra: Record<string, string> = {}, cwd = folder) => {
      const output = await new Deno.Command(command, { args, cwd, env: { ...env, ...extra }, stdin: "null" })
        .output();
      const stdout = decoder.decode(output.stdout);
      seenByClientsOrLogs.push(stdout);
      assert.equal(output.code, 0, `${args.join(" ")}: ${decoder.decode(output.stderr).slice(-2000)}`);
      return stdout;
    };
    /** The permission flags of an example's `Run:` line: it runs with those, no more. */
    const headerFlags = async (file: string) => {
      const text = await Deno.readTextFile(new URL(`../examples/${file}`, import.meta.url));
      return / deno run ((?:--\S+ )+)examples\//.exec(text)![1].trim().split(" ");
    };
    /** The demo's request log lines for a path since `from` (its stdout's length then). */
    const served = (path: string, from: number) =>
      demo.output().stdout.slice(from).split("\n").filter((line) => line.includes(`"path":"${path}"`)).length;
    await t.step(
      "the openai SDK in Deno, as its header runs it: chat (streamed and not); the rest when asked",
      async () => {
        const flags = await headerFlags("openai-sdk.ts");
        const before = demo.output().stdout.length;
        const out = await run(Deno.execPath(), ["run", ...flags, "--quiet", "openai-sdk.ts"]);
        assert.match(out, /^answer: Echo: Say hello in three words$/m);
        assert.match(out, /^Echo: Count to five$/m);
        assert.doesNotMatch(out, /^responses:|^embeddings:/m, "nothing a vLLM or Ollama server lacks, by default");
        assert.equal(served("/v1/responses", before) + served("/v1/embeddings", before), 0);
        const asked = await run(Deno.execPath(), ["run", ...flags, "--quiet", "openai-sdk.ts"], {
          RESPONSES: "1",
          EMBEDDINGS: "1",
        });
        assert.match(asked, /^responses: Echo: Say hello from the Responses API$/m);
        assert.match(asked, /^embeddings: 8 numbers$/m);
      },
    );
    await t.step(
      "an example run inside the repository, as its header says, leaves the repository's lock alone",
      async () => {
        const project = new URL("..", import.meta.url).pathname;
        const lock = await Deno.readTextFile(`${project}deno.lock`);
        const flags = await headerFlags("openai-sdk.ts");
        await run(Deno.execPath(), ["run", ...flags, "--quiet", "examples/openai-sdk.ts"], {}, project);
        assert.equal(await Deno.readTextFile(`${project}deno.lock`), lock);
        await assert.rejects(Deno.stat(`${project}examples/deno.lock`));
      },
    );
    await t.step({
      name: "the openai SDK on Node.js",
      ignore: !installed("node"),
      fn: async () => {
        const out = await run("node", ["openai-node.mjs"]);
        assert.match(out, /^chat: Echo: Say hello in three words$/m);
        assert.doesNotMatch(out, /^responses:/m);
        const asked = await run("node", ["openai-node.mjs"], { RESPONSES: "1", EMBEDDINGS: "1" });
        assert.match(asked, /^responses: Echo: Say hello from the Responses API$/m);
        assert.match(asked, /^embeddings: 8 numbers$/m);
      },
    });
    await t.step(
      "the Vercel AI SDK, as its header runs it: openai.chat (chat completions) by default, the Responses API when asked",
      async () => {
        const flags = await headerFlags("vercel-ai-sdk.ts");
        for (const [responses, path] of [["0", "/v1/chat/completions"], ["1", "/v1/responses"]]) {
          const before = demo.output().stdout.length;
          const out = await run(Deno.execPath(), ["run", ...flags, "--quiet", "vercel-ai-sdk.ts"], {
            RESPONSES: responses,
          });
          assert.match(out, /^generateText: Echo: Say hello in three words$/m);
          assert.match(out, /^streamText: Echo: Count to five$/m);
          assert.equal(served(path, before), 2, `RESPONSES=${responses}: both calls went to ${path}`);
        }
      },
    );
    await t.step("LangChain's ChatOpenAI, as its header runs it: invoke and stream", async () => {
      const out = await run(Deno.execPath(), ["run", ...await headerFlags("langchain.ts"), "--quiet", "langchain.ts"]);
      assert.match(out, /^invoke: Echo: Say hello in three words$/m);
      assert.match(out, /^stream: Echo: Count to five$/m);
    });
  } finally {
    demo.child.kill("SIGTERM");
    await demo.finished();
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(10);
});
