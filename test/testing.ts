/**
 * Fixtures shared by the test files: a fake upstream, the relay on an ephemeral port (in-process or as
 * a real `deno run -P main.ts` process), canary secrets, and small helpers. Nothing here asserts
 * behaviour of its own but the canary check each file ends with; the specification is in test/*_test.ts, one file per
 * area.
 *
 * @module
 */
import assert from "node:assert/strict";
import {
  createHandler,
  createLogger,
  type HandlerOptions,
  parseConfig,
  type RelayConfig,
  serverErrorHandler,
  type TrustedProxies,
  type Upstream,
} from "../main.ts";

/** A recognisable fake provider key: it must never show up in anything the relay prints or returns. */
export const CANARY_KEY = "sk-CANARY-upstream-key-4f1d2c9a";

/** A recognisable fake relay password. */
export const CANARY_PASSWORD = "CANARY-relay-password-77e1";

/** A recognisable fake secret in an extra upstream header. */
export const CANARY_EXTRA = "CANARY-extra-header-value-5b0e";

/** A recognisable key a caller brings for a BYOK upstream: it must reach that upstream and nothing else. */
export const CANARY_CALLER_KEY = "sk-CANARY-caller-key-8c2e9b1f";

/** The relay user name in every test. */
export const USERNAME = "team";

/** The Authorization header MC and the SDKs send: Bearer username:password. */
export const GOOD_BEARER = `Bearer ${USERNAME}:${CANARY_PASSWORD}`;

/** An allowed browser origin (MC's). */
export const ALLOWED = "https://www.metaconfigurator.org";

/** A second allowed origin. */
export const OTHER_ALLOWED = "https://metaconfigurator.github.io";

/** An origin that is not allowed. */
export const EVIL = "https://evil.example";

/**
 * Everything the relay logged or returned in this file, for the canary test at the end. Deno runs each test file in
 * an isolate of its own, so each file has its own copy of this list.
 */
export const seenByClientsOrLogs: string[] = [];

/**
 * The canary check a test file ends with: this file's tests recorded more than `atLeast` things (so the check is not
 * vacuous), and none holds a canary secret nor any of `more` (a secret of the file's own, by the message naming it).
 */
export function assertNoSecretSeen(atLeast: number, more: Record<string, string> = {}) {
  // Each test file runs in an isolate of its own, so this is what this file's tests saw.
  assert.ok(seenByClientsOrLogs.length > atLeast, "the other tests recorded what they saw");
  const everything = seenByClientsOrLogs.join("\n");
  assert.ok(!everything.includes(CANARY_KEY), "the provider key leaked");
  assert.ok(!everything.includes(CANARY_EXTRA), "an extra upstream header value leaked");
  // Clients send the password themselves; the relay must never send it back or log it.
  assert.ok(!everything.includes(CANARY_PASSWORD), "the relay password leaked");
  assert.ok(!everything.includes(CANARY_CALLER_KEY), "a caller's own key leaked");
  for (const [message, secret] of Object.entries(more)) assert.ok(!everything.includes(secret), message);
}

/** Shared text encoder. */
export const encoder = new TextEncoder();

/** Shared text decoder. */
export const decoder = new TextDecoder();

/** Waits `ms` milliseconds. */
export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A request as the fake upstream received it. */
export interface SeenRequest {
  method: string;
  path: string;
  search: string;
  headers: Headers;
  body: string;
}

