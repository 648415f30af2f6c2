/**
 * Serving: the listening socket (TLS, PORT, HOST), the counter store and metrics of a server, METRICS_PORT, graceful
 * shutdown, and the WORKERS threads (each runs main.ts, which hands it to `runWorker`).
 *
 * @module
 */

import { errorName, exitWithErrors } from "./exit.ts";
import { type EnvVar, type RelayConfig, type RelayEnv, VERSION } from "./config/variables.ts";
import { createHandler } from "./handler.ts";
import { BodyCut, errorResponse } from "./http.ts";
import { createLogger, type Logger, metricsResponse, RelayMetrics } from "./observe.ts";
import { planReload, type Running } from "./reload.ts";
import { checkAtStart, printBanner } from "./startup.ts";
import { openCounterStore } from "./stores/open.ts";
import { ThreadLock } from "./stores/sqlite.ts";
import { errorText } from "./text.ts";

/**
 * The `onError` of the relay's server: a deliberate cut (`BodyCut`, already in the request's log line) is not an
 * error; anything else is logged and answered with a 500 that names no detail.
 */
export function serverErrorHandler(log: Logger): (error: unknown) => Response {
  return (error) => {
    if (!(error instanceof BodyCut)) log.error("unhandled error", { error: errorText(error) });
    return errorResponse(500, "internal error; see the relay's log", "relay_error");
  };
}

/** Reads the TLS files named in the config; problems are reported like config errors. */
async function loadTls(config: RelayConfig): Promise<{ cert: string; key: string } | undefined> {
  if (!config.tlsCertFile || !config.tlsKeyFile) return undefined;
  const errors: string[] = [];
  const read = async (name: EnvVar, path: string) => {
    try {
      const text = await Deno.readTextFile(path);
      if (!text.includes("-----BEGIN")) errors.push(`${name} must name a PEM file, but "${path}" is not PEM`);
      return text;
    } catch (error) {
      errors.push(`${name} names "${path}", which cannot be read (${error instanceof Error ? error.name : "error"})`);
      return "";
    }
  };
  const cert = await read("TLS_CERT_FILE", config.tlsCertFile);
  const key = await read("TLS_KEY_FILE", config.tlsKeyFile);
  if (errors.length > 0) exitWithErrors(errors);
  return { cert, key };
}

/**
 * `Deno.serve`, with the ways listening fails told in one line each, naming the variable to change, then exit 1:
 * a port in use, a port that needs privileges, an address that is not this machine's, a certificate that does not fit.
 */
function listen(
  portVariable: EnvVar,
  hostVariable: EnvVar,
  options: Deno.ServeTcpOptions & Partial<Deno.TlsCertifiedKeyPem>,
  handler: Deno.ServeHandler,
): Deno.HttpServer {
  try {
    return Deno.serve(options, handler);
  } catch (error) {
    const where = `${options.hostname}:${options.port}`;
    const problem = error instanceof Deno.errors.AddrInUse
      ? `${portVariable} ${options.port}: ${where} is already in use by another program; stop it, or choose another port, e.g. ${portVariable}=8081`
      : error instanceof Deno.errors.PermissionDenied
      ? `${portVariable} ${options.port} needs administrator rights on this system; use a port from 1024 up, e.g. ${portVariable}=8080, behind a reverse proxy`
      : error instanceof Deno.errors.AddrNotAvailable
      ? `${hostVariable} ${options.hostname} is not an address of this machine; use 0.0.0.0 (every interface) or 127.0.0.1`
      : "cert" in options && options.cert
      ? `TLS_CERT_FILE and TLS_KEY_FILE do not hold a certificate chain and its private key (${errorName(error)})`
      : `cannot listen on ${where} (${errorName(error)}); check ${portVariable} and ${hostVariable}`;
    exitWithErrors([problem]);
  }
}

/** Where SIGHUP reads the configuration again: the variables the relay started with, and how to read them anew. */
export interface ReloadSource {
  env: RelayEnv;
  /** Reads the environment and the env files again (`readEnv`). */
  read(): Promise<{ env: RelayEnv; notes: string[]; problems: string[] }>;
}

/**
 * Starts the relay server for a config and wires graceful shutdown; resolves when it has stopped. `announce` hears
 * the port once the relay listens (the demo prints its banner then). With WORKERS above 1 the same port is served by
 * that many threads (`startWorkers`); this one also serves METRICS_PORT and handles the signals for all. With a
 * `reload` source, SIGHUP reads the configuration again (`reloadOnSignal`).
 */
