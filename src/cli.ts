/**
 * The command line besides serving: `--help`, the environment and --env-file, how start-up errors are printed, and
 * the commands `healthcheck`, `hash-password`, `seal` and `usage`.
 *
 * @module
 */

import { hashPassword } from "./auth.ts";
import { callerKeyProblem, KeySealer } from "./byok.ts";
import { parseSealing, parseUpstreams } from "./config/parse.ts";
import { DEFAULTS, ENV_VARS, type RelayEnv, VERSION } from "./config/variables.ts";
import type { LedgerRow } from "./stores/counter.ts";
import { RedisCounterStore } from "./stores/redis.ts";
import { SqliteCounterStore } from "./stores/sqlite.ts";
import { errorText, textEncoder } from "./text.ts";
import { formatUsage, parseUsageArgs, summariseUsage } from "./usage.ts";

// The ledger's arithmetic moved to usage.ts (the /admin stage shares it); re-exported for the public API.
export { parseUsageArgs, summariseUsage, type UsageQuery } from "./usage.ts";

/** `--help` text: what the relay is, every variable with its default, where the docs are. */
export const HELP = `mc-relay ${VERSION}: a self-hosted relay from browser apps (MetaConfigurator) to an
OpenAI-compatible LLM endpoint. Keeps the provider key on the server, answers CORS
for the configured origins only, and streams responses through.

Usage:
  mc-relay                 run the relay (configured by environment variables)
  mc-relay demo            run the relay in front of a built-in echo model, nothing to configure
  mc-relay healthcheck     request this relay's /health; exit 0 if it answers, 1 if not
  mc-relay hash-password   read a password on stdin, print its hash for MC_RELAY_USERS
  mc-relay seal --upstream NAME [--days 90]
                           seal a key (asked for on a terminal, else read from stdin) for a BYOK upstream
  mc-relay usage           the usage ledger (STATE_PATH or REDIS_URL): [--since YYYY-MM-DD]
                           [--until YYYY-MM-DD] [--by user|model|upstream|day] [--format table|csv|json]
  mc-relay --version       print the version
  mc-relay --help          print this help

Required environment variables:
  UPSTREAM_BASE_URL            provider base URL, e.g. https://api.openai.com/v1
  UPSTREAM_API_KEY             provider API key (never sent to browsers or logged)
  (or, instead of or besides those two)
  UPSTREAMS_JSON               several upstreams: [{"name","baseUrl","apiKey","authHeader","authPrefix","extraHeaders"}];
                               "byok":true (and "keyPattern") instead of "apiKey": callers bring their own key
  MC_RELAY_USERNAME            user name; clients send "username:password" as their API key
  MC_RELAY_PASSWORD            password
  (or, instead of or besides those two)
  MC_RELAY_USERS               more users: name:password or name:pbkdf2-sha256:... entries, comma-separated;
                               a name may carry its own token budgets: alice;day=200000;month=0:...
  (or none of these, with PUBLIC_ACCESS=true)

Optional (default in brackets):
  ALLOWED_ORIGIN               comma-separated exact browser origins [none allowed]
  PORT                         port to listen on [${DEFAULTS.port}]
  HOST                         interface to listen on [${DEFAULTS.host}]
  REQUEST_TIMEOUT_SECONDS      wait for upstream headers / longest silence in a stream [${DEFAULTS.requestTimeoutSeconds}]
  MAX_REQUEST_BYTES            largest request body [${DEFAULTS.maxRequestBytes}]
  MAX_BUFFERED_BYTES           request bodies held in memory at once, all requests (one caller: a quarter,
                               at least MAX_REQUEST_BYTES); then 503 [${DEFAULTS.maxBufferedBytes}]
  UPSTREAM_AUTH_HEADER         header carrying the provider key [${DEFAULTS.upstreamAuthHeader}]
  UPSTREAM_AUTH_PREFIX         prefix before the key; set it empty for a raw key [${DEFAULTS.upstreamAuthPrefix}]
  UPSTREAM_EXTRA_HEADERS_JSON  JSON object of extra upstream headers [none]
  LOG_LEVEL                    debug, info, warn or error [${DEFAULTS.logLevel}]
  TLS_CERT_FILE, TLS_KEY_FILE  PEM files; both set makes the relay serve HTTPS itself [unset]
  SHUTDOWN_TIMEOUT_SECONDS     how long in-flight requests may finish after SIGTERM [${DEFAULTS.shutdownTimeoutSeconds}]
  AUTH_FAILURES_PER_MINUTE     failed sign-ins per client address per minute, then 429; 0 = no limit [${DEFAULTS.authFailuresPerMinute}]
  PUBLIC_ACCESS                true: requests without credentials pass, limited and budgeted per address;
                               needs ALLOWED_ORIGIN, a request limit and a token budget [false]
  RATE_LIMIT_PER_MINUTE        requests per user (anonymous: per address) per minute; 0 = no limit [0]
  RATE_LIMIT_PER_HOUR          the same per hour [0]
  RATE_LIMIT_PER_DAY           the same per day [0]
  CONCURRENT_REQUESTS          requests in flight at once per user or address, streams included [0]
  TOKEN_BUDGET_PER_DAY         tokens per user or address per UTC day (real usage, else an estimate) [0]
  TOKEN_BUDGET_PER_MONTH       tokens per user or address per UTC calendar month [0]
  MAX_TOKENS_PER_REQUEST       answer tokens per request, all its answers (n, best_of, prompts) together [0]
  TRUST_PROXY                  proxies whose X-Forwarded-For counts: their addresses/CIDRs, or true / a
                               number of proxies on loopback or private addresses [false]
  ALLOWED_MODELS               comma-separated models clients may use; others get 400 [any]
  DISABLED_PATHS               routes to switch off, e.g. /v1/models,/v1/embeddings [none]
  ALLOWED_PATHS                no longer needed: every route is on [all]
  BASE_PATH                    serve every route under this prefix, e.g. /relay [none]
  STATE_PATH                   SQLite file for limits, budgets and the usage ledger, e.g. /data/state.db [memory]
  REDIS_URL                    redis:// or rediss:// URL: the same, shared by every copy [memory]
  USAGE_RETENTION_DAYS         ledger days kept [400]
  PAGE                         false turns the relay's own page at / off [true]
  PUBLIC_URL                   the address users reach the relay at, for the page and /mc-settings.json [derived
                               only on loopback]
  DEFAULT_MODEL                the model /mc-settings.json selects in MetaConfigurator [the first of
                               ALLOWED_MODELS, else none]
  SEAL_SECRET                  seals callers' keys for BYOK upstreams: POST /seal, 'mc-relay seal' [unset]
  SEAL_SECRETS_PREVIOUS        former SEAL_SECRETs whose sealed keys still open, comma-separated [none]
  MODEL_ALIASES_JSON           {"alias": ["upstream/model", ...]}: an alias served by the first target that answers [none]
  FAILOVER_BREAKER_FAILURES    failures in a row that open a target's circuit breaker [3]
  FAILOVER_BREAKER_SECONDS     how long an open breaker skips its target [30]
  WORKERS                      threads serving the port: a number, or auto (every core); above 1 needs
                               STATE_PATH or REDIS_URL [1]
  METRICS                      users who may read Prometheus metrics at /metrics, e.g. admin [false]
  METRICS_PORT                 a separate port serving /metrics without auth [none]
  METRICS_HOST                 the interface METRICS_PORT listens on [127.0.0.1]
  ADMINS                       users who may open the operator's view at /admin and /admin/usage, e.g. admin [none]

Docs: https://github.com/metaconfigurator/mc-relay#readme
`;