/** A fake upstream on an ephemeral loopback port that records every request. */
export function startUpstream(handler: (request: Request, seen: SeenRequest) => Response | Promise<Response>) {
  const requests: SeenRequest[] = [];
  // A fake upstream's errors are on purpose (a stream broken mid-way): they print nothing.
  const onError = () => new Response(null, { status: 500 });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {}, onError }, async (request) => {
    const url = new URL(request.url);
    const seen: SeenRequest = {
      method: request.method,
      path: url.pathname,
      search: url.search,
      headers: request.headers,
      body: request.method === "POST" ? await request.text() : "",
    };
    requests.push(seen);
    return await handler(request, seen);
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    requests,
    server,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/**
 * A raw TCP upstream for answers `Deno.serve` cannot make (a short body under a longer Content-Length, a stall, a
 * reset): it reads the first request, writes `answer` as it is, then closes the connection after `closeAfterMs`, or
 * holds it open until it is disposed.
 */
export function rawUpstream(answer: string, closeAfterMs?: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  let connection: Deno.Conn | undefined;
  const served = (async () => {
    connection = await listener.accept();
    await connection.read(new Uint8Array(65536));
    await connection.write(new TextEncoder().encode(answer));
    if (closeAfterMs === undefined) return;
    await sleep(closeAfterMs);
    connection.close();
    connection = undefined;
  })();
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    async [Symbol.asyncDispose]() {
      await served;
      connection?.close();
      listener.close();
    },
  };
}
/** An upstream entry with the canary key and extra headers. */
export function testUpstream(name: string, baseUrl: string, overrides: Partial<Upstream> = {}): Upstream {
  return {
    name,
    baseUrl,
    apiKey: CANARY_KEY,
    authHeader: "Authorization",
    authPrefix: "Bearer",
    extraHeaders: { "X-Title": "mc-relay tests", "X-Extra-Secret": CANARY_EXTRA },
    byok: false,
    ...overrides,
  };
}

/** The config every test starts from, with canary secrets. */
export function testConfig(upstreamBaseUrl: string, overrides: Partial<RelayConfig> = {}): RelayConfig {
  return {
    upstreams: [testUpstream("default", upstreamBaseUrl)],
    users: [{ name: USERNAME, password: CANARY_PASSWORD }],
    allowedModels: [],
    metricsUsers: [],
    admins: [],
    metricsHost: "127.0.0.1",
    maxBufferedBytes: 64 * 1024 * 1024,
    allowedOrigins: [ALLOWED, OTHER_ALLOWED],
    port: 0,
    host: "127.0.0.1",
    requestTimeoutMs: 5000,
    maxRequestBytes: 1024 * 1024,
    logLevel: "debug",
    shutdownTimeoutMs: 1000,
    // Off here, so tests that fail sign-ins on purpose do not lock each other out; the lockout tests turn them on.
    authFailuresPerMinute: 0,
    rateLimitPerMinute: 0,
    rateLimitPerHour: 0,
    rateLimitPerDay: 0,
    concurrentRequests: 0,
    tokenBudgetPerDay: 0,
    tokenBudgetPerMonth: 0,
    maxTokensPerRequest: 0,
    publicAccess: false,
    basePath: "",
    disabledPaths: [],
    usageRetentionDays: 400,
    memoryStoreKeys: 100_000,
    page: true,
    sealSecretsPrevious: [],
    modelAliases: {},
    breakerFailures: 3,
    breakerOpenMs: 30_000,
    workers: 1,
    trustProxy: { ranges: [], hops: 0 },
    ...overrides,
  };
}

