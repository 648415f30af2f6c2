/**
 * mc-relay's benchmark: figures printed, nothing asserted. Run with `deno task bench` (add `--quick` for a
 * smaller run). Everything talks to loopback only, and every loop is bounded in count and time.
 *
 * Three paths are measured in the same run, each in its own process:
 *   direct  client -> fake upstream                          (the floor)
 *   relay   client -> mc-relay (deno run -P main.ts) -> upstream
 *   nginx   client -> nginx (same auth check, no buffering, one worker) -> upstream
 *   bare    client -> the smallest Deno proxy (fetch, pass the body on, nothing else) -> upstream:
 *           what Deno itself costs, so the difference to the relay is what is the relay's own
 *   bare+JS the same proxy, but the body passes through the least JavaScript that can look at each chunk (one
 *           BYOB read and one enqueue per chunk): the floor for any Deno proxy that watches a stream, as the relay
 *           must (idle timeout, usage, byte counts), where the bare proxy lets Deno pipe the body without JavaScript
 * Then the relay alone: 1,000 concurrent streamed chats, a soak of requests with 1% injected upstream
 * faults (RSS and open files before and after), and start-up time.
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
    const chunks: number = body.chunks ?? 100;
    const interval: number = body.interval ?? 20;
    let sent = 0;
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        await sleep(interval);
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

/**
 * The smallest possible Deno proxy: the platform's own cost, for comparison. With `perChunk`, the body passes
 * through the least JavaScript that sees every chunk.
 */
function runBareProxy(port: number, upstreamUrl: string, perChunk = false) {
  Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, async (request) => {
    const url = new URL(request.url);
    const response = await fetch(`${upstreamUrl}${url.pathname}`, {
      method: request.method,
      headers: { authorization: "Bearer sk-bench", "content-type": "application/json" },
      body: request.body,
    });
    const init = { status: response.status, headers: response.headers };
    if (!perChunk || response.body === null) return new Response(response.body, init);
    const reader = response.body.getReader({ mode: "byob" });
    let buffer = new Uint8Array(2048);
    return new Response(
      new ReadableStream<Uint8Array>({
        async pull(controller) {
          const { done, value } = await reader.read(buffer);
          if (done) return controller.close();
          controller.enqueue(value.slice());
          buffer = new Uint8Array(value.buffer);
        },
        cancel: (reason) => reader.cancel(reason),
      }, { highWaterMark: 0 }),
      init,
    );
  });
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

/** Runs this file in another mode ("upstream", "bare" or "bare-js") on a free port, as a process of its own. */
function startBenchProcess(mode: "upstream" | "bare" | "bare-js", argument: string) {
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${here}bench.ts`, mode, String(port), argument],
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  return { url: `http://127.0.0.1:${port}`, child, pid: child.pid };
}

const startUpstreamProcess = (faultRate = 0) => startBenchProcess("upstream", String(faultRate));
const startBareProcess = (upstreamUrl: string, perChunk = false) =>
  startBenchProcess(perChunk ? "bare-js" : "bare", upstreamUrl);

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

/** p50/p99 in µs of sequential GET /v1/models over one kept-alive connection. */
async function sequentialLatency(base: string, count: number) {
  const timings: number[] = [];
  for (let i = 0; i < count + 200; i++) {
    const started = performance.now();
    const response = await fetch(`${base}/v1/models`, { headers: { authorization: AUTH } });
    await response.arrayBuffer();
    if (i >= 200) timings.push((performance.now() - started) * 1000); // the first 200 warm up
  }
  timings.sort((a, b) => a - b);
  return { p50: percentile(timings, 50), p99: percentile(timings, 99) };
}