/** The env files named on the command line, and the arguments left once they are taken out. */
export interface EnvFileOptions {
  /** Files to read, in order; `optional` ones may be missing (`--env-file-if-exists`). */
  files: { path: string; optional: boolean }[];
  /** The other arguments, in order. */
  rest: string[];
}

/** Takes `--env-file <path>` and `--env-file-if-exists <path>` (or `=<path>`) out of the arguments. */
export function takeEnvFileOptions(args: string[]): EnvFileOptions | { problem: string } {
  const files: EnvFileOptions["files"] = [];
  const rest: string[] = [];
  for (let index = 0; index < args.length; index++) {
    const match = /^--env-file(-if-exists)?(?:=(.*))?$/.exec(args[index]);
    if (!match) {
      rest.push(args[index]);
      continue;
    }
    const path = match[2] ?? args[++index];
    if (!path) return { problem: `${args[index - 1] ?? args[index]} needs a file, e.g. --env-file .env` };
    files.push({ path, optional: match[1] !== undefined });
  }
  return { files, rest };
}

/**
 * The relay's variables: from the process environment, else from the env files (the first file that sets a
 * variable wins; the real environment always wins). Files are parsed by Deno's Node layer (`node:util` parseEnv).
 * Returns notes for keys a file sets that the relay does not read (a typo shows), and problems for unreadable files.
 */
