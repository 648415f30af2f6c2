/**
 * mc-relay's benchmark: figures printed, nothing asserted. Run with `deno task bench` (add `--quick` for a
 * smaller run). Everything talks to loopback only, and every loop is bounded in count and time.
 *
 * The systems a user could put in the same place are measured in the same run, each in its own process, against
 * calling the fake upstream directly:
 *   nginx        one worker, the same auth check, no buffering, keep-alive to the upstream (the floor of any proxy)
 *   bare         the smallest Deno proxy (fetch, pass the body on, nothing else): what Deno itself costs
 *   bareJs       the same, but the body passes through the least JavaScript that can look at each chunk (one BYOB
 *                read and one enqueue per chunk): the floor for a Deno proxy that watches a stream, as the relay must
 *   bareRead     the same, and a chat's body read whole, parsed and serialised again, its answer read whole and
 *                parsed: the floor for a Deno proxy that checks a chat and counts its usage, as the relay must
 *   relay        mc-relay (deno run -P main.ts), no limits
 *   relayLimits  mc-relay with every request limit and a token budget on, in the memory store
 *   portkey      the Portkey gateway (Node), installed from npm into /tmp/mc-relay-bench/portkey at bench time
 *                (bench-only, never a dependency of the relay; skipped with the reason printed when npm fails)
 * For each: non-streamed chats (POST /v1/chat/completions, a small body, an answer with usage) and GET /v1/models,
 * throughput and CPU per request under wrk, added latency one request at a time, the added time to a stream's first
 * byte, CPU per chunk of streams (100 chunks 20 ms apart, 200 at once), RSS idle, at peak, and with 1,000 streams
 * open. Then the relay alone: a soak with 1% injected upstream faults, what each counter store costs per chat,
 * WORKERS, and start-up time. Where a column cannot be measured, the output says so and why.
 *
 * Every process is measured warm: each path, each store variant and each worker count first takes `WARM_UP_SECONDS`
 * of load. V8 compiles a server's hot code over its first seconds under load (the relay's throughput rose from
 * 3,400 to 5,900 req/s over its first ten seconds here), and a relay's figures are those of its steady state.
 * Throughputs are measured in turns: every path (store variant, worker count) in three rounds of a third of the time,
 * the median counting, so that a machine whose speed drifts over minutes slows them alike.
 *
 * `deno run -A bench.ts upstream PORT FAULT_RATE` runs the fake upstream on its own.
 */

const quick = Deno.args.includes("--quick");
/** Seconds of load each process takes before it is measured. */
const WARM_UP_SECONDS = quick ? 3 : 6;
const USER = "bench";
const PASSWORD = "bench-password-0123456789";
const AUTH = `Bearer ${USER}:${PASSWORD}`;
const here = new URL(".", import.meta.url).pathname;
const encoder = new TextEncoder();
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const wallClock = () => performance.timeOrigin + performance.now();

// ---------------------------------------------------------------------------
// The fake upstream (a process of its own)
// ---------------------------------------------------------------------------

/** Serves /models and /chat/completions fast; streams `chunks` events `interval` ms apart, each stamped with its send time. */
function runUpstream(port: number, faultRate: number) {
  const models = JSON.stringify({ object: "list", data: [{ id: "bench-model", object: "model", owned_by: "bench" }] });
  const answer = JSON.stringify({
    id: "chatcmpl-bench",
    object: "chat.completion",
    choices: [{ index: 0, message: { role: "assistant", content: "ok" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
  });
  Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, async (request) => {
    const path = new URL(request.url).pathname;
    const body = request.method === "POST" ? await request.json() : {};
    if (faultRate > 0 && Math.random() < faultRate) {
      if (Math.random() < 0.5) return new Response("injected upstream failure", { status: 500 });
      // A body that breaks off after its first bytes: the connection is dropped mid-response.
      return new Response(
        new ReadableStream({
          start(controller) {
            controller.enqueue(encoder.encode('{"partial":'));
            const reset = new Error("injected reset");
            reset.stack = "bench upstream: injected reset"; // one line, not a stack, per injected fault
            setTimeout(() => controller.error(reset), 5);
          },
        }),
        { headers: { "content-type": "application/json" } },
      );
    }
    if (path.endsWith("/models")) return new Response(models, { headers: { "content-type": "application/json" } });
    if (!body.stream) return new Response(answer, { headers: { "content-type": "application/json" } });
    // Gateways that drop unknown fields (Portkey) still pass the model: `bench-model@CHUNKSxINTERVAL` says it too.
    const shape = /@(\d+)x(\d+)$/.exec(String(body.model ?? ""));
    const chunks: number = body.chunks ?? (shape ? Number(shape[1]) : 100);
    const interval: number = body.interval ?? (shape ? Number(shape[2]) : 20);
    let sent = 0;
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        // The first event goes at once (what a stream's first byte is timed by); the others `interval` ms apart.
        if (sent > 0) await sleep(interval);
        if (sent++ === chunks) {
          controller.enqueue(encoder.encode("data: [DONE]\n\n"));
          return controller.close();
        }
        controller.enqueue(encoder.encode(`data: {"t":${wallClock()},"i":${sent}}\n\n`));
      },
    });
    return new Response(stream, { headers: { "content-type": "text/event-stream" } });
  });
}

/** The bare proxies' modes: `bare` passes bodies on, `bare-js` sees each chunk, `bare-read` also reads bodies whole. */
type BareMode = "bare" | "bare-js" | "bare-read";

/**
 * The smallest possible Deno proxy: the platform's own cost, for comparison. `bare-js`: a streamed body passes
 * through the least JavaScript that sees every chunk. `bare-read`: also the least a relay must do with a chat to check
 * it and count its usage (issues 23 and 27): the request body read whole, parsed and serialised again, a non-streamed
 * answer read whole and parsed, its bytes sent on; no auth, limits, deadlines, log or metrics.
 */