/** Requests per second (and requests made) of GET /v1/models with `connections` open connections (wrk, else a Deno loop). */
async function throughput(
  base: string,
  connections: number,
  seconds: number,
): Promise<{ rps: number; requests: number }> {
  if (installed("wrk")) {
    const output = await new Deno.Command("wrk", {
      args: ["-t2", `-c${connections}`, `-d${seconds}s`, "-H", `Authorization: ${AUTH}`, `${base}/v1/models`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(output.stdout);
    const rate = /Requests\/sec:\s+([\d.]+)/.exec(text);
    if (/Non-2xx/.test(text)) console.error(`  wrk saw non-2xx answers from ${base}:\n${text}`);
    if (rate) return { rps: Number(rate[1]), requests: Number(/(\d+) requests in/.exec(text)?.[1]) };
  }
  let done = 0;
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(Array.from({ length: connections }, async () => {
    while (performance.now() < deadline) {
      const response = await fetch(`${base}/v1/models`, { headers: { authorization: AUTH } });
      await response.arrayBuffer();
      done++;
    }
  }));
  return { rps: done / seconds, requests: done };
}

/** Requests per second of POST /v1/chat/completions (non-streamed) with `connections` open connections. */
async function chatThroughput(
  base: string,
  connections: number,
  seconds: number,
): Promise<{ rps: number; requests: number }> {
  if (installed("wrk")) {
    const script = await Deno.makeTempFile({ suffix: ".lua" });
    await Deno.writeTextFile(script, CHAT_WRK_SCRIPT);
    const output = await new Deno.Command("wrk", {
      args: ["-t2", `-c${connections}`, `-d${seconds}s`, "-s", script, `${base}/v1/chat/completions`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    await Deno.remove(script);
    const text = new TextDecoder().decode(output.stdout);
    if (/Non-2xx/.test(text)) console.error(`  wrk saw non-2xx answers from ${base}:\n${text}`);
    const rate = Number(/Requests\/sec:\s+([\d.]+)/.exec(text)?.[1]);
    const requests = Number(/(\d+) requests in/.exec(text)?.[1]);
    return { rps: rate, requests };
  }
  let done = 0;
  const deadline = performance.now() + seconds * 1000;
  await Promise.all(Array.from({ length: connections }, async () => {
    while (performance.now() < deadline) {
      const response = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: AUTH, "content-type": "application/json" },
        body: CHAT_BODY,
      });
      await response.arrayBuffer();
      done++;
    }
  }));
  return { rps: done / seconds, requests: done };
}

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

/** A wrk script that sends CHAT_BODY, signed in. */
const CHAT_WRK_SCRIPT =
  `wrk.method = "POST"\nwrk.body = '${CHAT_BODY}'\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "${AUTH}"\n`;

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
async function concurrentStreams(base: string, streams: number, chunks: number, interval: number) {
  const delays: number[] = [];
  let failures = 0;
  let completed = 0;
  const decoder = new TextDecoder();
  await Promise.all(Array.from({ length: streams }, async (_, index) => {
    await sleep((index % 100) * (interval / 100)); // spread the chunks over the interval
    try {
      const response = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: AUTH, "content-type": "application/json" },
        body: JSON.stringify({ model: "bench-model", stream: true, chunks, interval, messages: [] }),
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

/** A proxy the bench measures, started in a process of its own. */
type ProxyProcess = { url: string; pid: number; child: Deno.ChildProcess; prefix?: string };

/** Starts a proxy of one kind in front of the upstream and waits until it answers. */
async function startProxy(kind: "relay" | "nginx" | "bare" | "bareJs", upstreamUrl: string): Promise<ProxyProcess> {
  if (kind === "relay") {
    const relay = startRelayProcess(upstreamUrl);
    await waitForHttp(`${relay.url}/health`);
    return relay;
  }
  if (kind === "nginx") {
    const nginx = await startNginx(upstreamUrl);
    await waitForHttp(`${nginx.url}/v1/models`, { headers: { authorization: AUTH } });
    return nginx;
  }
  const bare = startBareProcess(upstreamUrl, kind === "bareJs");
  await waitForHttp(`${bare.url}/v1/models`);
  return bare;
}

/** Stops a bench process and removes what it left on disk. */
async function stopProcess(proxy: ProxyProcess): Promise<void> {
  proxy.child.kill("SIGTERM");
  await proxy.child.status;
  if (proxy.prefix) await Deno.remove(proxy.prefix, { recursive: true });
}

/**
 * Memory per open stream (KB), in a fresh proxy process: its RSS with `streams` more streams open (their first event
 * still to come) less its RSS before, per stream, after 100 streams held first have set up its pools. A fresh process
 * leaves out the garbage earlier traffic made (and the collections that free it while one measures), so this shows
 * what holding a stream open costs. NaN when the streams do not all open within 30 s.
 */
async function memoryPerOpenStream(proxy: ProxyProcess, streams: number): Promise<number> {
  const leave = new AbortController();
  let open = 0;
  const hold = (count: number) =>
    Array.from({ length: count }, async () => {
      try {
        const response = await fetch(`${proxy.url}/v1/chat/completions`, {
          method: "POST",
          signal: leave.signal,
          headers: { authorization: AUTH, "content-type": "application/json" },
          body: JSON.stringify({ model: "bench-model", stream: true, chunks: 1, interval: 60_000, messages: [] }),
        });
        open++;
        await response.body?.getReader().read(); // ends when the bench leaves
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
  const held = hold(streams);
  const allOpen = warm && await opened(100 + streams);
  const after = memoryMb(proxy.pid);
  leave.abort();
  await Promise.all([...first, ...held]);
  await stopProcess(proxy);
  return allOpen ? ((after - before) * 1024) / streams : NaN;
}

const format = (value: number, digits = 0) =>
  Number.isFinite(value)
    ? value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits })
    : "–";

async function main() {
  const sizes = quick
    ? { sequential: 500, seconds: 3, streams: 200, chunks: 50, soak: 5000 }
    : { sequential: 3000, seconds: 8, streams: 1000, chunks: 100, soak: 50000 };
  const haveNginx = installed("nginx");
  const deno = Deno.version.deno;
  const cpu = /model name\s*:\s*(.*)/.exec(Deno.readTextFileSync("/proc/cpuinfo"))?.[1] ?? "unknown CPU";
  console.log(
    `mc-relay bench${quick ? " (quick)" : ""}: Deno ${deno}, ${navigator.hardwareConcurrency} cores (${cpu}), ` +
      `${haveNginx ? "nginx (1 worker)" : "no nginx: its column is left empty"}, load from ${
        installed("wrk") ? "wrk" : "a Deno loop"
      }`,
  );

  const upstream = startUpstreamProcess();
  await waitForHttp(`${upstream.url}/v1/models`);
  const relay = await startProxy("relay", upstream.url);
  const nginx = haveNginx ? await startProxy("nginx", upstream.url) : undefined;
  const bare = await startProxy("bare", upstream.url);
  const bareJs = await startProxy("bareJs", upstream.url);
  const relayIdleMb = memoryMb(relay.pid);

  const paths = [
    { name: "direct", url: upstream.url, pid: upstream.pid },
    { name: "relay", url: relay.url, pid: relay.pid },
    ...(nginx ? [{ name: "nginx", url: nginx.url, pid: nginx.pid }] : []),
    { name: "bare", url: bare.url, pid: bare.pid },
    { name: "bareJs", url: bareJs.url, pid: bareJs.pid },
  ];
  const results: Record<string, Record<string, number>> = {};
  for (const path of paths) results[path.name] = {};

  console.log(`- warm-up: ${WARM_UP_SECONDS} s of GET /v1/models per path`);
  for (const path of paths) await throughput(path.url, 32, WARM_UP_SECONDS);

  console.log(`- sequential latency: ${sizes.sequential} requests per path`);
  for (const path of paths) {
    const { p50, p99 } = await sequentialLatency(path.url, sizes.sequential);
    Object.assign(results[path.name], { p50, p99 });
  }

  // The paths take turns, three rounds of a third of the time each, and each path's median counts: a machine whose
  // speed drifts over minutes (a shared VM) then slows every path alike instead of the ones measured last.
  for (const connections of [32, 256]) {
    console.log(`- throughput with ${connections} connections: ${sizes.seconds} s per path, in 3 turns`);
    const rounds: Record<string, number[]> = {};
    // CPU per request over all three turns: the proxy's own cost, whatever share of the cores it got.
    const cpu: Record<string, { seconds: number; requests: number }> = {};
    for (let round = 0; round < 3; round++) {
      for (const path of paths) {
        const cpuBefore = cpuSeconds(path.pid);
        const { rps, requests } = await throughput(path.url, connections, Math.max(1, Math.round(sizes.seconds / 3)));
        const spent = (cpu[path.name] ??= { seconds: 0, requests: 0 });
        spent.seconds += cpuSeconds(path.pid) - cpuBefore;
        spent.requests += requests;
        (rounds[path.name] ??= []).push(rps);
      }
    }
    for (const path of paths) {
      results[path.name][`rps${connections}`] = rounds[path.name].sort((a, b) => a - b)[1];
      // The direct path's process is the upstream itself: no proxy to count.
      if (path.name !== "direct") {
        results[path.name][`cpuPerRequestUs${connections}`] = (cpu[path.name].seconds * 1e6) / cpu[path.name].requests;
      }
    }
  }

  // 100 ms apart: 10,000 chunks a second over 1,000 streams, which the one load process can still take in
  // without its own queueing dominating the delays (at 20 ms even the direct path queues for 100+ ms here).
  console.log(`- streaming: ${sizes.streams} concurrent streams of ${sizes.chunks} chunks, 100 ms apart, per path`);
  for (const path of paths) {
    const proxyPid = path.name === "direct" ? undefined : path.pid;
    const cpuBefore = proxyPid ? cpuSeconds(proxyPid) : 0;
    let peakMb = 0;
    const sampler = proxyPid ? setInterval(() => (peakMb = Math.max(peakMb, memoryMb(proxyPid))), 100) : undefined;
    const run = await concurrentStreams(path.url, sizes.streams, sizes.chunks, 100);
    clearInterval(sampler);
    Object.assign(results[path.name], {
      chunkP50: run.p50,
      chunkP99: run.p99,
      streamFailures: run.failures,
      streamsCompleted: run.completed,
      cpuPerChunkUs: proxyPid ? ((cpuSeconds(proxyPid) - cpuBefore) * 1e6) / run.delays.length : NaN,
      peakMb: proxyPid ? peakMb : NaN,
    });
  }
  const relayPeakMb = results.relay.peakMb;

  console.log(`- memory per open stream: ${sizes.streams} streams held open (first event 60 s away), fresh processes`);
  for (const kind of ["relay", ...(haveNginx ? ["nginx" as const] : []), "bare", "bareJs"] as const) {
    results[kind].perStreamKb = await memoryPerOpenStream(await startProxy(kind, upstream.url), sizes.streams);
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

  for (const process of [relay, bare, bareJs, upstream, ...(nginx ? [nginx] : [])]) await stopProcess(process);

  const names = ["direct", "relay", "nginx", "bare", "bareJs"];
  const row = (label: string, value: (name: string) => string) =>
    `| ${label} | ${names.map((name) => (results[name] ? value(name) : "–")).join(" | ")} |`;
  const ratio = (a: number, b: number) => (haveNginx && Number.isFinite(a / b) ? format(a / b, 2) : "–");
  console.log(
    `
| measure | direct | relay | nginx | bare Deno | Deno, JS per chunk |
| --- | ---: | ---: | ---: | ---: | ---: |
${row("latency p50, sequential GET /v1/models (µs)", (name) => format(results[name].p50))}
${row("latency p99 (µs)", (name) => format(results[name].p99))}
${row("throughput, 32 connections (req/s)", (name) => format(results[name].rps32))}
${row("throughput, 256 connections (req/s)", (name) => format(results[name].rps256))}
${row("proxy CPU per request, 32 connections (µs)", (name) => format(results[name].cpuPerRequestUs32))}
${row(`chunk delay p50, ${sizes.streams} streams (ms)`, (name) => format(results[name].chunkP50, 2))}
${row("chunk delay p99 (ms)", (name) => format(results[name].chunkP99, 2))}
${row("streams completed / failed", (name) => `${results[name].streamsCompleted} / ${results[name].streamFailures}`)}
${row("proxy CPU per forwarded chunk (µs)", (name) => format(results[name].cpuPerChunkUs, 1))}
${row(`proxy RSS at peak, ${sizes.streams} streams (MB)`, (name) => format(results[name].peakMb, 1))}
${row(`proxy memory per open stream, ${sizes.streams} held (KB)`, (name) => format(results[name].perStreamKb, 1))}

- added latency p50 / p99: relay ${format(results.relay.p50 - results.direct.p50)} / ${
      format(results.relay.p99 - results.direct.p99)
    } µs${
      haveNginx
        ? `, nginx ${format(results.nginx.p50 - results.direct.p50)} / ${
          format(results.nginx.p99 - results.direct.p99)
        } µs`
        : ""
    }
- added chunk delay p50 / p99: relay ${format(results.relay.chunkP50 - results.direct.chunkP50, 2)} / ${
      format(results.relay.chunkP99 - results.direct.chunkP99, 2)
    } ms
- relay / nginx: throughput ${ratio(results.relay.rps32, results.nginx?.rps32)} (32 conn.), ${
      ratio(results.relay.rps256, results.nginx?.rps256)
    } (256 conn.); CPU per chunk ${ratio(results.relay.cpuPerChunkUs, results.nginx?.cpuPerChunkUs)}
- relay / bare Deno proxy: throughput ${
      format(results.relay.rps32 / results.bare.rps32, 2)
    } (32 conn.); CPU per request ${
      format(results.relay.cpuPerRequestUs32 / results.bare.cpuPerRequestUs32, 2)
    }; CPU per chunk ${format(results.relay.cpuPerChunkUs / results.bare.cpuPerChunkUs, 2)}; RSS ${
      format(results.relay.peakMb / results.bare.peakMb, 2)
    }; memory per open stream ${format(results.relay.perStreamKb / results.bare.perStreamKb, 2)}
- relay / Deno with JS per chunk: CPU per chunk ${
      format(results.relay.cpuPerChunkUs / results.bareJs.cpuPerChunkUs, 2)
    }; RSS ${format(results.relay.peakMb / results.bareJs.peakMb, 2)}; memory per open stream ${
      format(results.relay.perStreamKb / results.bareJs.perStreamKb, 2)
    }
- relay RSS: ${format(relayIdleMb, 1)} MB idle, ${format(relayPeakMb, 1)} MB at peak with ${sizes.streams} streams
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
} else if (Deno.args[0] === "bare" || Deno.args[0] === "bare-js") {
  runBareProxy(Number(Deno.args[1]), Deno.args[2], Deno.args[0] === "bare-js");
} else if (import.meta.main) {
  await main();
}