export async function readEnv(
  files: EnvFileOptions["files"] = [],
): Promise<{ env: RelayEnv; notes: string[]; problems: string[] }> {
  const { parseEnv } = files.length > 0 ? await import("node:util") : { parseEnv: () => ({}) };
  const fromFiles: Record<string, string> = {};
  const notes: string[] = [];
  const problems: string[] = [];
  for (const { path, optional } of files) {
    let text: string;
    try {
      text = Deno.readTextFileSync(path);
    } catch (error) {
      if (!(optional && error instanceof Deno.errors.NotFound)) {
        problems.push(`--env-file names "${path}", which cannot be read (${errorName(error)})`);
      }
      continue;
    }
    const parsed = parseEnv(text) as Record<string, string>;
    for (const [name, value] of Object.entries(parsed)) {
      if (!(ENV_VARS as readonly string[]).includes(name)) {
        notes.push(`${path} sets ${name}, which the relay does not read (see 'mc-relay --help')`);
      } else fromFiles[name] ??= value;
    }
  }
  const env: RelayEnv = {};
  for (const name of ENV_VARS) {
    const value = Deno.env.get(name) ?? fromFiles[name];
    if (value !== undefined) env[name] = value;
  }
  return { env, notes, problems };
}

/** An error's class name, for one-line messages (`NotFound`, `PermissionDenied`). */
export function errorName(error: unknown): string {
  return error instanceof Error ? error.name : "error";
}

export function exitWithErrors(errors: string[], hint = ""): never {
  console.error(`mc-relay: cannot start, ${errors.length} configuration problem(s):`);
  for (const error of errors) console.error(`  ${error}`);
  if (hint) console.error(hint);
  console.error("See 'mc-relay --help' or README.md for every variable.");
  Deno.exit(1);
}

/** Where a start without env file can look for one: a `.env` beside it that was not read. */
export function envFileHint(files: EnvFileOptions["files"]): string {
  if (files.length > 0) return "";
  try {
    Deno.statSync(".env");
    return "A .env file is in this folder but was not read: run 'mc-relay --env-file .env' (deno task start reads it).";
  } catch {
    return "Set the variables in the environment, or put them in a .env file (from examples/.env.example) and run 'mc-relay --env-file .env' or 'deno task start'.";
  }
}

/**
 * `mc-relay healthcheck`: asks the running relay's /health over loopback; 0 when it answers ok.
 * It speaks HTTP/1.1 over a plain or TLS socket itself: with TLS the certificate chain is checked
 * (the relay's own certificate is trusted too, so self-signed ones pass) but not the host name,
 * since a certificate for relay.example.com is fine even though the check connects to 127.0.0.1.
 */
export async function healthcheck(env: RelayEnv): Promise<number> {
  const port = Number(env.PORT?.trim() || DEFAULTS.port);
  const host = env.HOST?.trim() || "127.0.0.1";
  const hostname = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
  let connection: Deno.Conn | undefined;
  const deadline = setTimeout(() => connection?.close(), 5000);
  try {
    const certFile = env.TLS_CERT_FILE?.trim();
    connection = certFile
      ? await Deno.connectTls({
        hostname,
        port,
        caCerts: [await Deno.readTextFile(certFile)],
        unsafelyDisableHostnameVerification: true,
      })
      : await Deno.connect({ hostname, port });
    const basePath = (env.BASE_PATH?.trim() ?? "").replace(/\/+$/, "");
    await connection.write(
      textEncoder.encode(`GET ${basePath}/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`),
    );
    const response = await new Response(connection.readable).text();
    connection = undefined; // the readable closed it
    const healthy = /^HTTP\/1\.[01] 200 /.test(response) && response.includes('{"status":"ok"');
    console.log(healthy ? "healthy" : `unhealthy: ${response.split("\r\n")[0] || "no answer"}`);
    return healthy ? 0 : 1;
  } catch (error) {
    console.log(`unhealthy: ${errorText(error)}`);
    return 1;
  } finally {
    clearTimeout(deadline);
    try {
      connection?.close();
    } catch {
      // already closed
    }
  }
}

/**
 * `mc-relay hash-password`: prints the PBKDF2 hash of a password for MC_RELAY_USERS. On a terminal it asks twice,
 * without echo; otherwise it reads one line from standard input (`printf '%s' 'the password' | ...`).
 */
export async function hashPasswordCommand(): Promise<number> {
  let password: string;
  if (Deno.stdin.isTerminal()) {
    const first = await readHidden("Password for MC_RELAY_USERS: ");
    const second = first === undefined ? undefined : await readHidden("The same password again: ");
    if (first === undefined || second === undefined) return 130;
    if (first !== second) {
      console.error("mc-relay: the two passwords differ; nothing was printed");
      return 1;
    }
    password = first;
  } else {
    password = (await new Response(Deno.stdin.readable).text()).replace(/\r?\n$/, "");
  }
  if (password.length === 0 || password.includes("\n") || password.includes(",")) {
    console.error("mc-relay: give one password on standard input (no line breaks or commas), e.g.");
    console.error("  printf '%s' 'the password' | mc-relay hash-password");
    return 1;
  }
  if (password.length < 12) console.error("mc-relay: warning: the password is shorter than 12 characters");
  console.log(await hashPassword(password));
  return 0;
}