/** The relay handler served on an ephemeral loopback port (HTTPS when given a certificate); its log lines are kept. */
export function startRelay(
  config: RelayConfig,
  tls?: { cert: string; key: string },
  now?: () => number,
  options: Omit<HandlerOptions, "log" | "now"> = {},
) {
  const logs: string[] = [];
  const relayHandler = createHandler(config, {
    log(line) {
      logs.push(line);
      seenByClientsOrLogs.push(line);
    },
    now,
    ...options,
  });
  // Everything the relay returns, headers and body bytes, is recorded for the canary check, whoever reads it.
  const handler = async (request: Request, info: Deno.ServeHandlerInfo) => {
    const response = await relayHandler(request, info);
    seenByClientsOrLogs.push(JSON.stringify([response.status, ...response.headers]));
    if (response.body === null) return response;
    const recorder = new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        seenByClientsOrLogs.push(decoder.decode(chunk));
        controller.enqueue(chunk);
      },
    });
    return new Response(response.body.pipeThrough(recorder), response);
  };
  // The relay's own onError, as in production: deliberate cuts print nothing.
  const onError = serverErrorHandler(createLogger(config, (line) => logs.push(line)));
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {}, onError, ...(tls && { cert: tls.cert, key: tls.key }) },
    handler,
  );
  const url = `${tls ? "https" : "http"}://127.0.0.1:${server.addr.port}`;
  const call = async (path: string, init: RequestInit = {}) => {
    const response = await fetch(`${url}${path}`, init);
    const text = await response.text();
    seenByClientsOrLogs.push(text, JSON.stringify([...response.headers]));
    return { status: response.status, headers: response.headers, text, json: () => JSON.parse(text) };
  };
  return {
    url,
    port: server.addr.port,
    logs,
    /** Parsed request log lines. */
    requestLogs: () => logs.map((line) => JSON.parse(line)).filter((entry) => entry.msg === "request"),
    /** Fetches from the relay, reads the whole body and records what came back. */
    call,
    /** POSTs a chat body with the test user's credentials and returns the response unread (for streams). */
    fetchChat: (body: string) =>
      fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
        body,
      }),
    /** POSTs a chat body (as it is) with the test user's credentials, JSON headers and any `headers` added. */
    chat: (body: BodyInit, headers: Record<string, string> = {}) =>
      call("/v1/chat/completions", {
        method: "POST",
        headers: { authorization: GOOD_BEARER, "content-type": "application/json", ...headers },
        body,
      }),
    server,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/**
 * Sends a raw HTTP/1.1 request (so nothing tidies the request target) and reads one response: until it is
 * complete (by Content-Length or the last chunk), the server closes, or `timeoutMs` passes (status 0 when
 * nothing came). The server may keep a connection open after answering (Deno does while a declared request
 * body is still missing), so the end of the response, not the end of the connection, is what counts.
 */
export async function rawRequest(
  port: number,
  head: string,
  body = "",
  timeoutMs = 5000,
): Promise<{ status: number; text: string }> {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => connection.close(), timeoutMs);
  let text = "";
  try {
    await connection.write(encoder.encode(`${head}\r\n\r\n${body}`));
    const buffer = new Uint8Array(16384);
    while (!responseComplete(text)) {
      const read = await connection.read(buffer);
      if (read === null) break;
      text += decoder.decode(buffer.subarray(0, read));
    }
  } catch {
    // closed by the timer or reset by the server: report what arrived
  } finally {
    clearTimeout(timer);
    try {
      connection.close();
    } catch {
      // already closed
    }
  }
  seenByClientsOrLogs.push(text);
  return { status: Number(text.split(" ")[1]) || 0, text };
}

function responseComplete(text: string): boolean {
  const headerEnd = text.indexOf("\r\n\r\n");
  if (headerEnd === -1) return false;
  const head = text.slice(0, headerEnd).toLowerCase();
  const length = /\r\ncontent-length: *(\d+)/.exec(head);
  if (length) return encoder.encode(text.slice(headerEnd + 4)).byteLength >= Number(length[1]);
  if (/\r\ntransfer-encoding: *chunked/.test(head)) return text.endsWith("0\r\n\r\n");
  return /^http\/1\.1 (1\d\d|204|304)/.test(head);
}

/** An upstream that answers like OpenAI: a model list and a non-streamed chat completion. */
export function openAiLikeUpstream(request: Request, seen: SeenRequest): Response {
  if (seen.path.endsWith("/models")) {
    return Response.json({ object: "list", data: [{ id: "gpt-test", object: "model", owned_by: "test" }] });
  }
  return Response.json({
    id: "chatcmpl-1",
    object: "chat.completion",
    choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
    echo: { method: request.method, body: seen.body },
  }, { headers: { "x-request-id": "req_upstream_1", "openai-processing-ms": "12" } });
}