export async function serve(
  config: RelayConfig,
  warnings: string[] = [],
  announce?: (port: number) => void,
  reload?: ReloadSource,
): Promise<void> {
  let log = createLogger(config);
  for (const warning of warnings) log.warn(warning);
  let workers: Worker[] = [];
  const running: Running = { env: reload?.env ?? {}, config };
  // The WORKERS threads take turns at the SQLite file through one lock in shared memory (`ThreadLock`).
  const lock = config.workers > 1 ? new ThreadLock() : undefined;
  // The signal is taken from the start: a SIGHUP while the relay starts waits for it instead of ending the process.
  const started = Promise.withResolvers<Awaited<ReturnType<typeof startServer>>>();
  if (reload !== undefined && Deno.build.os !== "windows") {
    // Windows has no SIGHUP; there a restart applies a changed file.
    reloadOnSignal(reload, running, () => log, async (config) => {
      const { swap } = await started.promise;
      log = createLogger(config);
      swap(config);
      for (const worker of workers) worker.postMessage({ reload: config });
    });
  }
  // SIGINT and SIGTERM are taken before the relay listens, so a stop sent the moment it does is a clean stop.
  let metricsServer: Deno.HttpServer | undefined = undefined;
  let stopping = false;
  const stop = async (signal: Deno.Signal) => {
    // A second signal (process managers often send one per process in the group) changes nothing.
    if (stopping) return;
    stopping = true;
    // A signal that comes while the relay starts (right after its listening line, say) waits for the server.
    const { server, counters } = await started.promise;
    const { shutdownTimeoutMs } = running.config;
    log.info("shutting down: no new connections, in-flight requests may finish", {
      signal,
      timeout_seconds: shutdownTimeoutMs / 1000,
    });
    const deadline = setTimeout(() => {
      log.warn("shutdown timeout reached; closing remaining requests");
      Deno.exit(0);
    }, shutdownTimeoutMs);
    metricsServer?.shutdown();
    Promise.all([server.shutdown(), ...workers.map(stopWorker)]).then(async () => {
      clearTimeout(deadline);
      await counters.close?.();
      log.info("stopped");
      Deno.exit(0);
    });
  };
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT", "SIGBREAK"] : ["SIGINT", "SIGTERM"];
  for (const signal of signals) {
    try {
      Deno.addSignalListener(signal, () => void stop(signal));
    } catch {
      // Some hosts (Deno Deploy) manage the process themselves and offer no signals.
    }
  }
  let listeningPort = config.port;
  const serving = await startServer(config, log, lock, (port, url) => {
    log.info(`mc-relay ${VERSION} listening`, {
      url,
      upstream: new URL(config.upstreams[0].baseUrl).host,
      ...(config.upstreams.length > 1 &&
        { upstreams: config.upstreams.map((upstream) => `${upstream.name}=${new URL(upstream.baseUrl).host}`) }),
      allowed_origins: config.allowedOrigins,
      ...(config.workers > 1 && { workers: config.workers }),
    });
    workers = startWorkers({ ...config, port }, config.workers - 1, lock);
    running.config = { ...running.config, port };
    announce?.(port);
    listeningPort = port;
  });
  started.resolve(serving);
  const { server, metrics } = serving;
  // METRICS_PORT: /metrics without auth on its own port, for a scraper on a private network.
  metricsServer = config.metricsPort === undefined ? undefined : listen(
    "METRICS_PORT",
    "METRICS_HOST",
    {
      port: config.metricsPort,
      hostname: config.metricsHost,
      onListen({ hostname, port }) {
        log.info("metrics served", {
          url: `http://${hostname.includes(":") ? `[${hostname}]` : hostname}:${port}/metrics`,
        });
      },
    },
    (request) =>
      new URL(request.url).pathname === "/metrics" && request.method === "GET"
        ? metricsResponse(metrics)
        : new Response("not found", { status: 404 }),
  );

  // Once everything listens and the signals are handled: the start-up check, then the banner (the demo announces
  // itself instead). A macrotask later, so the work of the check never delays the signal handlers.
  setTimeout(() => checkAtStart(config, log).then((facts) => announce || printBanner(config, listeningPort, facts)));
  await server.finished;
}

/**
 * The env files as read once two reads 100 ms apart agree: an editor that truncates and writes a file could be caught
 * halfway, and a file with its limit lines not yet written is valid but says something else. Three tries, then a
 * problem that says to write the file whole (or move a written one into place) and signal again.
 */
export async function steadyRead(source: ReloadSource): ReturnType<ReloadSource["read"]> {
  let read = await source.read();
  for (let tries = 0; tries < 3; tries++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    const again = await source.read();
    if (JSON.stringify(again) === JSON.stringify(read)) return read;
    read = again;
  }
  const problem = "the env file kept changing while it was read; write it whole (or move a written file into place), " +
    "then send SIGHUP again";
  return { ...read, problems: [...read.problems, problem] };
}

/**
 * SIGHUP: reads the env files again and validates them as start-up does. Valid, `apply` gets the new config (every
 * thread swaps its handler: new requests see it, requests in flight finish with the one they started with) and the
 * log names the variables that changed, never a value; variables only a restart changes are named as such. Not
 * valid, the running configuration stays and the log names each problem. Reloads run one at a time.
 */