/** Reads one line from the terminal without echoing it; undefined on Ctrl+C or Ctrl+D. */
async function readHidden(prompt: string): Promise<string | undefined> {
  await Deno.stderr.write(textEncoder.encode(prompt));
  Deno.stdin.setRaw(true);
  const bytes: number[] = [];
  const buffer = new Uint8Array(64);
  try {
    while (true) {
      const read = await Deno.stdin.read(buffer);
      if (read === null) return undefined;
      for (const byte of buffer.subarray(0, read)) {
        if (byte === 3 || (byte === 4 && bytes.length === 0)) return undefined; // Ctrl+C, Ctrl+D
        if (byte === 13 || byte === 10) return new TextDecoder().decode(new Uint8Array(bytes));
        if (byte === 127 || byte === 8) bytes.pop();
        else bytes.push(byte);
      }
    }
  } finally {
    Deno.stdin.setRaw(false);
    await Deno.stderr.write(textEncoder.encode("\n"));
  }
}

/**
 * `mc-relay seal --upstream NAME [--days 90]`: seals a key for a BYOK upstream, as POST /seal does, with the relay's
 * own SEAL_SECRET and UPSTREAMS_JSON. The key is asked for without echo on a terminal, else read from stdin.
 */
export async function sealCommand(args: string[], env: RelayEnv): Promise<number> {
  const upstreamIndex = args.indexOf("--upstream");
  const daysIndex = args.indexOf("--days");
  const name = upstreamIndex === -1 ? undefined : args[upstreamIndex + 1];
  const days = daysIndex === -1 ? 90 : Number(args[daysIndex + 1]);
  const errors: string[] = [];
  const upstreams = parseUpstreams(env, []);
  const sealing = parseSealing(env, upstreams, errors);
  const target = upstreams.find((upstream) => upstream.name === name && upstream.byok);
  if (sealing.sealSecret === undefined) errors.push("SEAL_SECRET is not set: set it as the relay has it");
  if (target === undefined) {
    errors.push(
      `--upstream must name a BYOK upstream of UPSTREAMS_JSON: ${
        upstreams.filter((u) => u.byok).map((u) => u.name).join(", ") || "none"
      }`,
    );
  }
  if (!Number.isInteger(days) || days < 1 || days > 3650) errors.push("--days takes a whole number from 1 to 3650");
  if (errors.length > 0) {
    for (const error of errors) console.error(`mc-relay seal: ${error}`);
    return 2;
  }
  const key = Deno.stdin.isTerminal()
    ? await readHidden(`Your key for "${target!.name}": `)
    : (await new Response(Deno.stdin.readable).text()).trim();
  if (key === undefined) return 130;
  const problem = callerKeyProblem(key, target!);
  if (problem !== undefined) {
    console.error(`mc-relay seal: ${problem}`);
    return 1;
  }
  const sealer = new KeySealer([sealing.sealSecret!]);
  console.log(await sealer.seal(key, target!.name, Date.now() + days * 86_400_000));
  return 0;
}

/**
 * `mc-relay usage`: the usage ledger from STATE_PATH or REDIS_URL (the relay's own settings), summed by user,
 * model, upstream or day, as a table, CSV or JSON, so an operator can bill or audit without a log pipeline.
 */
export async function usageCommand(args: string[], env: RelayEnv): Promise<number> {
  const query = parseUsageArgs(args, new Date().toISOString().slice(0, 10));
  if ("problem" in query) {
    console.error(`mc-relay usage: ${query.problem}`);
    console.error(
      "  mc-relay usage [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--by user|model|upstream|day] [--format table|csv|json]",
    );
    return 2;
  }
  const statePath = env.STATE_PATH?.trim();
  const redisUrl = env.REDIS_URL?.trim();
  if (!statePath && !redisUrl) {
    console.error(
      "mc-relay usage: set STATE_PATH or REDIS_URL as the relay has it; a relay without either keeps no ledger",
    );
    return 1;
  }
  let rows: LedgerRow[];
  if (statePath) {
    try {
      Deno.statSync(statePath);
    } catch {
      console.error(`mc-relay usage: STATE_PATH names "${statePath}", which does not exist`);
      return 1;
    }
    const store = await SqliteCounterStore.open(statePath);
    rows = store.readUsage(query.since, query.until);
    store.close();
  } else {
    const store = await RedisCounterStore.connect(redisUrl!);
    if (!store.ready) {
      console.error("mc-relay usage: Redis at REDIS_URL does not answer");
      await store.close();
      return 1;
    }
    rows = await store.readUsage(query.since, query.until);
    await store.close();
  }
  console.log(formatUsage(summariseUsage(rows, query.by), query));
  return 0;
}