/** A fake upstream as `openAiLikeUpstream`, that also answers /embeddings with one embedding. */
export function embeddingsUpstream() {
  return startUpstream((request, seen) =>
    seen.path === "/embeddings"
      ? Response.json({ object: "list", data: [{ embedding: [0.1] }] })
      : openAiLikeUpstream(request, seen)
  );
}

/**
 * A relay in front of `upstreamUrl` configured through parseConfig from `env`, as the real process is; no sign-in
 * lockout unless `overrides` sets one.
 */
export function relayFromEnv(upstreamUrl: string, env: Record<string, string>, overrides: Partial<RelayConfig> = {}) {
  const result = parseConfig({ UPSTREAM_BASE_URL: upstreamUrl, UPSTREAM_API_KEY: CANARY_KEY, ...env });
  assert.ok(result.ok, JSON.stringify(!result.ok && result.errors));
  return startRelay({ ...result.config, authFailuresPerMinute: 0, ...overrides });
}

/** An upstream that answers every POST like OpenAI, reporting whatever usage `reported` holds at the time. */
export function usageUpstream() {
  const state: { reported: Record<string, unknown> } = {
    reported: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
  };
  const upstream = startUpstream(() =>
    Response.json({
      id: "chatcmpl-1",
      object: "chat.completion",
      choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
      usage: state.reported,
    })
  );
  return Object.assign(upstream, { state, forwarded: () => JSON.parse(upstream.requests.at(-1)!.body) });
}

/** A relay started by `startRelay`. */
export type Relay = ReturnType<typeof startRelay>;

/** POSTs `body` as JSON (model gpt-test unless it names one) to `path` with the test user's credentials. */
export const post = (relay: Relay, path: string, body: Record<string, unknown>) =>
  relay.call(path, {
    method: "POST",
    headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
    body: JSON.stringify({ model: "gpt-test", ...body }),
  });

/** POSTs a chat body (gpt-test, with `extra`) as JSON with `headers` only: no credentials unless they are given. */
export const chatAs = (relay: { call: Relay["call"] }, headers: Record<string, string>, extra = {}) =>
  relay.call("/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: chatBody(extra),
  });

/** A fake upstream that answers `status` (200: a chat answer naming itself) and counts what it got. */
export const answering = (name: string, status = 200) =>
  startUpstream((_request, seen) =>
    status === 200
      ? Response.json({
        choices: [{ message: { role: "assistant", content: `from ${name}` } }],
        model: JSON.parse(seen.body || "{}").model,
        usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
      })
      : Response.json({ error: { message: `${name} says ${status}` } }, { status })
  );

/** A relay over `upstreams` (the first is the default) with MODEL_ALIASES `aliases`, on `now`'s clock if given. */
export const relayWith = (
  aliases: Record<string, string[]>,
  upstreams: Upstream[],
  overrides: Partial<RelayConfig> = {},
  now?: () => number,
) => startRelay(testConfig(upstreams[0].baseUrl, { upstreams, modelAliases: aliases, ...overrides }), undefined, now);

/** A chat for `model` (an alias unless named) with the test user's credentials. */
export const ask = (relay: Relay, model = "alias-fast", extra = {}) => relay.chat(chatBody({ model, ...extra }));

/** A streamed body whose chunks the test releases one by one. */
export function controlledStream() {
  const releases: (() => void)[] = [];
  let cancelled: (reason: unknown) => void = () => {};
  const cancelledPromise = new Promise<unknown>((resolve) => (cancelled = resolve));
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
    cancel(reason) {
      cancelled(reason);
    },
  });
  return {
    body,
    send: (text: string) => controller.enqueue(encoder.encode(text)),
    close: () => controller.close(),
    cancelled: cancelledPromise,
    releases,
  };
}