function reloadOnSignal(
  source: ReloadSource,
  running: Running,
  log: () => Logger,
  apply: (config: RelayConfig) => Promise<void>,
): void {
  let queue = Promise.resolve();
  const reload = async () => {
    const { env, notes, problems } = await steadyRead(source);
    const plan = problems.length > 0 ? { ok: false as const, errors: problems } : planReload(running, env);
    if (!plan.ok) {
      for (const problem of plan.errors) log().error("reload refused: configuration problem", { problem });
      log().error(`reload refused: ${plan.errors.length} configuration problem(s); the running configuration stays`);
      return;
    }
    Object.assign(running, plan.running);
    await apply(plan.config);
    for (const warning of [...notes, ...plan.warnings]) log().warn(warning);
    if (plan.needRestart.length > 0) {
      log().warn("reload: these variables changed but need a restart; their running values stay", {
        variables: plan.needRestart,
      });
    }
    log().info("configuration reloaded", { changed: plan.changed });
  };
  try {
    Deno.addSignalListener("SIGHUP", () => {
      queue = queue.then(reload).catch((error) => log().error("reload failed", { error: errorText(error) }));
    });
  } catch {
    // A host without signals (Deno Deploy) has no reload either.
  }
}

/** One server of the relay: its counter store, metrics and handler on the configured port (shared among WORKERS). */
async function startServer(
  config: RelayConfig,
  log: Logger,
  lock: ThreadLock | undefined,
  listening: (port: number, url: string) => void,
) {
  const tls = await loadTls(config);
  const metrics = new RelayMetrics();
  const counters = await openCounterStore(config, (state, error) => {
    metrics.storeDegraded = state === "degraded" ? 1 : 0;
    if (state === "degraded") {
      log.warn("counter store: Redis unreachable; each copy now counts limits and budgets alone", { error });
    } else log.info("counter store: Redis answers again; counts are shared again");
  }, lock);
  if ("error" in counters) exitWithErrors([counters.error]);
  // A reload swaps the handler: each request keeps the one it started with, so streams in flight finish untouched.
  let handler = createHandler(config, { metrics, counters });
  const server = listen("PORT", "HOST", {
    port: config.port,
    hostname: config.host,
    reusePort: config.workers > 1,
    ...tls,
    onListen({ hostname, port }) {
      const shown = hostname.includes(":") ? `[${hostname}]` : hostname;
      listening(port, `${tls ? "https" : "http"}://${shown}:${port}`);
    },
    onError: serverErrorHandler(log),
  }, (request, info) => handler(request, info));
  const swap = (next: RelayConfig) => void (handler = createHandler(next, { metrics, counters, previous: handler }));
  return { server, counters, metrics, swap };
}

/** The name WORKERS threads get, so the module knows it runs in one. */
export const WORKER_NAME = "mc-relay-worker";

/** Starts `count` threads that serve `config` (its port already chosen) beside this one, on the same port. */
function startWorkers(config: RelayConfig, count: number, lock?: ThreadLock): Worker[] {
  return Array.from({ length: count }, () => {
    const worker = new Worker(new URL("../main.ts", import.meta.url).href, { type: "module", name: WORKER_NAME });
    worker.postMessage({ serve: config, lock: lock?.memory });
    return worker;
  });
}

/** Asks a worker to stop: it lets its requests finish, closes its store, and says so. */
function stopWorker(worker: Worker): Promise<void> {
  return new Promise((resolve) => {
    worker.addEventListener("message", (event) => {
      if ((event as MessageEvent).data === "stopped") {
        worker.terminate();
        resolve();
      }
    });
    worker.postMessage("stop");
  });
}

/** A WORKERS thread: serves the config the main thread sends, until it is told to stop. */
export function runWorker(): void {
  const scope = globalThis as unknown as {
    onmessage: (event: MessageEvent) => void;
    postMessage: (message: unknown) => void;
  };
  let stopping: (() => Promise<void>) | undefined;
  let swap: ((config: RelayConfig) => void) | undefined;
  let pending: RelayConfig | undefined;
  scope.onmessage = async (event) => {
    if (event.data === "stop") {
      await stopping?.();
      scope.postMessage("stopped");
      return;
    }
    if (event.data.reload) {
      // A reload that comes before this thread listens is applied once it does.
      if (swap) swap(event.data.reload as RelayConfig);
      else pending = event.data.reload as RelayConfig;
      return;
    }
    const config = event.data.serve as RelayConfig;
    const memory = event.data.lock as SharedArrayBuffer | undefined;
    const lock = memory === undefined ? undefined : new ThreadLock(memory);
    const started = await startServer(config, createLogger(config), lock, () => {});
    const { server, counters } = started;
    swap = started.swap;
    if (pending !== undefined) swap(pending);
    stopping = async () => {
      await server.shutdown();
      await counters.close?.();
    };
  };
}