function runBareProxy(port: number, upstreamUrl: string, mode: BareMode) {
  Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, async (request) => {
    const url = new URL(request.url);
    const read = mode === "bare-read" && request.body !== null;
    const response = await fetch(`${upstreamUrl}${url.pathname}`, {
      method: request.method,
      headers: { authorization: "Bearer sk-bench", "content-type": "application/json" },
      body: read ? new TextEncoder().encode(JSON.stringify(JSON.parse(await request.text()))) : request.body,
    });
    const init = { status: response.status, headers: response.headers };
    const stream = response.headers.get("content-type")?.startsWith("text/event-stream") ?? false;
    if (mode === "bare-read" && !stream && request.method === "POST") {
      const bytes = await response.bytes();
      JSON.parse(new TextDecoder().decode(bytes));
      return new Response(bytes, init);
    }
    // A relay passes an answer it need not read (a model list) within Deno, and watches only streams.
    if (mode === "bare" || response.body === null || (mode === "bare-read" && !stream)) {
      return new Response(response.body, init);
    }
    return new Response(perChunk(response.body), init);
  });
}

/** A body through the least JavaScript that sees each chunk: one BYOB read, one copy, one enqueue. */
function perChunk(body: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  const reader = body.getReader({ mode: "byob" });
  let buffer = new Uint8Array(2048);
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await reader.read(buffer);
      if (done) return controller.close();
      controller.enqueue(value.slice());
      buffer = new Uint8Array(value.buffer);
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

async function waitForHttp(url: string, init: RequestInit = {}, timeoutMs = 15000): Promise<number> {
  const started = performance.now();
  while (performance.now() - started < timeoutMs) {
    try {
      const response = await fetch(url, init);
      await response.body?.cancel();
      if (response.status < 500) return performance.now() - started;
    } catch {
      // not up yet
    }
    await sleep(2);
  }
  throw new Error(`${url} did not answer within ${timeoutMs} ms`);
}

/** Runs this file in another mode ("upstream" or a bare proxy's) on a free port, as a process of its own. */
function startBenchProcess(mode: "upstream" | BareMode, argument: string) {
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${here}bench.ts`, mode, String(port), argument],
    stdout: "null",
    // An upstream that injects faults reports each one it injects: not the bench's output.
    stderr: mode === "upstream" && Number(argument) > 0 ? "null" : "inherit",
  }).spawn();
  return { url: `http://127.0.0.1:${port}`, child, pid: child.pid };
}

const startUpstreamProcess = (faultRate = 0) => startBenchProcess("upstream", String(faultRate));
const startBareProcess = (upstreamUrl: string, mode: BareMode) => startBenchProcess(mode, upstreamUrl);

function startRelayProcess(upstreamUrl: string, extraEnv: Record<string, string> = {}) {
  const port = freePort();
  const started = performance.now();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-P", "main.ts"],
    cwd: here,
    env: {
      UPSTREAM_BASE_URL: `${upstreamUrl}/v1`,
      UPSTREAM_API_KEY: "sk-bench",
      MC_RELAY_USERNAME: USER,
      MC_RELAY_PASSWORD: PASSWORD,
      ALLOWED_ORIGIN: "https://www.metaconfigurator.org",
      HOST: "127.0.0.1",
      PORT: String(port),
      LOG_LEVEL: Deno.env.get("BENCH_LOG_LEVEL") ?? "warn",
      NO_COLOR: "1",
      ...extraEnv,
    },
    stdout: "null",
    stderr: "null",
  }).spawn();
  return { url: `http://127.0.0.1:${port}`, child, pid: child.pid, started };
}

async function startNginx(upstreamUrl: string) {
  const prefix = await Deno.makeTempDir({ prefix: "mc-relay-bench-nginx-" });
  const port = freePort();
  const upstreamHost = new URL(upstreamUrl).host;
  await Deno.writeTextFile(
    `${prefix}/nginx.conf`,
    `
user root;
worker_processes 1;
daemon off;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  upstream llm { server ${upstreamHost}; keepalive 512; }
  server {
    listen 127.0.0.1:${port};
    client_max_body_size 32m;
    location /v1/ {
      if ($http_authorization != "${AUTH}") { return 401; }
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-bench";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }
  }
}
`,
  );
  const child = new Deno.Command("nginx", {
    args: ["-p", prefix, "-c", `${prefix}/nginx.conf`],
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  return { url: `http://127.0.0.1:${port}`, child, pid: child.pid, prefix };
}

function installed(program: string): boolean {
  return (Deno.env.get("PATH") ?? "").split(":").some((folder) => {
    try {
      return Deno.statSync(`${folder}/${program}`).isFile;
    } catch {
      return false;
    }
  });
}

// ---------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------

/** The process and its children (nginx's workers). */
function processTree(pid: number): number[] {
  const pids = [pid];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const parent = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (parent === pid) pids.push(Number(entry.name));
    } catch {
      // gone
    }
  }
  return pids;
}