/** Resolves with the promise's value, or fails the test with `message` after `ms`. */
export async function within<T>(ms: number, promise: Promise<T>, message: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(message)), ms))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits until `condition` holds, looking every `everyMs`; fails with `message` when `ms` have passed first. */
export function eventually(ms: number, condition: () => boolean, message: string, everyMs = 20): Promise<void> {
  return within(
    ms,
    (async () => {
      while (!condition()) await sleep(everyMs);
    })(),
    message,
  );
}

/** A chat completion request body. */
export const chatBody = (extra: Record<string, unknown> = {}) =>
  JSON.stringify({ model: "gpt-test", messages: [{ role: "user", content: "Hello" }], ...extra });

/** A clock the test moves by hand, for the per-minute limits. */
export function manualClock() {
  let now = 1_000_000;
  return { now: () => now, advance: (ms: number) => void (now += ms) };
}

/** A streamed chat answer as OpenAI sends it: one chunk event per piece of content, then [DONE]. */
export function streamedAnswer(pieces: string[]): Response {
  const events = pieces.map((content) =>
    `data: ${
      JSON.stringify({
        id: "c1",
        object: "chat.completion.chunk",
        choices: [{ index: 0, delta: { content }, finish_reason: null }],
      })
    }\n\n`
  );
  return new Response(events.join("") + "data: [DONE]\n\n", { headers: { "content-type": "text/event-stream" } });
}

/** The four required variables, with canary secrets. */
export const minimalEnv = {
  UPSTREAM_BASE_URL: "https://api.openai.com/v1/",
  UPSTREAM_API_KEY: CANARY_KEY,
  MC_RELAY_USERNAME: USERNAME,
  MC_RELAY_PASSWORD: CANARY_PASSWORD,
};

/** TRUST_PROXY as parseConfig reads it. */
export function parseTrustProxyForTest(value: string): TrustedProxies {
  const result = parseConfig({ ...minimalEnv, TRUST_PROXY: value });
  assert.ok(result.ok);
  return result.config.trustProxy;
}

/** Environment for a relay subprocess: nothing inherited but what Deno needs to run. */
export function processEnv(env: Record<string, string>): Record<string, string> {
  const keep: Record<string, string> = { NO_COLOR: "1" };
  for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) keep[name] = value;
  }
  return { ...keep, ...env };
}

/** The project's folder: where the relay processes of the tests run, unless told otherwise. */
const PROJECT_FOLDER = new URL("..", import.meta.url).pathname;

/** Deno's arguments for the relay, as the start task has them. */
const START_ARGS = ["run", "-P", "--quiet", "main.ts"];

/** Where and how a relay process runs: a folder and Deno's arguments (default: the project, `START_ARGS`). */
export interface HowToRun {
  /** The working folder. */
  cwd?: string;
  /** Deno's arguments before the relay's own, e.g. `["task", "start"]`. */
  deno?: string[];
  /** Text for the process's standard input (`runRelayProcess`); none by default. */
  input?: string;
}

/** Runs `deno run -P --quiet main.ts` (the start task's flags) to completion. */
export async function runRelayProcess(env: Record<string, string>, args: string[] = [], how: HowToRun = {}) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [...(how.deno ?? START_ARGS), ...args],
    cwd: how.cwd ?? PROJECT_FOLDER,
    env: processEnv(env),
    clearEnv: true,
    stdin: how.input === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (how.input !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(encoder.encode(how.input));
    await writer.close();
  }
  const output = await child.output();
  const stdout = decoder.decode(output.stdout);
  const stderr = decoder.decode(output.stderr);
  seenByClientsOrLogs.push(stdout, stderr);
  return { code: output.code, stdout, stderr };
}

/**
 * Starts `deno run -P --quiet main.ts` (the start task's flags) and waits for its listening line. HOST and PORT
 * default to a free loopback port unless `how.deno` runs something else (a task reading its own .env).
 */