/** CPU seconds (user + system) of a process tree. */
function cpuSeconds(pid: number): number {
  let ticks = 0;
  for (const member of processTree(pid)) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${member}/stat`);
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // gone
    }
  }
  return ticks / 100;
}

/** Resident memory in MB of a process tree (`VmRSS`, or the peak `VmHWM`). */
function memoryMb(pid: number, field: "VmRSS" | "VmHWM" = "VmRSS"): number {
  let kb = 0;
  for (const member of processTree(pid)) {
    try {
      const status = Deno.readTextFileSync(`/proc/${member}/status`);
      kb += Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1] ?? 0);
    } catch {
      // gone
    }
  }
  return kb / 1024;
}

function openFiles(pid: number): number {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** Headers that sign a request in: the relay's user (nginx checks the same), or a gateway's own. */
type Auth = Record<string, string>;
// "Authorization" as wrk's -H writes it: a wrk script's header of the same name then replaces it, never adds a second.
const RELAY_AUTH: Auth = { Authorization: AUTH };

/** What one sequential request measures: the whole answer, or only until a stream's first byte. */
type Probe = "models" | "chat" | "firstByte";

/** One request of a probe kind; resolves when its answer (or, for `firstByte`, its first body byte) is in. */
async function probeOnce(base: string, auth: Auth, probe: Probe): Promise<void> {
  if (probe === "models") {
    const response = await fetch(`${base}/v1/models`, { headers: auth });
    await response.arrayBuffer();
    return;
  }
  const response = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { ...auth, "content-type": "application/json" },
    body: probe === "chat" ? CHAT_BODY : FIRST_BYTE_BODY,
  });
  if (probe === "chat") {
    await response.arrayBuffer();
    return;
  }
  const reader = response.body!.getReader();
  await reader.read(); // the first chunk: what a user waits for
  // The rest (one more event, 1 ms later) read to its end, as a client does, off the clock: a cancelled stream would
  // close the connection, so the next request paid a new connection and the proxy's teardown of this one.
  firstByteRest = (async () => {
    while (!(await reader.read()).done);
  })().catch(() => {});
}

/** The end of the last `firstByte` probe's stream, awaited before the next request's clock starts. */
let firstByteRest: Promise<void> = Promise.resolve();

/** p50/p99 in µs of `count` sequential requests of one probe kind over kept-alive connections (200 warm up first). */
async function sequentialLatency(base: string, auth: Auth, probe: Probe, count: number) {
  const timings: number[] = [];
  for (let i = 0; i < count + 200; i++) {
    await firstByteRest;
    const started = performance.now();
    await probeOnce(base, auth, probe);
    if (i >= 200) timings.push((performance.now() - started) * 1000);
  }
  timings.sort((a, b) => a - b);
  return { p50: percentile(timings, 50), p99: percentile(timings, 99) };
}

/** A wrk script that sends `body` to every request, with these headers. */
function wrkScript(auth: Auth, body?: string): string {
  const lines = Object.entries(auth).map(([name, value]) => `wrk.headers["${name}"] = "${value}"`);
  if (body !== undefined) {
    lines.push(`wrk.method = "POST"`, `wrk.body = '${body}'`, `wrk.headers["Content-Type"] = "application/json"`);
  }
  return `${lines.join("\n")}\n`;
}

/**
 * Requests per second (and requests made) with `connections` open connections: GET /v1/models, or non-streamed
 * chats (`chat`). wrk when installed, else a Deno loop in this process.
 */
async function throughput(
  base: string,
  connections: number,
  seconds: number,
  auth: Auth = RELAY_AUTH,
  chat = false,
): Promise<{ rps: number; requests: number }> {
  const url = `${base}/v1/${chat ? "chat/completions" : "models"}`;
  if (installed("wrk")) {
    const script = await Deno.makeTempFile({ suffix: ".lua" });
    await Deno.writeTextFile(script, wrkScript(auth, chat ? CHAT_BODY : undefined));
    const output = await new Deno.Command("wrk", {
      args: ["-t2", `-c${connections}`, `-d${seconds}s`, "-s", script, url],
      stdout: "piped",
      stderr: "piped",
    }).output();
    await Deno.remove(script);
    const text = new TextDecoder().decode(output.stdout);
    if (/Non-2xx/.test(text)) console.error(`  wrk saw non-2xx answers from ${url}:\n${text}`);
    const rate = /Requests\/sec:\s+([\d.]+)/.exec(text);
    if (rate) return { rps: Number(rate[1]), requests: Number(/(\d+) requests in/.exec(text)?.[1]) };
  }
  let done = 0;
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(Array.from({ length: connections }, async () => {
    while (performance.now() < deadline) {
      await probeOnce(base, auth, chat ? "chat" : "models");
      done++;
    }
  }));
  return { rps: done / seconds, requests: done };
}

/** Requests per second of POST /v1/chat/completions (non-streamed) with `connections` open connections. */
const chatThroughput = (base: string, connections: number, seconds: number, auth: Auth = RELAY_AUTH) =>
  throughput(base, connections, seconds, auth, true);

/** Every limit and budget on, each too generous ever to refuse: the store does all its work, nobody is turned away. */
const GENEROUS_LIMITS = {
  RATE_LIMIT_PER_MINUTE: "100000000",
  RATE_LIMIT_PER_HOUR: "100000000",
  CONCURRENT_REQUESTS: "100000",
  TOKEN_BUDGET_PER_DAY: "1000000000000",
  MAX_TOKENS_PER_REQUEST: "1000",
};

/** The non-streamed chat every chat measurement sends. */
const CHAT_BODY = '{"model":"bench-model","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}';

/** A streamed chat whose first event comes at once: what the time to a stream's first byte is measured with. */
const FIRST_BYTE_BODY = '{"model":"bench-model@1x1","stream":true,"messages":[{"role":"user","content":"hi"}]}';

/** A wrk script that sends CHAT_BODY, signed in. */
const CHAT_WRK_SCRIPT = wrkScript(RELAY_AUTH, CHAT_BODY);

/**
 * What each counter store costs per request: non-streamed chats with every limit and budget on (generous enough never
 * to refuse), through a relay keeping its counters in memory, in SQLite (STATE_PATH) and in Redis (REDIS_URL, a
 * redis-server of its own), against the same relay with no limits at all.
 */
async function storeCosts(upstreamUrl: string, seconds: number) {
  const limits = GENEROUS_LIMITS;
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-bench-" });
  const redisPort = freePort();
  const redis = installed("redis-server")
    ? new Deno.Command("redis-server", {
      args: ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdout: "null",
      stderr: "null",
    }).spawn()
    : undefined;
  const variants: { name: string; env: Record<string, string> }[] = [
    { name: "no limits", env: {} },
    { name: "memory", env: limits },
    { name: "SQLite", env: { ...limits, STATE_PATH: `${folder}/state.db` } },
    ...(redis ? [{ name: "Redis", env: { ...limits, REDIS_URL: `redis://127.0.0.1:${redisPort}` } }] : []),
  ];
  // Every variant runs at once and they take turns (three rounds), so a drift of the machine's speed hits them alike.
  const relays = variants.map((variant) => ({ variant, relay: startRelayProcess(upstreamUrl, variant.env) }));
  for (const { relay } of relays) {
    await waitForHttp(`${relay.url}/health`);
    await chatThroughput(relay.url, 32, WARM_UP_SECONDS);
  }
  const sums = relays.map(() => ({ rates: [] as number[], requests: 0, relayCpu: 0, storeCpu: 0 }));
  for (let round = 0; round < 3; round++) {
    for (const [index, { variant, relay }] of relays.entries()) {
      const onRedis = redis !== undefined && variant.name === "Redis";
      const relayCpu = cpuSeconds(relay.pid);
      const redisCpu = onRedis ? cpuSeconds(redis.pid) : 0;
      const { rps, requests } = await chatThroughput(relay.url, 32, Math.max(1, Math.round(seconds / 3)));
      sums[index].rates.push(rps);
      sums[index].requests += requests;
      sums[index].relayCpu += cpuSeconds(relay.pid) - relayCpu;
      sums[index].storeCpu += onRedis ? cpuSeconds(redis.pid) - redisCpu : NaN;
    }
  }
  const rows = relays.map(({ variant }, index) => ({
    name: variant.name,
    rps: sums[index].rates.sort((a, b) => a - b)[1],
    relayUs: (sums[index].relayCpu * 1e6) / sums[index].requests,
    storeUs: (sums[index].storeCpu * 1e6) / sums[index].requests,
  }));
  for (const { relay } of relays) {
    relay.child.kill("SIGTERM");
    await relay.child.status;
  }
  redis?.kill("SIGTERM");
  await redis?.status;
  await Deno.remove(folder, { recursive: true });
  return rows;
}

/**
 * Throughput with 1 and 2 WORKERS (one SQLite file shared, so limits stay exact), the load generator pinned to core 1
 * (`taskset`) so that it does not move between the cores the relay uses: GET /v1/models with no limits, and
 * non-streamed chats with every limit and budget on, where the workers take turns at the SQLite file.
 */
async function workerScaling(upstreamUrl: string, seconds: number) {
  const folder = await Deno.makeTempDir({ prefix: "mc-relay-bench-workers-" });
  const script = `${folder}/chat.lua`;
  await Deno.writeTextFile(script, CHAT_WRK_SCRIPT);
  const pinnedWrk = async (url: string, duration: number, chat: boolean) => {
    const output = await new Deno.Command("taskset", {
      args: [
        ...["-c", "1", "wrk", "-t1", "-c32", `-d${duration}s`, "-H", `Authorization: ${AUTH}`],
        ...(chat ? ["-s", script, `${url}/v1/chat/completions`] : [`${url}/v1/models`]),
      ],
      stdout: "piped",
      stderr: "piped",
    }).output().catch(() => undefined);
    const text = output ? new TextDecoder().decode(output.stdout) : "";
    if (/Non-2xx/.test(text)) console.error(`  wrk saw non-2xx answers from ${url}:\n${text}`);
    return Number(/Requests\/sec:\s+([\d.]+)/.exec(text)?.[1] ?? NaN);
  };
  // All run at once and take turns (three rounds; the median counts), as the paths and the stores do.
  const variants = [1, 2].flatMap((workers) =>
    [false, true].map((chat) => ({
      workers,
      chat,
      relay: startRelayProcess(upstreamUrl, {
        WORKERS: String(workers),
        STATE_PATH: `${folder}/w${workers}${chat ? "-chat" : ""}.db`,
        ...(chat ? GENEROUS_LIMITS : {}),
      }),
      rates: [] as number[],
    }))
  );
  for (const { relay, chat } of variants) {
    await waitForHttp(`${relay.url}/health`);
    await (chat ? chatThroughput(relay.url, 32, WARM_UP_SECONDS) : throughput(relay.url, 32, WARM_UP_SECONDS));
  }
  for (let round = 0; round < 3; round++) {
    for (const entry of variants) {
      entry.rates.push(await pinnedWrk(entry.relay.url, Math.max(1, Math.round(seconds / 3)), entry.chat));
    }
  }
  for (const { relay } of variants) {
    relay.child.kill("SIGTERM");
    await relay.child.status;
  }
  await Deno.remove(folder, { recursive: true });
  const median = (rates: number[]) => rates.sort((a, b) => a - b)[1];
  return [1, 2].map((workers) => {
    const of = (chat: boolean) => variants.find((entry) => entry.workers === workers && entry.chat === chat)!;
    return { workers, models: median(of(false).rates), chat: median(of(true).rates) };
  });
}

/** Opens `streams` streamed chats at once; returns chunk delays (ms, send stamp to arrival) and failures. */
async function concurrentStreams(base: string, auth: Auth, streams: number, chunks: number, interval: number) {
  const delays: number[] = [];
  let failures = 0;
  let completed = 0;
  const decoder = new TextDecoder();
  await Promise.all(Array.from({ length: streams }, async (_, index) => {
    await sleep((index % 100) * (interval / 100)); // spread the chunks over the interval
    try {
      const response = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { ...auth, "content-type": "application/json" },
        body: JSON.stringify({ model: `bench-model@${chunks}x${interval}`, stream: true, messages: [] }),
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      let buffered = "";
      let events = 0;
      for await (const bytes of response.body!) {
        const arrived = wallClock();
        buffered += decoder.decode(bytes, { stream: true });
        let end;
        while ((end = buffered.indexOf("\n\n")) !== -1) {
          const event = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          const stamp = /"t":([\d.]+)/.exec(event);
          if (stamp) {
            delays.push(arrived - Number(stamp[1]));
            events++;
          }
        }
      }
      if (events === chunks && buffered === "") completed++;
      else failures++;
    } catch {
      failures++;
    }
  }));
  delays.sort((a, b) => a - b);
  return { delays, failures, completed, p50: percentile(delays, 50), p99: percentile(delays, 99) };
}

/** A proxy the bench measures, started in a process of its own, with the headers that sign a request in to it. */
type ProxyProcess = { url: string; pid: number; child: Deno.ChildProcess; auth: Auth; prefix?: string };

/** The kinds of proxy the bench starts. `relayLimits`: every limit and a token budget on, in the memory store. */
type ProxyKind = "relay" | "relayLimits" | "nginx" | "bare" | "bareJs" | "bareRead" | "portkey";