export async function spawnRelay(env: Record<string, string>, args: string[] = [], how: HowToRun = {}) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [...(how.deno ?? START_ARGS), ...args],
    cwd: how.cwd ?? PROJECT_FOLDER,
    env: processEnv(how.deno ? env : { HOST: "127.0.0.1", PORT: "0", ...env }),
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let stdout = "";
  let stderr = "";
  const stdoutDone = child.stdout.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (text) => void (stdout += text) }),
  );
  const stderrDone = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (text) => void (stderr += text) }),
  );
  const listening = await within(
    15000,
    (async () => {
      while (!/"msg":"mc-relay [^"]+ listening"/.test(stdout)) await sleep(20);
      return JSON.parse(stdout.split("\n").find((line) => /"msg":"mc-relay [^"]+ listening"/.test(line))!);
    })(),
    "the relay process did not start",
  );
  return {
    child,
    url: listening.url as string,
    listening,
    output: () => ({ stdout, stderr }),
    async finished() {
      const status = await child.status;
      await stdoutDone;
      await stderrDone;
      seenByClientsOrLogs.push(stdout, stderr);
      return status;
    },
  };
}

/** Makes a self-signed certificate for localhost and 127.0.0.1 with openssl, in a temporary folder. */
export async function selfSignedCertificate() {
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-tls-" });
  const certFile = `${folder}/cert.pem`;
  const keyFile = `${folder}/key.pem`;
  const made = await new Deno.Command("openssl", {
    args: [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-days",
      "2",
      "-subj",
      "/CN=localhost",
      "-addext",
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "-addext",
      "basicConstraints=critical,CA:FALSE",
      "-keyout",
      keyFile,
      "-out",
      certFile,
    ],
    stdout: "null",
    stderr: "piped",
  }).output().catch((error) => {
    throw new Error(`openssl is needed for the HTTPS tests (.ci/run installs it): ${error}`);
  });
  assert.equal(made.code, 0, decoder.decode(made.stderr));
  return {
    certFile,
    keyFile,
    cert: await Deno.readTextFile(certFile),
    key: await Deno.readTextFile(keyFile),
    [Symbol.asyncDispose]: () => Deno.remove(folder, { recursive: true }),
  };
}

/** Whether a program is on the PATH. */
export function installed(program: string): boolean {
  return (Deno.env.get("PATH") ?? "").split(":").some((folder) => {
    try {
      return Deno.statSync(`${folder}/${program}`).isFile;
    } catch {
      return false;
    }
  });
}

/** A free loopback port (free when this returns; good enough for a test). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/** True in CI, where every program a test needs must be installed (no test skips there). */
export const IN_CI = Deno.env.get("CI") === "true";

/** A real redis-server (Debian's) on a free loopback port, without persistence; `restart` keeps the port. */
export async function startRedis() {
  const port = freePort();
  let child: Deno.ChildProcess | undefined;
  const start = async () => {
    child = new Deno.Command("redis-server", {
      args: ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    let output = "";
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    await within(
      10_000,
      (async () => {
        while (!output.includes("Ready to accept connections")) {
          const { done, value } = await reader.read();
          if (done) throw new Error(`redis-server exited: ${output}`);
          output += value;
        }
      })(),
      "redis-server did not start",
    );
    reader.releaseLock();
    child.stdout.cancel().catch(() => {});
  };
  const stop = async () => {
    child?.kill("SIGTERM");
    await child?.status;
    child = undefined;
  };
  await start();
  return { url: `redis://127.0.0.1:${port}`, port, stop, start, [Symbol.asyncDispose]: stop };
}

/** A public relay in front of `upstreamUrl`: anyone may call, 20 a minute, 100,000 tokens a day, behind a proxy on loopback. */
export function publicConfig(upstreamUrl: string, overrides: Partial<RelayConfig> = {}): RelayConfig {
  return testConfig(upstreamUrl, {
    publicAccess: true,
    rateLimitPerMinute: 20,
    tokenBudgetPerDay: 100_000,
    trustProxy: parseTrustProxyForTest("127.0.0.1"),
    ...overrides,
  });
}