/** Starts a proxy of one kind in front of the upstream and waits until it answers. */
async function startProxy(kind: ProxyKind, upstreamUrl: string): Promise<ProxyProcess> {
  if (kind === "relay" || kind === "relayLimits") {
    const relay = startRelayProcess(upstreamUrl, kind === "relayLimits" ? GENEROUS_LIMITS : {});
    await waitForHttp(`${relay.url}/health`);
    return { ...relay, auth: RELAY_AUTH };
  }
  if (kind === "nginx") {
    const nginx = await startNginx(upstreamUrl);
    await waitForHttp(`${nginx.url}/v1/models`, { headers: RELAY_AUTH });
    return { ...nginx, auth: RELAY_AUTH };
  }
  if (kind === "portkey") {
    const portkey = startPortkey(upstreamUrl);
    await waitForHttp(`${portkey.url}/v1/models`, { headers: portkey.auth }, 30_000);
    return portkey;
  }
  const bare = startBareProcess(
    upstreamUrl,
    kind === "bareJs" ? "bare-js" : kind === "bareRead" ? "bare-read" : "bare",
  );
  await waitForHttp(`${bare.url}/v1/models`);
  return { ...bare, auth: RELAY_AUTH };
}

/** Where the bench installs the Portkey gateway (bench-only: never a dependency of the relay). */
const PORTKEY_FOLDER = "/tmp/mc-relay-bench/portkey";
const PORTKEY_VERSION = Deno.env.get("BENCH_PORTKEY_VERSION") ?? "1.15.2";
const PORTKEY_ENTRY = `${PORTKEY_FOLDER}/node_modules/@portkey-ai/gateway/build/start-server.js`;

/**
 * Installs `@portkey-ai/gateway` with npm into PORTKEY_FOLDER (once; a second run reuses it), with `@hono/node-server`
 * pinned to 1.14.1 by npm `overrides`: later versions fail every Portkey stream with `TypeError: immutable`
 * (Portkey-AI/gateway#1389). Returns why not, when it cannot.
 */
async function installPortkey(): Promise<string | undefined> {
  if (!installed("node") || !installed("npm")) return "no node and npm on PATH";
  const manifest = JSON.stringify({
    name: "mc-relay-bench-portkey",
    private: true,
    dependencies: { "@portkey-ai/gateway": PORTKEY_VERSION },
    overrides: { "@hono/node-server": "1.14.1" },
  });
  try {
    await Deno.mkdir(PORTKEY_FOLDER, { recursive: true });
    const current = await Deno.readTextFile(`${PORTKEY_FOLDER}/package.json`).catch(() => "");
    if (current === manifest && await Deno.stat(PORTKEY_ENTRY).then(() => true, () => false)) return undefined;
    await Deno.writeTextFile(`${PORTKEY_FOLDER}/package.json`, manifest);
    const output = await new Deno.Command("npm", {
      args: ["install", "--no-audit", "--no-fund", "--loglevel=error"],
      cwd: PORTKEY_FOLDER,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(240_000),
    }).output();
    if (!output.success) {
      const said = new TextDecoder().decode(output.stderr).trim().split("\n").slice(-2).join(" ");
      return `npm install @portkey-ai/gateway@${PORTKEY_VERSION} failed: ${said.slice(0, 200)}`;
    }
    await Deno.stat(PORTKEY_ENTRY);
    return undefined;
  } catch (error) {
    return `npm install @portkey-ai/gateway@${PORTKEY_VERSION} failed: ${String(error).slice(0, 200)}`;
  }
}

/**
 * Loaded before Portkey: a server that names no host listens on 127.0.0.1 (Portkey's start script gives none, and
 * Node would listen on every interface), so the bench stays on loopback.
 */
const LOOPBACK_ONLY = `import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && typeof args[1] !== "string") args.splice(1, args[1] === undefined ? 1 : 0, "127.0.0.1");
  return listen.apply(this, args);
};`;

/**
 * The Portkey gateway under Node, headless, sending every request to the fake upstream as an OpenAI-compatible
 * custom host (`x-portkey-provider: openai`, `x-portkey-custom-host`), with the upstream's key as its bearer token.
 */
function startPortkey(upstreamUrl: string): ProxyProcess {
  const port = freePort();
  const child = new Deno.Command("node", {
    args: [
      "--import",
      `data:text/javascript,${encodeURIComponent(LOOPBACK_ONLY)}`,
      PORTKEY_ENTRY,
      `--port=${port}`,
      "--headless",
    ],
    cwd: PORTKEY_FOLDER,
    env: { NODE_ENV: "production" },
    stdout: "null",
    stderr: "null", // it logs an error line for every GET /v1/models it passes on
  }).spawn();
  const auth = {
    authorization: "Bearer sk-bench",
    "x-portkey-provider": "openai",
    "x-portkey-custom-host": `${upstreamUrl}/v1`,
  };
  return { url: `http://127.0.0.1:${port}`, child, pid: child.pid, auth };
}

/** Stops a bench process and removes what it left on disk. */
async function stopProcess(proxy: ProxyProcess): Promise<void> {
  proxy.child.kill("SIGTERM");
  await proxy.child.status;
  if (proxy.prefix) await Deno.remove(proxy.prefix, { recursive: true });
}

/**
 * Memory per open stream (KB), and RSS, in a fresh proxy process with `streams` streams open (their first event in,
 * the next 60 s away): its RSS with them less its RSS with the first 100, which set up its pools, per stream. A fresh process
 * leaves out the garbage earlier traffic made (and the collections that free it while one measures), so this shows
 * what holding a stream open costs. NaN when the streams do not all open within 30 s.
 */
async function memoryPerOpenStream(
  proxy: ProxyProcess,
  streams: number,
): Promise<{ perStreamKb: number; rssMb: number }> {
  const leave = new AbortController();
  let open = 0;
  const hold = (count: number) =>
    Array.from({ length: count }, async () => {
      try {
        const response = await fetch(`${proxy.url}/v1/chat/completions`, {
          method: "POST",
          signal: leave.signal,
          headers: { ...proxy.auth, "content-type": "application/json" },
          body: JSON.stringify({ model: "bench-model@2x60000", stream: true, messages: [] }),
        });
        const reader = response.body!.getReader();
        await reader.read(); // the first event (a gateway may send its headers only with it)
        open++;
        await reader.read(); // the second is 60 s away: ends when the bench leaves
      } catch {
        // left
      }
    });
  const opened = async (count: number) => {
    const started = performance.now();
    while (open < count && performance.now() - started < 30_000) await sleep(50);
    await sleep(1000); // the proxy settles
    return open === count;
  };
  const first = hold(100);
  const warm = await opened(100);
  const before = memoryMb(proxy.pid);
  const held = hold(streams - 100);
  const allOpen = warm && await opened(streams);
  const after = memoryMb(proxy.pid);
  leave.abort();
  await Promise.all([...first, ...held]);
  await stopProcess(proxy);
  return allOpen
    ? { perStreamKb: ((after - before) * 1024) / (streams - 100), rssMb: after }
    : { perStreamKb: NaN, rssMb: NaN };
}

const format = (value: number, digits = 0) =>
  Number.isFinite(value)
    ? value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits })
    : "–";

/** The systems measured side by side, in the order of the table. */
const SYSTEMS: { kind: ProxyKind; label: string }[] = [
  { kind: "nginx", label: "nginx, 1 worker (floor)" },
  { kind: "bare", label: "bare Deno proxy (floor)" },
  { kind: "bareJs", label: "Deno, JS per chunk (floor)" },
  { kind: "bareRead", label: "Deno, chat read and checked (floor)" },
  { kind: "relay", label: "mc-relay, no limits" },
  { kind: "relayLimits", label: "mc-relay, limits + budget (memory)" },
  { kind: "portkey", label: "Portkey gateway (Node)" },
];

/** One measured system: its process, or why it is not measured. */
type System = { kind: ProxyKind; label: string; proxy?: ProxyProcess; missing?: string; idleMb?: number };

async function main() {
  const sizes = quick
    ? { sequential: 300, seconds: 3, streams: 100, chunks: 50, held: 300, soak: 5000 }
    : { sequential: 2000, seconds: 9, streams: 200, chunks: 100, held: 1000, soak: 50000 };
  const haveNginx = installed("nginx");
  const haveWrk = installed("wrk");
  const deno = Deno.version.deno;
  const cpu = /model name\s*:\s*(.*)/.exec(Deno.readTextFileSync("/proc/cpuinfo"))?.[1] ?? "unknown CPU";
  console.log(
    `mc-relay bench${quick ? " (quick)" : ""}: Deno ${deno}, ${navigator.hardwareConcurrency} cores (${cpu}), ` +
      `load from ${haveWrk ? "wrk" : "a Deno loop (no wrk: throughputs are the loop's, which shares a core)"}`,
  );
  const portkeyMissing = await installPortkey();
  if (portkeyMissing) console.log(`  Portkey skipped: ${portkeyMissing}`);
  else console.log(`  Portkey gateway ${PORTKEY_VERSION} from npm in ${PORTKEY_FOLDER} (@hono/node-server 1.14.1)`);

  const upstream = startUpstreamProcess();
  await waitForHttp(`${upstream.url}/v1/models`);
  const direct = { url: upstream.url, auth: RELAY_AUTH };
  const systems: System[] = [];
  for (const { kind, label } of SYSTEMS) {
    const missing = kind === "nginx" && !haveNginx
      ? "nginx not installed"
      : kind === "portkey" && portkeyMissing
      ? portkeyMissing
      : undefined;
    if (missing) {
      systems.push({ kind, label, missing });
      continue;
    }
    try {
      const proxy = await startProxy(kind, upstream.url);
      await sleep(500);
      systems.push({ kind, label, proxy, idleMb: memoryMb(proxy.pid) });
    } catch (error) {
      systems.push({ kind, label, missing: `did not start: ${String(error).slice(0, 120)}` });
    }
  }
  const running = systems.filter((system) => system.proxy !== undefined) as (System & { proxy: ProxyProcess })[];
  const results: Record<string, Record<string, number>> = { direct: {} };
  for (const system of systems) results[system.kind] = {};
  const notes: string[] = [];

  console.log(`- warm-up: ${WARM_UP_SECONDS} s of chats and ${WARM_UP_SECONDS} s of GET /v1/models per system`);
  for (const { proxy } of running) {
    await chatThroughput(proxy.url, 32, WARM_UP_SECONDS, proxy.auth);
    await throughput(proxy.url, 32, WARM_UP_SECONDS, proxy.auth);
  }

  console.log(
    `- sequential latency: ${sizes.sequential} requests per system and kind (models, chat, a stream's first byte)`,
  );
  for (const probe of ["models", "chat", "firstByte"] as const) {
    // Direct first and again last: the floor every added latency is taken against is their mean.
    const first = await sequentialLatency(direct.url, direct.auth, probe, sizes.sequential);
    for (const { kind, proxy } of running) {
      const { p50, p99 } = await sequentialLatency(proxy.url, proxy.auth, probe, sizes.sequential);
      Object.assign(results[kind], { [`${probe}P50`]: p50, [`${probe}P99`]: p99 });
    }
    const last = await sequentialLatency(direct.url, direct.auth, probe, sizes.sequential);
    Object.assign(results.direct, {
      [`${probe}P50`]: (first.p50 + last.p50) / 2,
      [`${probe}P99`]: (first.p99 + last.p99) / 2,
    });
  }

  // The systems take turns, three rounds of a third of the time each, and each one's median counts: a machine whose
  // speed drifts over minutes (a shared VM) then slows every system alike instead of the ones measured last.
  for (const chat of [true, false]) {
    const what = chat ? "non-streamed chats" : "GET /v1/models";
    console.log(`- throughput, ${what}, 32 connections: ${sizes.seconds} s per system, in 3 turns`);
    const rounds: Record<string, number[]> = {};
    // CPU per request over all three turns: the proxy's own cost, whatever share of the cores it got.
    const spent: Record<string, { seconds: number; requests: number }> = {};
    for (let round = 0; round < 3; round++) {
      for (const { kind, proxy } of [{ kind: "direct", proxy: { ...direct, pid: upstream.pid } }, ...running]) {
        const cpuBefore = cpuSeconds(proxy.pid);
        const seconds = Math.max(1, Math.round(sizes.seconds / 3));
        const { rps, requests } = await throughput(proxy.url, 32, seconds, proxy.auth, chat);
        const sum = (spent[kind] ??= { seconds: 0, requests: 0 });
        sum.seconds += cpuSeconds(proxy.pid) - cpuBefore;
        sum.requests += requests;
        (rounds[kind] ??= []).push(rps);
      }
    }
    for (const kind in rounds) {
      const sorted = rounds[kind].sort((a, b) => a - b);
      results[kind][chat ? "chatRps" : "modelsRps"] = sorted[1];
      results[kind][chat ? "chatRpsSpread" : "modelsRpsSpread"] = (sorted[2] - sorted[0]) / sorted[1];
      // The direct path's process is the upstream itself: no proxy to count.
      if (kind !== "direct") {
        results[kind][chat ? "cpuPerChatUs" : "cpuPerModelsUs"] = (spent[kind].seconds * 1e6) / spent[kind].requests;
      }
    }
  }

  console.log(
    `- streaming: ${sizes.streams} concurrent streams of ${sizes.chunks} chunks, 20 ms apart, per system`,
  );
  for (const target of [{ kind: "direct", proxy: undefined }, ...running]) {
    const proxyPid = target.proxy?.pid;
    const cpuBefore = proxyPid ? cpuSeconds(proxyPid) : 0;
    let peakMb = 0;
    const sampler = proxyPid ? setInterval(() => (peakMb = Math.max(peakMb, memoryMb(proxyPid))), 100) : undefined;
    const run = await concurrentStreams(
      target.proxy?.url ?? direct.url,
      target.proxy?.auth ?? direct.auth,
      sizes.streams,
      sizes.chunks,
      20,
    );
    clearInterval(sampler);
    Object.assign(results[target.kind], {
      chunkP50: run.p50,
      chunkP99: run.p99,
      streamFailures: run.failures,
      streamsCompleted: run.completed,
      cpuPerChunkUs: proxyPid ? ((cpuSeconds(proxyPid) - cpuBefore) * 1e6) / run.delays.length : NaN,
      peakMb: proxyPid ? peakMb : NaN,
      // The highest RSS the process had over everything so far (the throughput phases included).
      hwmMb: proxyPid ? memoryMb(proxyPid, "VmHWM") : NaN,
    });
    if (run.failures > 0) {
      notes.push(`${target.kind}: ${run.failures} of ${sizes.streams} streams ended broken or short`);
    }
  }
  for (const { proxy } of running) await stopProcess(proxy);

  console.log(`- memory: ${sizes.held} streams held open (first event 60 s away), fresh processes`);
  for (const { kind } of running) {
    if (kind === "relayLimits") continue; // the same process as the relay's, with counters that hold no stream
    const held = await memoryPerOpenStream(await startProxy(kind, upstream.url), sizes.held);
    results[kind].perStreamKb = held.perStreamKb;
    results[kind].heldRssMb = held.rssMb;
    if (!Number.isFinite(held.rssMb)) notes.push(`${kind}: not all ${sizes.held} streams opened within 30 s`);
  }

  console.log(`- soak: ${sizes.soak} requests through the relay with 1% injected upstream faults`);
  const faulty = startUpstreamProcess(0.01);
  await waitForHttp(`${faulty.url}/v1/models`);
  const soakRelay = startRelayProcess(faulty.url);
  await waitForHttp(`${soakRelay.url}/health`);
  const outcomes = new Map<string, number>();
  const soakRound = async (requests: number) => {
    let issued = 0;
    await Promise.all(Array.from({ length: 50 }, async () => {
      while (issued < requests) {
        issued++;
        const chat = issued % 2 === 0;
        let outcome: string;
        try {
          const response = await fetch(`${soakRelay.url}/v1/${chat ? "chat/completions" : "models"}`, {
            method: chat ? "POST" : "GET",
            headers: { authorization: AUTH, "content-type": "application/json" },
            body: chat ? '{"model":"bench-model","messages":[]}' : undefined,
          });
          await response.arrayBuffer();
          outcome = String(response.status);
        } catch {
          outcome = "cut";
        }
        outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
      }
    }));
    await sleep(1000);
    return { rss: memoryMb(soakRelay.pid), files: openFiles(soakRelay.pid) };
  };
  // A warm-up round at the same concurrency fills the connection pools, so what follows compares like with like.
  const soakWarm = await soakRound(Math.round(sizes.soak / 10));
  outcomes.clear();
  const soakStarted = performance.now();
  const soakHalf = await soakRound(sizes.soak / 2);
  const soakAfter = await soakRound(sizes.soak / 2);
  const soakSeconds = (performance.now() - soakStarted) / 1000 - 2; // less the two 1 s pauses
  soakRelay.child.kill("SIGTERM");
  faulty.child.kill("SIGTERM");
  await soakRelay.child.status;
  await faulty.child.status;

  console.log(`- stores: non-streamed chats, 32 connections, ${sizes.seconds} s per store, every limit and budget on`);
  const stores = await storeCosts(upstream.url, sizes.seconds);

  const haveTaskset = installed("taskset") && installed("wrk");
  console.log(
    `- workers: GET /v1/models, and chats with every limit on (SQLite), with WORKERS=1 and 2, wrk pinned to core 1${
      haveTaskset ? "" : " (skipped: no taskset or wrk)"
    }`,
  );
  const scaling = haveTaskset ? await workerScaling(upstream.url, sizes.seconds) : [];

  console.log("- start-up: 5 starts of the relay process, time to the first answered /health");
  const startups: number[] = [];
  for (let i = 0; i < 5; i++) {
    const fresh = startRelayProcess(upstream.url);
    startups.push(await waitForHttp(`${fresh.url}/health`));
    fresh.child.kill("SIGTERM");
    await fresh.child.status;
  }
  startups.sort((a, b) => a - b);

  await stopProcess({ ...upstream, auth: RELAY_AUTH });

  const ms = (us: number, digits = 2) => format(us / 1000, digits);
  const added = (kind: string, probe: string) =>
    `${ms(results[kind][`${probe}P50`] - results.direct[`${probe}P50`])} / ${
      ms(results[kind][`${probe}P99`] - results.direct[`${probe}P99`])
    }`;
  const rows = systems.map(({ kind, label, missing, idleMb }) => {
    if (missing) return `| ${label} | not measured: ${missing} |||||||||`;
    const r = results[kind];
    return `| ${label} | ${format(r.chatRps)} | ${format(r.cpuPerChatUs)} | ${format(r.modelsRps)} | ${
      format(r.cpuPerModelsUs)
    } | ${added(kind, "models")} | ${added(kind, "chat")} | ${added(kind, "firstByte")} | ${
      format(r.cpuPerChunkUs, 1)
    } | ${format(r.chunkP50 - results.direct.chunkP50, 2)} / ${format(r.chunkP99 - results.direct.chunkP99, 2)} | ${
      format(idleMb ?? NaN)
    } / ${format(r.hwmMb)} | ${kind === "relayLimits" ? "(as no limits)" : format(r.heldRssMb)} |`;
  });
  const d = results.direct;
  const ratio = (kind: string, over: string, field: string) =>
    results[kind] && results[over] ? format(results[kind][field] / results[over][field], 2) : "–";
  const spread = (kind: string) => results[kind]?.chatRps ? `${format(results[kind].chatRpsSpread * 100)}%` : "–";
  console.log(
    `
Non-streamed chats (POST /v1/chat/completions, a small body, an answer with usage) and GET /v1/models: wrk, 32
connections, 3 turns of ${Math.max(1, Math.round(sizes.seconds / 3))} s, the median; CPU per request over all turns.
Added latency: sequential requests, one at a time, against calling the upstream directly (direct: models ${
      ms(d.modelsP50)
    } / ${ms(d.modelsP99)} ms, chat ${ms(d.chatP50)} / ${ms(d.chatP99)} ms, first byte ${ms(d.firstByteP50)} / ${
      ms(d.firstByteP99)
    } ms p50 / p99). Streams: ${sizes.streams} at once, ${sizes.chunks} chunks 20 ms apart (direct chunk delay ${
      format(d.chunkP50, 2)
    } / ${format(d.chunkP99, 2)} ms). RSS: idle after start, peak (VmHWM) after the throughput and stream phases, and
in a fresh process with ${sizes.held} streams open.

| system | chat req/s | CPU per chat (µs) | models req/s | CPU per models (µs) | added p50 / p99 models (ms) | added p50 / p99 chat (ms) | added first byte p50 / p99 (ms) | CPU per chunk (µs) | added chunk delay p50 / p99 (ms) | RSS idle / peak (MB) | RSS, ${
      format(sizes.held)
    } open streams (MB) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| direct (the fake upstream) | ${format(d.chatRps)} | – | ${format(d.modelsRps)} | – | – | – | – | – | – | – | – |
${rows.join("\n")}

- chat throughput spread over the 3 turns ((max - min) / median): ${
      systems.filter((s) => !s.missing).map((s) => `${s.kind} ${spread(s.kind)}`).join(", ")
    }
- mc-relay / bare Deno proxy: CPU per chat ${ratio("relay", "bare", "cpuPerChatUs")} (limits + budget: ${
      ratio("relayLimits", "bare", "cpuPerChatUs")
    }; goal at most 2), chat throughput ${ratio("relay", "bare", "chatRps")} (limits + budget: ${
      ratio("relayLimits", "bare", "chatRps")
    }; goal at least 0.5), RSS at ${sizes.held} open streams ${ratio("relay", "bare", "heldRssMb")} (goal at most 1.2)
- mc-relay / Deno with the chat read and checked: CPU per chat ${
      ratio("relay", "bareRead", "cpuPerChatUs")
    }, chat throughput ${ratio("relay", "bareRead", "chatRps")}; that floor / bare Deno proxy: CPU per chat ${
      ratio("bareRead", "bare", "cpuPerChatUs")
    }
- mc-relay / Deno with JS per chunk: CPU per chunk ${ratio("relay", "bareJs", "cpuPerChunkUs")} (goal at most 1.25)
- mc-relay / Portkey: chat throughput ${ratio("relay", "portkey", "chatRps")}, CPU per chat ${
      ratio("relay", "portkey", "cpuPerChatUs")
    }
- not measured: ${
      [
        ...systems.filter((s) => s.missing).map((s) => `${s.label}: ${s.missing}`),
        ...notes,
        "the direct path's CPU per request (its process is the upstream's)",
        "RSS at open streams for limits + budget (the relay's process; counters hold nothing per stream)",
      ].join("; ")
    }
- soak: ${sizes.soak} requests in ${format(soakSeconds, 1)} s, outcomes ${
      JSON.stringify(Object.fromEntries(outcomes))
    }; ` +
      `RSS after warm-up / half / all: ${format(soakWarm.rss, 1)} / ${format(soakHalf.rss, 1)} / ${
        format(soakAfter.rss, 1)
      } MB, open files ${soakWarm.files} / ${soakHalf.files} / ${soakAfter.files}
- start-up to first /health: median ${format(percentile(startups, 50))} ms (of ${
        startups.map((ms) => format(ms)).join(", ")
      })

| counters (limits and budgets on) | chat req/s, 32 connections | relay CPU per request (µs) | store CPU per request (µs) |
| --- | ---: | ---: | ---: |
${
        stores.map((row) => `| ${row.name} | ${format(row.rps)} | ${format(row.relayUs)} | ${format(row.storeUs)} |`)
          .join("\n")
      }

| WORKERS (wrk pinned to core 1) | GET /v1/models req/s | per worker | chats, every limit on (SQLite), req/s | per worker |
| --- | ---: | ---: | ---: | ---: |
${
        scaling.map((row) =>
          `| ${row.workers} | ${format(row.models)} | ${format(row.models / row.workers)} | ${format(row.chat)} | ${
            format(row.chat / row.workers)
          } |`
        ).join("\n")
      }
`,
  );
}

if (Deno.args[0] === "upstream") {
  runUpstream(Number(Deno.args[1]), Number(Deno.args[2] ?? 0));
} else if (["bare", "bare-js", "bare-read"].includes(Deno.args[0])) {
  runBareProxy(Number(Deno.args[1]), Deno.args[2], Deno.args[0] as BareMode);
} else if (import.meta.main) {
  await main();
}
