/**
 * mc-relay: a small, self-hosted relay between a browser app (first of all
 * MetaConfigurator) and any OpenAI-compatible LLM endpoint.
 *
 * The browser sends `username:password` (or nothing, on a public relay, or its own provider key, for a BYOK
 * upstream); the relay checks it, adds the provider key (which never leaves this process), sets CORS headers for
 * the configured origins only, and streams the upstream's answer straight back.
 *
 * This file is the whole relay, top to bottom. Its only import from outside Deno is the official Redis client,
 * loaded when REDIS_URL is set: a process that holds an API key should be small enough to read in one sitting.
 *
 * Sections, in file order (search for the banner text):
 * - Configuration: every environment variable, validated at once (`parseConfig`)
 * - Auth: credentials, password hashes, client addresses
 * - CORS: allowed origins, preflights
 * - Deadlines: one coarse timer for every request's timeouts (`DeadlineSweeper`)
 * - Counters: the store behind every limit, lockout and budget (`CounterStore`, `MemoryCounterStore`)
 * - Stores: SQLite (`STATE_PATH`), Redis (`REDIS_URL`) and the fallback while Redis is down
 * - Routes and error responses: the route table, OpenAI-shaped errors
 * - Handler: one context per request, passed through the stages (`createHandler`, `STAGES`)
 * - Stages: host, origin, preflight, route, health, settings, page, seal, identity, usage, metrics, limits (rates
 *   and concurrency), body, upstream choice, caller's key, model, answer length, budgets, usage request, forward,
 *   relay; then `account`
 * - Failover: model aliases, attempts, circuit breakers
 * - Bring your own key: callers' keys and sealed keys
 * - Page: the relay's own page at / and MC's one-link settings
 * - Bodies: reading requests, relaying answers, reading usage
 * - Metrics, Logging, Demo upstream, Start-up (the command line, workers)
 *
 * @module
 */

// Types only: Deno's Node layer (node:sqlite, node:util) loads when STATE_PATH or --env-file asks for it, which keeps
// the start of a relay without them fast.
import type { DatabaseSync, StatementSync } from "node:sqlite";

/** The relay's version; `--version` prints it and CHANGELOG.md's newest entry matches it. */
export const VERSION = "0.1.0";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/** Every environment variable the relay reads; deno.json's `--allow-env` list must match it. */
export const ENV_VARS = [
  "UPSTREAM_BASE_URL",
  "UPSTREAM_API_KEY",
  "MC_RELAY_USERNAME",
  "MC_RELAY_PASSWORD",
  "ALLOWED_ORIGIN",
  "PORT",
  "HOST",
  "REQUEST_TIMEOUT_SECONDS",
  "MAX_REQUEST_BYTES",
  "UPSTREAM_EXTRA_HEADERS_JSON",
  "UPSTREAM_AUTH_HEADER",
  "UPSTREAM_AUTH_PREFIX",
  "LOG_LEVEL",
  "TLS_CERT_FILE",
  "TLS_KEY_FILE",
  "SHUTDOWN_TIMEOUT_SECONDS",
  "AUTH_FAILURES_PER_MINUTE",
  "RATE_LIMIT_PER_MINUTE",
  "TRUST_PROXY",
  "MC_RELAY_USERS",
  "ALLOWED_MODELS",
  "ALLOWED_PATHS",
  "UPSTREAMS_JSON",
  "METRICS",
  "METRICS_PORT",
  "METRICS_HOST",
  "MAX_BUFFERED_BYTES",
  "PUBLIC_ACCESS",
  "RATE_LIMIT_PER_HOUR",
  "RATE_LIMIT_PER_DAY",
  "CONCURRENT_REQUESTS",
  "TOKEN_BUDGET_PER_DAY",
  "TOKEN_BUDGET_PER_MONTH",
  "MAX_TOKENS_PER_REQUEST",
  "BASE_PATH",
  "DISABLED_PATHS",
  "STATE_PATH",
  "REDIS_URL",
  "USAGE_RETENTION_DAYS",
  "PAGE",
  "PUBLIC_URL",
  "DEFAULT_MODEL",
  "SEAL_SECRET",
  "SEAL_SECRETS_PREVIOUS",
  "MODEL_ALIASES_JSON",
  "FAILOVER_BREAKER_FAILURES",
  "FAILOVER_BREAKER_SECONDS",
  "WORKERS",
] as const;

/** The name of one environment variable the relay reads. */
export type EnvVar = typeof ENV_VARS[number];

/** The environment as the relay sees it: only its own variables. */
export type RelayEnv = Partial<Record<EnvVar, string>>;

/** Log levels, least to most severe. */
export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;

/** One log level. */
export type LogLevel = typeof LOG_LEVELS[number];

/** The relay's validated configuration; `createHandler` is built from it. */
export interface RelayConfig {
  /** The upstreams: the one of UPSTREAM_BASE_URL (named "default") first, then those of UPSTREAMS_JSON. */
  upstreams: Upstream[];
  /** Who may use the relay: MC_RELAY_USERNAME/MC_RELAY_PASSWORD and the entries of MC_RELAY_USERS. */
  users: RelayUser[];
  /** Models clients may ask for (ALLOWED_MODELS); empty allows any. */
  allowedModels: string[];
  /** Users who may read Prometheus metrics at /metrics on the main port (METRICS); empty serves none there. */
  metricsUsers: string[];
  /** A separate port that serves /metrics without auth (METRICS_PORT); undefined for none. */
  metricsPort?: number;
  /** The interface METRICS_PORT listens on (METRICS_HOST, default loopback). */
  metricsHost: string;
  /**
   * Request bodies held in memory at once, all requests together (MAX_BUFFERED_BYTES); past it, 503. One caller may
   * hold a quarter of it, or one MAX_REQUEST_BYTES body if that is more.
   */
  maxBufferedBytes: number;
  /** Exact browser origins allowed to call the relay; empty allows none. */
  allowedOrigins: string[];
  /** TCP port to listen on (0 picks a free one). */
  port: number;
  /** Interface to listen on. */
  host: string;
  /** Longest wait for upstream headers, longest upstream silence mid-body, longest client body upload. */
  requestTimeoutMs: number;
  /** Largest request body accepted, in bytes. */
  maxRequestBytes: number;
  /** Least severe level that is logged. */
  logLevel: LogLevel;
  /** PEM certificate chain file; with `tlsKeyFile` the relay serves HTTPS itself. */
  tlsCertFile?: string;
  /** PEM private key file. */
  tlsKeyFile?: string;
  /** How long in-flight requests may run on after SIGTERM/SIGINT. */
  shutdownTimeoutMs: number;
  /** Failed sign-ins allowed per client address per minute before 429; 0 turns the limit off. */
  authFailuresPerMinute: number;
  /** Requests allowed per user (or, anonymous, per client address) per minute; 0 (the default) turns it off. */
  rateLimitPerMinute: number;
  /** The same per hour (RATE_LIMIT_PER_HOUR). */
  rateLimitPerHour: number;
  /** The same per day (RATE_LIMIT_PER_DAY). */
  rateLimitPerDay: number;
  /** Requests in flight at once per user or address, open streams included (CONCURRENT_REQUESTS); 0: no limit. */
  concurrentRequests: number;
  /** Tokens per user or address per UTC day (TOKEN_BUDGET_PER_DAY); 0: no budget. */
  tokenBudgetPerDay: number;
  /** Tokens per user or address per UTC calendar month (TOKEN_BUDGET_PER_MONTH); 0: no budget. */
  tokenBudgetPerMonth: number;
  /** The largest answer a request may ask for, in tokens (MAX_TOKENS_PER_REQUEST); 0: no cap. */
  maxTokensPerRequest: number;
  /** Requests without credentials pass as anonymous, limited and budgeted per address (PUBLIC_ACCESS). */
  publicAccess: boolean;
  /** The path prefix every route is served under (BASE_PATH), e.g. `/relay`; empty for none. */
  basePath: string;
  /** Routes switched off (DISABLED_PATHS), e.g. `/v1/models`. */
  disabledPaths: string[];
  /** A SQLite file for counters and the usage ledger (STATE_PATH); unset keeps them in memory. */
  statePath?: string;
  /** A Redis or Valkey URL for counters and the ledger shared by every copy (REDIS_URL). */
  redisUrl?: string;
  /** Ledger days kept (USAGE_RETENTION_DAYS). */
  usageRetentionDays: number;
  /** Serve the relay's own page at `/` (PAGE, default true). */
  page: boolean;
  /** The address users reach the relay at, BASE_PATH included (PUBLIC_URL), e.g. `https://relay.example.com`. */
  publicUrl?: string;
  /** The model the one-link MC settings select (DEFAULT_MODEL). */
  defaultModel?: string;
  /** The secret that seals callers' keys for BYOK upstreams (SEAL_SECRET); unset: no sealed keys, no /seal. */
  sealSecret?: string;
  /** Former seal secrets whose sealed keys still open, during a rotation (SEAL_SECRETS_PREVIOUS). */
  sealSecretsPrevious: string[];
  /** Model aliases (MODEL_ALIASES_JSON): an alias and its targets, `upstream/model`, tried in order. */
  modelAliases: Record<string, string[]>;
  /** Failures in a row that open a target's circuit breaker (FAILOVER_BREAKER_FAILURES). */
  breakerFailures: number;
  /** How long an open breaker skips its target, in milliseconds (FAILOVER_BREAKER_SECONDS). */
  breakerOpenMs: number;
  /** Threads serving the port (WORKERS: a number, or `auto` for every core). */
  workers: number;
  /** Which reverse proxies may set X-Forwarded-For (TRUST_PROXY); none by default (it could be spoofed). */
  trustProxy: TrustedProxies;
}

/** One OpenAI-compatible upstream and how to authenticate to it. */
export interface Upstream {
  /** Its name: in logs, as a model prefix (`name/model`) and in merged model lists. */
  name: string;
  /** Base URL without a trailing slash, e.g. `https://api.openai.com/v1`. */
  baseUrl: string;
  /** The provider key; sent to this upstream only, never to clients or logs. Empty for a BYOK upstream. */
  apiKey: string;
  /** Bring your own key: callers send their own provider key, which goes to this upstream only (`"byok": true`). */
  byok: boolean;
  /** A pattern a caller's own key must match before it leaves (`keyPattern`, e.g. `^sk-`). */
  keyPattern?: RegExp;
  /** Header that carries the key (`Authorization`, `api-key`, `x-api-key`). */
  authHeader: string;
  /** Prefix before the key in that header (`Bearer`); empty for a raw key. */
  authPrefix: string;
  /** Extra headers sent with every request to this upstream. */
  extraHeaders: Record<string, string>;
}

/** One relay user: a name and either a plain password or a PBKDF2 hash of it. */
export interface RelayUser {
  /** The name clients send before the colon. */
  name: string;
  /** The plain password (from MC_RELAY_PASSWORD or a `name:password` entry). */
  password?: string;
  /** A PBKDF2-SHA256 hash (from a `name:pbkdf2-sha256:...` entry); the password itself is not kept. */
  hash?: PasswordHash;
  /** This user's own token budgets per UTC day and month (`alice;day=N;month=N:...`); 0 means none. */
  tokenBudgets?: { day?: number; month?: number };
}

/** A parsed `pbkdf2-sha256:<iterations>:<salt>:<hash>` string (salt and hash in base64url). */
export interface PasswordHash {
  /** PBKDF2 iterations. */
  iterations: number;
  /** The random salt. */
  salt: Uint8Array<ArrayBuffer>;
  /** The derived 32 bytes. */
  hash: Uint8Array<ArrayBuffer>;
}

/** Routes that had to be switched on with ALLOWED_PATHS before 0.2; all are on now (DISABLED_PATHS turns any off). */
export const OPTIONAL_ROUTES = ["/v1/embeddings", "/v1/completions", "/v1/responses"];

/** Defaults for every optional setting (documented in README.md). */
export const DEFAULTS = {
  port: 8080,
  host: "0.0.0.0",
  requestTimeoutSeconds: 180,
  maxRequestBytes: 32 * 1024 * 1024,
  maxBufferedBytes: 64 * 1024 * 1024,
  upstreamAuthHeader: "Authorization",
  upstreamAuthPrefix: "Bearer",
  logLevel: "info" as LogLevel,
  shutdownTimeoutSeconds: 10,
  authFailuresPerMinute: 10,
};

/** MetaConfigurator's public origins; the demo allows them so MC can be tried against it. */
export const METACONFIGURATOR_ORIGINS = [
  "https://www.metaconfigurator.org",
  "https://metaconfigurator.github.io",
];

/** The outcome of `parseConfig`: a config plus warnings, or every problem found. */
export type ConfigResult =
  | { ok: true; config: RelayConfig; warnings: string[] }
  | { ok: false; errors: string[] };

/** A host (or HOST, or Host header) that only this machine reaches: localhost, 127.x.x.x or ::1, port optional. */
const LOOPBACK_AUTHORITY = /^(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]|::1)(:\d{1,5})?$/;

/** A valid HTTP header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** A header value without control characters other than tab. */
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

/** Hop-by-hop and framing headers that never cross the relay in either direction. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/** Headers an operator may not set through UPSTREAM_EXTRA_HEADERS_JSON: the relay owns them. */
const RESERVED_UPSTREAM_HEADERS = new Set([
  ...HOP_BY_HOP,
  "host",
  "content-length",
  "content-type",
  "accept-encoding",
]);

/**
 * Validates the relay's environment variables. Pure: reads only `env`.
 * Every problem is collected, one line each, naming the variable and a valid
 * value; secret values are never repeated back.
 */
export function parseConfig(env: RelayEnv): ConfigResult {
  const errors: string[] = [];
  const warnings: string[] = [];
  const read = envReader(env, errors);
  const publicAccess = read.flag("PUBLIC_ACCESS", "true (anyone may use the relay within its limits) or false");
  const upstreams = parseUpstreams(env, errors);
  const allByok = upstreams.length > 0 && upstreams.every((upstream) => upstream.byok);
  const users = parseUsers(env, errors, warnings, publicAccess || allByok);
  const allowedOrigins = parseAllowedOrigins(env.ALLOWED_ORIGIN, errors);
  if (allowedOrigins.length === 0) {
    warnings.push(
      "ALLOWED_ORIGIN is not set: no browser origin may call the relay (server-side clients still can); set e.g. ALLOWED_ORIGIN=https://www.metaconfigurator.org",
    );
  }
  const listener = parseListener(read, errors);
  const limits = parseLimits(read, errors);
  const server = parseServer(read, errors);
  const routing = parseRouting(read, errors, warnings);
  const state = parseState(read, errors, warnings);
  const presentation = parsePresentation(read, errors);
  const sealing = parseSealing(env, upstreams, errors);
  const failover = parseFailover(read, upstreams, errors);
  const workers = parseWorkers(read.text("WORKERS"), errors);
  const metricsUsers = parseMetricsUsers(read.text("METRICS"), users, errors);
  if (errors.length > 0) return { ok: false, errors };
  const config: RelayConfig = {
    upstreams,
    users,
    publicAccess,
    allowedOrigins,
    metricsUsers,
    ...listener,
    ...server,
    ...limits,
    ...routing,
    ...state,
    ...presentation,
    ...sealing,
    ...failover,
    workers,
  };
  const refusals = [...publicAccessProblems(config), ...workersProblems(config)];
  if (refusals.length > 0) return { ok: false, errors: refusals };
  return { ok: true, config, warnings: [...warnings, ...riskWarnings(config)] };
}

/** Reads the relay's variables, each problem added to `errors` naming the variable and a valid example. */
function envReader(env: RelayEnv, errors: string[]) {
  const text = (name: EnvVar) => env[name]?.trim() || undefined;
  const number = (name: EnvVar, fallback: number, rule: NumberRule) =>
    parseNumber(text(name), fallback, name, errors, rule);
  return {
    text,
    number,
    /** A whole number from 0 (0 usually meaning "off"). */
    count: (name: EnvVar, fallback: number, example: string) =>
      number(name, fallback, { integer: true, min: 0, max: 1e15, example }),
    /** `true` or `false` (any case); unset is false. */
    flag(name: EnvVar, example: string): boolean {
      const raw = text(name)?.toLowerCase() ?? "false";
      if (raw !== "true" && raw !== "false") errors.push(`${name} must be ${example}, got "${text(name)}"`);
      return raw === "true";
    },
  };
}

/** Where the relay listens: PORT and HOST. */
function parseListener(read: ReturnType<typeof envReader>, errors: string[]) {
  const port = read.number("PORT", DEFAULTS.port, {
    integer: true,
    min: 0,
    max: 65535,
    example: "a whole number from 0 to 65535, e.g. 8080",
  });
  const host = read.text("HOST") ?? DEFAULTS.host;
  if (/\s|\//.test(host)) {
    errors.push(`HOST must be an interface address or name, e.g. 0.0.0.0 or 127.0.0.1, got "${host}"`);
  }
  return { port, host };
}

/** How the relay runs: log level, TLS, metrics port, proxies in front, shutdown. */
function parseServer(read: ReturnType<typeof envReader>, errors: string[]) {
  const rawLevel = read.text("LOG_LEVEL")?.toLowerCase() ?? DEFAULTS.logLevel;
  const logLevel = (LOG_LEVELS as readonly string[]).includes(rawLevel) ? rawLevel as LogLevel : DEFAULTS.logLevel;
  if (logLevel !== rawLevel) {
    errors.push(`LOG_LEVEL must be one of ${LOG_LEVELS.join(", ")}, got "${read.text("LOG_LEVEL")}"`);
  }
  const tlsCertFile = read.text("TLS_CERT_FILE");
  const tlsKeyFile = read.text("TLS_KEY_FILE");
  if (Boolean(tlsCertFile) !== Boolean(tlsKeyFile)) {
    errors.push(
      "TLS_CERT_FILE and TLS_KEY_FILE go together: set both (PEM certificate chain and private key) or neither",
    );
  }
  const metricsPort = read.text("METRICS_PORT") === undefined ? undefined : read.number("METRICS_PORT", 0, {
    integer: true,
    min: 0,
    max: 65535,
    example: "a port for /metrics without auth, e.g. 9464",
  });
  const metricsHost = read.text("METRICS_HOST") ?? "127.0.0.1";
  if (/\s|\//.test(metricsHost)) {
    errors.push(`METRICS_HOST must be an interface address, e.g. 127.0.0.1 or 0.0.0.0, got "${metricsHost}"`);
  }
  const shutdownTimeoutSeconds = read.number("SHUTDOWN_TIMEOUT_SECONDS", DEFAULTS.shutdownTimeoutSeconds, {
    min: 0,
    max: 3600,
    example: "seconds, e.g. 10",
  });
  return {
    tlsCertFile,
    tlsKeyFile,
    metricsPort,
    metricsHost,
    logLevel,
    shutdownTimeoutMs: Math.round(shutdownTimeoutSeconds * 1000),
    trustProxy: parseTrustProxy(read.text("TRUST_PROXY"), errors),
  };
}

/** Limits: timeouts, body sizes, sign-in guesses, requests per window and at once, token budgets and caps. */
function parseLimits(read: ReturnType<typeof envReader>, errors: string[]) {
  const requestTimeoutSeconds = read.number("REQUEST_TIMEOUT_SECONDS", DEFAULTS.requestTimeoutSeconds, {
    min: 0.001,
    max: 86400,
    example: "seconds greater than 0, e.g. 180",
  });
  const maxRequestBytes = read.number("MAX_REQUEST_BYTES", DEFAULTS.maxRequestBytes, {
    integer: true,
    min: 1,
    max: 2 ** 31,
    example: "a whole number of bytes, e.g. 33554432 (32 MiB)",
  });
  const maxBufferedBytes = read.number("MAX_BUFFERED_BYTES", Math.max(DEFAULTS.maxBufferedBytes, maxRequestBytes), {
    integer: true,
    min: 1,
    max: 2 ** 40,
    example: "a whole number of bytes, e.g. 67108864 (64 MiB)",
  });
  if (maxBufferedBytes < maxRequestBytes) {
    errors.push(
      `MAX_BUFFERED_BYTES must be at least MAX_REQUEST_BYTES (${maxRequestBytes}), e.g. ${maxRequestBytes * 2}`,
    );
  }
  const perWindow = (window: string, example: number) =>
    `a whole number of requests per ${window}, e.g. ${example} (0 = no limit)`;
  return {
    requestTimeoutMs: Math.round(requestTimeoutSeconds * 1000),
    maxRequestBytes,
    maxBufferedBytes,
    authFailuresPerMinute: read.count(
      "AUTH_FAILURES_PER_MINUTE",
      DEFAULTS.authFailuresPerMinute,
      "a whole number of failed sign-ins per minute, e.g. 10 (0 = no limit)",
    ),
    rateLimitPerMinute: read.count("RATE_LIMIT_PER_MINUTE", 0, perWindow("minute", 20)),
    rateLimitPerHour: read.count("RATE_LIMIT_PER_HOUR", 0, perWindow("hour", 200)),
    rateLimitPerDay: read.count("RATE_LIMIT_PER_DAY", 0, perWindow("day", 1000)),
    concurrentRequests: read.count(
      "CONCURRENT_REQUESTS",
      0,
      "a whole number of requests in flight at once, e.g. 5 (0 = no limit)",
    ),
    tokenBudgetPerDay: read.count("TOKEN_BUDGET_PER_DAY", 0, "a whole number of tokens per UTC day, e.g. 100000"),
    tokenBudgetPerMonth: read.count(
      "TOKEN_BUDGET_PER_MONTH",
      0,
      "a whole number of tokens per UTC calendar month, e.g. 2000000",
    ),
    maxTokensPerRequest: read.count(
      "MAX_TOKENS_PER_REQUEST",
      0,
      "a whole number of answer tokens per request, e.g. 10000 (0 = no cap)",
    ),
  };
}

/** Routing: the routes switched off, the path prefix, the model allow-list. */
function parseRouting(read: ReturnType<typeof envReader>, errors: string[], warnings: string[]) {
  const list = (name: EnvVar) => (read.text(name) ?? "").split(",").map((entry) => entry.trim()).filter(Boolean);
  for (const path of list("ALLOWED_PATHS")) {
    if (!OPTIONAL_ROUTES.includes(path)) {
      errors.push(`ALLOWED_PATHS may list ${OPTIONAL_ROUTES.join(", ")} (comma-separated), got "${path}"`);
    }
  }
  if (list("ALLOWED_PATHS").length > 0) {
    warnings.push(
      "ALLOWED_PATHS is no longer needed: every route is on; DISABLED_PATHS switches routes off, e.g. /v1/embeddings",
    );
  }
  const switchable = Object.keys(ROUTES).filter((path) => path.startsWith("/v1/"));
  const disabledPaths = list("DISABLED_PATHS");
  for (const path of disabledPaths) {
    if (!switchable.includes(path)) {
      errors.push(`DISABLED_PATHS may list ${switchable.join(", ")} (comma-separated), e.g. /v1/models, got "${path}"`);
    }
  }
  const basePath = read.text("BASE_PATH")?.replace(/\/+$/, "") ?? "";
  if (basePath !== "" && !/^(\/[A-Za-z0-9._~-]+)+$/.test(basePath)) {
    errors.push(
      `BASE_PATH must be a path such as /relay (no trailing slash, no query), got "${read.text("BASE_PATH")}"`,
    );
  }
  return {
    disabledPaths: [...new Set(disabledPaths)],
    basePath,
    allowedModels: list("ALLOWED_MODELS"),
  };
}

/**
 * Where counters and the ledger live: REDIS_URL (shared by every copy) or STATE_PATH (SQLite, one machine), and
 * USAGE_RETENTION_DAYS. REDIS_URL wins when both are set (the Docker image sets STATE_PATH by default), with a warning.
 */
function parseState(read: ReturnType<typeof envReader>, errors: string[], warnings: string[]) {
  const redisUrl = read.text("REDIS_URL");
  let statePath = read.text("STATE_PATH");
  if (statePath !== undefined && redisUrl !== undefined) {
    warnings.push("STATE_PATH is ignored: REDIS_URL is set, so counts and the usage ledger are kept in Redis");
    statePath = undefined;
  }
  if (redisUrl !== undefined && !/^rediss?:\/\/[^\s]+$/.test(redisUrl)) {
    // The URL may hold a password: it is never repeated.
    errors.push("REDIS_URL must be a redis:// or rediss:// URL, e.g. redis://:password@valkey:6379/0");
  }
  return {
    statePath,
    redisUrl,
    usageRetentionDays: read.number("USAGE_RETENTION_DAYS", 400, {
      integer: true,
      min: 1,
      max: 36500,
      example: "a whole number of days, e.g. 400",
    }),
  };
}

/**
 * MODEL_ALIASES_JSON: `{"alias": ["upstream/model", ...]}`, each target a keyed upstream (a caller's own key never
 * fails over to another provider); FAILOVER_BREAKER_FAILURES and FAILOVER_BREAKER_SECONDS.
 */
function parseFailover(read: ReturnType<typeof envReader>, upstreams: Upstream[], errors: string[]) {
  const example = '{"alias-fast": ["blablador/alias-fast", "academiccloud/meta-llama-3.1-8b-instruct"]}';
  const modelAliases: Record<string, string[]> = {};
  const raw = read.text("MODEL_ALIASES_JSON");
  let parsed: unknown = {};
  try {
    parsed = raw === undefined ? {} : JSON.parse(raw);
  } catch {
    errors.push(`MODEL_ALIASES_JSON is not valid JSON; it must be like ${example}`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    errors.push(`MODEL_ALIASES_JSON must be an object of aliases to lists of upstream/model, like ${example}`);
    parsed = {};
  }
  const byName = new Map(upstreams.map((upstream) => [upstream.name, upstream]));
  for (const [alias, targets] of Object.entries(parsed as Record<string, unknown>)) {
    const where = `MODEL_ALIASES_JSON alias "${alias.slice(0, 60)}"`;
    if (!/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$/.test(alias)) {
      errors.push(`${where} must be letters, digits, '.', '_', ':' or '-' (no '/'), e.g. "alias-fast"`);
    } else if (
      !Array.isArray(targets) || targets.length === 0 || targets.some((target) => typeof target !== "string")
    ) {
      errors.push(`${where} must list its targets as "upstream/model" strings, like ${example}`);
    } else {
      for (const target of targets as string[]) {
        const upstream = byName.get(target.slice(0, target.indexOf("/")));
        if (upstream === undefined || target.indexOf("/") === target.length - 1) {
          errors.push(`${where}: "${target.slice(0, 100)}" must be a configured upstream's name, '/', and a model`);
        } else if (upstream.byok) {
          errors.push(`${where}: "${upstream.name}" is BYOK; aliases fail over between keyed upstreams only`);
        }
      }
      modelAliases[alias] = targets as string[];
    }
  }
  const breakerFailures = read.number("FAILOVER_BREAKER_FAILURES", 3, {
    integer: true,
    min: 1,
    max: 1000,
    example: "failures in a row that open a target's breaker, e.g. 3",
  });
  const breakerSeconds = read.number("FAILOVER_BREAKER_SECONDS", 30, {
    min: 0.001,
    max: 86400,
    example: "seconds an open breaker skips its target, e.g. 30",
  });
  return { modelAliases, breakerFailures, breakerOpenMs: Math.round(breakerSeconds * 1000) };
}

/** SEAL_SECRET and SEAL_SECRETS_PREVIOUS: long random secrets, only with a BYOK upstream. Never repeated. */
function parseSealing(env: RelayEnv, upstreams: Upstream[], errors: string[]) {
  const sealSecret = env.SEAL_SECRET?.trim() || undefined;
  const sealSecretsPrevious = (env.SEAL_SECRETS_PREVIOUS ?? "").split(",").map((entry) => entry.trim()).filter(Boolean);
  const example = "e.g. the output of 'openssl rand -base64 32'";
  if (sealSecret !== undefined && sealSecret.length < 32) {
    errors.push(`SEAL_SECRET must be at least 32 characters, ${example}`);
  }
  if (sealSecretsPrevious.some((secret) => secret.length < 32)) {
    errors.push(`SEAL_SECRETS_PREVIOUS entries must be at least 32 characters each, ${example}`);
  }
  if (sealSecretsPrevious.length > 0 && sealSecret === undefined) {
    errors.push("SEAL_SECRETS_PREVIOUS goes with SEAL_SECRET: set the new secret in SEAL_SECRET");
  }
  if (sealSecret !== undefined && !upstreams.some((upstream) => upstream.byok)) {
    errors.push('SEAL_SECRET seals keys for BYOK upstreams, and UPSTREAMS_JSON has none ("byok": true)');
  }
  return { sealSecret, sealSecretsPrevious };
}

/** The relay's own page and one-link MC settings: PAGE, PUBLIC_URL, DEFAULT_MODEL. */
function parsePresentation(read: ReturnType<typeof envReader>, errors: string[]) {
  const page = read.text("PAGE") === undefined ? true : read.flag("PAGE", "true (a page at /) or false");
  const raw = read.text("PUBLIC_URL");
  let publicUrl: string | undefined;
  if (raw !== undefined) {
    try {
      const url = new URL(raw);
      if ((url.protocol === "https:" || url.protocol === "http:") && !url.search && !url.hash && !url.username) {
        publicUrl = url.href.replace(/\/+$/, "");
      }
    } catch {
      // reported below
    }
    if (publicUrl === undefined) {
      errors.push(
        `PUBLIC_URL must be the address users reach the relay at, e.g. https://relay.example.com, got "${raw}"`,
      );
    }
  }
  return { page, publicUrl, defaultModel: read.text("DEFAULT_MODEL") };
}

/** WORKERS: a whole number of threads from 1, or `auto` (one per core). */
function parseWorkers(raw: string | undefined, errors: string[]): number {
  if (raw === undefined) return 1;
  if (raw.toLowerCase() === "auto") return Math.max(1, navigator.hardwareConcurrency);
  if (/^[0-9]{1,3}$/.test(raw) && Number(raw) >= 1 && Number(raw) <= 256) return Number(raw);
  errors.push(`WORKERS must be a number of threads, e.g. 2, or auto (one per core), got "${raw}"`);
  return 1;
}

/**
 * Several WORKERS count limits, lockouts and budgets together only in a shared store: they need STATE_PATH (one
 * SQLite file, each worker with its own connection) or REDIS_URL. SO_REUSEPORT, which shares the port, is POSIX only.
 */
function workersProblems(config: RelayConfig): string[] {
  if (config.workers === 1) return [];
  const problems: string[] = [];
  if (config.statePath === undefined && config.redisUrl === undefined) {
    problems.push(
      `WORKERS=${config.workers} needs STATE_PATH or REDIS_URL, so that all workers count limits and budgets together, e.g. STATE_PATH=/data/state.db`,
    );
  }
  if (Deno.build.os === "windows") {
    problems.push("WORKERS above 1 needs SO_REUSEPORT, which Windows lacks; use WORKERS=1");
  }
  return problems;
}

/**
 * PUBLIC_ACCESS=true lets anyone through who can reach the relay, so it starts only with its guard rails: the
 * browser origins named, a request limit and a token budget on.
 */
function publicAccessProblems(config: RelayConfig): string[] {
  if (!config.publicAccess) return [];
  const problems: string[] = [];
  if (config.allowedOrigins.length === 0) {
    problems.push(
      "PUBLIC_ACCESS=true needs ALLOWED_ORIGIN: the pages that may use the relay, e.g. https://www.metaconfigurator.org",
    );
  }
  if (
    config.rateLimitPerMinute + config.rateLimitPerHour + config.rateLimitPerDay + config.concurrentRequests === 0
  ) {
    problems.push(
      "PUBLIC_ACCESS=true needs a request limit per address: RATE_LIMIT_PER_MINUTE, RATE_LIMIT_PER_HOUR, RATE_LIMIT_PER_DAY or CONCURRENT_REQUESTS, e.g. RATE_LIMIT_PER_MINUTE=20",
    );
  }
  if (config.tokenBudgetPerDay + config.tokenBudgetPerMonth === 0) {
    problems.push(
      "PUBLIC_ACCESS=true needs a token budget per address: TOKEN_BUDGET_PER_DAY or TOKEN_BUDGET_PER_MONTH, e.g. TOKEN_BUDGET_PER_DAY=100000",
    );
  }
  return problems;
}

/**
 * TRUST_PROXY: `false` (the default: X-Forwarded-For is ignored), `true` or a number of proxies in front (trusted
 * from loopback and private addresses only), or the proxies' addresses and CIDR ranges (trusted from those only,
 * every trusted entry of X-Forwarded-For walked past).
 */
function parseTrustProxy(raw: string | undefined, errors: string[]): TrustedProxies {
  const text = raw?.toLowerCase();
  if (text === undefined || text === "false") return { ranges: [], hops: 0 };
  const privateRanges = () => PRIVATE_RANGES.map((range) => parseAddressRange(range)!);
  if (text === "true") return { ranges: privateRanges(), hops: 1 };
  if (/^[0-9]{1,2}$/.test(text) && Number(text) > 0) return { ranges: privateRanges(), hops: Number(text) };
  const ranges = text.split(",").map((entry) => entry.trim()).filter(Boolean).map(parseAddressRange);
  if (ranges.length > 0 && ranges.every((range) => range !== undefined)) {
    return { ranges: ranges as AddressRange[], hops: 0 };
  }
  errors.push(
    `TRUST_PROXY must be false, true (one proxy on a loopback or private address), the number of such proxies, or the proxies' addresses or CIDR ranges, e.g. 127.0.0.1,10.0.0.0/8, got "${raw}"`,
  );
  return { ranges: [], hops: 0 };
}

/** METRICS: `false`, or the users who may read /metrics on the main port (it shows every user's traffic). */
function parseMetricsUsers(raw: string | undefined, users: RelayUser[], errors: string[]): string[] {
  if (raw === undefined || raw.toLowerCase() === "false") return [];
  const names = raw.split(",").map((name) => name.trim()).filter(Boolean);
  const known = new Set(users.map((user) => user.name));
  if (raw.toLowerCase() === "true") {
    errors.push(
      "METRICS names the users who may read /metrics (it shows every user's traffic), e.g. METRICS=admin; true is no longer accepted",
    );
  } else if (names.length === 0 || names.some((name) => !known.has(name))) {
    errors.push(`METRICS must be false or names of configured users, e.g. METRICS=admin, got "${raw}"`);
  }
  return names;
}

/**
 * Start-up warnings for configurations that work but are risky, each naming the variable: keys in clear text,
 * open lockouts, trusted headers from anywhere, exposed metrics, weak hashes and passwords, plain HTTP.
 */
function riskWarnings(config: RelayConfig): string[] {
  const warnings: string[] = [];
  if (config.publicAccess) {
    warnings.push(
      "PUBLIC_ACCESS=true: anyone who can reach the relay may use it without credentials, within the request limits and token budgets per address",
    );
  }
  for (const upstream of config.upstreams) {
    const url = new URL(upstream.baseUrl);
    if (url.protocol === "http:" && !LOOPBACK_AUTHORITY.test(url.hostname)) {
      const name = upstream.name === "default" ? "UPSTREAM_BASE_URL" : `UPSTREAMS_JSON entry "${upstream.name}"`;
      warnings.push(`${name} uses http:// to ${url.host}: the provider key travels in clear text; use https://`);
    }
  }
  for (const origin of config.allowedOrigins) {
    const url = new URL(origin);
    if (url.protocol === "http:" && !LOOPBACK_AUTHORITY.test(url.hostname)) {
      warnings.push(`ALLOWED_ORIGIN allows ${origin} over http://: anyone on its network can change that page`);
    }
  }
  if (config.authFailuresPerMinute === 0) {
    warnings.push("AUTH_FAILURES_PER_MINUTE=0 turns the sign-in lockout off: passwords can be guessed at full speed");
  }
  if (config.trustProxy.ranges.length > 0 && !LOOPBACK_AUTHORITY.test(config.host)) {
    warnings.push(
      `TRUST_PROXY is set while HOST=${config.host} is reachable from other machines: name the proxies' addresses in TRUST_PROXY so that nobody else can set X-Forwarded-For`,
    );
  }
  if (config.metricsPort !== undefined && !LOOPBACK_AUTHORITY.test(config.metricsHost)) {
    warnings.push(
      `METRICS_HOST=${config.metricsHost}: /metrics on METRICS_PORT has no auth and shows user names; keep it on a private network`,
    );
  }
  for (const user of config.users) {
    if (user.hash && user.hash.iterations < 100_000) {
      warnings.push(
        `MC_RELAY_USERS user ${user.name} has a PBKDF2 hash of ${user.hash.iterations} iterations; make a new one with 'mc-relay hash-password' (600,000)`,
      );
    }
    if (user.password !== undefined && user.password === user.name) {
      warnings.push(`the password of user ${user.name} equals the user name (MC_RELAY_USERS or MC_RELAY_PASSWORD)`);
    }
  }
  if (config.host === "0.0.0.0" && !config.tlsCertFile) {
    warnings.push(
      "HOST=0.0.0.0 without TLS_CERT_FILE: serve the relay behind HTTPS (see README, 'Deploy': Caddy, nginx) so passwords never cross a network in clear text",
    );
  }
  return warnings;
}

/**
 * The users: MC_RELAY_USERNAME with MC_RELAY_PASSWORD, and the comma-separated `name:password` or
 * `name:pbkdf2-sha256:...` entries of MC_RELAY_USERS, whose name may carry token budgets of its own:
 * `alice;day=200000;month=0:...` (0: no budget for her). At least one user is required, unless PUBLIC_ACCESS or
 * every upstream is BYOK.
 */
function parseUsers(env: RelayEnv, errors: string[], warnings: string[], usersOptional: boolean): RelayUser[] {
  const users: RelayUser[] = [];
  const username = env.MC_RELAY_USERNAME?.trim() ?? "";
  const password = env.MC_RELAY_PASSWORD ?? "";
  const listed = env.MC_RELAY_USERS?.trim() ?? "";
  if (username || password || (!listed && !usersOptional)) {
    if (!username) {
      errors.push("MC_RELAY_USERNAME is required: the name users type before the colon, e.g. 'team'");
    } else if (username.includes(":")) {
      errors.push("MC_RELAY_USERNAME must not contain ':' (users send 'username:password'), e.g. 'team'");
    }
    if (!password) {
      errors.push(
        "MC_RELAY_PASSWORD is required: a long random password, e.g. the output of 'openssl rand -base64 24'",
      );
    } else if (password.length < 12) {
      warnings.push("MC_RELAY_PASSWORD is shorter than 12 characters; anyone who can reach the relay may guess it");
    }
    if (username && !username.includes(":") && password) users.push({ name: username, password });
  }
  for (const [index, entry] of listed.split(",").map((part) => part.trim()).filter(Boolean).entries()) {
    const colon = entry.indexOf(":");
    const [name, ...options] = entry.slice(0, colon).split(";").map((part) => part.trim());
    const secret = entry.slice(colon + 1);
    // Entries are named by position: their text contains a password or hash, never repeated here.
    const where = `MC_RELAY_USERS entry ${index + 1}`;
    const tokenBudgets = parseUserBudgets(options, where, errors);
    if (colon < 1 || !name || !secret) {
      errors.push(`${where} must be name:password or name:pbkdf2-sha256:... (from 'mc-relay hash-password')`);
    } else if (secret.startsWith("pbkdf2-sha256:")) {
      const hash = parsePasswordHash(secret);
      if (hash) users.push({ name, hash, tokenBudgets });
      else errors.push(`${where} has a malformed hash; make it with 'mc-relay hash-password'`);
    } else {
      if (secret.length < 12) warnings.push(`${where} (${name}) has a password shorter than 12 characters`);
      users.push({ name, password: secret, tokenBudgets });
    }
  }
  const names = users.map((user) => user.name);
  const repeated = names.filter((name, index) => names.indexOf(name) !== index);
  if (repeated.length > 0) errors.push(`MC_RELAY_USERS names a user twice: ${[...new Set(repeated)].join(", ")}`);
  return users;
}

/** A user's own token budgets from `name;day=N;month=N`: each replaces TOKEN_BUDGET_PER_DAY or _MONTH for them. */
function parseUserBudgets(options: string[], where: string, errors: string[]): RelayUser["tokenBudgets"] {
  if (options.length === 0) return undefined;
  const budgets: { day?: number; month?: number } = {};
  for (const option of options) {
    const match = /^(day|month)=([0-9]{1,15})$/.exec(option);
    if (match) budgets[match[1] as "day" | "month"] = Number(match[2]);
    else {errors.push(
        `${where} has "${option.slice(0, 30)}" after its name; use e.g. alice;day=200000;month=3000000:...`,
      );}
  }
  return budgets;
}

/** PBKDF2 iterations for new hashes (OWASP's 2023 figure for PBKDF2-HMAC-SHA256). */
export const PBKDF2_ITERATIONS = 600_000;

const base64url = (bytes: Uint8Array) =>
  btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
const fromBase64url = (text: string) =>
  Uint8Array.from(atob(text.replaceAll("-", "+").replaceAll("_", "/")), (char) => char.charCodeAt(0));

async function pbkdf2(password: string, salt: Uint8Array<ArrayBuffer>, iterations: number) {
  const key = await crypto.subtle.importKey("raw", textEncoder.encode(password), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits({ name: "PBKDF2", hash: "SHA-256", salt, iterations }, key, 256);
  return new Uint8Array(bits);
}

/** Hashes a password as `pbkdf2-sha256:<iterations>:<salt>:<hash>` (what `mc-relay hash-password` prints). */
export async function hashPassword(password: string, iterations = PBKDF2_ITERATIONS): Promise<string> {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  return `pbkdf2-sha256:${iterations}:${base64url(salt)}:${base64url(await pbkdf2(password, salt, iterations))}`;
}

/** Parses a `pbkdf2-sha256:...` string; undefined when it is malformed. */
export function parsePasswordHash(text: string): PasswordHash | undefined {
  const match = /^pbkdf2-sha256:(\d{1,9}):([A-Za-z0-9_-]{16,}):([A-Za-z0-9_-]{43})$/.exec(text);
  if (!match || Number(match[1]) < 1000) return undefined;
  try {
    return { iterations: Number(match[1]), salt: fromBase64url(match[2]), hash: fromBase64url(match[3]) };
  } catch {
    return undefined;
  }
}

/** Checks a password against a PBKDF2 hash, comparing in constant time. */
export async function verifyPasswordHash(password: string, stored: PasswordHash): Promise<boolean> {
  return constantTimeBytesEqual(await pbkdf2(password, stored.salt, stored.iterations), stored.hash);
}

/**
 * The upstreams: UPSTREAM_BASE_URL with UPSTREAM_API_KEY and its UPSTREAM_AUTH_* and extra headers (required
 * unless UPSTREAMS_JSON is set), then the entries of UPSTREAMS_JSON. Keys are checked, never repeated.
 */
function parseUpstreams(env: RelayEnv, errors: string[]): Upstream[] {
  const value = (name: EnvVar) => env[name]?.trim() || undefined;
  const upstreams: Upstream[] = [];
  const listed = value("UPSTREAMS_JSON");
  if (value("UPSTREAM_BASE_URL") || value("UPSTREAM_API_KEY") || !listed) {
    const baseUrl = parseBaseUrl(value("UPSTREAM_BASE_URL"), "UPSTREAM_BASE_URL", errors);
    const apiKey = parseApiKey(env.UPSTREAM_API_KEY, "UPSTREAM_API_KEY", errors);
    const authHeader = parseAuthHeader(value("UPSTREAM_AUTH_HEADER"), "UPSTREAM_AUTH_HEADER", errors);
    // Unset means "Bearer"; set but empty means "send the raw key".
    const authPrefix = parseAuthPrefix(env.UPSTREAM_AUTH_PREFIX, "UPSTREAM_AUTH_PREFIX", errors);
    let extraHeaders: Record<string, string> = {};
    const extraJson = value("UPSTREAM_EXTRA_HEADERS_JSON");
    if (extraJson) {
      try {
        extraHeaders = parseHeaders(JSON.parse(extraJson), "UPSTREAM_EXTRA_HEADERS_JSON", authHeader, errors);
      } catch {
        errors.push(`UPSTREAM_EXTRA_HEADERS_JSON is not valid JSON; it must be ${HEADERS_EXAMPLE}`);
      }
    }
    if (baseUrl && apiKey) {
      upstreams.push({ name: "default", baseUrl, apiKey, authHeader, authPrefix, extraHeaders, byok: false });
    }
  }
  if (listed) {
    const example =
      'a JSON array like [{"name":"openai","baseUrl":"https://api.openai.com/v1","apiKey":"sk-..."}] (optional: authHeader, authPrefix, extraHeaders; "byok":true and keyPattern instead of apiKey)';
    let entries: unknown;
    try {
      entries = JSON.parse(listed);
    } catch {
      errors.push(`UPSTREAMS_JSON is not valid JSON; it must be ${example}`);
    }
    if (entries !== undefined && (!Array.isArray(entries) || entries.length === 0)) {
      errors.push(`UPSTREAMS_JSON must be ${example}`);
    }
    for (const [index, entry] of (Array.isArray(entries) ? entries : []).entries()) {
      const where = `UPSTREAMS_JSON entry ${index + 1}`;
      if (typeof entry !== "object" || entry === null) {
        errors.push(`${where} must be an object with name, baseUrl and apiKey`);
        continue;
      }
      const { name, baseUrl, apiKey, authHeader, authPrefix, extraHeaders, byok, keyPattern } = entry as Record<
        string,
        unknown
      >;
      const text = (field: unknown) => typeof field === "string" ? field.trim() || undefined : undefined;
      if (typeof name !== "string" || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) {
        errors.push(`${where} needs a "name" of letters, digits, '.', '_' or '-', e.g. "openai"`);
      }
      if (byok !== undefined && typeof byok !== "boolean") errors.push(`${where} "byok" must be true or false`);
      if (byok === true && apiKey !== undefined) {
        errors.push(`${where} is "byok": its callers bring their own key, so it has no "apiKey"; remove one of them`);
      }
      const upstream: Upstream = {
        name: String(name),
        baseUrl: parseBaseUrl(text(baseUrl), `${where} baseUrl`, errors) ?? "",
        apiKey: byok === true
          ? ""
          : parseApiKey(typeof apiKey === "string" ? apiKey : undefined, `${where} apiKey`, errors) ?? "",
        byok: byok === true,
        keyPattern: parseKeyPattern(keyPattern, where, errors),
        authHeader: parseAuthHeader(text(authHeader), `${where} authHeader`, errors),
        authPrefix: parseAuthPrefix(
          typeof authPrefix === "string" ? authPrefix : undefined,
          `${where} authPrefix`,
          errors,
        ),
        extraHeaders: {},
      };
      if (extraHeaders !== undefined) {
        upstream.extraHeaders = parseHeaders(extraHeaders, `${where} extraHeaders`, upstream.authHeader, errors);
      }
      upstreams.push(upstream);
    }
  }
  const names = upstreams.map((upstream) => upstream.name);
  const repeated = names.filter((name, index) => names.indexOf(name) !== index);
  if (repeated.length > 0) {
    errors.push(
      `UPSTREAMS_JSON names an upstream twice (the first is "default"): ${[...new Set(repeated)].join(", ")}`,
    );
  }
  return upstreams;
}

/** A BYOK upstream's `keyPattern`: a regular expression a caller's key must match, e.g. "^sk-". */
function parseKeyPattern(raw: unknown, where: string, errors: string[]): RegExp | undefined {
  if (raw === undefined) return undefined;
  try {
    if (typeof raw === "string" && raw.length <= 200) return new RegExp(raw);
  } catch {
    // reported below
  }
  errors.push(`${where} "keyPattern" must be a regular expression a key must match, e.g. "^sk-"`);
  return undefined;
}

function parseBaseUrl(raw: string | undefined, label: string, errors: string[]): string | undefined {
  const example = "e.g. https://api.openai.com/v1 or http://localhost:11434/v1";
  if (!raw) {
    errors.push(`${label} is required: the provider's OpenAI-compatible base URL, ${example}`);
    return undefined;
  }
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    errors.push(`${label} must be an absolute http(s) URL, ${example}`);
    return undefined;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    errors.push(`${label} must start with http:// or https://, ${example}`);
  } else if (url.username || url.password) {
    errors.push(`${label} must not contain credentials (user:pass@); put the key in the API key setting`);
  } else if (url.search || url.hash) {
    errors.push(`${label} must not have a query or fragment, ${example}`);
  } else {
    return url.href.replace(/\/+$/, "");
  }
  return undefined;
}

function parseApiKey(raw: string | undefined, label: string, errors: string[]): string | undefined {
  const key = raw?.trim() ?? "";
  if (!key) {
    errors.push(
      `${label} is required: the provider's API key (for a local server that needs none, any placeholder such as 'none')`,
    );
  } else if (!HEADER_VALUE.test(key)) {
    errors.push(`${label} contains control characters; paste the key alone, without line breaks`);
  } else {
    return key;
  }
  return undefined;
}

function parseAuthHeader(raw: string | undefined, label: string, errors: string[]): string {
  const header = raw ?? DEFAULTS.upstreamAuthHeader;
  if (!HEADER_NAME.test(header) || RESERVED_UPSTREAM_HEADERS.has(header.toLowerCase())) {
    errors.push(`${label} must be a header name such as Authorization, api-key or x-api-key, got "${header}"`);
  }
  return header;
}

function parseAuthPrefix(raw: string | undefined, label: string, errors: string[]): string {
  const prefix = raw === undefined ? DEFAULTS.upstreamAuthPrefix : raw.trim();
  if (!HEADER_VALUE.test(prefix) || /\s/.test(prefix)) {
    errors.push(`${label} must be one word such as "Bearer", or empty for a raw key`);
  }
  return prefix;
}

const HEADERS_EXAMPLE =
  'a JSON object of header names to string values, e.g. {"HTTP-Referer":"https://example.com","X-Title":"MC"}';

/** Checks extra upstream headers: valid names, not ones the relay sets, single-line string values. */
function parseHeaders(parsed: unknown, label: string, authHeader: string, errors: string[]): Record<string, string> {
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    errors.push(`${label} must be ${HEADERS_EXAMPLE}`);
    return {};
  }
  const headers: Record<string, string> = {};
  for (const [name, headerValue] of Object.entries(parsed)) {
    const lower = name.toLowerCase();
    if (!HEADER_NAME.test(name)) {
      errors.push(`${label} has an invalid header name "${name}"; it must be ${HEADERS_EXAMPLE}`);
    } else if (RESERVED_UPSTREAM_HEADERS.has(lower) || lower === authHeader.toLowerCase()) {
      errors.push(`${label} may not set "${name}": the relay sets it (the key goes in the API key setting)`);
    } else if (typeof headerValue !== "string" || !HEADER_VALUE.test(headerValue)) {
      // The value may be a secret: name the header, never repeat the value.
      errors.push(`${label} header "${name}" must have a single-line string value`);
    } else {
      headers[name] = headerValue;
    }
  }
  return headers;
}

function parseAllowedOrigins(raw: string | undefined, errors: string[]): string[] {
  const origins: string[] = [];
  for (const entry of (raw ?? "").split(",").map((part) => part.trim()).filter(Boolean)) {
    let origin: string | undefined;
    try {
      const url = new URL(entry);
      if ((url.protocol === "http:" || url.protocol === "https:") && url.origin === entry) origin = entry;
    } catch {
      // reported below
    }
    if (origin) {
      origins.push(origin);
    } else {
      errors.push(
        `ALLOWED_ORIGIN entries must be exact origins (scheme://host[:port], no path, no trailing slash, never *), got "${entry}"; e.g. https://www.metaconfigurator.org`,
      );
    }
  }
  return [...new Set(origins)];
}

/** How a numeric variable is checked. */
interface NumberRule {
  integer?: boolean;
  min: number;
  max: number;
  /** What a valid value looks like, for the error line. */
  example: string;
}

function parseNumber(
  raw: string | undefined,
  fallback: number,
  name: EnvVar,
  errors: string[],
  rule: NumberRule,
): number {
  if (raw === undefined) return fallback;
  const number = /^[0-9]+(\.[0-9]+)?$/.test(raw) ? Number(raw) : NaN;
  if (
    !Number.isFinite(number) || number < rule.min || number > rule.max || (rule.integer && !Number.isInteger(number))
  ) {
    errors.push(`${name} must be ${rule.example}, got "${raw}"`);
    return fallback;
  }
  return number;
}

// ---------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------

/**
 * Reads `username:password` from an Authorization header:
 * `Basic base64(username:password)` or `Bearer username:password` (what MC
 * and every OpenAI SDK send when the user types `username:password` as the
 * API key). Returns a reason instead when the header is missing or malformed.
 */
export function readCredentials(authorization: string | null): { credentials: string } | { problem: string } {
  if (!authorization) {
    return {
      problem: "missing credentials: send 'Authorization: Bearer <username>:<password>' (in MC: the API key field)",
    };
  }
  const match = /^(\S+)\s+(\S+)\s*$/.exec(authorization);
  const scheme = match?.[1].toLowerCase();
  let credentials: string | undefined;
  if (scheme === "bearer") {
    credentials = match![2];
  } else if (scheme === "basic") {
    try {
      credentials = new TextDecoder("utf-8", { fatal: true }).decode(
        Uint8Array.from(atob(match![2]), (char) => char.charCodeAt(0)),
      );
    } catch {
      return { problem: "malformed Basic credentials: expected base64 of <username>:<password>" };
    }
  } else {
    return { problem: "unsupported Authorization scheme: use 'Bearer <username>:<password>' or Basic" };
  }
  if (!credentials.includes(":")) {
    return { problem: "the API key must be <username>:<password> (both parts, joined by a colon)" };
  }
  return { credentials };
}

const textEncoder = new TextEncoder();

/**
 * Compares a client-supplied secret with the expected one in time that
 * depends only on the expected value's length, never on where they differ.
 */
export function constantTimeEqual(given: string, expected: string): boolean {
  // UTF-16 code units, compared where they are: no copy of the secret per request, and no two strings that
  // differ compare equal (encoding would turn every lone surrogate into the same replacement character).
  let difference = given.length ^ expected.length;
  for (let i = 0; i < expected.length; i++) difference |= (given.charCodeAt(i) || 0) ^ expected.charCodeAt(i);
  return difference === 0;
}

/** The byte-level comparison behind `verifyPasswordHash`. */
function constantTimeBytesEqual(given: Uint8Array, expected: Uint8Array): boolean {
  let difference = given.length ^ expected.length;
  for (let i = 0; i < expected.length; i++) difference |= (given[i] ?? 0) ^ expected[i];
  return difference === 0;
}

/** Which reverse proxies may set X-Forwarded-For (TRUST_PROXY). */
export interface TrustedProxies {
  /** Addresses and CIDR ranges of the proxies; a peer outside them is the client, whatever it forwards. */
  ranges: AddressRange[];
  /** With a number (TRUST_PROXY=2): how many proxies append to X-Forwarded-For; 0 walks past every trusted entry. */
  hops: number;
}

/** An address range: an address as 16 bytes (IPv4 as IPv4-mapped IPv6) and a prefix length over those bytes. */
export interface AddressRange {
  /** The first address's bytes. */
  bytes: Uint8Array;
  /** The prefix length in bits, 0 to 128. */
  bits: number;
}

/** Loopback and private ranges: what TRUST_PROXY=true (or a number) trusts, a proxy on this host or network. */
export const PRIVATE_RANGES = [
  "127.0.0.0/8",
  "10.0.0.0/8",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "169.254.0.0/16",
  "::1/128",
  "fc00::/7",
  "fe80::/10",
];

/** An IPv4 or IPv6 address as 16 bytes (IPv4 as ::ffff:a.b.c.d); undefined when it is not an address. */
export function addressBytes(text: string): Uint8Array | undefined {
  const address = text.replace(/^\[|\]$/g, "").replace(/%.*$/, "");
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(address);
  if (v4) {
    const parts = v4.slice(1).map(Number);
    if (parts.some((part) => part > 255)) return undefined;
    return Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, ...parts]);
  }
  if (!/^[0-9a-fA-F:.]+$/.test(address) || !address.includes(":")) return undefined;
  let text6 = address;
  const tail: number[] = [];
  const embedded = /:(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})$/.exec(text6);
  if (embedded) {
    const four = addressBytes(embedded[1]);
    if (!four) return undefined;
    tail.push(...four.subarray(12));
    text6 = `${text6.slice(0, embedded.index)}:0:0`;
  }
  const halves = text6.split("::");
  if (halves.length > 2) return undefined;
  const groups = (half: string) => half === "" ? [] : half.split(":");
  const head = groups(halves[0]);
  const rest = halves.length === 2 ? groups(halves[1]) : [];
  const missing = 8 - head.length - rest.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) return undefined;
  const all = [...head, ...Array(halves.length === 2 ? missing : 0).fill("0"), ...rest];
  if (all.some((group) => !/^[0-9a-fA-F]{1,4}$/.test(group))) return undefined;
  const bytes = new Uint8Array(16);
  all.forEach((group, index) => {
    const value = parseInt(group, 16);
    bytes[index * 2] = value >> 8;
    bytes[index * 2 + 1] = value & 255;
  });
  if (tail.length === 4) bytes.set(tail, 12);
  return bytes;
}

/** Parses `address` or `address/bits` (IPv4 bits count from the IPv4 part); undefined when malformed. */
export function parseAddressRange(text: string): AddressRange | undefined {
  const [address, bitsText, extra] = text.trim().split("/");
  const bytes = addressBytes(address);
  if (!bytes || extra !== undefined) return undefined;
  const isV4 = address.includes(".") && !address.includes(":");
  const max = isV4 ? 32 : 128;
  const bits = bitsText === undefined ? max : /^\d{1,3}$/.test(bitsText) ? Number(bitsText) : NaN;
  if (!(bits >= 0 && bits <= max)) return undefined;
  return { bytes, bits: isV4 ? bits + 96 : bits };
}

/** Whether `address` lies in one of `ranges`. */
export function inRanges(address: string, ranges: AddressRange[]): boolean {
  const bytes = addressBytes(address);
  if (!bytes) return false;
  return ranges.some((range) => {
    for (let bit = 0; bit < range.bits; bit += 8) {
      const mask = range.bits - bit >= 8 ? 0xff : (0xff << (8 - (range.bits - bit))) & 0xff;
      if ((bytes[bit / 8] & mask) !== (range.bytes[bit / 8] & mask)) return false;
    }
    return true;
  });
}

/**
 * The client's address: the connection's peer, unless the peer is a trusted proxy (TRUST_PROXY). Then
 * X-Forwarded-For is read from the right: with a hop count, the entry that many proxies back; otherwise the
 * first entry that is not itself a trusted proxy. Entries further left can be forged and are never used.
 */
export function clientAddress(request: Request, info: Deno.ServeHandlerInfo, trust: TrustedProxies): string {
  const peer = "hostname" in info.remoteAddr ? info.remoteAddr.hostname : "unix";
  if (trust.ranges.length === 0 || !inRanges(peer, trust.ranges)) return peer;
  const forwarded = (request.headers.get("x-forwarded-for") ?? "").split(",").map((entry) => entry.trim())
    .filter(Boolean);
  if (forwarded.length === 0) return peer;
  if (trust.hops > 0) return withoutPort(forwarded[Math.max(0, forwarded.length - trust.hops)]).slice(0, 64);
  let index = forwarded.length - 1;
  while (index > 0 && inRanges(withoutPort(forwarded[index]), trust.ranges)) index--;
  return withoutPort(forwarded[index]).slice(0, 64);
}

/**
 * An X-Forwarded-For entry without the port some proxies append (Azure, IIS ARR: `203.0.113.8:50001`,
 * `[2001:db8::1]:443`): counted with it, every connection of one client would get limits and budgets of its own.
 */
function withoutPort(entry: string): string {
  const bracketed = /^\[([^\]]*)\](?::\d*)?$/.exec(entry);
  if (bracketed !== null) return bracketed[1];
  const v4 = /^(\d{1,3}(?:\.\d{1,3}){3}):\d*$/.exec(entry);
  return v4 !== null ? v4[1] : entry;
}

/**
 * The key a client address is counted under: an IPv6 address by its /64 (one customer's network hands out
 * any number of addresses in it), an IPv4 address (or IPv4-mapped IPv6) as it is.
 */
export function addressKey(address: string): string {
  let key = addressKeys.get(address);
  if (key !== undefined) return key;
  const bytes = addressBytes(address);
  if (!bytes) {
    key = address;
  } else if (bytes.subarray(0, 12).every((byte, index) => byte === (index < 10 ? 0 : 255))) {
    key = bytes.subarray(12).join(".");
  } else {
    const groups = [0, 2, 4, 6].map((index) => ((bytes[index] << 8) | bytes[index + 1]).toString(16));
    key = `${groups.join(":")}::/64`;
  }
  // Every request asks for its client's key, often twice: the recent answers are kept, at most 4,096 of them.
  if (addressKeys.size >= 4096) addressKeys.clear();
  addressKeys.set(address, key);
  return key;
}

/** `addressKey`'s recent answers by address. */
const addressKeys = new Map<string, string>();

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

/** Request headers a browser may send cross-origin, besides the `x-stainless-*` and `openai-*` families. */
const ALLOWED_REQUEST_HEADERS = new Set([
  "authorization",
  "x-api-key",
  "content-type",
  "accept",
  "x-relay-endpoint",
  "idempotency-key",
]);
/** Header name prefixes OpenAI's JS SDK sends from browsers. */
const ALLOWED_REQUEST_HEADER_PREFIXES = ["x-stainless-", "openai-"];
/** Response headers a page may read: ours, rate limits and the provider's request id. */
const EXPOSED_RESPONSE_HEADERS = [
  "x-relay-request-id",
  "x-relay-upstream",
  "x-request-id",
  "retry-after",
  "openai-processing-ms",
  "x-ratelimit-limit-requests",
  "x-ratelimit-limit-tokens",
  "x-ratelimit-remaining-requests",
  "x-ratelimit-remaining-tokens",
  "x-ratelimit-reset-requests",
  "x-ratelimit-reset-tokens",
].join(", ");
/** How long a browser may cache a preflight (Chromium caps this at two hours). */
const PREFLIGHT_MAX_AGE_SECONDS = 7200;

/** The CORS headers for a response to an allowed origin (never `*`). */
export function corsHeaders(origin: string): Record<string, string> {
  return {
    "access-control-allow-origin": origin,
    "access-control-expose-headers": EXPOSED_RESPONSE_HEADERS,
  };
}

/**
 * Adds the headers the relay adds to every response to `headers` (by lower-case name): CORS for an allowed origin,
 * `Origin` in `Vary` (after what the upstream's `Vary` names), the request id.
 */
function addRelayHeaders(
  headers: Record<string, string>,
  requestId: string,
  cors: Record<string, string>,
): Record<string, string> {
  for (const name in cors) headers[name] = cors[name];
  headers["vary"] = headers["vary"] ? `${headers["vary"]}, Origin` : "Origin";
  headers["x-relay-request-id"] = requestId;
  return headers;
}

/** Answers a preflight from an allowed origin, allowing only the request headers the relay accepts. */
export function preflightHeaders(origin: string, request: Request): Record<string, string> {
  const requested = (request.headers.get("access-control-request-headers") ?? "")
    .split(",")
    .map((name) => name.trim().toLowerCase())
    .filter((name) =>
      ALLOWED_REQUEST_HEADERS.has(name) || ALLOWED_REQUEST_HEADER_PREFIXES.some((prefix) => name.startsWith(prefix))
    );
  const headers: Record<string, string> = {
    "access-control-allow-origin": origin,
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": [...new Set([...ALLOWED_REQUEST_HEADERS, ...requested])].join(", "),
    "access-control-max-age": String(PREFLIGHT_MAX_AGE_SECONDS),
  };
  // Chromium asks before a public page may call a relay on the user's own machine or network.
  if (request.headers.get("access-control-request-private-network") === "true") {
    headers["access-control-allow-private-network"] = "true";
  }
  return headers;
}

// ---------------------------------------------------------------------------
// Deadlines: one coarse timer for every request's timeouts
// ---------------------------------------------------------------------------

/** How late a deadline may fire: the sweeper's tick, in milliseconds. */
const DEADLINE_TICK_MS = 25;

/** A deadline the sweeper keeps: `fire` runs once, when `at` (a `performance.now()` time) has passed. */
interface Deadline {
  /** When it fires; a stream moves it on while it waits for a chunk, and sets Infinity between waits. */
  at: number;
  /** What it does; dropped once it has fired or been cancelled. */
  fire: () => void;
}

/** The `fire` of a deadline that has fired or been cancelled. */
const SPENT = () => {};

/**
 * Every timeout a request sets (its first byte, its body, a stream's silence, a shared-store call) on one interval
 * timer instead of a timer each: setting and clearing a Deno timer costs microseconds, and a request set up to
 * four. A deadline fires up to DEADLINE_TICK_MS late, which is nothing against REQUEST_TIMEOUT_SECONDS; the
 * interval runs only while a deadline is pending, so an idle relay (or a finished test) holds no timer.
 */
class DeadlineSweeper {
  #pending = new Set<Deadline>();
  #interval: ReturnType<typeof setInterval> | undefined;

  /** Calls `fire` in `ms` milliseconds, unless `cancel` comes first. */
  add(ms: number, fire: () => void): Deadline {
    const deadline = { at: performance.now() + ms, fire };
    this.#pending.add(deadline);
    this.#interval ??= setInterval(() => this.#sweep(), DEADLINE_TICK_MS);
    return deadline;
  }

  /** Drops a deadline that has not fired; nothing happens for one that has. */
  cancel(deadline: Deadline | undefined): void {
    if (deadline === undefined || !this.#pending.delete(deadline)) return;
    // A deadline object can outlive its request (V8 moves long-lived kinds of objects to the old generation, where
    // a dead one still holds what it points to until the next full collection): let go of the request at once.
    deadline.fire = SPENT;
    if (this.#pending.size === 0) this.#stop();
  }

  #sweep(): void {
    const now = performance.now();
    for (const deadline of this.#pending) {
      if (deadline.at > now) continue;
      this.#pending.delete(deadline);
      const fire = deadline.fire;
      deadline.fire = SPENT;
      fire();
    }
    if (this.#pending.size === 0) this.#stop();
  }

  #stop(): void {
    clearInterval(this.#interval);
    this.#interval = undefined;
  }
}

/** The process's one sweeper: every relay, store and stream in it shares the tick. */
const deadlines = new DeadlineSweeper();

// ---------------------------------------------------------------------------
// Counters: one store for every limit, lockout and budget
// ---------------------------------------------------------------------------

/** A token bucket: `capacity` events, refilled evenly over `periodMs`; a capacity of 0 means no limit. */
export interface BucketRule {
  /** Events allowed at once (and per period). */
  capacity: number;
  /** Milliseconds to refill an empty bucket. */
  periodMs: number;
}

/**
 * Where the relay counts: every limit and lockout goes through this interface, so a durable or shared store
 * is a new implementation of it, not a change to the handler. Keys name what is counted and for whom, e.g.
 * `sign-in:203.0.113.7:team`.
 */
export interface CounterStore {
  /** Whole seconds until `key` may act again under `rule` (0: now), without using anything. */
  wait(key: string, rule: BucketRule): number | Promise<number>;
  /** Uses one event of `key`'s allowance: 0, or the whole seconds to wait when none is left. */
  take(key: string, rule: BucketRule): number | Promise<number>;
  /** Gives one event back to `key`'s allowance (a sign-in guess that was right, a request never sent). */
  give(key: string, rule: BucketRule): void | Promise<void>;
  /** Whole events left in `key`'s bucket now. */
  remaining(key: string, rule: BucketRule): number | Promise<number>;
  /**
   * Adds `amount` (negative to take back) to the counter `key` and returns its new value; the counter is forgotten
   * after `expiresAt` (ms), if given. Infinity when the store has no room for a new counter.
   */
  add(key: string, amount: number, expiresAt?: number): number | Promise<number>;
  /** The counter's value; 0 when it does not exist or has expired. */
  get(key: string): number | Promise<number>;
  /** Adds one answered request to the usage ledger. */
  recordUsage(entry: LedgerEntry): void | Promise<void>;
  /** The ledger's rows for the UTC days `since` to `until` (`YYYY-MM-DD`, both included). */
  readUsage(since: string, until: string): LedgerRow[] | Promise<LedgerRow[]>;
  /** "degraded" while a shared store cannot be reached and this process counts alone. */
  readonly state?: "ok" | "degraded";
  /** True when every method answers at once (never a promise): a check and its count then run as one step. */
  readonly synchronous?: boolean;
  /** Runs the calls `work` makes as one transaction (SQLite: one commit instead of one each); all or none count. */
  batch?<T>(work: () => T): T;
  /**
   * `startCheck` in one call (Redis: one script). A store that is not `synchronous` must have it; `startCheck`
   * composes it from the calls above for one that is.
   */
  startCheck?(key: string, rule: BucketRule, expiresAt: number): CheckStart | Promise<CheckStart>;
  /** Closes files and connections. */
  close?(): void | Promise<void>;
  /** A store made of two (FallbackCounterStore): runs `call` on the one that counts now and says which. */
  hold?<T>(
    call: (store: CounterStore) => T,
    undo?: (store: CounterStore, value: Awaited<T>) => unknown,
  ): Promise<Held<Awaited<T>>>;
  /** A store made of two: gives back to `store`, one of its two, what `hold` took there. */
  giveBack?(store: CounterStore, call: (store: CounterStore) => unknown): Promise<void>;
}

/**
 * Takes something that must be given back later (a place, a reservation, a sign-in check): `call` runs on the
 * store that counts now, and the answer says which, for `giveBack`. `undo` gives it back should a shared store carry
 * out a call the relay had given up on. A plain store answers with itself, at once when it is synchronous.
 */
export function hold<T>(
  counters: CounterStore,
  call: (store: CounterStore) => T,
  undo?: (store: CounterStore, value: Awaited<T>) => unknown,
): Held<Awaited<T>> | Promise<Held<Awaited<T>>> {
  if (counters.hold) return counters.hold(call, undo);
  const value = call(counters);
  if (value instanceof Promise) return value.then((answer) => ({ value: answer, store: counters }));
  return { value: value as Awaited<T>, store: counters };
}

/** Gives back to `store`, the one `hold` named, what was taken there: never to the other store of a pair. */
export function giveBack<T>(counters: CounterStore, store: CounterStore, call: (store: CounterStore) => T): unknown {
  return counters.giveBack ? counters.giveBack(store, call) : call(store);
}

/** What `startCheck` found: a check started, a lockout (with the seconds it lasts), or checks that fill the allowance. */
export type CheckStart = { started: true } | { lockedFor: number } | { busy: true };

/**
 * Starts a check that may use one of `key`'s guesses: while the bucket is empty, the lockout's seconds; while the
 * guesses left do not outnumber the checks already running (counted in `<key>:checking`, forgotten after `expiresAt`),
 * busy; else the check is counted as running (the caller ends it with `add(<key>:checking, -1)`). Atomic in every
 * store: one transaction in SQLite, one script in Redis, one step in memory.
 */
export function startCheck(
  counters: CounterStore,
  key: string,
  rule: BucketRule,
  expiresAt: number,
): CheckStart | Promise<CheckStart> {
  if (counters.startCheck) return counters.startCheck(key, rule, expiresAt);
  if (!counters.synchronous) throw new Error("a counter store that is not synchronous needs its own startCheck");
  const checkingKey = `${key}:checking`;
  // Every call answers at once: the steps run without a gap, in one transaction where the store has them.
  const run = (): CheckStart => {
    const lockedFor = counters.wait(key, rule) as number;
    if (lockedFor > 0) return { lockedFor };
    const checking = counters.add(checkingKey, 1, expiresAt) as number;
    if (rule.capacity === 0 || checking <= (counters.remaining(key, rule) as number)) return { started: true };
    counters.add(checkingKey, -1);
    return { busy: true };
  };
  return counters.batch ? counters.batch(run) : run();
}

/** One answered request for the usage ledger. */
export interface LedgerEntry {
  /** The UTC day, `YYYY-MM-DD`. */
  day: string;
  /** `user:<name>`, or `address:<address>` for anonymous requests. */
  who: string;
  /** The model the client asked for (an alias stays the alias). */
  model: string;
  /** The upstream that answered. */
  upstream: string;
  /** Prompt tokens. */
  prompt: number;
  /** Completion tokens. */
  completion: number;
  /** All tokens. */
  total: number;
  /** True when the relay estimated the figures because the upstream reported none. */
  estimated: boolean;
}

/** The ledger's sums for one UTC day, caller, model and upstream. */
export interface LedgerRow {
  /** The UTC day, `YYYY-MM-DD`. */
  day: string;
  /** `user:<name>` or `address:<address>`. */
  who: string;
  /** The model the clients asked for. */
  model: string;
  /** The upstream that answered. */
  upstream: string;
  /** Requests answered. */
  requests: number;
  /** Prompt tokens in all. */
  prompt_tokens: number;
  /** Completion tokens in all. */
  completion_tokens: number;
  /** All tokens. */
  total_tokens: number;
  /** Requests whose usage the relay estimated. */
  estimated_requests: number;
}

/**
 * Counters in this process's memory: lost on restart, one count per process. Memory stays bounded (`maxKeys`
 * buckets, and as many counters) without ever turning a newcomer away: when the buckets are full, those that have
 * refilled are forgotten first (they hold nothing), then the fullest tenth of the rest, the ones whose callers
 * have used the least, oldest first. So a flood of callers that each made one request (100,000 IPv6 /64s with one
 * invalid request each) is forgotten before anybody who has spent an allowance: a locked-out client or a spent
 * budget outlives the flood unless nine in ten buckets are emptier than its own. Counters (places in flight,
 * token budgets) are never evicted while they hold anything: a new one past `maxKeys` is refused (Infinity).
 * It keeps no usage ledger: nothing could read one (`mc-relay usage` reads STATE_PATH or REDIS_URL, and a restart
 * would lose it), and kept it would grow by a row per day, caller and model for as long as the process runs.
 */
export class MemoryCounterStore implements CounterStore {
  readonly synchronous = true;
  #buckets = new Map<string, { tokens: number; updatedAt: number; rule: BucketRule }>();
  #counters = new Map<string, { value: number; expiresAt: number }>();

  /** `now` returns milliseconds; tests pass a clock they control. */
  constructor(readonly now: () => number = Date.now, readonly maxKeys = 100_000) {}

  /** The bucket of `key`, refilled up to now; a new one for a new key, room made for it when the store is full. */
  #bucket(key: string, rule: BucketRule) {
    const now = this.now();
    let bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      if (this.#buckets.size >= this.maxKeys) this.#evict(now);
      bucket = { tokens: rule.capacity, updatedAt: now, rule };
      this.#buckets.set(key, bucket);
    }
    bucket.tokens = refilled(bucket.tokens, bucket.updatedAt, now, rule);
    bucket.updatedAt = now;
    return bucket;
  }

  wait(key: string, rule: BucketRule): number {
    if (rule.capacity === 0 || !this.#buckets.has(key)) return 0;
    return secondsToWait(this.#bucket(key, rule).tokens, rule);
  }

  take(key: string, rule: BucketRule): number {
    if (rule.capacity === 0) return 0;
    const bucket = this.#bucket(key, rule);
    if (bucket.tokens < 1) return secondsToWait(bucket.tokens, rule);
    bucket.tokens -= 1;
    return 0;
  }

  give(key: string, rule: BucketRule): void {
    const bucket = rule.capacity === 0 ? undefined : this.#buckets.get(key);
    if (bucket) bucket.tokens = Math.min(rule.capacity, bucket.tokens + 1);
  }

  remaining(key: string, rule: BucketRule): number {
    if (!this.#buckets.has(key)) return rule.capacity;
    return Math.floor(this.#bucket(key, rule).tokens);
  }

  add(key: string, amount: number, expiresAt = Infinity): number {
    const now = this.now();
    let counter = this.#counters.get(key);
    if (counter !== undefined && counter.expiresAt <= now) {
      this.#counters.delete(key);
      counter = undefined;
    }
    if (counter === undefined) {
      if (this.#counters.size >= this.maxKeys && !this.#sweepCounters(now)) return Infinity;
      counter = { value: 0, expiresAt };
      this.#counters.set(key, counter);
    }
    counter.value += amount;
    return counter.value;
  }

  get(key: string): number {
    const counter = this.#counters.get(key);
    return counter === undefined || counter.expiresAt <= this.now() ? 0 : counter.value;
  }

  /** Keeps nothing (see the class): usage while Redis is unreachable is not in the ledger either. */
  recordUsage(_entry: LedgerEntry): void {}

  readUsage(_since: string, _until: string): LedgerRow[] {
    return [];
  }

  /** Forgets expired counters and those back at zero. True when there is room for a new one. */
  #sweepCounters(now: number): boolean {
    for (const [key, { value, expiresAt }] of this.#counters) {
      if (expiresAt <= now || value === 0) this.#counters.delete(key);
    }
    return this.#counters.size < this.maxKeys;
  }

  /**
   * Makes room for new buckets: forgets those that have refilled, then, while more than nine in ten of `maxKeys`
   * are left, the fullest of the rest (a caller who used least loses least), the longest untouched first. Sorting
   * once for a tenth of the store keeps a flood of new keys at a few microseconds each.
   */
  #evict(now: number): void {
    const scored: { key: string; left: number; updatedAt: number }[] = [];
    for (const [key, { tokens, updatedAt, rule }] of this.#buckets) {
      const left = refilled(tokens, updatedAt, now, rule) / rule.capacity;
      if (left >= 1) this.#buckets.delete(key);
      else scored.push({ key, left, updatedAt });
    }
    const excess = this.#buckets.size - Math.floor(this.maxKeys * 0.9);
    if (excess <= 0) return;
    scored.sort((a, b) => b.left - a.left || a.updatedAt - b.updatedAt);
    for (let index = 0; index < excess; index++) this.#buckets.delete(scored[index].key);
  }
}

// ---------------------------------------------------------------------------
// Stores: SQLite on one machine, Redis or Valkey for many, memory when Redis is down
// ---------------------------------------------------------------------------

/** Tokens in a bucket that held `tokens` at `updatedAt`, refilled up to `now`. */
function refilled(tokens: number, updatedAt: number, now: number, rule: BucketRule): number {
  return Math.min(rule.capacity, tokens + ((now - updatedAt) * rule.capacity) / rule.periodMs);
}

/** Whole seconds until a bucket holding `tokens` has one whole token again; 0 when it has. */
function secondsToWait(tokens: number, rule: BucketRule): number {
  return tokens >= 1 ? 0 : Math.ceil(((1 - tokens) * rule.periodMs) / 1000 / rule.capacity);
}

/** The UTC day (`YYYY-MM-DD`) `days` days before `day`. */
function daysBefore(day: string, days: number): string {
  return new Date(Date.parse(`${day}T00:00:00Z`) - days * 86_400_000).toISOString().slice(0, 10);
}

/**
 * A lock the WORKERS threads of one process share (an Int32Array on shared memory: 0 free, 1 held): a thread that
 * finds the SQLite file's write lock taken by a sibling would otherwise sleep in SQLite's busy handler, a millisecond
 * and more each time, while the sibling needs it for some 20 µs. Waiting here wakes the moment it is free. It only
 * orders the threads: SQLite's own lock still guards the file, so a wait that times out simply goes on to it.
 */
export class ThreadLock {
  readonly #cell: Int32Array;

  /** Shares `memory` (4 bytes of a SharedArrayBuffer, the same one in every thread). */
  constructor(readonly memory: SharedArrayBuffer = new SharedArrayBuffer(4)) {
    this.#cell = new Int32Array(memory, 0, 1);
  }

  /** Takes the lock, waiting for it at most `timeoutMs`; false when it was not taken (nothing to release). */
  acquire(timeoutMs = 2000): boolean {
    const deadline = performance.now() + timeoutMs;
    while (Atomics.compareExchange(this.#cell, 0, 0, 1) !== 0) {
      const left = deadline - performance.now();
      if (left <= 0) return false;
      Atomics.wait(this.#cell, 0, 1, left);
    }
    return true;
  }

  /** Gives the lock up and wakes one waiting thread. */
  release(): void {
    Atomics.store(this.#cell, 0, 0);
    Atomics.notify(this.#cell, 0, 1);
  }
}

/**
 * Counters and the usage ledger in a SQLite file (STATE_PATH), through Deno's built-in `node:sqlite`: they survive
 * restarts. WAL mode with `synchronous=NORMAL`: safe when the relay crashes; an operating-system crash may lose the
 * last second or so of counts. Each read-modify-write runs in an IMMEDIATE transaction, so several processes on one
 * machine may share the file. Refilled buckets and expired counters are swept once a minute, ledger days older than
 * USAGE_RETENTION_DAYS once an hour.
 */
export class SqliteCounterStore implements CounterStore {
  readonly synchronous = true;
  #db: DatabaseSync;
  #statements: Record<string, StatementSync>;
  #lastSweep = 0;
  #lastRetention = 0;
  /** True inside a transaction: the calls of a `batch` join it. */
  #inTransaction = false;

  /**
   * Opens (or creates) the file; throws when it cannot be opened or written. WORKERS threads of one process pass
   * one `ThreadLock` made from the same shared memory, so they take turns at the file without SQLite's sleeps.
   */
  static async open(
    path: string,
    now: () => number = Date.now,
    retentionDays = 400,
    lock?: ThreadLock,
  ): Promise<SqliteCounterStore> {
    const { DatabaseSync } = await import("node:sqlite");
    return new SqliteCounterStore(new DatabaseSync(path), now, retentionDays, lock);
  }

  private constructor(
    database: DatabaseSync,
    readonly now: () => number,
    readonly retentionDays: number,
    readonly lock?: ThreadLock,
  ) {
    this.#db = database;
    this.#db.exec(`
      PRAGMA journal_mode = WAL;
      PRAGMA synchronous = NORMAL;
      PRAGMA busy_timeout = 2000;
      CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL, updated_at INTEGER, capacity REAL, period_ms REAL);
      CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value REAL, expires_at REAL);
      CREATE TABLE IF NOT EXISTS usage (
        day TEXT, who TEXT, model TEXT, upstream TEXT,
        requests INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, estimated_requests INTEGER,
        PRIMARY KEY (day, who, model, upstream));
    `);
    const prepare = (sql: string) => this.#db.prepare(sql);
    this.#statements = {
      bucket: prepare("SELECT tokens, updated_at FROM buckets WHERE key = ?"),
      saveBucket: prepare(
        "INSERT INTO buckets (key, tokens, updated_at, capacity, period_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
      ),
      counter: prepare("SELECT value, expires_at FROM counters WHERE key = ?"),
      saveCounter: prepare(
        "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
      ),
      addUsage: prepare(
        "INSERT INTO usage VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (day, who, model, upstream) DO UPDATE SET requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens, total_tokens = total_tokens + excluded.total_tokens, estimated_requests = estimated_requests + excluded.estimated_requests",
      ),
      readUsage: prepare("SELECT * FROM usage WHERE day >= ? AND day <= ? ORDER BY day, who, model, upstream"),
      // Prepared once: parsing them per call cost as much as the work inside.
      begin: prepare("BEGIN IMMEDIATE"),
      commit: prepare("COMMIT"),
      rollback: prepare("ROLLBACK"),
    };
    // A file that cannot be written fails here, at start-up, not at the first request.
    this.#transaction(() => this.#sweep(this.now()));
  }

  /** Runs `work` in one IMMEDIATE transaction (a write lock across processes); inside a `batch`, in the batch's. */
  #transaction<T>(work: () => T): T {
    if (this.#inTransaction) return work();
    const locked = this.lock?.acquire() ?? false;
    try {
      this.#statements.begin.run();
      this.#inTransaction = true;
      try {
        const result = work();
        this.#statements.commit.run();
        return result;
      } catch (error) {
        this.#statements.rollback.run();
        throw error;
      } finally {
        this.#inTransaction = false;
      }
    } finally {
      if (locked) this.lock!.release();
    }
  }

  batch<T>(work: () => T): T {
    return this.#transaction(work);
  }

  /** Runs one operation on `key`'s bucket: the level before it, and whether a `take` took one. */
  #bucketOp(key: string, rule: BucketRule, op: "take" | "give" | "look"): { level: number; taken: boolean } {
    if (op === "look") {
      // A look writes nothing: one SELECT, no write lock, no commit.
      const row = this.#statements.bucket.get(key) as { tokens: number; updated_at: number } | undefined;
      return {
        level: row === undefined ? rule.capacity : refilled(row.tokens, row.updated_at, this.now(), rule),
        taken: false,
      };
    }
    return this.#transaction(() => {
      const now = this.now();
      const row = this.#statements.bucket.get(key) as { tokens: number; updated_at: number } | undefined;
      const level = row === undefined ? rule.capacity : refilled(row.tokens, row.updated_at, now, rule);
      const taken = op === "take" && level >= 1;
      if (taken || (op === "give" && row !== undefined)) {
        const tokens = taken ? level - 1 : Math.min(rule.capacity, level + 1);
        this.#statements.saveBucket.run(key, tokens, now, rule.capacity, rule.periodMs);
      }
      if (now - this.#lastSweep > 60_000) this.#sweep(now);
      return { level, taken };
    });
  }

  wait(key: string, rule: BucketRule): number {
    return rule.capacity === 0 ? 0 : secondsToWait(this.#bucketOp(key, rule, "look").level, rule);
  }

  take(key: string, rule: BucketRule): number {
    if (rule.capacity === 0) return 0;
    const { level, taken } = this.#bucketOp(key, rule, "take");
    return taken ? 0 : secondsToWait(level, rule);
  }

  give(key: string, rule: BucketRule): void {
    if (rule.capacity > 0) this.#bucketOp(key, rule, "give");
  }

  remaining(key: string, rule: BucketRule): number {
    return Math.floor(this.#bucketOp(key, rule, "look").level);
  }

  add(key: string, amount: number, expiresAt = Infinity): number {
    return this.#transaction(() => {
      const row = this.#statements.counter.get(key) as { value: number; expires_at: number | null } | undefined;
      const live = row !== undefined && (row.expires_at ?? Infinity) > this.now();
      const value = (live ? row!.value : 0) + amount;
      const expiry = live ? row!.expires_at : expiresAt;
      this.#statements.saveCounter.run(key, value, expiry === Infinity ? null : expiry);
      return value;
    });
  }

  get(key: string): number {
    const row = this.#statements.counter.get(key) as { value: number; expires_at: number | null } | undefined;
    return row === undefined || (row.expires_at ?? Infinity) <= this.now() ? 0 : row.value;
  }

  recordUsage(entry: LedgerEntry): void {
    // Every write goes through #transaction, so WORKERS threads take turns at it through the ThreadLock.
    this.#transaction(() =>
      this.#statements.addUsage.run(
        entry.day,
        entry.who,
        entry.model,
        entry.upstream,
        entry.prompt,
        entry.completion,
        entry.total,
        entry.estimated ? 1 : 0,
      )
    );
  }

  readUsage(since: string, until: string): LedgerRow[] {
    return (this.#statements.readUsage.all(since, until) as unknown as LedgerRow[]).map((row) => ({ ...row }));
  }

  /** Forgets refilled buckets and expired counters; once an hour, ledger days past the retention. */
  #sweep(now: number): void {
    this.#lastSweep = now;
    this.#db.exec(
      `DELETE FROM buckets WHERE tokens + (${now} - updated_at) * capacity / period_ms >= capacity;
       DELETE FROM counters WHERE expires_at IS NOT NULL AND expires_at <= ${now};`,
    );
    if (now - this.#lastRetention > 3_600_000) {
      this.#lastRetention = now;
      const oldest = daysBefore(new Date(now).toISOString().slice(0, 10), this.retentionDays);
      this.#db.prepare("DELETE FROM usage WHERE day < ?").run(oldest);
    }
  }

  /** Closes the file. */
  close(): void {
    this.#db.close();
  }
}

/** The Redis client's calls the store uses (the official `redis` package). */
export interface RedisClient {
  /** Connects, and keeps reconnecting. */
  connect(): Promise<unknown>;
  /** Listens to the client's events ("error"). */
  on(event: string, listener: (...args: unknown[]) => void): unknown;
  /** Runs a Lua script atomically. */
  eval(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  /** Runs a Lua script Redis already has, named by its SHA-1 (NOSCRIPT when it has not). */
  evalSha(sha: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  /** A string value. */
  get(key: string): Promise<string | null>;
  /** How many of the keys exist (1 or 0 for one). */
  exists(key: string): Promise<number>;
  /** A hash's fields. */
  hGetAll(key: string): Promise<Record<string, string>>;
  /** PONG when Redis answers. */
  ping(): Promise<string>;
  /** Whether the connection is up and commands are accepted. */
  readonly isReady: boolean;
  /** Closes the connection (node-redis 5). */
  close?(): Promise<void>;
  /** Closes the connection (older clients). */
  quit?(): Promise<unknown>;
}

/**
 * The level of the token bucket in the hash KEYS[1] (`t` tokens at `u`), refilled evenly up to `capacity` over
 * `period` until `now`: the part of REDIS_BUCKET_SCRIPT and REDIS_START_CHECK_SCRIPT that looks at a bucket.
 */
const REDIS_REFILLED_LEVEL = `
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local level = capacity
if state[1] then level = math.min(capacity, tonumber(state[1]) + (now - tonumber(state[2])) * capacity / period) end`;

/** A token bucket in one hash: refill, then take, give or look; returns the level before and whether it took. */
const REDIS_BUCKET_SCRIPT = `
local capacity, period, now, op = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]${REDIS_REFILLED_LEVEL}
local taken = 0
local tokens = nil
if op == 'take' and level >= 1 then taken = 1; tokens = level - 1 end
if op == 'give' and state[1] then tokens = math.min(capacity, level + 1) end
if tokens then
  redis.call('HSET', KEYS[1], 't', tostring(tokens), 'u', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(period) + 1000)
end
return {tostring(level), taken}`;

/** A counter: add, set the expiry when one is given, return the new value. */
const REDIS_ADD_SCRIPT = `
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return value`;

/**
 * `startCheck`: refill the bucket (KEYS[1]) to look at its level; when a guess is left, count one more running check
 * (KEYS[2]) and keep it only while the running checks do not outnumber the guesses left.
 */
const REDIS_START_CHECK_SCRIPT = `
local capacity, period, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])${REDIS_REFILLED_LEVEL}
if capacity > 0 and level < 1 then return {'locked', tostring(level)} end
local checking = tonumber(redis.call('INCRBYFLOAT', KEYS[2], 1))
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIREAT', KEYS[2], ARGV[4]) end
if capacity == 0 or checking <= math.floor(level) then return {'started', tostring(level)} end
redis.call('INCRBYFLOAT', KEYS[2], -1)
return {'busy', tostring(level)}`;

/** One ledger row: add each figure to its field of the day's hash, and keep the day for the retention. */
const REDIS_USAGE_SCRIPT = `
for index = 1, #ARGV - 1, 2 do redis.call('HINCRBY', KEYS[1], ARGV[index], ARGV[index + 1]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[#ARGV])
return 1`;

/** The scripts a batch may hold, by the name the batch script knows them by. */
const REDIS_BATCHED_SCRIPTS: Record<string, string> = {
  bucket: REDIS_BUCKET_SCRIPT,
  add: REDIS_ADD_SCRIPT,
  usage: REDIS_USAGE_SCRIPT,
};

/**
 * A `batch`: several of the scripts above as one, atomic like each of them. ARGV holds, per call, the script's
 * name, its number of keys and of arguments, then the arguments; KEYS holds every call's keys in order. Each
 * script's text runs unchanged as the body of a function whose KEYS and ARGV are its own call's.
 */
const REDIS_BATCH_SCRIPT = `
local scripts = {
${
  Object.entries(REDIS_BATCHED_SCRIPTS).map(([name, script]) => `${name} = function(KEYS, ARGV)${script}\nend,`).join(
    "\n",
  )
}
}
local results, k, a = {}, 1, 1
while a <= #ARGV do
  local script, keys, arguments = scripts[ARGV[a]], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  results[#results + 1] = script({unpack(KEYS, k, k + keys - 1)}, {unpack(ARGV, a + 3, a + 2 + arguments)})
  k, a = k + keys, a + 3 + arguments
end
return results`;

/** One script call a `batch` holds until it ends. */
interface QueuedScript {
  name: string;
  options: { keys: string[]; arguments: string[] };
  resolve(value: unknown): void;
  reject(error: unknown): void;
}

/**
 * Counters and the ledger in Redis or Valkey (REDIS_URL), shared by every copy of the relay. Every update is one
 * Lua script, so N copies together never let more through than a limit. Keys start with `mc-relay:`; buckets and
 * counters expire by themselves, ledger days after USAGE_RETENTION_DAYS.
 */
export class RedisCounterStore implements CounterStore {
  /**
   * Connects to `url`, waiting up to REDIS_START_WAIT_MS for the first connection (then it keeps trying in the
   * background, and `ready` says false); commands fail at once while it is not connected.
   */
  static async connect(url: string, now: () => number = Date.now, retentionDays = 400): Promise<RedisCounterStore> {
    const { createClient } = await import("npm:redis@5.12.1");
    const client = createClient({
      url,
      disableOfflineQueue: true,
      socket: { connectTimeout: 1000, reconnectStrategy: (retries: number) => Math.min(100 * 2 ** retries, 2000) },
    }) as unknown as RedisClient;
    const store = new RedisCounterStore(client, now, retentionDays);
    for (
      const script of [
        REDIS_BUCKET_SCRIPT,
        REDIS_ADD_SCRIPT,
        REDIS_START_CHECK_SCRIPT,
        REDIS_USAGE_SCRIPT,
        REDIS_BATCH_SCRIPT,
      ]
    ) {
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-1", textEncoder.encode(script)));
      store.#scriptShas.set(script, Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join(""));
    }
    client.on("error", () => {}); // the fallback store reports the state; the client reconnects by itself
    await orAfter(client.connect().catch(() => {}), REDIS_START_WAIT_MS, undefined);
    return store;
  }

  /** Whether Redis is connected now. */
  get ready(): boolean {
    return this.client.isReady;
  }

  /** Each script's SHA-1: a call sends the 40 characters, not the script, once Redis has it. */
  #scriptShas = new Map<string, string>();

  private constructor(readonly client: RedisClient, readonly now: () => number, readonly retentionDays: number) {}

  /** The calls of the `batch` being made, while one is. */
  #queued?: QueuedScript[];

  /**
   * The store calls `work` makes go to Redis as one script (REDIS_BATCH_SCRIPT): one command and one round trip
   * for a stage's calls, atomic together. Each call's promise settles with its own answer, or all fail together.
   */
  batch<T>(work: () => T): T {
    if (this.#queued !== undefined) return work();
    const queued: QueuedScript[] = this.#queued = [];
    try {
      return work();
    } finally {
      this.#queued = undefined;
      this.#sendQueued(queued);
    }
  }

  #sendQueued(queued: QueuedScript[]): void {
    if (queued.length === 0) return;
    if (queued.length === 1) {
      const [call] = queued;
      this.#script(REDIS_BATCHED_SCRIPTS[call.name], call.options).then(call.resolve, call.reject);
      return;
    }
    const keys: string[] = [];
    const args: string[] = [];
    for (const { name, options } of queued) {
      keys.push(...options.keys);
      args.push(name, String(options.keys.length), String(options.arguments.length), ...options.arguments);
    }
    this.#script(REDIS_BATCH_SCRIPT, { keys, arguments: args }).then(
      (answers) => queued.forEach((call, index) => call.resolve((answers as unknown[])[index])),
      (error) => queued.forEach((call) => call.reject(error)),
    );
  }

  /** Runs a script a batch may hold: inside a `batch`, held for it; else at once. */
  #batchable(name: string, options: { keys: string[]; arguments: string[] }): Promise<unknown> {
    const queued = this.#queued;
    if (queued === undefined) return this.#script(REDIS_BATCHED_SCRIPTS[name], options);
    return new Promise((resolve, reject) => queued.push({ name, options, resolve, reject }));
  }

  /** Runs one of the store's scripts by its SHA-1; the script itself only when Redis lacks it (yet, or since a restart). */
  async #script(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown> {
    const sha = this.#scriptShas.get(script);
    if (sha !== undefined) {
      try {
        return await this.client.evalSha(sha, options);
      } catch (error) {
        if (!errorText(error).includes("NOSCRIPT")) throw error;
      }
    }
    return await this.client.eval(script, options); // which also keeps the script in Redis for the next call
  }

  async #bucketOp(key: string, rule: BucketRule, op: "take" | "give" | "look") {
    const [level, taken] = await this.#batchable("bucket", {
      keys: [`mc-relay:${key}`],
      arguments: [String(rule.capacity), String(rule.periodMs), String(this.now()), op],
    }) as [string, number];
    return { level: Number(level), taken: taken === 1 };
  }

  async wait(key: string, rule: BucketRule): Promise<number> {
    return rule.capacity === 0 ? 0 : secondsToWait((await this.#bucketOp(key, rule, "look")).level, rule);
  }

  async take(key: string, rule: BucketRule): Promise<number> {
    if (rule.capacity === 0) return 0;
    const { level, taken } = await this.#bucketOp(key, rule, "take");
    return taken ? 0 : secondsToWait(level, rule);
  }

  async give(key: string, rule: BucketRule): Promise<void> {
    if (rule.capacity > 0) await this.#bucketOp(key, rule, "give");
  }

  async remaining(key: string, rule: BucketRule): Promise<number> {
    return Math.floor((await this.#bucketOp(key, rule, "look")).level);
  }

  async add(key: string, amount: number, expiresAt = Infinity): Promise<number> {
    const value = await this.#batchable("add", {
      keys: [`mc-relay:${key}`],
      arguments: [String(amount), Number.isFinite(expiresAt) ? String(Math.ceil(expiresAt)) : ""],
    });
    return Number(value);
  }

  async get(key: string): Promise<number> {
    return Number(await this.client.get(`mc-relay:${key}`) ?? 0);
  }

  async startCheck(key: string, rule: BucketRule, expiresAt: number): Promise<CheckStart> {
    const [outcome, level] = await this.#script(REDIS_START_CHECK_SCRIPT, {
      keys: [`mc-relay:${key}`, `mc-relay:${key}:checking`],
      arguments: [String(rule.capacity), String(rule.periodMs), String(this.now()), String(Math.ceil(expiresAt))],
    }) as [string, string];
    if (outcome === "started") return { started: true };
    return outcome === "locked" ? { lockedFor: secondsToWait(Number(level), rule) } : { busy: true };
  }

  async recordUsage(entry: LedgerEntry): Promise<void> {
    const field = JSON.stringify([entry.who, entry.model, entry.upstream]);
    const figures = {
      requests: 1,
      prompt_tokens: entry.prompt,
      completion_tokens: entry.completion,
      total_tokens: entry.total,
      estimated_requests: entry.estimated ? 1 : 0,
    };
    const expiresAt = Date.parse(`${entry.day}T00:00:00Z`) + (this.retentionDays + 1) * 86_400_000;
    await this.#batchable("usage", {
      keys: [`mc-relay:usage:${entry.day}`],
      arguments: [
        ...Object.entries(figures).flatMap(([name, value]) => [`${field}\n${name}`, String(value)]),
        String(expiresAt),
      ],
    });
  }

  async readUsage(since: string, until: string): Promise<LedgerRow[]> {
    const rows = new Map<string, LedgerRow>();
    for (let day = since; day <= until; day = daysBefore(day, -1)) {
      for (const [field, value] of Object.entries(await this.client.hGetAll(`mc-relay:usage:${day}`))) {
        const [labels, name] = field.split("\n");
        const [who, model, upstream] = JSON.parse(labels) as string[];
        const key = `${day}\n${labels}`;
        const row = rows.get(key) ??
          {
            day,
            who,
            model,
            upstream,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            estimated_requests: 0,
          };
        row[name as "requests"] = Number(value);
        rows.set(key, row);
      }
    }
    return [...rows.values()].sort((a, b) => `${a.day}${a.who}${a.model}`.localeCompare(`${b.day}${b.who}${b.model}`));
  }

  /** Whether Redis answers now. */
  async ping(): Promise<boolean> {
    return (await this.client.ping()) === "PONG";
  }

  /** Closes the connection. */
  async close(): Promise<void> {
    await (this.client.close?.() ?? this.client.quit?.())?.catch?.(() => {});
  }
}

/**
 * How long Redis may stay silent (no answer to any call of this copy) while a call waits, before the relay counts
 * in memory instead. Silence, not a call's own wait: under a flood of requests calls queue on the one connection
 * and each waits longer, but Redis keeps answering, and a copy that went over to memory for that would split its
 * counts between two stores for no outage at all.
 */
const SHARED_STORE_TIMEOUT_MS = 250;

/**
 * How many give-backs (places, reservations' settlements) a copy keeps for Redis while it does not answer, to send
 * when it does. Beyond that the oldest are dropped: the counters they would correct expire by themselves (a place
 * after a day, a budget when its day or month ends).
 */
const MAX_OWED_TO_SHARED = 10_000;

/**
 * How long the start waits for the first Redis connection before it listens: a copy must not answer its first
 * requests counting alone only because it listened a moment before its connection was up. Redis still down by then:
 * the copy starts degraded (logged) and goes over to Redis when it answers.
 */
const REDIS_START_WAIT_MS = 3000;

/** What a count answered, and the store that now holds what it took: the one to give it back to. */
export interface Held<T> {
  value: T;
  store: CounterStore;
}

/**
 * A shared store with a way out: while Redis answers, every count goes there; when a call fails, or Redis stays
 * silent for SHARED_STORE_TIMEOUT_MS while a call waits, the relay logs it once, reports `degraded` (in /health and
 * the metrics) and counts in this process's memory, so every copy enforces the limits alone rather than answer 5xx
 * or wait. Every two seconds it asks Redis again, and goes back to it (logged once) when it answers. It starts
 * degraded when Redis is not connected yet.
 *
 * What a request takes (a place, a budget reservation, a sign-in check) is given back to the store it was taken
 * from, whatever the state is by then (`hold` says where, `giveBack` goes there): a reservation made in memory during
 * an outage is settled in memory, never against a budget in Redis it was not added to; a place taken in Redis is
 * freed in Redis, at once or, while Redis does not answer, as soon as it does (`#owed`). A call given up on that Redis
 * carries out later anyway is undone there.
 */
export class FallbackCounterStore implements CounterStore {
  #degraded = false;
  #probe?: ReturnType<typeof setInterval>;
  /** When Redis last answered a call (performance.now()). */
  #lastAnswer = 0;
  /** Give-backs for Redis that wait for it to answer again. */
  #owed: ((store: CounterStore) => unknown)[] = [];

  /** `onChange` hears every change of state ("ok" or "degraded"), the degraded start too. */
  constructor(
    readonly shared: RedisCounterStore,
    readonly local: CounterStore,
    readonly onChange: (state: "ok" | "degraded", error?: string) => void,
  ) {
    if (!shared.ready) this.#degrade(`not connected ${REDIS_START_WAIT_MS / 1000} s after the start`);
  }

  /** "degraded" while counts stay in this process. */
  get state(): "ok" | "degraded" {
    return this.#degraded ? "degraded" : "ok";
  }

  /** Give-backs waiting for Redis to answer again. */
  get owed(): number {
    return this.#owed.length;
  }

  /**
   * `call` on Redis, settled with its answer, or rejected when it fails or Redis stays silent for
   * SHARED_STORE_TIMEOUT_MS meanwhile. `abandoned` hears the answer of a call given up on that Redis carried out later.
   */
  #onShared<T>(call: (store: CounterStore) => T, abandoned?: (value: Awaited<T>) => void): Promise<Awaited<T>> {
    const started = performance.now();
    let deadline: Deadline | undefined;
    let gaveUp = false;
    const answer = Promise.resolve(call(this.shared)).then((value) => {
      this.#lastAnswer = performance.now();
      if (gaveUp) abandoned?.(value);
      return value;
    });
    const silence = new Promise<never>((_, reject) => {
      const check = () => {
        const quietFor = performance.now() - Math.max(started, this.#lastAnswer);
        if (quietFor < SHARED_STORE_TIMEOUT_MS) {
          deadline = deadlines.add(SHARED_STORE_TIMEOUT_MS - quietFor, check);
          return;
        }
        gaveUp = true;
        reject(new Error(`no answer for ${SHARED_STORE_TIMEOUT_MS} ms`));
      };
      deadline = deadlines.add(SHARED_STORE_TIMEOUT_MS, check);
    });
    answer.catch(() => {}); // a failure after the silence is nobody's to hear
    return Promise.race([answer, silence]).finally(() => deadlines.cancel(deadline));
  }

  /**
   * Runs `call` where counts go now and says which store answered: what it took must be given back there. `undo`
   * gives it back in Redis should a call given up on be carried out there after all.
   */
  async hold<T>(
    call: (store: CounterStore) => T,
    undo?: (store: CounterStore, value: Awaited<T>) => unknown,
  ): Promise<Held<Awaited<T>>> {
    if (!this.#degraded) {
      try {
        return {
          value: await this.#onShared(call, undo && ((value) => this.giveBack(this.shared, (s) => undo(s, value)))),
          store: this.shared,
        };
      } catch (error) {
        this.#degrade(errorText(error));
      }
    }
    return { value: await call(this.local), store: this.local };
  }

  /**
   * Gives back to `store` (Redis or memory) what was taken there. For Redis while it does not answer: kept, and sent
   * when it answers again; never counted in memory, where nothing was taken.
   */
  async giveBack(store: CounterStore, call: (store: CounterStore) => unknown): Promise<void> {
    if (store !== this.shared) return void await call(store);
    if (this.#degraded) return this.#owe(call);
    try {
      // Silence is no failure here: the call is on its way and Redis will carry it out or reject it.
      await this.#onShared(call).catch((error) => {
        if (!errorText(error).startsWith("no answer for")) throw error;
      });
    } catch (error) {
      this.#owe(call);
      this.#degrade(errorText(error));
    }
  }

  #owe(call: (store: CounterStore) => unknown): void {
    if (this.#owed.push(call) > MAX_OWED_TO_SHARED) this.#owed.shift();
  }

  /**
   * Sends the give-backs kept for Redis; those that fail stay kept. True when none is left. A counter Redis no longer
   * has (it restarted without its data, or the counter expired) took nothing to give back: it is left alone, else a
   * place or a reservation freed twice would let a caller past its limit.
   */
  async #payOwed(): Promise<boolean> {
    const owed = this.#owed.splice(0);
    const shared = this.shared;
    const add = async (key: string, amount: number, expiresAt?: number) =>
      await shared.client.exists(`mc-relay:${key}`) ? await shared.add(key, amount, expiresAt) : 0;
    const stillThere = new Proxy(shared, {
      get: (target, name) => name === "add" ? add : Reflect.get(target, name, target)?.bind?.(target),
    });
    const results = await Promise.allSettled(owed.map((call) => call(stillThere)));
    results.forEach((result, index) => result.status === "rejected" && this.#owed.push(owed[index]));
    return this.#owed.length === 0;
  }

  async #run<T>(operation: (store: CounterStore) => T | Promise<T>): Promise<T> {
    return (await this.hold(operation)).value as T;
  }

  #degrade(error: string): void {
    if (this.#degraded) return;
    this.#degraded = true;
    this.onChange("degraded", error);
    this.#probe = setInterval(async () => {
      const back = await orAfter(this.shared.ping().catch(() => false), 1000, false);
      // What Redis is owed goes first: a count taken there and freed meanwhile must not hold a place any longer.
      if (back && this.#degraded && await this.#payOwed()) {
        this.#degraded = false;
        clearInterval(this.#probe);
        this.onChange("ok");
      }
    }, 2000);
  }

  /** A batch of the shared store while Redis answers; in memory, the calls one after another. */
  batch<T>(work: () => T): T {
    return this.#degraded ? work() : this.shared.batch(work);
  }

  wait = (key: string, rule: BucketRule) => this.#run((store) => store.wait(key, rule));
  take = (key: string, rule: BucketRule) => this.#run((store) => store.take(key, rule));
  give = (key: string, rule: BucketRule) => this.#run((store) => store.give(key, rule));
  remaining = (key: string, rule: BucketRule) => this.#run((store) => store.remaining(key, rule));
  add = (key: string, amount: number, expiresAt?: number) => this.#run((store) => store.add(key, amount, expiresAt));
  get = (key: string) => this.#run((store) => store.get(key));
  recordUsage = (entry: LedgerEntry) => this.#run((store) => store.recordUsage(entry));
  startCheck = (key: string, rule: BucketRule, expiresAt: number) =>
    this.#run((store) => startCheck(store, key, rule, expiresAt));
  readUsage = (since: string, until: string) => this.#run((store) => store.readUsage(since, until));

  /** Stops probing and closes the connection. */
  async close(): Promise<void> {
    clearInterval(this.#probe);
    await this.shared.close();
  }
}

/** What `work` resolves with, or `value` once `ms` have passed first; the timer goes when either is there. */
async function orAfter<T, U>(work: Promise<T>, ms: number, value: U): Promise<T | U> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([work, new Promise<U>((resolve) => timer = setTimeout(() => resolve(value), ms))]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The store the configuration asks for: SQLite at STATE_PATH, Redis at REDIS_URL (with the in-memory fallback), or
 * memory. A SQLite file that cannot be opened is an error naming STATE_PATH.
 */
export async function openCounterStore(
  config: RelayConfig,
  onChange: (state: "ok" | "degraded", error?: string) => void = () => {},
  lock?: ThreadLock,
): Promise<CounterStore | { error: string }> {
  if (config.statePath !== undefined) {
    try {
      return await SqliteCounterStore.open(config.statePath, Date.now, config.usageRetentionDays, lock);
    } catch (error) {
      return {
        error: `STATE_PATH names "${config.statePath}", which cannot be opened and written as a SQLite file (${
          errorText(error).slice(0, 200)
        }); use a writable path such as /data/state.db`,
      };
    }
  }
  if (config.redisUrl !== undefined) {
    const shared = await RedisCounterStore.connect(config.redisUrl, Date.now, config.usageRetentionDays);
    return new FallbackCounterStore(shared, new MemoryCounterStore(), onChange);
  }
  return new MemoryCounterStore();
}

// ---------------------------------------------------------------------------
// Routes and error responses
// ---------------------------------------------------------------------------

/** One route the relay serves: the only paths that ever reach the upstream are these. */
interface Route {
  method: "GET" | "POST";
  /** Path appended to UPSTREAM_BASE_URL; absent for routes the relay answers itself. */
  upstreamPath?: string;
}

/** The routes, matched exactly against the normalised path. */
const ROUTES: Record<string, Route> = {
  "/": { method: "GET" },
  "/mc-settings.json": { method: "GET" },
  "/health": { method: "GET" },
  "/usage": { method: "GET" },
  "/seal": { method: "POST" },
  "/v1/models": { method: "GET", upstreamPath: "/models" },
  "/v1/chat/completions": { method: "POST", upstreamPath: "/chat/completions" },
  "/v1/completions": { method: "POST", upstreamPath: "/completions" },
  "/v1/embeddings": { method: "POST", upstreamPath: "/embeddings" },
  "/v1/responses": { method: "POST", upstreamPath: "/responses" },
};

/** No Connection tokens. */
const NO_TOKENS: ReadonlySet<string> = new Set();

/** Response headers from the upstream that the relay drops: they describe the upstream's connection, cookies or CORS, not the answer. */
function isDroppedResponseHeader(name: string, connectionTokens: ReadonlySet<string>): boolean {
  return HOP_BY_HOP.has(name) || connectionTokens.has(name) || name.startsWith("access-control-") ||
    name === "set-cookie" || name === "set-cookie2" || name === "alt-svc" || name === "date";
}

/** Builds an OpenAI-style error response: `{"error":{"message","type","code"}}`. */
export function errorResponse(
  status: number,
  message: string,
  code: string,
  headers: Record<string, string> = {},
): Response {
  const type = status >= 500 ? "server_error" : status === 429 ? "rate_limit_error" : "invalid_request_error";
  return jsonResponse({ error: { message: `mc-relay: ${message}`, type, code } }, { status, headers });
}

/** A JSON response the relay makes itself, with its Content-Length, so its log line has the true `bytes_out`. */
export function jsonResponse(
  body: unknown,
  init: { status?: number; headers?: Record<string, string> } = {},
): Response {
  const bytes = textEncoder.encode(JSON.stringify(body));
  return new Response(bytes, {
    status: init.status ?? 200,
    headers: { "content-type": "application/json", "content-length": String(bytes.byteLength), ...init.headers },
  });
}

/**
 * The error a relayed body ends with when the relay cuts it (upstream silent or broken): it makes Deno drop the
 * connection so the client sees the cut. Deno hands it to the server's `onError`, which knows it is deliberate.
 */
class BodyCut extends Error {
  constructor(outcome: string) {
    super(`mc-relay: response body cut short (${outcome})`);
    this.stack = this.message;
  }
}

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

/** Why an upstream call ended early. */
class RelayAbort extends Error {
  readonly #kind: "client_gone" | "upstream_timeout" | "breaker_open";
  constructor(kind: "client_gone" | "upstream_timeout" | "breaker_open") {
    super(`mc-relay: upstream request ended (${kind})`);
    this.#kind = kind;
    // Deno prints the reason when it ends a response body with it: one line, no stack, no fields.
    this.stack = this.message;
  }
  /** Which side ended it. */
  get kind() {
    return this.#kind;
  }
}

// ---------------------------------------------------------------------------
// Handler: one context per request, passed through the stages
// ---------------------------------------------------------------------------

/** What one request carries through the stages: the request, what the stages decided, and its log record. */
interface RequestContext {
  readonly request: Request;
  readonly url: URL;
  /** The request's Origin header; null for non-browser clients. */
  readonly origin: string | null;
  /** The CORS headers every response carries: empty unless the origin is allowed. */
  readonly cors: Record<string, string>;
  /** Resolves when Deno has sent the response, or the connection ended. */
  readonly completed: Promise<void>;
  /** The relay's request id, in the log line and the `X-Relay-Request-Id` response header. */
  readonly id: string;
  readonly method: string;
  /** The path as logged: cut at 200 characters. */
  readonly path: string;
  /** The client's address (TRUST_PROXY decides which). */
  readonly client: string;
  readonly startedAt: number;
  /** False when the Host header could change the path; `checkHost` answers 400. */
  readonly validHost: boolean;
  /** Bytes of the request body counted against MAX_BUFFERED_BYTES until it has been sent upstream. */
  heldBytes: number;
  /** Whose share of MAX_BUFFERED_BYTES `heldBytes` count against: `user:<name>` or `address:<key>`. */
  bodyHolder?: string;
  /** The route matched by `matchRoute`. */
  route?: Route;
  /** The path inside BASE_PATH that `matchRoute` matched, e.g. `/v1/models`. */
  routePath?: string;
  /** The model alias the client asked for (MODEL_ALIASES_JSON), if it did. */
  alias?: string;
  /** Every attempt at an alias's targets, for the log line: target, outcome, milliseconds. */
  attempts?: { target: string; outcome: string; ms: number }[];
  /** The key the caller brought for a BYOK upstream (raw or sealed): X-Api-Key, or a bearer token naming no user. */
  callerKey?: string;
  /** The auth header value for a BYOK upstream, made from the caller's key by `useCallerKey`. */
  upstreamAuth?: string;
  /** Masks secrets in what the upstream sends back: the relay's, plus the caller's own key for a BYOK upstream. */
  masker?: ReturnType<typeof createSecretMasker>;
  /** The signed-in user, set by `identifyCaller`; undefined for anonymous requests (PUBLIC_ACCESS). */
  user?: string;
  /** Whom limits and budgets count for: `user:<name>`, or `address:<address>` for anonymous requests. */
  subject?: string;
  /** The in-flight counter this request holds (CONCURRENT_REQUESTS), released by `account`. */
  inFlightKey?: string;
  /** The store that holds the place: where `account` gives it back (`hold`). */
  inFlightStore?: CounterStore;
  /**
   * The most answer tokens this request may get, all its answers (`n`, `best_of`, prompts) together, after
   * MAX_TOKENS_PER_REQUEST; undefined when unbounded.
   */
  answerTokens?: number;
  /** Token budget counters charged with a reservation, settled by `account` with the real usage. */
  reservations?: { key: string; amount: number; expiresAt: number; store: CounterStore }[];
  /** The request body as read by `readRequestBody`. */
  body?: Uint8Array<ArrayBuffer>;
  /** The body parsed as a JSON object, when a stage needs to look inside it. */
  payload?: JsonObject;
  /** True when a stage changed `payload`: the body is serialised again before it is forwarded. */
  bodyChanged: boolean;
  /** The upstream chosen by `chooseUpstream`. */
  target: UpstreamTarget;
  /** How token usage is read from the answer; set for chat and completions. */
  usageWatch?: UsageWatch;
  /** Aborts the upstream call: the client left, or the upstream was too slow. */
  upstreamCall?: AbortController;
  /** Ends the watch that aborts the upstream call when the client leaves (`watchClient`). */
  stopWatchingClient?: () => void;
  /** True once the client has gone (noticed by `watchClient`). */
  clientGone?: boolean;
  /** True once the request was sent upstream: from then on it is charged, with usage or an estimate. */
  forwarded?: boolean;
  /** Server-sent events relayed, for a usage estimate when the upstream reports none. */
  events?: () => number;
  /** The upstream's response, once `forwardRequest` has it. */
  upstreamResponse?: Response;
  status?: number;
  upstreamStatus?: number;
  bytesIn: number;
  bytesOut: number;
  /** The upstream's name in the log, when there are several. */
  upstream?: string;
  /** The model the client asked for (chat and completions). */
  model?: string;
  /** Token usage the upstream reported. */
  usage?: TokenUsage;
  outcome?: string;
  error?: string;
  /** True while an upstream body is relayed: `account` runs when it ends. */
  logWhenBodyEnds?: boolean;
  /** True when the response already carries the relay's own headers. */
  headersSet?: boolean;
}

/** A parsed JSON object body. */
type JsonObject = Record<string, unknown> & { stream_options?: { include_usage?: unknown } };

/** An upstream with what is derived from it once: its host for messages and its ready auth header value. */
type UpstreamTarget = Upstream & {
  host: string;
  authValue: string;
  /** The attempts of a request to it alone (no alias): itself, made once. */
  plan: Attempt[];
  /**
   * The headers every request to it carries but the key: its extra headers and the relay's own, made once, by
   * lower-case name. A plain record: Deno converts one without the iterator a list of pairs costs per header.
   */
  baseHeaders: Record<string, string>;
};

/** Options for `createHandler` that are not configuration. */
export interface HandlerOptions {
  /** Receives each finished log line (JSON, no trailing newline); defaults to stdout. */
  log?: (line: string) => void;
  /** The clock for rate limits, in milliseconds; tests pass one they control. */
  now?: () => number;
  /** Where the handler counts; pass one to serve it elsewhere too (METRICS_PORT). */
  metrics?: RelayMetrics;
  /** Where limits and lockouts are counted; in process memory unless given. */
  counters?: CounterStore;
  /** The longest a request body may go without a byte (10 s, BODY_IDLE_MS); tests shorten it. */
  bodyIdleMs?: number;
}

/** A `Deno.serve` handler. */
export type RelayHandler = (request: Request, info: Deno.ServeHandlerInfo) => Promise<Response>;

/** What the stages share across requests: the config and everything built from it once. */
interface Relay {
  readonly config: RelayConfig;
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  readonly counters: CounterStore;
  readonly routes: Record<string, Route>;
  readonly allowedOrigins: Set<string>;
  /** The host names the relay knows it serves (`servedHostNames`): only these can be its own page's origin. */
  readonly servedHosts: Set<string>;
  /** PUBLIC_URL's origin, e.g. `https://relay.example.com`: the relay's own page whatever Host a proxy sends. */
  readonly publicOrigin?: string;
  readonly upstreams: UpstreamTarget[];
  readonly upstreamsByName: Map<string, UpstreamTarget>;
  /** The configured users by name. */
  readonly usersByName: Map<string, RelayUser>;
  /** The request limits that are on (RATE_LIMIT_PER_*), each a token bucket. */
  readonly requestLimits: RequestLimit[];
  /** The clock for limits and budget windows, in milliseconds. */
  readonly now: () => number;
  /** ALLOWED_MODELS as a set; empty allows any model. */
  readonly allowedModels: Set<string>;
  /** The token bucket of failed sign-ins (AUTH_FAILURES_PER_MINUTE). */
  readonly signInRule: BucketRule;
  /** True when some user has a hashed password: then every failed sign-in costs a decoy hash check. */
  readonly hashedUsers: boolean;

  /**
   * The user these `name:password` credentials from `address` belong to, if any; HASHING_BUSY when checks are
   * saturated, ADDRESS_BUSY when the address has its share of them.
   */
  authenticate(
    credentials: string,
    address: string,
  ): Promise<string | undefined | typeof HASHING_BUSY | typeof ADDRESS_BUSY>;
  /** The text with every configured secret masked; undefined when a secret shows in a form it cannot mask. */
  maskSecrets(text: string): string | undefined;
  /** A response header's value, or `[REDACTED]` when it holds a configured secret in any form. */
  maskHeaderValue(value: string): string;
  /** The configured secrets an upstream might echo: keys and extra header values. */
  readonly upstreamSecrets: string[];
  /** Seals and opens callers' keys (SEAL_SECRET); undefined without one. */
  readonly sealer?: KeySealer;
  /** True when some upstream is BYOK: then a bearer token that names no user is the caller's own key. */
  readonly byok: boolean;
  /** The circuit breakers of the aliases' targets. */
  readonly breakers: CircuitBreakers;
  /** Request bodies held at once (MAX_BUFFERED_BYTES). */
  readonly bodyBudget: ByteBudget;
  /** What bounds the reading of each request body. */
  readonly bodyLimits: BodyLimits;
}

/**
 * What a stage decides: a `Response` ends the request, undefined passes it to the next stage. A stage returns a
 * promise only when it has waiting to do (a store, a hash, a body, the upstream): each promise costs the request
 * an allocation and a turn of the microtask queue, so a stage with nothing to do for a request decides at once.
 */
type StageAnswer = Response | undefined | Promise<Response | undefined>;

/** One stage of the handler. */
type Stage = (relay: Relay, context: RequestContext) => StageAnswer;

/**
 * The stages every request passes, in this order. The first one that returns a `Response` ends the
 * request; `relayResponse` always does. `account` runs after the last, or when a relayed body ends.
 */
const STAGES: Stage[] = [
  checkHost,
  checkOrigin,
  answerPreflight,
  matchRoute,
  onRoute("/health", answerHealth),
  onRoute("/mc-settings.json", answerMcSettings),
  onRoute("/", answerPage),
  onRoute("/seal", answerSeal),
  identifyCaller,
  onRoute("/usage", answerUsage),
  onRoute("/metrics", answerMetrics),
  applyLimits,
  readRequestBody,
  chooseUpstream,
  useCallerKey,
  checkModel,
  capAnswerTokens,
  reserveTokens,
  requestUsage,
  forwardRequest,
  relayResponse,
];

/**
 * A stage that answers one route of the relay's own: requests for any other path pass it without a call (and
 * without the promise an async stage would make for them).
 */
function onRoute(path: string, stage: Stage): Stage {
  return (relay, context) => context.routePath === path ? stage(relay, context) : undefined;
}

/**
 * Builds the relay's request handler from a validated config: the stages in `STAGES` over one
 * `RequestContext` per request, then `account` for the log line and metrics. An exception in a stage is
 * answered with a 500 naming the request id (the details go to the log, never to the client).
 */
export function createHandler(config: RelayConfig, options: HandlerOptions = {}): RelayHandler {
  const relay = createRelay(config, options);
  return async (request, info) => {
    const context = newContext(relay, request, info);
    let response: Response | undefined;
    try {
      for (let index = 0; index < STAGES.length; index++) {
        const answer = STAGES[index](relay, context);
        // Most stages decide at once (see StageAnswer): only a promise is awaited.
        response = answer instanceof Promise ? await answer : answer;
        if (response !== undefined) break;
      }
    } catch (error) {
      context.error = errorText(error);
      context.outcome = "relay_error";
      response = undefined;
    }
    response ??= errorResponse(500, `internal error (request id ${context.id}); see the relay's log`, "relay_error");
    context.status = response.status;
    if (!context.headersSet) {
      // A response the relay made itself: it carries its length (0 for none).
      context.bytesOut = Number(response.headers.get("content-length") ?? 0);
      const added = addRelayHeaders({}, context.id, context.cors);
      for (const name in added) response.headers.set(name, added[name]);
    }
    if (!context.logWhenBodyEnds) account(relay, context);
    return response;
  };
}

/** Builds what the stages share from the config: routes, upstream targets, sign-in checks, counters. */
function createRelay(config: RelayConfig, options: HandlerOptions): Relay {
  const routes: Record<string, Route> = { ...ROUTES };
  if (config.metricsUsers.length > 0) routes["/metrics"] = { method: "GET" };
  for (const path of config.disabledPaths) delete routes[path];
  if (!config.page) delete routes["/"];
  if (config.sealSecret === undefined) delete routes["/seal"];
  const upstreams = config.upstreams.map((upstream) => {
    const target: UpstreamTarget = {
      ...upstream,
      // Lower case like every other header name the relay sends, once, not per request.
      authHeader: upstream.authHeader.toLowerCase(),
      host: new URL(upstream.baseUrl).host,
      authValue: upstream.authPrefix ? `${upstream.authPrefix} ${upstream.apiKey}` : upstream.apiKey,
      plan: [],
      // Ask for bodies as the upstream has them, so they pass through byte for byte.
      baseHeaders: Object.fromEntries([
        ...Object.entries(upstream.extraHeaders).map(([name, value]) => [name.toLowerCase(), value]),
        ["accept-encoding", "identity"],
        ["user-agent", `mc-relay/${VERSION}`],
      ]),
    };
    target.plan.push({ target, label: upstream.name });
    return target;
  });
  const upstreamSecrets = upstreams.flatMap((upstream) => [upstream.apiKey, ...Object.values(upstream.extraHeaders)])
    .filter(Boolean);
  const masker = createSecretMasker(upstreamSecrets);
  const now = options.now ?? Date.now;
  const metrics = options.metrics ?? new RelayMetrics();
  const log = createLogger(config, options.log);
  for (const targets of Object.values(config.modelAliases)) {
    for (const label of targets) metrics.breakerOpen.set(label, 0);
  }
  return {
    config,
    log,
    metrics,
    counters: options.counters ?? new MemoryCounterStore(options.now),
    routes,
    allowedOrigins: new Set(config.allowedOrigins),
    servedHosts: servedHostNames(config),
    publicOrigin: config.publicUrl && new URL(config.publicUrl).origin,
    upstreams,
    upstreamsByName: new Map(upstreams.map((upstream) => [upstream.name, upstream])),
    allowedModels: new Set(config.allowedModels),
    signInRule: { capacity: config.authFailuresPerMinute, periodMs: 60_000 },
    usersByName: new Map(config.users.map((user) => [user.name, user])),
    requestLimits: requestLimits(config),
    now,
    authenticate: createAuthenticator(config.users, metrics),
    hashedUsers: config.users.some((user) => user.hash !== undefined),
    bodyBudget: new ByteBudget(config.maxBufferedBytes, config.maxRequestBytes),
    bodyLimits: {
      maxRequestBytes: config.maxRequestBytes,
      requestTimeoutMs: config.requestTimeoutMs,
      idleMs: Math.min(options.bodyIdleMs ?? BODY_IDLE_MS, config.requestTimeoutMs),
    },
    maskSecrets: masker.mask,
    maskHeaderValue: masker.maskHeaderValue,
    upstreamSecrets,
    sealer: config.sealSecret === undefined
      ? undefined
      : new KeySealer([config.sealSecret, ...config.sealSecretsPrevious], now),
    byok: upstreams.some((upstream) => upstream.byok),
    breakers: new CircuitBreakers(config.breakerFailures, config.breakerOpenMs, now, (label, open) => {
      metrics.breakerOpen.set(label, open ? 1 : 0);
      if (open) log.warn("breaker open: target skipped", { target: label, seconds: config.breakerOpenMs / 1000 });
      else log.info("breaker closed: target answers again", { target: label });
    }),
  };
}

/** A fresh context for one request: its id, its client's address, and the CORS headers its origin gets. */
function newContext(relay: Relay, request: Request, info: Deno.ServeHandlerInfo): RequestContext {
  const host = request.headers.get("host");
  const validHost = host === null || VALID_HOST.test(host);
  // Deno builds request.url from Host and the request target: only a valid Host keeps the path the target's.
  const url = new URL(validHost ? request.url : "http://invalid-host/");
  const path = url.pathname;
  const origin = request.headers.get("origin");
  return {
    request,
    url,
    origin,
    cors: origin !== null && relay.allowedOrigins.has(origin) ? corsHeaders(origin) : NO_CORS,
    completed: info.completed,
    id: crypto.randomUUID(),
    method: request.method.slice(0, 16),
    path: path.length > 200 ? `${path.slice(0, 200)}...` : path,
    client: clientAddress(request, info, relay.config.trustProxy),
    startedAt: performance.now(),
    bodyChanged: false,
    target: relay.upstreams[0],
    bytesIn: 0,
    bytesOut: 0,
    heldBytes: 0,
    bodyHolder: undefined,
    validHost,
    // Every field a stage may set, set here: one object of one shape per request, not one grown field by field.
    route: undefined,
    routePath: undefined,
    alias: undefined,
    attempts: undefined,
    callerKey: undefined,
    upstreamAuth: undefined,
    masker: undefined,
    user: undefined,
    subject: undefined,
    inFlightKey: undefined,
    inFlightStore: undefined,
    answerTokens: undefined,
    reservations: undefined,
    body: undefined,
    payload: undefined,
    usageWatch: undefined,
    upstreamCall: undefined,
    stopWatchingClient: undefined,
    clientGone: undefined,
    forwarded: undefined,
    events: undefined,
    upstreamResponse: undefined,
    status: undefined,
    upstreamStatus: undefined,
    upstream: undefined,
    model: undefined,
    usage: undefined,
    outcome: undefined,
    error: undefined,
    logWhenBodyEnds: undefined,
    headersSet: undefined,
  };
}

/** The CORS headers of a request from no allowed origin: none (one object, never changed). */
const NO_CORS: Record<string, string> = Object.freeze({});

/** A Host header: a name, an IPv4 address or a bracketed IPv6 address, with an optional port. */
const VALID_HOST = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$/;

/**
 * ALLOWED_MODELS: whether `model` may be used on `upstreamName`. An entry whose part before the first `/` names
 * an upstream (`openai/gpt-4o`) allows that model on that upstream only; any other entry (`gpt-4o`,
 * `meta-llama/Llama-3`) allows that model on every upstream.
 */
function modelAllowed(relay: Relay, upstreamName: string, model: string): boolean {
  if (relay.allowedModels.size === 0) return true;
  if (relay.allowedModels.has(`${upstreamName}/${model}`)) return true;
  const slash = model.indexOf("/");
  const namesUpstream = slash > 0 && relay.upstreamsByName.has(model.slice(0, slash));
  return !namesUpstream && relay.allowedModels.has(model);
}

/**
 * Masks configured secrets (provider keys, extra header values of 8 characters or more) in what an upstream
 * sends back. It knows the forms a server may echo a key in: as it is, JSON-escaped (`\\/`, `\\u002d`: a JSON
 * body is parsed and every string masked), URL-encoded, and in base64 at any alignment. Text that still
 * reveals a secret once unescaped gets `undefined`: the caller replaces it rather than pass it on.
 */
function createSecretMasker(rawSecrets: string[]) {
  const secrets = [...new Set(rawSecrets.filter((secret) => secret.length >= 8))];
  const forms = [...new Set(secrets.flatMap(secretForms))].sort((a, b) => b.length - a.length);
  const anyForm = forms.length === 0
    ? undefined
    : new RegExp(forms.map((form) => form.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"));
  const replaceForms = (text: string) => forms.reduce((masked, form) => masked.replaceAll(form, "[REDACTED]"), text);
  const maskValue = (value: unknown): unknown => {
    if (typeof value === "string") return replaceForms(value);
    if (Array.isArray(value)) return value.map(maskValue);
    if (typeof value === "object" && value !== null) {
      return Object.fromEntries(Object.entries(value).map(([key, inner]) => [replaceForms(key), maskValue(inner)]));
    }
    return value;
  };
  const reveals = (text: string) => {
    const unescaped = text.replace(/\\u([0-9a-fA-F]{4})/g, (_, hex) => String.fromCharCode(parseInt(hex, 16)))
      .replaceAll("\\/", "/");
    let decoded = text;
    try {
      decoded = decodeURIComponent(text.replaceAll("+", " "));
    } catch {
      // not URL-encoded text
    }
    return secrets.some((secret) => unescaped.includes(secret) || decoded.includes(secret));
  };
  return {
    mask(text: string): string | undefined {
      if (secrets.length === 0) return text;
      let masked = text;
      const parsed = parseJsonText(text);
      if (typeof parsed === "object" && parsed !== null) {
        const deep = JSON.stringify(maskValue(parsed));
        if (deep !== JSON.stringify(parsed)) masked = deep;
      }
      masked = replaceForms(masked);
      return reveals(masked) ? undefined : masked;
    },
    maskHeaderValue(value: string): string {
      if (anyForm === undefined) return value;
      // One regex test per header; the unescaping check only where escapes could hide a secret.
      const hidden = (value.includes("%") || value.includes("\\")) && reveals(value);
      return hidden || anyForm.test(value) ? "[REDACTED]" : value;
    },
  };
}

/** The forms a secret may take in text: as it is, JSON- and URL-escaped, and base64 (standard and URL-safe). */
function secretForms(secret: string): string[] {
  const forms = [secret, JSON.stringify(secret).slice(1, -1), secret.replaceAll("/", "\\/")];
  const encoded = encodeURIComponent(secret);
  forms.push(encoded, encoded.replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase()));
  const bytes = textEncoder.encode(secret);
  for (let shift = 0; shift < 3; shift++) {
    // Base64 of the secret after `shift` other bytes: drop the groups that the bytes around it change.
    const padded = new Uint8Array(shift + bytes.length);
    padded.set(bytes, shift);
    const base64 = btoa(String.fromCharCode(...padded)).replace(/=+$/, "");
    const core = base64.slice(shift === 0 ? 0 : 4, base64.length - 4);
    if (core.length >= 8) forms.push(core, core.replaceAll("+", "-").replaceAll("/", "_"));
  }
  return forms;
}

/** What `authenticate` answers when the password hashing queue is full. */
const HASHING_BUSY = Symbol("hashing busy");

/** What `authenticate` answers when the caller's address already has its share of the hashing queue. */
const ADDRESS_BUSY = Symbol("address busy");

/** PBKDF2 checks that run at once (one per core here) and that may wait for a turn; past that, 503. */
const HASH_CHECKS_AT_ONCE = 2;
const HASH_CHECKS_WAITING = 32;

/**
 * One address's share of the hashing queue: at most this many of its checks in the queue (running or waiting), and
 * this many more waiting behind them for the address's own turn; past that, 429. So one address takes at most a
 * sixteenth of the queue, and its own burst (a team's first sign-ins behind one NAT) is checked in turn, not refused.
 */
const HASH_CHECKS_PER_ADDRESS = 2;
const HASH_CHECKS_WAITING_PER_ADDRESS = 16;

/**
 * Checks `name:password` credentials, from a client address, against the users. A hashed password costs a PBKDF2
 * run (about 80 ms of CPU): a success is remembered for this process under a salted SHA-256 of the credentials, so
 * a signed-in user pays it once and never queues behind a flood of guesses. Failures are never remembered. At most
 * HASH_CHECKS_AT_ONCE checks run at once, and one address holds at most HASH_CHECKS_PER_ADDRESS places of the
 * queue, so a flood of guesses from one address cannot turn away other addresses' sign-ins. When hashed users
 * exist, every failure costs one PBKDF2 run (an unknown name, a wrong plain password: against a decoy hash), so
 * the time of an answer does not tell which names exist nor which have plain passwords.
 */
function createAuthenticator(
  users: RelayUser[],
  metrics: RelayMetrics,
): (credentials: string, address: string) => Promise<string | undefined | typeof HASHING_BUSY | typeof ADDRESS_BUSY> {
  const usersByName = new Map(users.map((user) => [user.name, user]));
  const verifiedHashes = new Map<string, true>();
  const cachePepper = crypto.getRandomValues(new Uint8Array(16)).join(",");
  const hashed = users.flatMap((user) => user.hash ? [user.hash] : []);
  const decoy: PasswordHash | undefined = hashed.length === 0 ? undefined : {
    iterations: Math.max(...hashed.map((hash) => hash.iterations)),
    salt: crypto.getRandomValues(new Uint8Array(16)),
    hash: crypto.getRandomValues(new Uint8Array(32)),
  };
  const hashChecks = new Semaphore(HASH_CHECKS_AT_ONCE, HASH_CHECKS_WAITING);
  const shares = new KeyedSemaphore(HASH_CHECKS_PER_ADDRESS, HASH_CHECKS_WAITING_PER_ADDRESS);
  const checkHash = async (secret: string, hash: PasswordHash, address: string) => {
    if (!shares.tryAcquire(address)) return ADDRESS_BUSY;
    try {
      await shares.turn(address);
      if (!hashChecks.tryAcquire()) return HASHING_BUSY;
      await hashChecks.turn();
      metrics.hashChecks++;
      try {
        return await verifyPasswordHash(secret, hash);
      } finally {
        hashChecks.release();
      }
    } finally {
      shares.release(address);
    }
  };
  /** A failed sign-in: with hashed users, one decoy check first (its answer is a failure whatever it finds). */
  const failure = async (secret: string, address: string) => {
    if (decoy === undefined) return undefined;
    const checked = await checkHash(secret, decoy, address);
    return typeof checked === "symbol" ? checked : undefined;
  };
  return async (credentials, address) => {
    const colon = credentials.indexOf(":");
    const name = credentials.slice(0, colon);
    const secret = credentials.slice(colon + 1);
    const user = usersByName.get(name);
    if (user === undefined) {
      if (decoy === undefined) void constantTimeEqual(secret, cachePepper); // the cost of comparing a plain password
      return await failure(secret, address);
    }
    if (user.password !== undefined) {
      return constantTimeEqual(secret, user.password) ? name : await failure(secret, address);
    }
    const digest = new Uint8Array(
      await crypto.subtle.digest("SHA-256", textEncoder.encode(`${cachePepper}:${credentials}`)),
    ).join(",");
    if (verifiedHashes.has(digest)) return name;
    const checked = await checkHash(secret, user.hash!, address);
    if (checked !== true) return typeof checked === "symbol" ? checked : undefined;
    if (verifiedHashes.size >= 10_000) verifiedHashes.delete(verifiedHashes.keys().next().value!);
    verifiedHashes.set(digest, true);
    return name;
  };
}

/** A counting semaphore with a bounded queue: `tryAcquire` reserves a place, `turn` waits for it, `release` ends it. */
class Semaphore {
  #running = 0;
  #waiting: (() => void)[] = [];
  #reserved = 0;

  constructor(readonly atOnce: number, readonly maxWaiting: number) {}

  /** Reserves a place; false when as many are running and waiting as allowed. */
  tryAcquire(): boolean {
    if (this.#reserved >= this.atOnce + this.maxWaiting) return false;
    this.#reserved++;
    return true;
  }

  /** Resolves when the reserved place may run. */
  turn(): Promise<void> {
    if (this.#running < this.atOnce) {
      this.#running++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /** True when no place is reserved. */
  get idle(): boolean {
    return this.#reserved === 0;
  }

  /** Ends a running place and lets the next waiting one run. */
  release(): void {
    this.#reserved--;
    const next = this.#waiting.shift();
    if (next) next();
    else this.#running--;
  }
}

/**
 * One `Semaphore` per key (a client address), made on first use and forgotten once it holds nothing: memory
 * follows the checks in progress, not the addresses ever seen.
 */
class KeyedSemaphore {
  #semaphores = new Map<string, Semaphore>();

  constructor(readonly atOnce: number, readonly maxWaiting: number) {}

  /** Reserves a place for `key`; false when its places are all taken. A true must be ended with `release`. */
  tryAcquire(key: string): boolean {
    let semaphore = this.#semaphores.get(key);
    if (semaphore === undefined) {
      semaphore = new Semaphore(this.atOnce, this.maxWaiting);
      this.#semaphores.set(key, semaphore);
    }
    return semaphore.tryAcquire();
  }

  /** Resolves when `key`'s reserved place may run. */
  turn(key: string): Promise<void> {
    return this.#semaphores.get(key)!.turn();
  }

  /** Ends `key`'s place once its turn has come. */
  release(key: string): void {
    const semaphore = this.#semaphores.get(key)!;
    semaphore.release();
    if (semaphore.idle) this.#semaphores.delete(key);
  }
}

// ---------------------------------------------------------------------------
// Stages: from the origin check to the relayed response
// ---------------------------------------------------------------------------

/** Stage: request target. A Host header that is not a host name (it could move the path or query) gets 400. */
function checkHost(_relay: Relay, context: RequestContext): Response | undefined {
  if (context.validHost) return undefined;
  context.outcome = "invalid_host";
  return errorResponse(400, "the Host header must be a host name or address with an optional port", "invalid_host");
}

/** Host names no resolver is asked about: an IPv4 address as browsers write it, or an IPv6 one in brackets. */
const ADDRESS_LITERAL = /^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\])$/;

/**
 * The host names the relay knows it serves, lowercased as a URL has them: the loopback names, PUBLIC_URL's host,
 * and HOST unless it listens everywhere (0.0.0.0, ::), where it names nothing. A DNS name outside these may point
 * at the relay for a moment only (DNS rebinding), so it is never taken for the relay's own.
 */
function servedHostNames(config: RelayConfig): Set<string> {
  const names = new Set(["localhost", "127.0.0.1", "[::1]"]);
  if (config.publicUrl) names.add(new URL(config.publicUrl).hostname);
  const host = config.host.toLowerCase().replace(/^([0-9a-f:]*:[0-9a-f:.]*)$/, "[$1]");
  if (host !== "" && host !== "0.0.0.0" && host !== "[::]") names.add(host);
  return names;
}

/**
 * Whether the request comes from a page of the relay's own origin (its page at /). A browser never lets another page
 * send that Origin, but the Host it sends is whatever name the page was loaded from: a page of an attacker's name
 * that resolves to the relay a moment later (DNS rebinding) sends an Origin matching its Host too. So the Origin
 * is the relay's own when it is PUBLIC_URL's, or when it matches the Host and that Host is a name the relay knows
 * it serves (`servedHostNames`) or an address literal, which no DNS answer can rebind.
 */
function isSameOrigin(relay: Relay, context: RequestContext): boolean {
  if (context.origin === null) return false;
  if (context.origin === relay.publicOrigin) return true;
  let url: URL;
  try {
    url = new URL(context.origin);
  } catch {
    return false;
  }
  if (url.host !== context.request.headers.get("host")?.toLowerCase()) return false;
  return relay.servedHosts.has(url.hostname) || ADDRESS_LITERAL.test(url.hostname);
}

/**
 * Stage: origin. A browser origin that is not in ALLOWED_ORIGIN (nor the relay's own page, `isSameOrigin`) gets 403 without CORS
 * headers, so the page cannot read it, and nothing reaches the upstream. Requests without Origin (servers, curl)
 * pass on.
 */
function checkOrigin(relay: Relay, context: RequestContext): Response | undefined {
  if (context.origin === null || relay.allowedOrigins.has(context.origin) || isSameOrigin(relay, context)) {
    return undefined;
  }
  return errorResponse(
    403,
    `origin ${context.origin} is not allowed; add it to ALLOWED_ORIGIN`,
    "origin_not_allowed",
  );
}

/** Stage: preflight. An OPTIONS request on any path is answered here, before credentials are asked for. */
function answerPreflight(_relay: Relay, context: RequestContext): Response | undefined {
  if (context.request.method !== "OPTIONS") return undefined;
  const headers = context.origin ? preflightHeaders(context.origin, context.request) : { allow: "GET, POST, OPTIONS" };
  return new Response(null, { status: 204, headers });
}

/** Stage: route. Only the paths in the route table exist (404 otherwise), each with one method (405 otherwise). */
function matchRoute(relay: Relay, context: RequestContext): Response | undefined {
  const { basePath } = relay.config;
  const full = context.url.pathname;
  const inside = basePath === "" || full === basePath || full.startsWith(`${basePath}/`);
  const pathname = inside ? full.slice(basePath.length) || "/" : "";
  const route = Object.hasOwn(relay.routes, pathname) ? relay.routes[pathname] : undefined;
  if (!route) {
    // The path is not repeated: an answer must not tell whether a guessed path matched a secret.
    const served = Object.keys(relay.routes).map((path) => `${basePath}${path}`).join(", ");
    return errorResponse(404, `unknown path; the relay serves ${served}`, "unknown_url");
  }
  if (context.request.method !== route.method) {
    return errorResponse(
      405,
      `${context.request.method} is not allowed on ${pathname}; use ${route.method}`,
      "method_not_allowed",
      { allow: `${route.method}, OPTIONS` },
    );
  }
  context.route = route;
  context.routePath = pathname;
  return undefined;
}

/**
 * Stage: GET /health answers without credentials: `ok`, how many upstreams there are (as MC's relay does), and
 * the counter store's `state` (`degraded` while Redis is unreachable: still 200, the relay still serves).
 */
function answerHealth(relay: Relay, _context: RequestContext): Response | undefined {
  return jsonResponse({
    status: "ok",
    ok: true,
    endpoints: relay.upstreams.length,
    state: relay.counters.state ?? "ok",
    ...(Object.keys(relay.config.modelAliases).length > 0 && { breakers_open: relay.breakers.open() }),
  });
}

/**
 * Stage: identity. Checks `username:password`: 401 when it is missing or wrong. Wrong guesses are limited per
 * user name and client address (AUTH_FAILURES_PER_MINUTE): a check starts only while the allowance left is larger
 * than the checks already running for that name and address (`admitSignInCheck`), and only a wrong password uses
 * the allowance up. So at most the allowance of wrong guesses is ever checked, however many arrive at once, while
 * any number of right ones pass; and one client cannot lock out other users behind the same address. Once the
 * allowance is used up, the right password waits too (429): otherwise guessing would simply go on. 503 when
 * password hashing is saturated. With PUBLIC_ACCESS, credentials that name no configured user are anonymous.
 */
function identifyCaller(relay: Relay, context: RequestContext): StageAnswer {
  const authorization = context.request.headers.get("authorization");
  const read = readCredentials(authorization);
  const name = "credentials" in read ? read.credentials.slice(0, read.credentials.indexOf(":")) : "";
  const apiKeyHeader = context.request.headers.get("x-api-key")?.trim() || undefined;
  // No relay user: with PUBLIC_ACCESS (credentials naming no configured user; MC's public preset sends "Bearer "
  // with nothing, or a key typed once for another provider) or, with BYOK upstreams, a token without a colon (a
  // provider key; `name:password` is always checked as relay credentials, so names cannot be told apart). Counted
  // by address; the header is never logged, nor forwarded anywhere but to a BYOK upstream the caller chose, where
  // `useCallerKey` checks it.
  const anonymous = relay.config.publicAccess && !relay.usersByName.has(name);
  if (anonymous || (relay.byok && !("credentials" in read))) {
    context.subject = `address:${addressKey(context.client)}`;
    const token = bearerToken(authorization);
    if (relay.byok) context.callerKey = apiKeyHeader ?? (token?.includes(":") ? undefined : token);
    return undefined;
  }
  const guessKey = `sign-in:${addressKey(context.client)}:${name.slice(0, 64)}`;
  const known = relay.usersByName.get(name);
  if (relay.counters.synchronous && known?.password !== undefined && "credentials" in read) {
    return signInWithPlainPassword(relay, context, read.credentials, known, guessKey, apiKeyHeader);
  }
  return checkSignIn(relay, context, read, guessKey, apiKeyHeader);
}

/**
 * The general sign-in: admitted past the lockout (`admitSignInCheck`), the password checked (a hash takes its
 * time), a wrong guess counted, the admission given back whatever happens.
 */
async function checkSignIn(
  relay: Relay,
  context: RequestContext,
  read: ReturnType<typeof readCredentials>,
  guessKey: string,
  apiKeyHeader: string | undefined,
): Promise<Response | undefined> {
  const admitted = await admitSignInCheck(relay, context, guessKey);
  if (admitted instanceof Response) return admitted;
  let user: Awaited<ReturnType<Relay["authenticate"]>>;
  try {
    user = "credentials" in read ? await relay.authenticate(read.credentials, addressKey(context.client)) : undefined;
    // A wrong guess uses its allowance before its check ends: a check waiting for the place sees the allowance
    // already smaller, so no more checks run than there are guesses left.
    if (user === undefined) await relay.counters.take(guessKey, relay.signInRule);
  } finally {
    await giveBack(relay.counters, admitted, (store) => store.add(`${guessKey}:checking`, -1));
  }
  if (user === undefined) {
    return signInRefused(context, "problem" in read ? read.problem : "wrong username or password");
  }
  if (typeof user === "symbol") return hashingBusy(context, user);
  return signedIn(context, user, apiKeyHeader);
}

/**
 * The answer when a sign-in found no place to be checked: 429 when its address has its share of the hashing queue
 * (it is that address that sends too many), 503 when the whole queue is full.
 */
function hashingBusy(context: RequestContext, busy: typeof HASHING_BUSY | typeof ADDRESS_BUSY): Response {
  if (busy === ADDRESS_BUSY) {
    context.outcome = "sign_in_address_busy";
    return errorResponse(
      429,
      "too many sign-ins from this address are being checked at once; try again in a second",
      "too_many_sign_ins",
      { "retry-after": "1" },
    );
  }
  context.outcome = "sign_in_busy";
  return errorResponse(503, "too many sign-ins are being checked; try again in a second", "relay_busy", {
    "retry-after": "1",
  });
}

/**
 * The sign-in of a user with a plain password when the counters answer at once: the lockout look, the comparison
 * and the count of a wrong guess run as one step, so no other check can slip in between and nothing needs
 * admitting. Same answers as `identifyCaller`'s general path.
 */
function signInWithPlainPassword(
  relay: Relay,
  context: RequestContext,
  credentials: string,
  user: RelayUser,
  guessKey: string,
  apiKeyHeader: string | undefined,
): StageAnswer {
  const lockedFor = relay.counters.wait(guessKey, relay.signInRule) as number;
  if (lockedFor > 0) {
    return lockedOut(context, lockedFor);
  }
  if (!constantTimeEqual(credentials.slice(user.name.length + 1), user.password!)) {
    relay.counters.take(guessKey, relay.signInRule);
    if (!relay.hashedUsers) return signInRefused(context, "wrong username or password");
    // Counted above, in the same step as the look; the answer then waits for the decoy check an unknown name
    // costs, so a wrong plain password cannot be told from an unknown name by its time.
    return relay.authenticate(credentials, addressKey(context.client)).then((failed) =>
      typeof failed === "symbol" ? hashingBusy(context, failed) : signInRefused(context, "wrong username or password")
    );
  }
  return signedIn(context, user.name, apiKeyHeader);
}

/** The answer while a user name's guesses from an address are used up: 429 with Retry-After. */
function lockedOut(context: RequestContext, seconds: number): Response {
  context.outcome = "auth_locked_out";
  return errorResponse(
    429,
    `too many failed sign-ins for this user from this address; try again in ${seconds} s`,
    "too_many_failed_sign_ins",
    { "retry-after": String(seconds) },
  );
}

/** A refused sign-in: 401, with a Basic challenge only for non-browser clients (a browser would pop up a dialog). */
function signInRefused(context: RequestContext, message: string): Response {
  const challenge: Record<string, string> = context.origin === null
    ? { "www-authenticate": 'Basic realm="mc-relay", charset="UTF-8"' }
    : {};
  return errorResponse(401, message, "invalid_api_key", challenge);
}

/** Records a signed-in user; a key it brings for a BYOK upstream comes in X-Api-Key. */
function signedIn(context: RequestContext, user: string, apiKeyHeader: string | undefined): undefined {
  context.user = user;
  context.subject = `user:${user}`;
  context.callerKey = apiKeyHeader;
  return undefined;
}

/** How long a sign-in waits for the checks running for its name and address before it gets 503. */
const SIGN_IN_WAIT_MS = 2000;

/**
 * Lets a sign-in check start when the guesses left for its name and address outnumber the checks already
 * running (counted in `<key>:checking`, which the caller gives back, to the store this answers, afterwards); waits
 * while only running checks fill the allowance. A used-up allowance answers 429 with Retry-After.
 */
async function admitSignInCheck(
  relay: Relay,
  context: RequestContext,
  guessKey: string,
): Promise<Response | CounterStore> {
  for (const started = performance.now(); performance.now() - started < SIGN_IN_WAIT_MS;) {
    // A safety expiry: places held by a copy that died free themselves within a minute.
    const { value: start, store } = await hold(
      relay.counters,
      (counters) => startCheck(counters, guessKey, relay.signInRule, relay.now() + 60_000),
      (counters, start) => "started" in start ? counters.add(`${guessKey}:checking`, -1) : undefined,
    );
    if ("started" in start) return store;
    if ("lockedFor" in start) return lockedOut(context, start.lockedFor);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  context.outcome = "sign_in_busy";
  return errorResponse(503, "too many sign-ins are being checked; try again in a second", "relay_busy", {
    "retry-after": "1",
  });
}

/** One request limit: its variable, its window, its token bucket. */
interface RequestLimit {
  variable: EnvVar;
  window: "minute" | "hour" | "day";
  rule: BucketRule;
}

/** The request limits that are on, shortest window first. */
function requestLimits(config: RelayConfig): RequestLimit[] {
  const limits: RequestLimit[] = [
    {
      variable: "RATE_LIMIT_PER_MINUTE",
      window: "minute",
      rule: { capacity: config.rateLimitPerMinute, periodMs: 60_000 },
    },
    {
      variable: "RATE_LIMIT_PER_HOUR",
      window: "hour",
      rule: { capacity: config.rateLimitPerHour, periodMs: 3_600_000 },
    },
    { variable: "RATE_LIMIT_PER_DAY", window: "day", rule: { capacity: config.rateLimitPerDay, periodMs: 86_400_000 } },
  ];
  return limits.filter((limit) => limit.rule.capacity > 0);
}

/** "this user" or "this address": whom a limit counted, for messages. */
function subjectWords(context: RequestContext): string {
  return context.user === undefined ? "this address" : `user ${context.user}`;
}

/**
 * Several independent store calls of one stage, together: one transaction where the store has them (SQLite), else
 * issued at once, so a shared store (Redis) gets them in one round trip.
 */
function storeCalls<T>(relay: Relay, calls: () => T[]): Promise<Awaited<T>[]> {
  try {
    return Promise.all(relay.counters.batch ? relay.counters.batch(calls) : calls());
  } catch (error) {
    return Promise.reject(error); // a synchronous store's failure arrives like an asynchronous one's
  }
}

/**
 * Stage: limits. RATE_LIMIT_PER_MINUTE, _HOUR and _DAY per signed-in user (so one user cannot use up a team's
 * shared address), or per client address for anonymous requests: each window is a token bucket that refills evenly,
 * and a request takes one event from each. CONCURRENT_REQUESTS per user or address, open streams included: a
 * request takes a place, held until `account` runs, when the response (or its stream) has ended. All are asked in
 * one store call (one SQLite transaction, one Redis round trip); a refusal gives back everything it took: 429 with
 * Retry-After, naming the limit, its window and when one more request is allowed.
 */
function applyLimits(relay: Relay, context: RequestContext): StageAnswer {
  if (relay.requestLimits.length === 0 && relay.config.concurrentRequests === 0) return undefined;
  return takeLimits(relay, context);
}

/** The limits stage's store work: every limit asked at once, everything given back on a refusal. */
async function takeLimits(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { requestLimits } = relay;
  const concurrency = relay.config.concurrentRequests;
  const key = (limit: RequestLimit) => `requests-per-${limit.window}:${context.subject}`;
  const inFlightKey = concurrency === 0 ? undefined : `in-flight:${context.subject}`;
  const { counters } = relay;
  const held = await storeCalls(relay, () => {
    const calls = requestLimits.map((limit) =>
      hold(counters, (store) => store.take(key(limit), limit.rule), (store, waitFor) => {
        if (waitFor === 0) return store.give(key(limit), limit.rule);
      })
    );
    // A safety expiry on the place: should a copy die holding places, they free themselves after a day.
    if (inFlightKey !== undefined) {
      calls.push(hold(
        counters,
        (store) => store.add(inFlightKey, 1, relay.now() + 86_400_000),
        (store) => store.add(inFlightKey, -1),
      ));
    }
    return calls;
  });
  const answers = held.map(({ value }) => value);
  const refusedRate = answers.findIndex((waitFor, index) => index < requestLimits.length && waitFor > 0);
  const refusedPlace = inFlightKey !== undefined && answers[requestLimits.length] > concurrency;
  if (refusedRate === -1 && !refusedPlace) {
    context.inFlightKey = inFlightKey;
    context.inFlightStore = held[requestLimits.length]?.store;
    return undefined;
  }
  // Everything goes back to the store that gave it, even when Redis came or went meanwhile.
  await storeCalls(relay, () => {
    const calls: unknown[] = [];
    requestLimits.forEach((limit, index) => {
      if (answers[index] === 0) {
        calls.push(giveBack(counters, held[index].store, (s) => s.give(key(limit), limit.rule)));
      }
    });
    if (inFlightKey !== undefined) {
      calls.push(giveBack(counters, held[requestLimits.length].store, (store) => store.add(inFlightKey, -1)));
    }
    return calls;
  });
  return refusedRate === -1
    ? tooManyInFlight(context, concurrency)
    : rateLimited(context, requestLimits[refusedRate], answers[refusedRate]);
}

/** The answer when a request window's limit is reached: 429 with Retry-After. */
function rateLimited(context: RequestContext, limit: RequestLimit, waitFor: number): Response {
  context.outcome = "relay_rate_limited";
  return errorResponse(
    429,
    `the relay's limit of ${limit.rule.capacity} requests per ${limit.window} (${limit.variable}) is reached for ${
      subjectWords(context)
    }; one more is allowed in ${waitFor} s`,
    "relay_rate_limit_exceeded",
    { "retry-after": String(waitFor) },
  );
}

/** The answer when CONCURRENT_REQUESTS are in flight already: 429, try again in a second. */
function tooManyInFlight(context: RequestContext, limit: number): Response {
  context.outcome = "relay_concurrency_limited";
  return errorResponse(
    429,
    `${
      subjectWords(context)
    } already has ${limit} requests in flight (CONCURRENT_REQUESTS); try again when one has finished`,
    "relay_concurrency_limit_exceeded",
    { "retry-after": "1" },
  );
}

/**
 * Stage: GET /metrics on the main port, for the users METRICS names only (it shows every user's traffic). Like
 * /usage, a read that does not count against the caller's request limits.
 */
function answerMetrics(relay: Relay, context: RequestContext): Response | undefined {
  if (!relay.config.metricsUsers.includes(context.user!)) {
    return errorResponse(403, "this user may not read /metrics; METRICS names who may", "metrics_not_allowed");
  }
  return metricsResponse(relay.metrics);
}

/**
 * Stage: body checks. A POST body is read whole (413 past MAX_REQUEST_BYTES, 408 when it stalls for 10 s or does
 * not arrive in time, 503 past MAX_BUFFERED_BYTES or the caller's share of it: see `readBody`, `ByteBudget`) and
 * must be one JSON object (400 otherwise): every POST
 * route of the OpenAI API takes one. It is parsed once, and forwarded as the relay serialises it again, so
 * the upstream receives exactly what the relay checked and logs.
 */
function readRequestBody(relay: Relay, context: RequestContext): StageAnswer {
  if (context.request.method !== "POST") return undefined;
  return readJsonBody(relay, context);
}

/** The body stage's reading and checking of a POST body. */
async function readJsonBody(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const read = await readBody(context.request, relay.bodyLimits, reserveBodyBytes(relay, context));
  if ("status" in read) {
    context.outcome = read.outcome;
    return errorResponse(read.status, read.message, read.code, read.headers);
  }
  context.bytesIn = read.body.byteLength;
  const payload = parseJson(read.body);
  const problem = payload === undefined ? "the body must be one JSON object" : jsonBodyProblem(payload);
  if (problem !== undefined) {
    context.outcome = "invalid_body";
    return errorResponse(400, problem, "invalid_request_body");
  }
  context.payload = payload;
  context.bodyChanged = true;
  if (typeof payload!.model === "string") context.model = payload!.model;
  context.usageWatch = { stripUsageEvent: false };
  return undefined;
}

/**
 * What is wrong with a parsed JSON body, if anything: two top-level keys that differ only in case (Go's JSON
 * decoder, behind many upstreams, would read one where the relay read the other), a non-string `model`, or a
 * `stream` that is not true or false.
 */
function jsonBodyProblem(payload: JsonObject): string | undefined {
  const seen = new Set<string>();
  for (const key of Object.keys(payload)) {
    // Go folds case the Unicode way: besides ASCII, "ſ" matches "s" and the Kelvin sign "K" matches "k".
    const folded = key.toLowerCase().replaceAll("ſ", "s");
    if (seen.has(folded)) {
      return `the body has two keys that differ only in case (${
        JSON.stringify(folded.slice(0, 40))
      }); send each key once`;
    }
    seen.add(folded);
  }
  if (payload.model !== undefined && typeof payload.model !== "string") return '"model" must be a string';
  if (payload.stream !== undefined && typeof payload.stream !== "boolean") return '"stream" must be true or false';
  return undefined;
}

/**
 * Stage: upstream choice. A model prefix naming an upstream ("openai/gpt-4o") picks it and is stripped; else
 * MC's X-Relay-Endpoint picks the upstream whose base URL it starts with (400 when none does); else the first.
 * A model list with several upstreams and no choice merges every upstream's list. With a single upstream the
 * operator's configuration decides: X-Relay-Endpoint is ignored.
 */
function chooseUpstream(relay: Relay, context: RequestContext): StageAnswer {
  const { upstreams } = relay;
  if (context.model !== undefined && Object.hasOwn(relay.config.modelAliases, context.model)) {
    // An alias: `forwardRequest` tries its targets in order; the first one stands for the checks until then.
    context.alias = context.model;
    context.attempts = [];
    const [first] = attemptPlan(relay, context);
    context.target = first.target;
    return undefined;
  }
  const endpoint = context.request.headers.get("x-relay-endpoint")?.trim().replace(/\/+$/, "");
  const serves = (upstream: UpstreamTarget) =>
    endpoint === upstream.baseUrl || endpoint!.startsWith(`${upstream.baseUrl}/`);
  if (upstreams.length === 1) {
    if (!endpoint || serves(upstreams[0])) return undefined;
    context.outcome = "unknown_upstream";
    return errorResponse(
      400,
      `X-Relay-Endpoint ${JSON.stringify(endpoint.slice(0, 200))} is not the endpoint this relay serves (${
        upstreams[0].baseUrl
      }); set MC's endpoint to it, or use a relay for that provider`,
      "unknown_upstream",
    );
  }
  const model = context.model;
  const slash = model?.indexOf("/") ?? -1;
  const byModel = slash > 0 ? relay.upstreamsByName.get(model!.slice(0, slash)) : undefined;
  if (byModel) {
    context.target = byModel;
    context.model = model!.slice(slash + 1);
    context.payload!.model = context.model;
    context.bodyChanged = true;
  } else if (endpoint) {
    const byEndpoint = upstreams.find(serves);
    if (!byEndpoint) {
      context.outcome = "unknown_upstream";
      return errorResponse(
        400,
        `X-Relay-Endpoint ${JSON.stringify(endpoint.slice(0, 200))} matches none of this relay's upstreams (${
          upstreams.map((upstream) => upstream.name).join(", ")
        }); set MC's endpoint to one of their base URLs`,
        "unknown_upstream",
      );
    }
    context.target = byEndpoint;
  } else if (context.route!.upstreamPath === "/models") {
    return mergedModels(relay, context);
  }
  context.upstream = context.target.name;
  return undefined;
}

/**
 * Stage: model allow-list. With ALLOWED_MODELS, a body without an allowed model gets 400 before the upstream, and so
 * does one whose OpenRouter `models` (the fallbacks OpenRouter tries when `model` fails) names a model that is not
 * allowed on every upstream the request may go to. `route` only says how OpenRouter uses `models`: it passes.
 */
function checkModel(relay: Relay, context: RequestContext): Response | undefined {
  if (context.payload === undefined || relay.allowedModels.size === 0) return undefined;
  const fallbacks = fallbackModelsProblem(relay, context);
  if (fallbacks !== undefined) {
    context.outcome = "model_not_allowed";
    return errorResponse(400, fallbacks, "model_not_allowed");
  }
  const model = context.model;
  if (context.alias !== undefined && (relay.allowedModels.has(context.alias))) return undefined;
  if (context.alias === undefined && model !== undefined && modelAllowed(relay, context.target.name, model)) {
    return undefined;
  }
  context.outcome = "model_not_allowed";
  return errorResponse(
    400,
    model === undefined
      ? 'this relay needs a JSON body with a "model" (ALLOWED_MODELS is set)'
      : `model ${JSON.stringify(model.slice(0, 100))} is not allowed here; allowed: ${
        relay.config.allowedModels.join(", ")
      }`,
    "model_not_allowed",
  );
}

/**
 * What is wrong with the body's OpenRouter `models` under ALLOWED_MODELS, if anything: it must be a list of names,
 * each allowed on every upstream the request may be sent to (each target of an alias), since OpenRouter may answer
 * with any of them instead of `model`.
 */
function fallbackModelsProblem(relay: Relay, context: RequestContext): string | undefined {
  const models = context.payload!.models;
  if (models === undefined || models === null) return undefined;
  const allowed = relay.config.allowedModels.join(", ");
  if (!Array.isArray(models)) {
    return `"models" must be a list of model names (ALLOWED_MODELS is set; allowed: ${allowed})`;
  }
  const targets = attemptPlan(relay, context).map((attempt) => attempt.target.name);
  const refused = models.find((model) =>
    typeof model !== "string" || !targets.every((target) => modelAllowed(relay, target, model))
  );
  if (refused === undefined) return undefined;
  return `"models" names ${
    JSON.stringify(String(refused).slice(0, 100))
  }, which is not allowed here; allowed: ${allowed}`;
}

/** One token budget that applies now: its variable, its UTC window, its counter and when the window ends. */
interface TokenBudget {
  variable: "TOKEN_BUDGET_PER_DAY" | "TOKEN_BUDGET_PER_MONTH";
  window: "day" | "month";
  budget: number;
  key: string;
  resetsAt: number;
}

/**
 * The token budgets that apply to this request's user or address now: TOKEN_BUDGET_PER_DAY and _MONTH, or the
 * user's own from MC_RELAY_USERS. Windows are UTC calendar days and months.
 */
function tokenBudgets(relay: Relay, context: RequestContext): TokenBudget[] {
  const now = new Date(relay.now());
  const own = context.user === undefined ? undefined : relay.usersByName.get(context.user)?.tokenBudgets;
  const [year, month, day] = [now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()];
  const today = now.toISOString().slice(0, 10);
  const budgets: TokenBudget[] = [];
  const perDay = own?.day ?? relay.config.tokenBudgetPerDay;
  const perMonth = own?.month ?? relay.config.tokenBudgetPerMonth;
  if (perDay > 0) {
    const key = `tokens-day:${today}:${context.subject}`;
    budgets.push({
      variable: "TOKEN_BUDGET_PER_DAY",
      window: "day",
      budget: perDay,
      key,
      resetsAt: Date.UTC(year, month, day + 1),
    });
  }
  if (perMonth > 0) {
    const key = `tokens-month:${today.slice(0, 7)}:${context.subject}`;
    budgets.push({
      variable: "TOKEN_BUDGET_PER_MONTH",
      window: "month",
      budget: perMonth,
      key,
      resetsAt: Date.UTC(year, month + 1, 1),
    });
  }
  return budgets;
}

/** Stage: GET /usage: for the caller (user, or address with PUBLIC_ACCESS), every limit and budget, used and left. */
async function answerUsage(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { counters, config } = relay;
  const limits = await Promise.all(relay.requestLimits.map(async ({ variable, window, rule }) => {
    const key = `requests-per-${window}:${context.subject}`;
    const remaining = await counters.remaining(key, rule);
    const nextInSeconds = await counters.wait(key, rule);
    return {
      name: variable,
      window,
      limit: rule.capacity,
      used: rule.capacity - remaining,
      remaining,
      next_in_seconds: nextInSeconds,
    };
  }));
  const budgets = await Promise.all(
    tokenBudgets(relay, context).map(async ({ variable, window, budget, key, resetsAt }) => {
      const used = await counters.get(key);
      return {
        name: variable,
        window,
        budget,
        used,
        remaining: Math.max(0, budget - used),
        resets_at: new Date(resetsAt).toISOString(),
      };
    }),
  );
  const concurrent = config.concurrentRequests === 0 ? null : {
    name: "CONCURRENT_REQUESTS",
    limit: config.concurrentRequests,
    in_flight: await counters.get(`in-flight:${context.subject}`),
  };
  return jsonResponse({
    caller: context.user === undefined ? { anonymous: true } : { user: context.user },
    limits,
    concurrent,
    budgets,
    max_tokens_per_request: config.maxTokensPerRequest || null,
  }, { headers: { "cache-control": "no-store" } });
}

/** The fields that bound an answer's length, per upstream path. */
const ANSWER_TOKEN_FIELDS: Record<string, string[]> = {
  "/chat/completions": ["max_tokens", "max_completion_tokens"],
  "/completions": ["max_tokens"],
  "/responses": ["max_output_tokens"],
};

/**
 * The longest answer a request may ask for, per answer: far above every model's output limit (the largest take
 * about 128,000 tokens), so no provider takes more, and small enough that a reservation made of it stays an exact
 * integer. Larger values (1e300, 1e21) are refused rather than lowered: added to a budget's counter they used to
 * drown it in floating point, and taking them back reset a spent budget to 0.
 */
const MAX_ANSWER_TOKENS = 1_000_000;

/** The most answers `n` and `best_of` may ask for per prompt: OpenAI's own limit for `n`. */
const MAX_ANSWERS_PER_PROMPT = 128;

/**
 * How many answers a request asks for: its prompts (a completion's `prompt` may be a list of them; a list of token
 * numbers is one prompt) times the larger of `n` and `best_of` (best_of answers are generated, and billed, to
 * return n). A text when `n` or `best_of` is not a whole number from 1 to MAX_ANSWERS_PER_PROMPT.
 */
function answerCount(path: string, payload: JsonObject): number | string {
  let perPrompt = 1;
  for (const field of ["n", "best_of"]) {
    const value = payload[field];
    if (value === undefined || value === null) continue;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > MAX_ANSWERS_PER_PROMPT) {
      return `"${field}" must be a whole number from 1 to ${MAX_ANSWERS_PER_PROMPT}`;
    }
    perPrompt = Math.max(perPrompt, value);
  }
  const prompt = payload.prompt;
  const listed = path === "/completions" && Array.isArray(prompt) && prompt.some((item) => typeof item !== "number");
  return (listed ? Math.max(1, (prompt as unknown[]).length) : 1) * perPrompt;
}

/**
 * Stage: answer length. `max_tokens`, `max_completion_tokens` (chat) and `max_output_tokens` (Responses API)
 * must be whole numbers from 1 to MAX_ANSWER_TOKENS (400 `invalid_max_tokens` otherwise, before anything is
 * counted). MAX_TOKENS_PER_REQUEST bounds all the answers of a request together (`answerCount`): each answer gets
 * its share, and a request asking for more answers than the cap has tokens gets 400 `invalid_answer_count`.
 * Values above the share are lowered to it; when a request names none, the share is added as the field its
 * upstream takes: `max_completion_tokens` for OpenAI and Azure OpenAI (their reasoning models refuse `max_tokens`),
 * `max_tokens` for every other chat upstream (most OpenAI-compatible servers know only that one).
 */
function capAnswerTokens(relay: Relay, context: RequestContext): Response | undefined {
  const path = context.route!.upstreamPath ?? "";
  const fields = ANSWER_TOKEN_FIELDS[path];
  const { payload } = context;
  if (fields === undefined || payload === undefined) return undefined;
  const cap = relay.config.maxTokensPerRequest;
  const answers = answerCount(path, payload);
  if (typeof answers === "string" || (cap > 0 && answers > cap)) {
    context.outcome = "invalid_body";
    const tooMany = `this request asks for ${answers} answers (n, best_of, prompts), more than the ${cap} tokens ` +
      `per request of MAX_TOKENS_PER_REQUEST can hold; ask for at most ${cap}`;
    return errorResponse(400, typeof answers === "string" ? answers : tooMany, "invalid_answer_count");
  }
  const share = cap > 0 ? Math.floor(cap / answers) : MAX_ANSWER_TOKENS;
  let answer: number | undefined;
  for (const field of fields) {
    const value = payload[field];
    if (value === undefined || value === null) continue;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > MAX_ANSWER_TOKENS) {
      context.outcome = "invalid_body";
      return errorResponse(
        400,
        `"${field}" must be a whole number from 1 to ${MAX_ANSWER_TOKENS}; no model answers at more length`,
        "invalid_max_tokens",
      );
    }
    const capped = Math.min(value, share);
    payload[field] = capped;
    answer = Math.max(answer ?? 0, capped);
  }
  if (answer === undefined && cap > 0) {
    const openAi = /(^|\.)openai\.com(:\d+)?$|\.openai\.azure\.com(:\d+)?$/.test(context.target.host);
    payload[fields.length === 2 && openAi ? fields[1] : fields[0]] = share;
    answer = share;
  }
  // Every answer may be that long: the reservation counts them all. Bounded so that it stays an exact integer in
  // the counters whatever a list of prompts holds; a reservation of that size spends any budget already.
  context.answerTokens = answer === undefined
    ? undefined
    : Math.min(answer * answers, MAX_ANSWER_TOKENS * MAX_ANSWERS_PER_PROMPT);
  return undefined;
}

/**
 * Stage: token budgets. A request is charged a reservation when it starts (about four bytes a token of its body,
 * plus the answer tokens it may get, all its answers counted) on every budget that applies, and the real usage replaces it in `account`.
 * It may start while the budget is not spent; so together with the reservations of requests in flight, a budget
 * is overshot by at most one request's answer. Spent: 429 `token_budget_exceeded` with Retry-After until the
 * UTC day or month ends.
 *
 * Budgets count tokens only. What a provider bills per call of a hosted tool on the Responses API (web search, code
 * interpreter, file search: a fee per call or per session, not tokens) is outside them, and the relay does not refuse
 * such tools: it cannot price them across providers, and an operator who must bound that spend limits the paths
 * (DISABLED_PATHS=/v1/responses) or the provider key's own spending limit does.
 */
function reserveTokens(relay: Relay, context: RequestContext): StageAnswer {
  // A BYOK request spends the caller's own quota, not the operator's: no budget applies.
  if (context.usageWatch === undefined || context.target.byok) return undefined;
  return refuseBackground(relay, context) ?? reserveBudgets(relay, context);
}

/**
 * A background response (`"background": true`, Responses API) while a token budget applies: 400
 * `background_not_allowed`. The provider answers "queued" with no usage and bills the whole answer later, where the
 * relay never sees it: charging the reservation instead would leave an answer with no MAX_TOKENS_PER_REQUEST
 * unbounded, so such a request is refused rather than counted wrong. Without a budget it passes.
 */
function refuseBackground(relay: Relay, context: RequestContext): Response | undefined {
  const background = context.payload?.background;
  if (background === undefined || background === null || background === false) return undefined;
  const [budget] = tokenBudgets(relay, context);
  if (budget === undefined) return undefined;
  context.outcome = "background_not_allowed";
  const message = `background responses cannot be counted against this relay's token budget (${budget.variable}): ` +
    `their usage arrives after the request ends; send the request without "background"`;
  return errorResponse(400, message, "background_not_allowed");
}

/** The budgets stage's store work: the request's estimate added to each budget, all taken back on a refusal. */
async function reserveBudgets(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const amount = Math.ceil(context.bytesIn / 4) + (context.answerTokens ?? 0);
  const reservations: NonNullable<RequestContext["reservations"]> = [];
  context.reservations = reservations;
  for (const budget of tokenBudgets(relay, context)) {
    const expiresAt = budget.resetsAt + 3_600_000;
    const { value: total, store } = await hold(
      relay.counters,
      (counters) => counters.add(budget.key, amount, expiresAt),
      (counters) => counters.add(budget.key, -amount, expiresAt),
    );
    if (total - amount < budget.budget) {
      reservations.push({ key: budget.key, amount, expiresAt, store });
      continue;
    }
    // Each reservation goes back to the store it was added to (memory during a Redis outage, Redis else).
    await giveBack(relay.counters, store, (counters) => counters.add(budget.key, -amount, expiresAt));
    for (const reservation of reservations.splice(0)) {
      await giveBack(
        relay.counters,
        reservation.store,
        (counters) => counters.add(reservation.key, -reservation.amount, reservation.expiresAt),
      );
    }
    context.outcome = "token_budget_exceeded";
    const waitFor = Math.max(1, Math.ceil((budget.resetsAt - relay.now()) / 1000));
    return errorResponse(
      429,
      `the token budget of ${budget.budget} tokens per UTC ${budget.window} (${budget.variable}) is used up for ${
        subjectWords(context)
      }; it renews at ${new Date(budget.resetsAt).toISOString()}`,
      "token_budget_exceeded",
      { "retry-after": String(waitFor) },
    );
  }
  return undefined;
}

/**
 * Stage: usage request. A streamed chat only reports token usage when asked, so the relay asks, and takes the
 * extra usage event back out of the stream when the client had not asked for it itself. A changed body is
 * serialised again here, once.
 */
function requestUsage(_relay: Relay, context: RequestContext): undefined {
  const { payload, usageWatch } = context;
  const asksForUsage = context.route!.upstreamPath === "/chat/completions" ||
    context.route!.upstreamPath === "/completions";
  if (usageWatch !== undefined && payload !== undefined && asksForUsage) {
    const options = payload.stream_options;
    if (payload.stream === true && !(typeof options === "object" && options?.include_usage === true)) {
      payload.stream_options = { ...(typeof options === "object" ? options : {}), include_usage: true };
      context.bodyChanged = true;
      usageWatch.stripUsageEvent = true;
    }
  }
  if (context.bodyChanged) context.body = textEncoder.encode(JSON.stringify(payload)) as Uint8Array<ArrayBuffer>;
  return undefined;
}

/**
 * The headers every request to `target` carries: its extra headers, its key (the caller's own for a BYOK upstream,
 * `auth`), and the relay's own.
 */
function upstreamHeaders(target: UpstreamTarget, auth?: string): Record<string, string> {
  return { ...target.baseHeaders, [target.authHeader]: auth ?? target.authValue };
}

/**
 * Counts a request's body bytes against MAX_BUFFERED_BYTES as they arrive, and against its caller's share of it:
 * the signed-in user, else the address (by /64 for IPv6, as the limits count it); `releaseBody` gives them back.
 */
function reserveBodyBytes(relay: Relay, context: RequestContext): (bytes: number) => boolean {
  context.bodyHolder = context.user !== undefined ? `user:${context.user}` : `address:${addressKey(context.client)}`;
  return (bytes) => {
    if (!relay.bodyBudget.reserve(context.bodyHolder!, bytes)) return false;
    context.heldBytes += bytes;
    return true;
  };
}

/** Drops the request body once it has been sent: its bytes no longer count against MAX_BUFFERED_BYTES. */
function releaseBody(relay: Relay, context: RequestContext): void {
  if (context.bodyHolder !== undefined) relay.bodyBudget.release(context.bodyHolder, context.heldBytes);
  context.heldBytes = 0;
  context.body = undefined;
  context.payload = undefined;
}

/** The answer when the upstream call failed before any response: 499, 504 or 502. */
function upstreamFailure(relay: Relay, context: RequestContext, error: unknown): Response {
  const reason = context.upstreamCall!.signal.reason;
  const host = context.target.host;
  if (reason instanceof RelayAbort && reason.kind === "client_gone") {
    context.outcome = "client_gone";
    return errorResponse(499, "the client closed the request", "client_closed_request");
  }
  if (reason instanceof RelayAbort && reason.kind === "upstream_timeout") {
    context.outcome = "upstream_timeout";
    return errorResponse(
      504,
      `the upstream ${host} sent no response within ${
        relay.config.requestTimeoutMs / 1000
      } s (REQUEST_TIMEOUT_SECONDS)`,
      "upstream_timeout",
    );
  }
  context.outcome = "upstream_unreachable";
  context.error = errorText(error);
  return errorResponse(
    502,
    `could not reach the upstream ${host}: ${
      describeNetworkError(context.error)
    }; check UPSTREAM_BASE_URL and that the provider is reachable from the relay`,
    "upstream_unreachable",
  );
}

/** The answer to an upstream redirect: 502 naming the target's host, never following it. */
function upstreamRedirect(context: RequestContext, location: string): Response {
  context.outcome = "upstream_redirect";
  let redirectTarget = "another location";
  try {
    redirectTarget = new URL(location, context.target.baseUrl).host;
  } catch {
    // keep the generic wording
  }
  return errorResponse(
    502,
    `the upstream ${context.target.host} redirected to ${redirectTarget}; set ${
      context.target.name === "default" ? "UPSTREAM_BASE_URL" : `the baseUrl of upstream "${context.target.name}"`
    } to the final URL`,
    "upstream_redirect",
  );
}

/**
 * Stage: relay. Passes the upstream's status, headers and body back with the relay's own headers. A body of
 * known length that needs no inspection goes to the client inside Deno; a small non-streamed answer whose usage
 * is read is read whole first (`relayWholeAnswer`); any other body passes chunk by chunk through `relayBody`
 * (idle timeout, usage reading), and a small error body or filtered model list is rewritten.
 */
function relayResponse(relay: Relay, context: RequestContext): Response | Promise<Response> {
  const response = context.upstreamResponse!;
  const headers = responseHeaders(relay, context, response);
  context.headersSet = true;
  context.status = response.status;
  const eventStream = headers["content-type"]?.toLowerCase().startsWith("text/event-stream") ?? false;
  if (eventStream) {
    // Tell reverse proxies and CDNs not to buffer or compress the stream.
    headers["cache-control"] = "no-cache, no-transform";
    headers["x-accel-buffering"] = "no";
  }
  if (response.status >= 300) return relayErrorResponse(relay, context, response, headers);
  const filterModels = (relay.allowedModels.size > 0 || Object.keys(relay.config.modelAliases).length > 0) &&
    context.route!.upstreamPath === "/models" && response.ok;
  const inspectUsage = context.usageWatch !== undefined && response.ok;
  const contentLength = response.headers.get("content-length");
  const init = { status: response.status, statusText: response.statusText, headers };
  const knownLength = response.body !== null && !eventStream && contentLength !== null;
  if (knownLength && !filterModels && !inspectUsage) {
    return new Response(passWithinDeno(relay, context, response.body!, Number(contentLength)), init);
  }
  if (knownLength && inspectUsage && Number(contentLength) <= WHOLE_ANSWER_MAX_BYTES) {
    return relayWholeAnswer(relay, context, response, init);
  }
  const usage = inspectUsage ? usageReader(context.usageWatch!, eventStream) : undefined;
  context.events = usage?.events;
  // Taking the usage event out shortens a stream: its length, if the upstream gave one, no longer holds.
  if (usage && eventStream && context.usageWatch!.stripUsageEvent) delete headers["content-length"];
  if (response.body === null) {
    context.stopWatchingClient!();
    return new Response(null, init);
  }
  const body = relayedBody(relay, context, response.body, eventStream, usage);
  if (filterModels && !response.headers.has("content-encoding")) {
    delete headers["content-length"];
    return filteredModelList(relay, context, body, init);
  }
  return new Response(body, init);
}

/** The upstream's model list with only the allowed models and the aliases (see `filterModelList`). */
async function filteredModelList(
  relay: Relay,
  context: RequestContext,
  body: ReadableStream<Uint8Array>,
  init: ResponseInit,
): Promise<Response> {
  const allowed = (model: string) => modelAllowed(relay, context.target.name, model);
  return new Response(
    (await rewriteBody(body, (text) => filterModelList(text, allowed, aliasModels(relay)))).body,
    init,
  );
}

/** A body of known length must arrive in full within REQUEST_TIMEOUT_SECONDS of its headers, or the call is aborted. */
function wholeBodyDeadline(relay: Relay, context: RequestContext): Deadline {
  const upstreamCall = context.upstreamCall!;
  return deadlines.add(relay.config.requestTimeoutMs, () => upstreamCall.abort(new RelayAbort("upstream_timeout")));
}

/** The largest non-streamed answer of known length that `relayWholeAnswer` reads whole; a larger one is relayed. */
const WHOLE_ANSWER_MAX_BYTES = 256 * 1024;

/**
 * A non-streamed answer of known length (up to WHOLE_ANSWER_MAX_BYTES) whose usage the relay reads: read whole in
 * one step inside Deno, its usage taken, and sent on as the same bytes, without a JavaScript step per chunk or a
 * stream to the client. It must arrive within REQUEST_TIMEOUT_SECONDS of its headers. Its status and headers go out
 * only with it, so an answer that breaks off gets 502 (or 504 after the timeout), never a cut body with a 200.
 */
async function relayWholeAnswer(
  relay: Relay,
  context: RequestContext,
  response: Response,
  init: ResponseInit,
): Promise<Response> {
  const bodyDeadline = wholeBodyDeadline(relay, context);
  let bytes: Uint8Array<ArrayBuffer>;
  try {
    bytes = await response.bytes();
  } catch (error) {
    // Not sent yet: the relay's own answer gets the relay's headers instead.
    context.headersSet = false;
    return answerCutOff(relay, context, error);
  } finally {
    deadlines.cancel(bodyDeadline);
    context.stopWatchingClient!();
  }
  context.usage = pickUsage(parseJson(bytes));
  context.bytesOut = bytes.byteLength;
  context.outcome = "completed";
  return new Response(bytes, init);
}

/** The relay's answer when an upstream's answer broke off, timed out or lost its client before its end. */
function answerCutOff(relay: Relay, context: RequestContext, error: unknown): Response {
  const reason = context.upstreamCall!.signal.reason;
  if (reason instanceof RelayAbort && reason.kind === "client_gone") return upstreamFailure(relay, context, error);
  const host = context.target.host;
  if (reason instanceof RelayAbort && reason.kind === "upstream_timeout") {
    context.outcome = "upstream_timeout";
    return errorResponse(
      504,
      `the upstream ${host} did not finish its answer within ${
        relay.config.requestTimeoutMs / 1000
      } s (REQUEST_TIMEOUT_SECONDS)`,
      "upstream_timeout",
    );
  }
  context.outcome = "upstream_stream_error";
  context.error = errorText(error);
  return errorResponse(502, `the upstream ${host} broke off its answer before its end`, "upstream_stream_error");
}

/** The upstream body passed on through `relayBody`, with `account` called when it ends. */
function relayedBody(
  relay: Relay,
  context: RequestContext,
  source: ReadableStream<Uint8Array>,
  eventStream: boolean,
  usage?: ReturnType<typeof usageReader>,
): ReadableStream<Uint8Array> {
  if (eventStream) relay.metrics.openStreams++;
  context.logWhenBodyEnds = true;
  return relayBody(source, context.upstreamCall!, relay.config.requestTimeoutMs, {
    transform: usage?.transform,
    flush: usage?.flush,
    onChunk(bytes) {
      context.bytesOut += bytes;
    },
    onEnd(outcome, error) {
      context.stopWatchingClient!();
      if (eventStream) relay.metrics.openStreams--;
      context.outcome ??= outcome;
      if (error) context.error = error;
      context.usage = usage?.result();
      account(relay, context);
    },
  });
}

/**
 * An upstream's error answer (status 300 and up; a redirect with Location never gets here). Its body is read
 * (up to MAX_REWRITTEN_BODY_BYTES) and every configured secret in it is masked; a provider's 429 says whose
 * quota it is. A body the relay cannot inspect (compressed, too large, or showing a secret in a form that
 * cannot be masked) is replaced by the relay's own error with the same status, never passed on.
 */
async function relayErrorResponse(
  relay: Relay,
  context: RequestContext,
  response: Response,
  headers: Record<string, string>,
): Promise<Response> {
  const init = { status: response.status, statusText: response.statusText, headers };
  if (response.body === null) {
    context.stopWatchingClient!();
    return new Response(null, init);
  }
  delete headers["content-length"];
  const encoding = response.headers.get("content-encoding");
  const replace = (reason: string) => {
    context.outcome = "upstream_error_body_replaced";
    context.error = `error body replaced: ${reason}`;
    for (const name of ["content-encoding", "cache-control", "x-accel-buffering"]) delete headers[name];
    headers["content-type"] = "application/json";
    return JSON.stringify({
      error: {
        message:
          `mc-relay: the upstream ${context.target.host} answered ${response.status} with a body the relay does not pass on (${reason}); see the relay's log (request id ${context.id})`,
        type: response.status >= 500 ? "server_error" : "invalid_request_error",
        code: "upstream_error",
      },
    });
  };
  const body = relayedBody(relay, context, response.body, false);
  if (encoding !== null && encoding.toLowerCase() !== "identity") {
    const replaced = replace(`${encoding.slice(0, 20)}-encoded`);
    await body.cancel();
    return new Response(replaced, init);
  }
  const rewritten = await rewriteBody(body, (text) => {
    const masked = context.masker ? context.masker.mask(text) : relay.maskSecrets(text);
    if (masked === undefined) return undefined;
    return response.status === 429 ? explainProviderRateLimit(masked, context.target.host) : masked;
  }, replace);
  return new Response(rewritten.body, init);
}

/**
 * The upstream's response headers without hop-by-hop, cookie and CORS headers, plus the relay's own, by lower-case
 * name (as Deno lists them: one entry a name). A plain record, which Deno takes into the response without the
 * iterator a list of pairs costs per header.
 */
function responseHeaders(relay: Relay, context: RequestContext, response: Response): Record<string, string> {
  const connection = response.headers.get("connection");
  const connectionTokens = connection === null
    ? NO_TOKENS
    : new Set(connection.split(",").map((token) => token.trim().toLowerCase()));
  // No prototype: a header the upstream names `__proto__` is a header like any other.
  const headers: Record<string, string> = Object.create(null);
  const mask = context.masker ? context.masker.maskHeaderValue : relay.maskHeaderValue;
  // forEach, not an iterator: no object per header.
  response.headers.forEach((value, name) => {
    if (!isDroppedResponseHeader(name, connectionTokens)) headers[name] = mask(value);
  });
  addRelayHeaders(headers, context.id, context.cors);
  // Which upstream (for an alias: which target) answered.
  headers["x-relay-upstream"] = context.upstream ?? context.target.name;
  return headers;
}

/**
 * A body of known length (a model list, a non-streamed answer) goes to the client inside Deno, without a
 * JavaScript step per chunk. It must arrive within REQUEST_TIMEOUT_SECONDS of its headers; the log line is
 * written when Deno has sent it.
 */
function passWithinDeno(
  relay: Relay,
  context: RequestContext,
  body: ReadableStream<Uint8Array>,
  length: number,
): ReadableStream<Uint8Array> {
  const upstreamCall = context.upstreamCall!;
  const bodyDeadline = wholeBodyDeadline(relay, context);
  context.logWhenBodyEnds = true;
  const delivered = () => {
    deadlines.cancel(bodyDeadline);
    context.stopWatchingClient!();
    const reason = upstreamCall.signal.reason;
    context.outcome = reason instanceof RelayAbort ? reason.kind : "completed";
    if (context.outcome === "completed") context.bytesOut = length;
    account(relay, context);
  };
  // Deno resolves `completed` however the response ended; should it ever reject, the line is still written.
  context.completed.then(delivered, delivered);
  return body;
}

/** GET /v1/models with several upstreams: every upstream's list, ids prefixed with the upstream's name. */
async function mergedModels(relay: Relay, context: RequestContext): Promise<Response> {
  // A caller's own key goes to the one upstream it chose, never to several: BYOK upstreams list their models
  // only when X-Relay-Endpoint names them.
  const keyed = relay.upstreams.filter((upstream) => !upstream.byok);
  if (keyed.length === 0) {
    context.outcome = "unknown_upstream";
    return errorResponse(
      400,
      `name the provider whose models to list with X-Relay-Endpoint (MC's endpoint setting): one of ${
        relay.upstreams.map((upstream) => upstream.baseUrl).join(", ")
      }`,
      "unknown_upstream",
    );
  }
  const lists = await Promise.all(keyed.map((target) => fetchModelList(relay, target)));
  const data = [
    ...lists.flatMap(({ name, models }) =>
      models.filter((entry) => typeof entry?.id === "string" && modelAllowed(relay, name, entry.id as string))
        .map((entry) => ({ ...entry, id: `${name}/${entry.id}` }))
    ),
    ...aliasModels(relay),
  ];
  const failed = lists.filter((list) => list.error).map((list) => `${list.name} (${list.error})`);
  if (failed.length > 0) context.error = `model lists missing: ${failed.join(", ")}`;
  if (failed.length === lists.length) {
    context.outcome = "upstream_unreachable";
    return errorResponse(502, `no upstream answered for its model list: ${failed.join(", ")}`, "upstream_unreachable");
  }
  context.outcome = failed.length > 0 ? "partial" : "completed";
  context.upstreamStatus = 200;
  return jsonResponse({ object: "list", data });
}

/** One upstream's model list for `mergedModels`, or the reason it has none. */
async function fetchModelList(
  relay: Relay,
  target: UpstreamTarget,
): Promise<{ name: string; models: { id?: unknown }[]; error?: string }> {
  const abort = new AbortController();
  const deadline = deadlines.add(relay.config.requestTimeoutMs, () => abort.abort());
  try {
    const response = await fetch(`${target.baseUrl}/models`, {
      headers: upstreamHeaders(target),
      signal: abort.signal,
      redirect: "manual",
    });
    if (!response.ok) {
      await response.body?.cancel();
      return { name: target.name, error: `HTTP ${response.status}`, models: [] };
    }
    const list = await response.json();
    return { name: target.name, models: Array.isArray(list?.data) ? list.data : [] };
  } catch (error) {
    return { name: target.name, error: describeNetworkError(errorText(error)), models: [] };
  } finally {
    deadlines.cancel(deadline);
  }
}

/** The tokens an answer used in all: `total_tokens`, or prompt and completion added up. */
function usageTotal(usage: TokenUsage): number {
  return usage.total_tokens ?? (usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0);
}

/**
 * Replaces the request's token reservations with what it used, frees its in-flight place, and adds a charged
 * request to the usage ledger (per UTC day, caller, model and upstream).
 */
function settle(relay: Relay, context: RequestContext, usage: TokenUsage | undefined): Promise<unknown> | undefined {
  // BYOK requests spend the caller's own quota: the relay keeps no record of them.
  const recorded = usage !== undefined && !context.target.byok;
  if (!context.reservations?.length && !recorded && context.inFlightKey === undefined) return undefined;
  const used = usage === undefined ? 0 : usageTotal(usage);
  return storeCalls(relay, () => {
    const writes: unknown[] = [];
    // The real usage replaces each reservation in the store that holds it, whichever store counts by now.
    for (const { key, amount, expiresAt, store } of context.reservations?.splice(0) ?? []) {
      writes.push(giveBack(relay.counters, store, (counters) => counters.add(key, used - amount, expiresAt)));
    }
    if (recorded) {
      writes.push(relay.counters.recordUsage({
        day: new Date(relay.now()).toISOString().slice(0, 10),
        who: context.subject ?? `address:${addressKey(context.client)}`,
        model: context.model?.slice(0, 100) ?? "",
        upstream: context.target.name,
        prompt: usage.prompt_tokens ?? 0,
        completion: usage.completion_tokens ?? 0,
        total: used,
        estimated: usage.estimated === true,
      }));
    }
    if (context.inFlightKey !== undefined) {
      const key = context.inFlightKey;
      context.inFlightKey = undefined;
      writes.push(giveBack(relay.counters, context.inFlightStore ?? relay.counters, (store) => store.add(key, -1)));
    }
    return writes;
  });
}

/**
 * A usage estimate for an answer whose usage never arrived (the client left first, the upstream reports none),
 * so that no request is free: about four bytes a token for the prompt and a JSON answer, one token per
 * server-sent event of a stream. Marked `estimated`.
 */
function estimateUsage(context: RequestContext): TokenUsage {
  const prompt = Math.ceil(context.bytesIn / 4);
  const completion = context.events ? context.events() : Math.ceil(context.bytesOut / 4);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion, estimated: true };
}

/** Stage: account. Counts the request in the metrics and writes its log line (when info is logged). */
function account(relay: Relay, context: RequestContext): void {
  releaseBody(relay, context);
  const charged = context.usageWatch !== undefined && context.forwarded && !((context.upstreamStatus ?? 0) >= 300);
  if (context.usage === undefined && charged) {
    context.usage = estimateUsage(context);
  }
  settle(relay, context, charged ? context.usage : undefined)?.catch((error) =>
    relay.log.error("counter store: could not settle a request", { request_id: context.id, error: errorText(error) })
  );
  const route = context.routePath !== undefined && Object.hasOwn(relay.routes, context.routePath)
    ? context.routePath
    : "other";
  const model = context.model?.slice(0, 100);
  relay.metrics.countRequest(route, context.status ?? 0, context.user ?? "");
  if (context.usage && context.user) relay.metrics.countTokens(context.user, model ?? "", context.usage);
  // Health probes come every few seconds: their lines are debug, not info.
  const level = context.routePath === "/health" ? "debug" : "info";
  if (!relay.log.enabled(level)) return;
  relay.log[level]("request", {
    request_id: context.id,
    method: context.method,
    path: context.path,
    client: context.client,
    user: context.user,
    upstream: context.upstream,
    model,
    usage: context.usage,
    status: context.status,
    upstream_status: context.upstreamStatus,
    duration_ms: Math.round((performance.now() - context.startedAt) * 10) / 10,
    bytes_in: context.bytesIn,
    bytes_out: context.bytesOut,
    alias: context.alias,
    attempts: context.attempts && context.attempts.length > 1 ? context.attempts : undefined,
    outcome: context.outcome,
    error: context.error && context.masker ? context.masker.mask(context.error) ?? "[REDACTED]" : context.error,
  });
}

// ---------------------------------------------------------------------------
// Failover: model aliases, attempts, circuit breakers
// ---------------------------------------------------------------------------

/** One target a request may be sent to: an upstream and, for an alias, the model to ask it for. */
interface Attempt {
  target: UpstreamTarget;
  /** The model this target is asked for; undefined keeps the body as it is. */
  model?: string;
  /** `upstream/model` for an alias target, else the upstream's name: in logs, metrics, breakers, X-Relay-Upstream. */
  label: string;
}

/** An answer from the upstream that lets a request move on to the next target, when there is one. */
const FAILOVER_STATUSES = new Set([429, 500, 502, 503, 504]);

/**
 * Circuit breakers, one per alias target, in this process: FAILOVER_BREAKER_FAILURES failures in a row open a
 * target's breaker, and for FAILOVER_BREAKER_SECONDS requests skip it; then one request may try it (half-open): a
 * success closes the breaker, a failure opens it again. When a breaker opens, the attempts still waiting on that
 * target are aborted, so they move on instead of waiting for its timeout.
 *
 * A timeout (no response headers within the attempt's share, or a 504 from a gateway in front of the target) counts
 * only together with timeouts of other callers: among the failures in a row, timeouts open the breaker only once at
 * least two callers (users, or addresses for anonymous requests) had them, and a probe that times out for one caller
 * alone neither opens nor closes it (the next request probes again). The reason: how long an answer takes is the
 * caller's to decide (a huge prompt, a long answer that is not streamed), so one caller's timeouts say nothing about
 * the target, and one caller could otherwise open every breaker of an alias and turn everybody away. A target that
 * hangs for everyone still opens as soon as a second caller times out on it. Refused connections, DNS and TLS
 * failures, and 429/500/502/503 answers count whoever sent the request. The cost: on a relay with a single caller, a
 * target that hangs is not skipped; each request waits its share on it, then moves on.
 */
class CircuitBreakers {
  #targets = new Map<
    string,
    { failures: number; openUntil: number; probing: boolean; hard: boolean; timedOutFor: Set<string> }
  >();
  #waiting = new Map<string, Set<AbortController>>();

  constructor(
    readonly failuresToOpen: number,
    readonly openMs: number,
    readonly now: () => number,
    readonly onChange: (label: string, open: boolean) => void,
  ) {}

  #state(label: string) {
    let state = this.#targets.get(label);
    if (state === undefined) {
      state = { failures: 0, openUntil: 0, probing: false, hard: false, timedOutFor: new Set() };
      this.#targets.set(label, state);
    }
    return state;
  }

  /** Whether a request may try `label` now (a half-open breaker lets one probe through). */
  admit(label: string): boolean {
    const state = this.#state(label);
    if (state.openUntil === 0) return true;
    if (this.now() < state.openUntil || state.probing) return false;
    state.probing = true;
    return true;
  }

  /** Seconds until the first open breaker of `labels` lets a probe through. */
  secondsToRetry(labels: string[]): number {
    const soonest = Math.min(...labels.map((label) => this.#state(label).openUntil));
    return Math.max(1, Math.ceil((soonest - this.now()) / 1000));
  }

  /** Watches an attempt on `label`: it is aborted if the breaker opens meanwhile. Returns the end of the watch. */
  watch(label: string, attempt: AbortController): () => void {
    let waiting = this.#waiting.get(label);
    if (waiting === undefined) this.#waiting.set(label, waiting = new Set());
    waiting.add(attempt);
    return () => waiting.delete(attempt);
  }

  /** Records an answer from `label`: closes its breaker. */
  succeeded(label: string): void {
    const state = this.#state(label);
    const wasOpen = state.openUntil !== 0;
    Object.assign(state, { failures: 0, openUntil: 0, probing: false, hard: false });
    state.timedOutFor.clear();
    if (wasOpen) this.onChange(label, false);
  }

  /**
   * Records a failure of `label` for `caller`, a timeout or not: may open its breaker, and then aborts the attempts
   * waiting on it.
   */
  failed(label: string, caller: string, timeout: boolean): void {
    const state = this.#state(label);
    state.failures++;
    // Two callers are all it takes: the set never holds more (a flood of addresses cannot grow it).
    if (timeout && state.timedOutFor.size < 2) state.timedOutFor.add(caller);
    else state.hard = true;
    // Only after failures that are not all one caller's timeouts: see the class's comment.
    const telling = state.hard || state.timedOutFor.size >= 2;
    if (!telling) {
      state.probing = false;
      return;
    }
    if (!state.probing && state.failures < this.failuresToOpen) return;
    const wasOpen = state.openUntil !== 0;
    // A probe's failure is judged on its own: evidence that opened the breaker once does not reopen it.
    Object.assign(state, { openUntil: this.now() + this.openMs, probing: false, hard: false });
    state.timedOutFor.clear();
    if (!wasOpen) this.onChange(label, true);
    for (const attempt of this.#waiting.get(label) ?? []) attempt.abort(new RelayAbort("breaker_open"));
  }

  /** The targets whose breakers are open now (half-open ones included). */
  open(): string[] {
    return [...this.#targets].filter(([, state]) => state.openUntil !== 0).map(([label]) => label);
  }
}

/** The attempts a request may make: every target of its alias, in order, or its one upstream. */
function attemptPlan(relay: Relay, context: RequestContext): Attempt[] {
  const targets = context.alias === undefined ? undefined : relay.config.modelAliases[context.alias];
  if (targets === undefined) return context.target.plan;
  return targets.map((label) => {
    const slash = label.indexOf("/");
    return { target: relay.upstreamsByName.get(label.slice(0, slash))!, model: label.slice(slash + 1), label };
  });
}

/**
 * Stage: forward. Calls the upstream with the client's body, Content-Type and Accept, and the upstream's key. For
 * a model alias, the targets are tried in order: a connection, DNS or TLS failure, no response headers within the
 * attempt's share of REQUEST_TIMEOUT_SECONDS, or a 429/500/502/503/504 moves on to the next target (whose breaker is
 * not open) with the same body, model replaced; any other answer is the answer. A client that leaves aborts the call
 * (499); with no target left the last failure is answered (502 or 504, or the last upstream answer); a redirect is
 * 502, since following it could carry the key elsewhere.
 */
async function forwardRequest(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const plan = attemptPlan(relay, context);
  watchClient(context);
  const deadline = performance.now() + relay.config.requestTimeoutMs;
  context.forwarded = true;
  let failure: unknown;
  try {
    for (let index = 0; index < plan.length; index++) {
      const attempt = plan[index];
      if (context.clientGone) break;
      if (plan.length > 1 && !relay.breakers.admit(attempt.label)) {
        context.attempts?.push({ target: attempt.label, outcome: "breaker_open", ms: 0 });
        continue;
      }
      // Each target left gets an equal share of the time left for the first byte.
      const share = (deadline - performance.now()) / (plan.length - index);
      const result = await callUpstream(relay, context, attempt, Math.max(1, share));
      const last = index === plan.length - 1;
      if (!("response" in result) || (FAILOVER_STATUSES.has(result.response.status) && !last)) {
        if (plan.length > 1 && !context.clientGone) countFailure(relay, context, attempt, result);
        if ("response" in result) await result.response.body?.cancel();
        failure = "error" in result ? result.error : undefined;
        continue;
      }
      if (plan.length > 1) relay.breakers.succeeded(attempt.label);
      context.upstreamResponse = result.response;
      break;
    }
  } finally {
    releaseBody(relay, context);
  }
  if (context.upstreamResponse === undefined) return noAnswer(relay, context, plan, failure);
  const response = context.upstreamResponse;
  context.upstreamStatus = response.status;
  if (response.status >= 300 && response.status < 400 && response.headers.has("location")) {
    await response.body?.cancel();
    context.stopWatchingClient!();
    return upstreamRedirect(context, response.headers.get("location")!);
  }
  return undefined;
}

/**
 * A failed attempt on an alias target, for its breaker (as the caller's timeout or a failure of the target, see
 * `CircuitBreakers`) and the metrics. An attempt cut because the breaker opened meanwhile is no new failure.
 */
function countFailure(
  relay: Relay,
  context: RequestContext,
  attempt: Attempt,
  result: { response: Response } | { error: unknown },
): void {
  relay.metrics.countFailover(attempt.label);
  const reason = context.upstreamCall!.signal.reason;
  if (reason instanceof RelayAbort && reason.kind === "breaker_open") return;
  const timeout = "response" in result
    ? result.response.status === 504
    : reason instanceof RelayAbort && reason.kind === "upstream_timeout";
  relay.breakers.failed(attempt.label, context.subject ?? `address:${addressKey(context.client)}`, timeout);
}

/** Listener options for a listener that runs at most once (one object for every request). */
const ONCE = { once: true } as const;

/** The client's request headers the upstream gets (every other one stays with the relay). */
const FORWARDED_REQUEST_HEADERS = ["content-type", "accept"] as const;

/**
 * Aborts the upstream call when the client leaves, once the call has run for DEADLINE_TICK_MS (so within two ticks,
 * 50 ms): an answer that comes sooner never needs `request.signal`, which costs a fifth of a fast request's
 * instructions (measured under callgrind, Deno 2.9.6). A client that left before the watch starts is noticed when it
 * starts. A relayed stream notices a client that leaves by its own cancellation. `context.stopWatchingClient` ends
 * the watch.
 */
function watchClient(context: RequestContext): void {
  let stop = () => {};
  const start = deadlines.add(DEADLINE_TICK_MS, () => {
    const signal = context.request.signal;
    const onClientGone = () => {
      context.clientGone = true;
      context.upstreamCall?.abort(new RelayAbort("client_gone"));
    };
    if (signal.aborted) return onClientGone();
    signal.addEventListener("abort", onClientGone, ONCE);
    stop = () => signal.removeEventListener("abort", onClientGone);
  });
  context.stopWatchingClient = () => {
    deadlines.cancel(start);
    stop();
  };
}

/** One attempt: the request to `attempt`'s upstream, with its own abort, within `timeoutMs` for the headers. */
async function callUpstream(
  relay: Relay,
  context: RequestContext,
  attempt: Attempt,
  timeoutMs: number,
): Promise<{ response: Response } | { error: unknown }> {
  const { request } = context;
  context.target = attempt.target;
  context.upstream = relay.upstreams.length > 1 || attempt.model !== undefined ? attempt.label : undefined;
  const headers = upstreamHeaders(attempt.target, context.upstreamAuth);
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = request.headers.get(name);
    // The client's value replaces an extra header of the same name, as it always did.
    if (value !== null) headers[name] = value;
  }
  // The body sent is the relay's own serialisation (UTF-8 JSON), whatever type and charset the client declared.
  if (context.body !== undefined) headers["content-type"] = "application/json";
  if (attempt.model !== undefined) {
    context.payload!.model = attempt.model;
    context.body = textEncoder.encode(JSON.stringify(context.payload)) as Uint8Array<ArrayBuffer>;
  }
  const call = new AbortController();
  context.upstreamCall = call;
  // Only an alias's targets have breakers that may abort a waiting attempt.
  const unwatch = attempt.model === undefined ? undefined : relay.breakers.watch(attempt.label, call);
  const deadline = deadlines.add(timeoutMs, () => call.abort(new RelayAbort("upstream_timeout")));
  const started = performance.now();
  try {
    const response = await fetch(`${attempt.target.baseUrl}${context.route!.upstreamPath}${context.url.search}`, {
      method: request.method,
      headers,
      body: context.body,
      signal: call.signal,
      redirect: "manual",
    });
    relay.metrics.observeUpstreamLatency((performance.now() - started) / 1000);
    context.attempts?.push({
      target: attempt.label,
      outcome: String(response.status),
      ms: Math.round(performance.now() - started),
    });
    return { response };
  } catch (error) {
    const reason = call.signal.reason;
    const outcome = reason instanceof RelayAbort ? reason.kind : describeNetworkError(errorText(error));
    context.attempts?.push({ target: attempt.label, outcome, ms: Math.round(performance.now() - started) });
    return { error };
  } finally {
    deadlines.cancel(deadline);
    unwatch?.();
  }
}

/**
 * The answer when no target answered: 499 when the client left, 503 when every target's breaker is open, else the
 * last failure (504 for a timeout, 502 otherwise).
 */
function noAnswer(relay: Relay, context: RequestContext, plan: Attempt[], failure: unknown): Response {
  context.stopWatchingClient!();
  const tried = context.attempts?.some((attempt) => attempt.outcome !== "breaker_open") ?? true;
  if (!tried && !context.clientGone) {
    const waitFor = relay.breakers.secondsToRetry(plan.map((attempt) => attempt.label));
    context.outcome = "upstreams_unavailable";
    return errorResponse(
      503,
      `every target of ${context.alias} failed just now (${
        plan.map((attempt) => attempt.label).join(", ")
      }); try again in ${waitFor} s`,
      "upstreams_unavailable",
      { "retry-after": String(waitFor) },
    );
  }
  return upstreamFailure(relay, context, failure);
}

// ---------------------------------------------------------------------------
// Bring your own key: callers' keys and sealed keys
// ---------------------------------------------------------------------------

/** The longest key a caller may bring: Azure AD access tokens run to a few kilobytes. */
const MAX_CALLER_KEY_LENGTH = 8192;

/** Sealed keys start with this, so the relay tells them from raw provider keys. */
const SEALED_PREFIX = "mcrs1.";

/** Seals per client address per minute at POST /seal. */
const SEALS_PER_MINUTE = 10;

/** The token a caller sent as `Authorization: Bearer <token>`, if any. */
function bearerToken(authorization: string | null): string | undefined {
  return /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "")?.[1];
}

/** What is wrong with a key a caller brings for `target`, if anything; checked before the key leaves. */
function callerKeyProblem(key: string | undefined, target: Upstream): string | undefined {
  if (!key) {
    return `send your own key for the upstream "${target.name}" as the API key (Authorization: Bearer <key>, or X-Api-Key)`;
  }
  if (key.length > MAX_CALLER_KEY_LENGTH) return `the key is longer than ${MAX_CALLER_KEY_LENGTH} characters`;
  if (!/^[\x21-\x7e]+$/.test(key)) {
    return "the key contains spaces, control or non-ASCII characters; paste the key alone";
  }
  if (target.keyPattern && !target.keyPattern.test(key)) {
    return `this is not a key for the upstream "${target.name}" (its keys match ${target.keyPattern.source}); check that the endpoint and the key belong to the same provider`;
  }
  return undefined;
}

/** What a sealed key holds: the key, the upstream it is for, and its expiry (seconds since the epoch). */
interface SealedContent {
  k: string;
  u: string;
  e: number;
}

/**
 * Seals callers' keys for BYOK upstreams, so that a browser can hold a string that only this relay can open, for one
 * upstream and until a date. AES-256-GCM (WebCrypto) under a key derived from SEAL_SECRET with HKDF-SHA-256; the
 * upstream and the expiry are inside the authenticated plaintext, so neither can be changed. Former secrets
 * (SEAL_SECRETS_PREVIOUS) still open what they sealed; dropping a secret revokes every key sealed under it. Only
 * the derived CryptoKeys are cached; an opened key lives as long as its request.
 */
export class KeySealer {
  #keys: Promise<CryptoKey[]>;

  /** `secrets`: the current one first, then former ones; `now` in milliseconds. */
  constructor(secrets: string[], readonly now: () => number = Date.now) {
    this.#keys = Promise.all(secrets.map(deriveSealKey));
  }

  /** Seals `key` for `upstream` until `expiresAt` (milliseconds). */
  async seal(key: string, upstream: string, expiresAt: number): Promise<string> {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const content: SealedContent = { k: key, u: upstream, e: Math.floor(expiresAt / 1000) };
    const [current] = await this.#keys;
    const sealed = await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: SEAL_CONTEXT },
      current,
      textEncoder.encode(JSON.stringify(content)),
    );
    const bytes = new Uint8Array(12 + sealed.byteLength);
    bytes.set(iv);
    bytes.set(new Uint8Array(sealed), 12);
    return `${SEALED_PREFIX}${base64url(bytes)}`;
  }

  /** The key inside `sealed`, when it is intact, sealed under a known secret, for `upstream`, and not expired. */
  async open(sealed: string, upstream: string): Promise<{ key: string } | { problem: string }> {
    let bytes: Uint8Array<ArrayBuffer>;
    try {
      bytes = fromBase64url(sealed.slice(SEALED_PREFIX.length));
    } catch {
      return { problem: "the sealed key is damaged; seal your key again" };
    }
    let content: SealedContent | undefined;
    for (const key of await this.#keys) {
      try {
        const plain = await crypto.subtle.decrypt(
          { name: "AES-GCM", iv: bytes.subarray(0, 12), additionalData: SEAL_CONTEXT },
          key,
          bytes.subarray(12),
        );
        content = JSON.parse(new TextDecoder().decode(plain));
        break;
      } catch {
        // another secret, or damaged
      }
    }
    if (content === undefined) {
      return {
        problem:
          "the sealed key is damaged, or was sealed under a secret this relay no longer has; seal your key again",
      };
    }
    if (content.u !== upstream) {
      return { problem: `the sealed key is for the upstream "${content.u}", not "${upstream}"` };
    }
    if (content.e * 1000 <= this.now()) return { problem: "the sealed key has expired; seal your key again" };
    return { key: content.k };
  }
}

/** Bound into every sealed key, so that a sealed key is never taken for anything else. */
const SEAL_CONTEXT = textEncoder.encode("mc-relay sealed key v1");

/** The AES-256-GCM key HKDF derives from a seal secret. */
async function deriveSealKey(secret: string): Promise<CryptoKey> {
  const material = await crypto.subtle.importKey("raw", textEncoder.encode(secret), "HKDF", false, ["deriveKey"]);
  return await crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: textEncoder.encode("mc-relay seal"), info: SEAL_CONTEXT },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    ["encrypt", "decrypt"],
  );
}

/**
 * Stage: the caller's own key. For a BYOK upstream, the key the caller brought (raw, or sealed and opened here) is
 * checked before it leaves (401 when it is missing, malformed, or does not match the upstream's keyPattern) and
 * goes in that upstream's auth header; it is masked in everything the upstream sends back. A keyed upstream needs
 * relay credentials (or PUBLIC_ACCESS): a caller with only its own key gets 401, and its key goes nowhere.
 */
function useCallerKey(relay: Relay, context: RequestContext): StageAnswer {
  const { target } = context;
  if (!target.byok) {
    if (context.user !== undefined || relay.config.publicAccess) return undefined;
    context.outcome = "auth_required";
    return errorResponse(
      401,
      `the upstream "${target.name}" uses this relay's own key: sign in with username:password as the API key`,
      "invalid_api_key",
    );
  }
  return checkCallerKey(relay, context);
}

/** The caller's key for a BYOK upstream: opened when sealed, checked, and masked in everything sent back. */
async function checkCallerKey(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { target } = context;
  let key = context.callerKey;
  if (key?.startsWith(SEALED_PREFIX)) {
    const opened = relay.sealer === undefined
      ? { problem: "this relay opens no sealed keys (SEAL_SECRET is not set); send the key itself" }
      : await relay.sealer.open(key, target.name);
    if ("problem" in opened) {
      context.outcome = "sealed_key_refused";
      return errorResponse(401, opened.problem, "invalid_api_key");
    }
    key = opened.key;
  }
  const problem = callerKeyProblem(key, target);
  if (problem !== undefined) {
    context.outcome = "caller_key_refused";
    return errorResponse(401, problem, "invalid_api_key");
  }
  context.upstreamAuth = target.authPrefix ? `${target.authPrefix} ${key}` : key;
  context.masker = createSecretMasker([...relay.upstreamSecrets, key!, context.callerKey!]);
  return undefined;
}

/**
 * Stage: POST /seal (with SEAL_SECRET), without relay credentials and limited per address: `{"key", "upstream",
 * "expiresInDays"}` in, `{"sealed", "upstream", "expires_at"}` out. The key is checked like a raw one first.
 */
async function answerSeal(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const waitFor = await relay.counters.take(`seals:${addressKey(context.client)}`, {
    capacity: SEALS_PER_MINUTE,
    periodMs: 60_000,
  });
  if (waitFor > 0) {
    context.outcome = "seal_rate_limited";
    return errorResponse(
      429,
      `at most ${SEALS_PER_MINUTE} seals a minute from one address; try again in ${waitFor} s`,
      "relay_rate_limit_exceeded",
      {
        "retry-after": String(waitFor),
      },
    );
  }
  const read = await readBody(context.request, relay.bodyLimits, reserveBodyBytes(relay, context));
  if ("status" in read) return errorResponse(read.status, read.message, read.code, read.headers);
  const request = parseJson(read.body) as { key?: unknown; upstream?: unknown; expiresInDays?: unknown } | undefined;
  const target = typeof request?.upstream === "string" ? relay.upstreamsByName.get(request.upstream) : undefined;
  const days = request?.expiresInDays ?? 90;
  const problem = request === undefined
    ? 'the body must be {"key": "...", "upstream": "<name>", "expiresInDays": 90}'
    : target === undefined || !target.byok
    ? `"upstream" must name a BYOK upstream of this relay: ${
      relay.upstreams.filter((u) => u.byok).map((u) => u.name).join(", ")
    }`
    : typeof days !== "number" || !Number.isInteger(days) || days < 1 || days > 3650
    ? '"expiresInDays" must be a whole number of days from 1 to 3650'
    : callerKeyProblem(typeof request.key === "string" ? request.key : undefined, target);
  if (problem !== undefined) {
    context.outcome = "seal_refused";
    return errorResponse(400, problem, "invalid_seal_request");
  }
  const expiresAt = relay.now() + (days as number) * 86_400_000;
  const sealed = await relay.sealer!.seal(request!.key as string, target!.name, expiresAt);
  return jsonResponse(
    { sealed, upstream: target!.name, expires_at: new Date(Math.floor(expiresAt / 1000) * 1000).toISOString() },
    { headers: { "cache-control": "no-store" } },
  );
}

// ---------------------------------------------------------------------------
// Page: the relay's own page at / and MC's one-link settings
// ---------------------------------------------------------------------------

/**
 * The address users reach the relay at, BASE_PATH included: PUBLIC_URL when set. Without it, only a relay that
 * listens on loopback derives it, from a loopback Host header (a browser or proxy on this machine); a Host header
 * from anywhere else is never trusted for it, since an answer built from it could be cached for others.
 */
function publicBase(relay: Relay, context: RequestContext): string | undefined {
  const { config } = relay;
  if (config.publicUrl) return config.publicUrl;
  const host = context.request.headers.get("host") ?? "";
  if (!LOOPBACK_AUTHORITY.test(config.host) || !LOOPBACK_AUTHORITY.test(host)) return undefined;
  return `${config.tlsCertFile ? "https" : "http"}://${host}${config.basePath}`;
}

/** MC's settings document that selects this relay: the relay, the endpoint it serves, and the model if one is set. */
function mcSettings(relay: Relay, base: string) {
  const model = relay.config.defaultModel ?? relay.config.allowedModels[0];
  return { aiIntegration: { ...(model && { model }), backend: { relay: base, endpoint: relay.upstreams[0].baseUrl } } };
}

/** The link that configures MetaConfigurator for this relay in one click. */
function mcSettingsLink(base: string): string {
  return `${METACONFIGURATOR_ORIGINS[0]}/?settings=${encodeURIComponent(`${base}/mc-settings.json`)}`;
}

/**
 * Stage: GET /mc-settings.json, without credentials and with CORS for allowed origins: the MC settings document
 * that selects this relay, for `https://www.metaconfigurator.org/?settings=<relay>/mc-settings.json`. Nothing secret
 * is in it. 404 when the relay does not know the address users reach it at (set PUBLIC_URL).
 */
function answerMcSettings(relay: Relay, context: RequestContext): Response | undefined {
  const base = publicBase(relay, context);
  if (base === undefined) {
    return errorResponse(
      404,
      "this relay does not know the address its users reach it at; its operator sets PUBLIC_URL, e.g. https://relay.example.com",
      "public_url_unknown",
    );
  }
  return jsonResponse(mcSettings(relay, base), { headers: { "cache-control": "no-cache" } });
}

/** Stage: GET / (under BASE_PATH; PAGE=false turns it off): the relay's own page, without credentials. */
async function answerPage(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const hashes = await pageHashes;
  const body = textEncoder.encode(pageHtml(relay, context));
  return new Response(body, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-length": String(body.byteLength),
      "content-security-policy":
        `default-src 'none'; script-src '${hashes.script}'; style-src '${hashes.style}'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'`,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-store",
    },
  });
}

/** Text for HTML, with `&`, `<`, `>`, `"` and `'` escaped. */
function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

/**
 * The page: what this relay is and whether it runs, the values to type into MC and into an SDK (each with a copy
 * button), the one-link setup, and a sign-in that lists the models, runs a streamed test chat and shows the caller's
 * limits and budgets. The information is in the HTML itself; only copying, sign-in and the chat need JavaScript. The
 * models (and so the upstreams) show only after sign-in; the key typed stays in the page's memory.
 */
function pageHtml(relay: Relay, context: RequestContext): string {
  const { config } = relay;
  const base = publicBase(relay, context);
  const shown = (value: string | undefined, placeholder: string) =>
    value === undefined
      ? `<span data-fill="${escapeHtml(placeholder)}">${escapeHtml(placeholder)}</span>`
      : escapeHtml(value);
  const relayUrl = shown(base, "{base}");
  const sdkUrl = shown(base && `${base}/v1`, "{base}/v1");
  const keyText = config.publicAccess
    ? "nothing: this relay is public (leave MC's key field empty), or your <code>username:password</code> if you have one"
    : "your <code>username:password</code>, from whoever runs this relay";
  const state = relay.counters.state === "degraded"
    ? "running, counting limits in this copy alone (store unreachable)"
    : "running";
  const link = base === undefined
    ? `<p>The one-click setup needs the relay's public address: its operator sets <code>PUBLIC_URL</code>.</p>`
    : `<p><a href="${
      escapeHtml(mcSettingsLink(base))
    }">Set up MetaConfigurator for this relay in one click</a> (it loads <code>${
      escapeHtml(`${base}/mc-settings.json`)
    }</code>).</p>`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mc-relay</title>
<link rel="icon" href="data:,">
<style>${PAGE_STYLE}</style>
</head>
<body data-base-path="${escapeHtml(config.basePath)}" data-public="${config.publicAccess}" data-model="${
    escapeHtml(config.defaultModel ?? "")
  }">
<main>
<h1>mc-relay</h1>
<p>A relay between web apps such as <a href="https://www.metaconfigurator.org">MetaConfigurator</a> and an OpenAI-compatible AI provider. It keeps the provider's key on the server and answers browsers from the allowed origins only.</p>
<p id="status">Status: <strong>${escapeHtml(state)}</strong>, version ${VERSION}.</p>
<h2>Use it from MetaConfigurator</h2>
${link}
<p>Or type these into MetaConfigurator's AI settings (the relay option):</p>
<dl>
<dt>Relay URL (without <code>/v1</code>)</dt><dd><code data-copy="Relay URL">${relayUrl}</code></dd>
<dt>Endpoint</dt><dd><code data-copy="Endpoint">${escapeHtml(relay.upstreams[0].baseUrl)}</code></dd>
<dt>API key</dt><dd>${keyText}</dd>
</dl>
<h2>Use it from an OpenAI SDK</h2>
<dl>
<dt><code>baseURL</code></dt><dd><code data-copy="baseURL">${sdkUrl}</code></dd>
<dt><code>apiKey</code></dt><dd>${keyText}</dd>
</dl>
<h2>Try it</h2>
<noscript><p>Signing in and the test chat need JavaScript.</p></noscript>
<form id="sign-in" hidden>
<label for="key">API key (<code>username:password</code>${config.publicAccess ? ", or empty" : ""})</label>
<input id="key" type="password" autocomplete="current-password" spellcheck="false">
<button type="submit">Sign in</button>
<p class="note">The key stays in this page's memory; it is sent to this relay only.</p>
</form>
<div id="signed-in" hidden>
<h3>Models</h3>
<ul id="models"></ul>
<h3>Your limits</h3>
<ul id="usage"></ul>
<h3>Test chat</h3>
<form id="chat">
<label for="model">Model</label>
<select id="model"></select>
<label for="message">Message</label>
<input id="message" value="Say hello in three words">
<button type="submit">Send</button>
</form>
<pre id="answer" aria-live="polite"></pre>
</div>
<p id="problem" role="alert"></p>
</main>
<script>${PAGE_SCRIPT}</script>
</body>
</html>
`;
}

/** The page's style: readable, high contrast, visible focus, light and dark. */
const PAGE_STYLE = `
body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fff}
main{max-width:46rem;margin:0 auto;padding:1rem 1.25rem 3rem}
a{color:#0b57d0}code{font:0.95em ui-monospace,monospace;background:#f0f0f0;padding:0 .2em;border-radius:3px}
dt{font-weight:600;margin-top:.5rem}dd{margin:0 0 0 1rem}
label{display:block;font-weight:600;margin-top:.75rem}
input,select{font:inherit;padding:.35rem;width:100%;max-width:30rem;box-sizing:border-box;border:1px solid #555;border-radius:4px}
button{font:inherit;margin:.5rem .5rem 0 0;padding:.35rem .9rem;border:1px solid #0b57d0;border-radius:4px;background:#0b57d0;color:#fff;cursor:pointer}
dd button{margin:0 0 0 .5rem;padding:0 .5rem;background:#fff;color:#0b57d0}
:focus-visible{outline:3px solid #e37400;outline-offset:2px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.75rem;border-radius:4px;min-height:1.5rem}
.note{font-size:.9rem;color:#444}#problem{color:#b3261e;font-weight:600}
@media (prefers-color-scheme:dark){body{color:#eee;background:#121212}a{color:#8ab4f8}code,pre{background:#2a2a2a}
input,select{background:#1e1e1e;color:#eee;border-color:#aaa}.note{color:#bbb}#problem{color:#f28b82}
dd button{background:#121212;color:#8ab4f8;border-color:#8ab4f8}}
`;

/** The page's script: copy buttons, sign-in, models, limits and a streamed test chat. It holds no server data. */
const PAGE_SCRIPT = `
"use strict";
const data = document.body.dataset;
const api = (path) => data.basePath + path;
const $ = (id) => document.getElementById(id);
let key = "";
const problem = (text) => { $("problem").textContent = text; };
for (const node of document.querySelectorAll("[data-fill]")) {
  const base = location.origin + data.basePath;
  node.textContent = node.dataset.fill.replace("{base}", base);
}
for (const code of document.querySelectorAll("[data-copy]")) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy the " + code.dataset.copy);
  button.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(code.textContent); button.textContent = "Copied"; }
    catch { button.textContent = "Select and copy"; }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  code.after(button);
}
async function call(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (key) headers.authorization = "Bearer " + key;
  const response = await fetch(api(path), { ...init, headers });
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try { message = (await response.json()).error.message; } catch {}
    throw new Error(message);
  }
  return response;
}
$("sign-in").hidden = false;
$("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  problem("");
  try {
    const models = (await (await call("/v1/models")).json()).data.map((model) => model.id);
    $("models").replaceChildren(...models.map((id) => Object.assign(document.createElement("li"), { textContent: id })));
    $("model").replaceChildren(...models.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id, selected: id === data.model })));
    const usage = await (await call("/usage")).json();
    const lines = [
      ...usage.budgets.map((b) => b.remaining.toLocaleString("en-US") + " of " + b.budget.toLocaleString("en-US") + " tokens left this UTC " + b.window + " (renews " + b.resets_at + ")"),
      ...usage.limits.map((l) => l.remaining + " of " + l.limit + " requests left per " + l.window),
      ...(usage.max_tokens_per_request ? ["answers up to " + usage.max_tokens_per_request + " tokens"] : []),
    ];
    $("usage").replaceChildren(...(lines.length ? lines : ["no limits or budgets"]).map((text) => Object.assign(document.createElement("li"), { textContent: text })));
    $("signed-in").hidden = false;
    $("message").focus();
  } catch (error) {
    problem(error.message);
  }
});
$("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  problem("");
  $("answer").textContent = "";
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: $("model").value, stream: true, messages: [{ role: "user", content: $("message").value }] }),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      pending += value;
      const events = pending.split(/\\r?\\n\\r?\\n/);
      pending = events.pop();
      for (const event of events) {
        const text = event.split(/\\r?\\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
        if (!text || text === "[DONE]") continue;
        const delta = JSON.parse(text).choices?.[0]?.delta?.content;
        if (delta) $("answer").textContent += delta;
      }
    }
  } catch (error) {
    problem(error.message);
  }
});
`;

/** The CSP hashes of the page's script and style, computed once. */
const pageHashes = (async () => {
  const hash = async (text: string) =>
    `sha256-${
      btoa(String.fromCharCode(...new Uint8Array(await crypto.subtle.digest("SHA-256", textEncoder.encode(text)))))
    }`;
  return { script: await hash(PAGE_SCRIPT), style: await hash(PAGE_STYLE) };
})();

// ---------------------------------------------------------------------------
// Bodies: reading requests, relaying answers, reading usage
// ---------------------------------------------------------------------------

/** A JSON object body, or undefined when the body is not a JSON object. */
function parseJson(body: Uint8Array): JsonObject | undefined {
  const value = parseJsonText(new TextDecoder().decode(body));
  return typeof value === "object" && value !== null && !Array.isArray(value)
    ? value as Record<string, unknown>
    : undefined;
}

/** What the relay watches for in a chat or completion answer to log its token usage. */
interface UsageWatch {
  /** The relay asked for the usage event, so the client does not get it. */
  stripUsageEvent: boolean;
}

/** Tokens one answer used, as the upstream reported them. */
export interface TokenUsage {
  /** Tokens of the prompt. */
  prompt_tokens?: number;
  /** Tokens of the answer. */
  completion_tokens?: number;
  /** Both. */
  total_tokens?: number;
  /** True when the relay estimated these figures because the upstream reported none. */
  estimated?: boolean;
}

/** A `"usage": {` in an event's text. */
const USAGE_OBJECT = /"usage"\s*:\s*\{/;

/** Largest non-streamed answer whose usage the relay reads (larger ones pass on, uncounted). */
const MAX_USAGE_BODY_BYTES = 4 * 1024 * 1024;

/**
 * The most tokens one answer's usage may report, per figure: a hundred times the largest context windows, so an
 * honest report never comes near it, and far below where sums of such figures stop being exact integers.
 */
const MAX_REPORTED_TOKENS = 1_000_000_000;

/**
 * The token usage in an answer or event: `usage` at the top (chat, completions, embeddings) or in `response`
 * (the Responses API's final event), with the Responses API's `input_tokens`/`output_tokens` names too. Undefined
 * when a figure is not a whole number from 0 to MAX_REPORTED_TOKENS (a buggy or hostile upstream): then the answer
 * is charged an estimate, as one without usage is.
 */
function pickUsage(value: unknown): TokenUsage | undefined {
  const container = value as { usage?: unknown; response?: { usage?: unknown } } | undefined;
  const usage = (container?.usage ?? container?.response?.usage) as Record<string, unknown> | undefined | null;
  if (typeof usage !== "object" || usage === null) return undefined;
  let believable = true;
  const count = (...names: string[]) => {
    for (const name of names) {
      const value = usage[name];
      if (value === undefined || value === null) continue;
      // Added to budget counters and the ledger: a count no answer can have (1e300, negative, a fraction, a text)
      // would break them or give tokens back, so the whole report is set aside and the answer is estimated instead.
      if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > MAX_REPORTED_TOKENS) {
        believable = false;
      }
      return value as number;
    }
    return undefined;
  };
  const prompt = count("prompt_tokens", "input_tokens");
  const completion = count("completion_tokens", "output_tokens");
  const total = count("total_tokens");
  if (!believable) return undefined;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: total ?? (prompt ?? 0) + (completion ?? 0),
  };
}

/**
 * Reads token usage from an answer while it passes. A streamed answer is split into whole server-sent events
 * (an incomplete event waits for its end, as any SSE client does), and the usage event the relay asked for is
 * dropped; a JSON answer is copied aside (up to MAX_USAGE_BODY_BYTES) and read when it ends. Bytes pass on as
 * they came, apart from a dropped event.
 */
function usageReader(watch: UsageWatch, eventStream: boolean) {
  let usage: TokenUsage | undefined;
  if (!eventStream) {
    const copies: Uint8Array[] = [];
    let size = 0;
    return {
      transform(chunk: Uint8Array) {
        const copy = chunk.slice();
        size += copy.byteLength;
        if (size <= MAX_USAGE_BODY_BYTES) copies.push(copy);
        return copy;
      },
      flush() {
        if (size <= MAX_USAGE_BODY_BYTES) {
          const decoder = new TextDecoder();
          const text = copies.map((copy) => decoder.decode(copy, { stream: true })).join("") + decoder.decode();
          usage = pickUsage(parseJsonText(text));
        }
        return new Uint8Array(0);
      },
      result: () => usage,
      events: undefined,
    };
  }
  // Linear in the stream's length: each chunk is scanned once (with the last three characters before it, where
  // a boundary may start), and an event's text is joined only when it is complete.
  const decoder = new TextDecoder();
  let parts: string[] = [];
  let carry = "";
  let events = 0;
  const passEvents = (text: string, final: boolean) => {
    const scan = carry + text;
    carry = "";
    let out = "";
    let start = 0;
    EVENT_BOUNDARY.lastIndex = 0;
    for (let match; (match = EVENT_BOUNDARY.exec(scan)) !== null;) {
      const end = match.index + match[0].length;
      // A "\r" at the very end may be the first half of a "\r\n" still on its way.
      if (!final && end === scan.length && match[0].endsWith("\r")) break;
      const event = parts.join("") + scan.slice(start, match.index);
      parts = [];
      start = end;
      if (event.includes("data:")) events++;
      if (!isDroppedUsageEvent(event)) out += event + match[0];
    }
    const rest = scan.slice(start);
    if (final) {
      out += parts.join("") + rest;
      parts = [];
    } else {
      const keep = Math.min(3, rest.length);
      parts.push(rest.slice(0, rest.length - keep));
      carry = rest.slice(rest.length - keep);
    }
    return textEncoder.encode(out);
  };
  /** Reads usage from an event; true when it is the usage event the relay asked for, to be taken out. */
  const isDroppedUsageEvent = (event: string) => {
    // Only an event with a usage object is parsed (OpenAI also sends "usage":null on every other chunk).
    if (!USAGE_OBJECT.test(event)) return false;
    const data = parseJsonText(
      event.split(/\r\n|\r|\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5)).join("\n"),
    );
    const found = pickUsage(data);
    if (found) usage = found;
    const choices = (data as { choices?: unknown[] } | undefined)?.choices;
    return found !== undefined && watch.stripUsageEvent && Array.isArray(choices) && choices.length === 0;
  };
  return {
    transform(chunk: Uint8Array) {
      const text = decoder.decode(chunk, { stream: true });
      // The common chunk: whole events, nothing held back, no usage in it. It goes on as it came, only counted.
      if (parts.length === 0 && carry === "" && endsAtEventBoundary(chunk) && !USAGE_OBJECT.test(text)) {
        for (let at = text.indexOf("data:"); at !== -1; at = text.indexOf("data:", at + 5)) events++;
        return chunk.slice();
      }
      return passEvents(text, false);
    },
    flush: () => passEvents(decoder.decode(), true),
    result: () => usage,
    events: () => events,
  };
}

/** Whether bytes end with a blank line (`\n\n` or `\r\n\r\n`): no event and no character is left incomplete. */
function endsAtEventBoundary(bytes: Uint8Array): boolean {
  const n = bytes.length;
  return n >= 2 && bytes[n - 1] === 10 &&
    (bytes[n - 2] === 10 || (n >= 4 && bytes[n - 2] === 13 && bytes[n - 3] === 10));
}

/** The end of a server-sent event: two line endings, each CRLF, LF or a lone CR. */
const EVENT_BOUNDARY = /(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))/g;

function parseJsonText(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** What reading a client's request body produced: the bytes, or an error to send. */
type BodyRead =
  | { body: Uint8Array<ArrayBuffer> }
  | { status: number; message: string; code: string; outcome: string; headers?: Record<string, string> };

/** What bounds the reading of one request body. */
interface BodyLimits {
  /** MAX_REQUEST_BYTES. */
  maxRequestBytes: number;
  /** REQUEST_TIMEOUT_SECONDS, in milliseconds: the longest a whole body may take. */
  requestTimeoutMs: number;
  /** The longest a body may go without a byte arriving (BODY_IDLE_MS, or REQUEST_TIMEOUT_SECONDS when shorter). */
  idleMs: number;
}

/**
 * The longest an upload may go without sending a byte, 10 s: a client that is still sending gets TCP segments
 * through in that time on any working network, while a connection that stalls on purpose would otherwise keep its
 * bytes counted against MAX_BUFFERED_BYTES for the whole REQUEST_TIMEOUT_SECONDS (180 s by default).
 */
const BODY_IDLE_MS = 10_000;

/**
 * Reads a request body into memory, refusing it as soon as it grows past MAX_REQUEST_BYTES (whatever
 * Content-Length claims), when `reserve` refuses the bytes (MAX_BUFFERED_BYTES, all requests together or one
 * caller's share: 503), when no byte arrives for `idleMs` or the whole body takes longer than
 * REQUEST_TIMEOUT_SECONDS (408), so a slow or oversized upload never reaches the upstream and the bodies held at
 * once stay bounded. Bytes are counted as they arrive, never as declared: a Content-Length alone holds nothing,
 * so uploads that declare a large body and stall cannot turn other requests away.
 */
async function readBody(
  request: Request,
  limits: BodyLimits,
  reserve: (bytes: number) => boolean,
): Promise<BodyRead> {
  const { maxRequestBytes: maxBytes, requestTimeoutMs: timeoutMs, idleMs } = limits;
  const declared = Number(request.headers.get("content-length") ?? "0");
  if (declared > maxBytes) return bodyTooLarge(maxBytes);
  if (request.body === null) return { body: new Uint8Array(0) };

  const reader = request.body.getReader();
  let cut: "idle" | "total" | undefined;
  const end = performance.now() + timeoutMs;
  // One deadline, moved on before each read: the idle limit, or the end of the whole body's time if that is sooner.
  const deadline = deadlines.add(Math.min(idleMs, timeoutMs), () => {
    cut = deadline.at >= end ? "total" : "idle";
    reader.cancel().catch(() => {});
  });
  const chunks: Uint8Array<ArrayBuffer>[] = [];
  let size = 0;
  try {
    while (true) {
      deadline.at = Math.min(end, performance.now() + idleMs);
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > maxBytes || !reserve(value.byteLength)) {
        await reader.cancel().catch(() => {});
        return size > maxBytes ? bodyTooLarge(maxBytes) : BODY_BUSY;
      }
      chunks.push(value);
    }
  } catch {
    if (cut === undefined) {
      return {
        status: 400,
        message: "the request body could not be read",
        code: "bad_request_body",
        outcome: "client_gone",
      };
    }
  } finally {
    deadlines.cancel(deadline);
  }
  if (cut !== undefined) return bodyTimeout(cut, cut === "idle" ? idleMs : timeoutMs);
  if (chunks.length === 1) return { body: chunks[0] };
  const body = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return { body };
}

/** The answer to a body past MAX_REQUEST_BYTES: 413. */
function bodyTooLarge(maxBytes: number): BodyRead {
  return {
    status: 413,
    message: `request body is larger than ${maxBytes} bytes (MAX_REQUEST_BYTES)`,
    code: "request_too_large",
    outcome: "body_too_large",
  };
}

/** The answer when the bytes of a body do not fit MAX_BUFFERED_BYTES or the caller's share of it: 503. */
const BODY_BUSY: BodyRead = {
  status: 503,
  message:
    "the relay holds as many request bodies as it may (MAX_BUFFERED_BYTES), or as many as one caller may; try again in a second",
  code: "relay_busy",
  outcome: "body_memory_full",
  // The rest of the body is not read: the connection cannot carry another request.
  headers: { "retry-after": "1", connection: "close" },
};

/** The answer to a body that stalled (`idle`) or took too long as a whole (`total`): 408, the connection closed. */
function bodyTimeout(cut: "idle" | "total", ms: number): BodyRead {
  return {
    status: 408,
    message: cut === "idle"
      ? `no byte of the request body arrived for ${ms / 1000} s; send the body without pauses`
      : `the request body did not arrive within ${ms / 1000} s (REQUEST_TIMEOUT_SECONDS)`,
    code: "request_timeout",
    outcome: cut === "idle" ? "body_idle" : "body_timeout",
    headers: { connection: "close" },
  };
}

/**
 * Bytes of request bodies held in memory by all requests together, bounded by MAX_BUFFERED_BYTES, and by each
 * holder (a user, or an address for anonymous callers) within `share`: one caller, however many connections it
 * opens, cannot take the whole allowance from everybody else.
 */
class ByteBudget {
  #held = 0;
  #byHolder = new Map<string, number>();
  /** Each holder's share: a quarter of the limit, but always one whole MAX_REQUEST_BYTES body. */
  readonly share: number;

  constructor(readonly limit: number, maxRequestBytes: number) {
    this.share = Math.min(limit, Math.max(maxRequestBytes, Math.floor(limit / 4)));
  }

  /** Counts `bytes` as held by `holder`; false (and nothing counted) when that would pass the limit or the share. */
  reserve(holder: string, bytes: number): boolean {
    const mine = this.#byHolder.get(holder) ?? 0;
    if (this.#held + bytes > this.limit || mine + bytes > this.share) return false;
    this.#held += bytes;
    this.#byHolder.set(holder, mine + bytes);
    return true;
  }

  /** Counts `bytes` of `holder` as no longer held. */
  release(holder: string, bytes: number): void {
    if (bytes === 0) return;
    this.#held = Math.max(0, this.#held - bytes);
    // Only holders with bytes held are kept: the map stays as small as the requests reading bodies.
    const mine = (this.#byHolder.get(holder) ?? 0) - bytes;
    if (mine > 0) this.#byHolder.set(holder, mine);
    else this.#byHolder.delete(holder);
  }
}

/**
 * Passes an upstream body through chunk by chunk (never buffered), counting
 * bytes, cutting it when the upstream stays silent longer than `idleMs`
 * while the relay waits for the next chunk, and cancelling the upstream when
 * the client goes away. A cut stream ends with an error, not a clean end, so
 * the client can tell that it is incomplete.
 */
function relayBody(
  source: ReadableStream<Uint8Array>,
  upstream: AbortController,
  idleMs: number,
  events: {
    onChunk(bytes: number): void;
    onEnd(outcome: string, error?: string): void;
    /** Rewrites each chunk before it is passed on (may hold back an incomplete part). */
    transform?: (chunk: Uint8Array) => Uint8Array;
    /** What is left when the upstream body ends. */
    flush?: () => Uint8Array;
  },
): ReadableStream<Uint8Array> {
  // Reading into one small buffer per stream (and passing on a right-sized copy) keeps memory per open stream
  // low: the default reader hands out a view on a fresh 64 KiB buffer per chunk, kept alive until collected.
  const reader = source.getReader({ mode: "byob" });
  let buffer = new Uint8Array(RELAY_BUFFER_MIN_BYTES);
  let ended = false;
  // The stream's silence deadline: moved on when a read starts, set aside (Infinity) while the client reads.
  const silence = deadlines.add(Infinity, () => upstream.abort(new RelayAbort("upstream_timeout")));

  const end = (outcome: string, error?: string) => {
    if (ended) return;
    ended = true;
    deadlines.cancel(silence);
    events.onEnd(outcome, error);
  };

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      silence.at = performance.now() + idleMs;
      try {
        let chunk: Uint8Array | undefined;
        while (chunk === undefined || chunk.byteLength === 0) {
          const { done, value } = await reader.read(buffer);
          if (done) {
            silence.at = Infinity;
            const rest = events.flush?.();
            if (rest && rest.byteLength > 0) {
              events.onChunk(rest.byteLength);
              controller.enqueue(rest);
            }
            end("completed");
            controller.close();
            return;
          }
          chunk = events.transform ? events.transform(value) : value.slice();
          // A read that fills the buffer asks for a larger one (up to RELAY_BUFFER_MAX_BYTES): a stream of small
          // events keeps 2 KiB per stream, a large body is read in large pieces.
          buffer = value.byteLength === value.buffer.byteLength && value.byteLength < RELAY_BUFFER_MAX_BYTES
            ? new Uint8Array(value.byteLength * 4)
            : new Uint8Array(value.buffer);
          // The upstream spoke, even if only part of an event: the silence starts again.
          if (chunk.byteLength === 0) silence.at = performance.now() + idleMs;
        }
        silence.at = Infinity;
        events.onChunk(chunk.byteLength);
        controller.enqueue(chunk);
      } catch (error) {
        silence.at = Infinity;
        const reason = upstream.signal.reason;
        const outcome = reason instanceof RelayAbort ? reason.kind : "upstream_stream_error";
        end(outcome, outcome === "upstream_stream_error" ? errorText(error) : undefined);
        // Erroring the body makes Deno drop the connection, so the client sees the cut. Deno prints the
        // error to stderr: keep that to one line without a stack (the request's log line has the details).
        controller.error(new BodyCut(outcome));
      }
    },
    cancel(reason) {
      end("client_gone");
      upstream.abort(new RelayAbort("client_gone"));
      return reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
}

/** The read buffer each relayed stream starts with: a server-sent event of an LLM answer is far smaller. */
const RELAY_BUFFER_MIN_BYTES = 2 * 1024;
/** The largest read buffer a relayed body grows to; a larger chunk simply takes more than one read. */
const RELAY_BUFFER_MAX_BYTES = 64 * 1024;

/** The largest upstream body the relay reads to rewrite; a larger one passes through untouched. */
const MAX_REWRITTEN_BODY_BYTES = 1024 * 1024;

/** Keeps only the allowed models in an OpenAI model list and adds `extra` (the aliases); else passes it on unchanged. */
function filterModelList(text: string, allowed: (model: string) => boolean, extra: object[] = []): string {
  const list = parseJsonText(text) as { data?: { id?: unknown }[] } | undefined;
  if (!Array.isArray(list?.data)) return text;
  list.data = [...list.data.filter((model) => typeof model?.id === "string" && allowed(model.id)), ...extra];
  return JSON.stringify(list);
}

/** The model aliases a client may use, as entries of an OpenAI model list (`owned_by: "mc-relay"`). */
function aliasModels(relay: Relay): object[] {
  return Object.keys(relay.config.modelAliases)
    .filter((alias) => relay.allowedModels.size === 0 || relay.allowedModels.has(alias))
    .map((alias) => ({ id: alias, object: "model", created: 0, owned_by: "mc-relay" }));
}

/**
 * Reads a small body and returns it rewritten by `rewrite`. When the body is larger than
 * MAX_REWRITTEN_BODY_BYTES, or `rewrite` returns undefined (it cannot make the text safe), `replace` gives the
 * body instead; without `replace` a large body passes on unchanged. A body that fails while being read ends
 * with the same error for the client.
 */
async function rewriteBody(
  body: ReadableStream<Uint8Array>,
  rewrite: (text: string) => string | undefined,
  replace?: (reason: string) => string,
): Promise<{ body: ReadableStream<Uint8Array> }> {
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    while (size <= MAX_REWRITTEN_BODY_BYTES) {
      const { done, value } = await reader.read();
      if (done) {
        const text = new TextDecoder().decode(await new Blob(chunks as BlobPart[]).arrayBuffer());
        const rewritten = rewrite(text) ?? replace?.("it shows a secret in a form the relay cannot mask") ?? "";
        return { body: new Blob([rewritten]).stream() };
      }
      chunks.push(value);
      size += value.byteLength;
    }
  } catch (error) {
    return { body: new ReadableStream({ start: (controller) => controller.error(error) }) };
  }
  if (replace) {
    const replaced = replace(`larger than ${MAX_REWRITTEN_BODY_BYTES} bytes`);
    await reader.cancel().catch(() => {});
    return { body: new Blob([replaced]).stream() };
  }
  return {
    body: new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(chunk);
      },
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      },
      cancel: (reason) => reader.cancel(reason),
    }),
  };
}

/** Prefixes a provider's 429 message so users can tell the provider's quota from the relay's own limit. */
function explainProviderRateLimit(text: string, upstreamHost: string): string {
  const body = parseJsonText(text) as { error?: { message?: unknown } } | undefined;
  if (typeof body?.error?.message !== "string") return text; // not OpenAI's error shape: pass it on as it is
  body.error.message =
    `The provider ${upstreamHost} is rate-limiting the relay (the provider's quota or rate, not your relay user's limit): ${body.error.message}`;
  return JSON.stringify(body);
}

/** An error's message followed by those of its causes (fetch puts the useful part in `cause`). */
function errorText(error: unknown): string {
  const parts: string[] = [];
  for (let current = error, depth = 0; current !== undefined && depth < 5; depth++) {
    parts.push(current instanceof Error ? current.message : String(current));
    current = current instanceof Error ? current.cause : undefined;
  }
  return parts.join(": ");
}

/** Turns a fetch error into a short, secret-free phrase for clients. */
function describeNetworkError(message: string): string {
  if (/connection refused/i.test(message)) return "connection refused";
  if (/dns|lookup address|name or service not known|no such host/i.test(message)) return "DNS lookup failed";
  if (/certificate|tls|ssl|handshake/i.test(message)) return "TLS handshake failed";
  if (/reset/i.test(message)) return "connection reset";
  if (/timed out|timeout/i.test(message)) return "connection timed out";
  return "network error";
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/** Upper bounds (seconds) of the upstream latency histogram's buckets. */
const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
/** At most this many label combinations per counter: past it, new ones are counted under "other" (kinds kept apart). */
const MAX_LABEL_SETS = 2000;
/** At most this many model labels per user: past it, that user's further models are counted as "other". */
const MAX_MODELS_PER_USER = 20;

/** Prometheus metrics: requests by route, status and user, upstream latency, open streams, tokens. */
export class RelayMetrics {
  #requests = new Map<string, number>();
  #tokens = new Map<string, number>();
  #latency = { buckets: LATENCY_BUCKETS.map(() => 0), sum: 0, count: 0 };
  /** Event streams being relayed right now. */
  openStreams = 0;
  /** PBKDF2 password checks run (decoys for unknown names included). */
  hashChecks = 0;
  /** 1 while the shared counter store is unreachable and this copy counts alone. */
  storeDegraded = 0;
  /** Per alias target: 1 while its circuit breaker is open. */
  breakerOpen = new Map<string, number>();
  #failovers = new Map<string, number>();

  /** Counts a failed attempt at an alias target that moved the request on. */
  countFailover(target: string) {
    RelayMetrics.#add(this.#failovers, { target }, 1);
  }

  static #label(value: string) {
    return value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
  }

  #modelsByUser = new Map<string, Set<string>>();

  static #add(counter: Map<string, number>, labels: Record<string, string>, amount: number) {
    let key = Object.entries(labels).map(([name, value]) => `${name}="${RelayMetrics.#label(value)}"`).join(",");
    if (!counter.has(key) && counter.size >= MAX_LABEL_SETS) {
      key = Object.keys(labels).map((name) => `${name}="${name === "kind" ? labels.kind : "other"}"`).join(",");
    }
    counter.set(key, (counter.get(key) ?? 0) + amount);
  }

  /** The model's label for this user: itself among the user's first MAX_MODELS_PER_USER models, else "other". */
  #modelLabel(user: string, model: string): string {
    let models = this.#modelsByUser.get(user);
    if (models === undefined) this.#modelsByUser.set(user, models = new Set());
    if (models.has(model)) return model;
    if (models.size >= MAX_MODELS_PER_USER) return "other";
    models.add(model);
    return model;
  }

  /** The label text of each route, status and user seen so far (at most MAX_LABEL_SETS). */
  #requestKeys = new Map<string, string>();

  /** Counts one answered request. */
  countRequest(route: string, status: number, user: string) {
    // The label text is made once per route, status and user (a bounded set), not per request.
    const id = `${route}\n${status}\n${user}`;
    let key = this.#requestKeys.get(id);
    if (key === undefined) {
      key = `route="${RelayMetrics.#label(route)}",status="${status}",user="${RelayMetrics.#label(user)}"`;
      if (this.#requestKeys.size < MAX_LABEL_SETS) this.#requestKeys.set(id, key);
    }
    if (!this.#requests.has(key) && this.#requests.size >= MAX_LABEL_SETS) {
      key = 'route="other",status="other",user="other"';
    }
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
  }

  /** Records how long the upstream took to send its response headers. */
  observeUpstreamLatency(seconds: number) {
    LATENCY_BUCKETS.forEach((bound, index) => {
      if (seconds <= bound) this.#latency.buckets[index]++;
    });
    this.#latency.sum += seconds;
    this.#latency.count++;
  }

  /** Adds the tokens of one answer. */
  countTokens(user: string, requestedModel: string, usage: TokenUsage) {
    const model = this.#modelLabel(user, requestedModel);
    for (const kind of ["prompt", "completion"] as const) {
      const tokens = usage[`${kind}_tokens`];
      if (tokens !== undefined) RelayMetrics.#add(this.#tokens, { user, model, kind }, tokens);
    }
  }

  /** The metrics in Prometheus' text format. */
  render(): string {
    const lines = [
      "# HELP mc_relay_requests_total Requests answered, by route, status and user.",
      "# TYPE mc_relay_requests_total counter",
      ...[...this.#requests].map(([labels, value]) => `mc_relay_requests_total{${labels}} ${value}`),
      "# HELP mc_relay_upstream_latency_seconds Time until the upstream's response headers.",
      "# TYPE mc_relay_upstream_latency_seconds histogram",
      ...LATENCY_BUCKETS.map((bound, index) =>
        `mc_relay_upstream_latency_seconds_bucket{le="${bound}"} ${this.#latency.buckets[index]}`
      ),
      `mc_relay_upstream_latency_seconds_bucket{le="+Inf"} ${this.#latency.count}`,
      `mc_relay_upstream_latency_seconds_sum ${this.#latency.sum}`,
      `mc_relay_upstream_latency_seconds_count ${this.#latency.count}`,
      "# HELP mc_relay_password_hash_checks_total PBKDF2 password checks run, for known and unknown user names.",
      "# TYPE mc_relay_password_hash_checks_total counter",
      `mc_relay_password_hash_checks_total ${this.hashChecks}`,
      "# HELP mc_relay_store_degraded 1 while Redis is unreachable and this copy counts limits and budgets alone.",
      "# TYPE mc_relay_store_degraded gauge",
      `mc_relay_store_degraded ${this.storeDegraded}`,
      "# HELP mc_relay_failovers_total Failed attempts at an alias target, by target.",
      "# TYPE mc_relay_failovers_total counter",
      ...[...this.#failovers].map(([labels, value]) => `mc_relay_failovers_total{${labels}} ${value}`),
      "# HELP mc_relay_breaker_open 1 while an alias target's circuit breaker is open.",
      "# TYPE mc_relay_breaker_open gauge",
      ...[...this.breakerOpen].map(([target, value]) =>
        `mc_relay_breaker_open{target="${RelayMetrics.#label(target)}"} ${value}`
      ),
      "# HELP mc_relay_open_streams Event streams being relayed now.",
      "# TYPE mc_relay_open_streams gauge",
      `mc_relay_open_streams ${this.openStreams}`,
      "# HELP mc_relay_tokens_total Tokens the upstreams reported, by user, model and kind (prompt, completion).",
      "# TYPE mc_relay_tokens_total counter",
      ...[...this.#tokens].map(([labels, value]) => `mc_relay_tokens_total{${labels}} ${value}`),
    ];
    return `${lines.join("\n")}\n`;
  }
}

/** A response with the metrics, for GET /metrics. */
export function metricsResponse(metrics: RelayMetrics): Response {
  const bytes = textEncoder.encode(metrics.render());
  return new Response(bytes, {
    headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8", "content-length": String(bytes.byteLength) },
  });
}

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

/** A structured logger that writes one JSON object per line. */
export interface Logger {
  /** Whether lines of this level are written at all. */
  enabled(level: LogLevel): boolean;
  /** Logs at debug level. */
  debug(msg: string, fields?: Record<string, unknown>): void;
  /** Logs at info level. */
  info(msg: string, fields?: Record<string, unknown>): void;
  /** Logs at warn level. */
  warn(msg: string, fields?: Record<string, unknown>): void;
  /** Logs at error level. */
  error(msg: string, fields?: Record<string, unknown>): void;
}

/** The password in a redis:// URL (decoded), or "" when it has none. */
function redisPassword(url: string): string {
  try {
    return decodeURIComponent(new URL(url).password);
  } catch {
    return "";
  }
}

/**
 * Creates the logger. Callers never pass headers, bodies or credentials;
 * as a second line of defence every configured secret is masked in each line.
 */
export function createLogger(config: RelayConfig, sink: (line: string) => void = console.log): Logger {
  const threshold = LOG_LEVELS.indexOf(config.logLevel);
  const passwords = config.users.flatMap((user) => user.password === undefined ? [] : [user.password]);
  const upstreamSecrets = config.upstreams.flatMap((
    upstream,
  ) => [upstream.apiKey, ...Object.values(upstream.extraHeaders)]);
  const redisSecrets = config.redisUrl === undefined ? [] : [config.redisUrl, redisPassword(config.redisUrl)];
  const sealSecrets = [...(config.sealSecret ? [config.sealSecret] : []), ...config.sealSecretsPrevious];
  const secrets = [...upstreamSecrets, ...passwords, ...redisSecrets, ...sealSecrets]
    .filter((secret) => secret.length >= 6)
    .flatMap((secret) => [secret, JSON.stringify(secret).slice(1, -1)]);
  const write = (level: LogLevel) => (msg: string, fields: Record<string, unknown> = {}) => {
    if (LOG_LEVELS.indexOf(level) < threshold) return;
    let line = JSON.stringify({ time: new Date().toISOString(), level, msg, ...fields });
    for (const secret of secrets) line = line.replaceAll(secret, "[REDACTED]");
    sink(line);
  };
  return {
    enabled: (level) => LOG_LEVELS.indexOf(level) >= threshold,
    debug: write("debug"),
    info: write("info"),
    warn: write("warn"),
    error: write("error"),
  };
}

// ---------------------------------------------------------------------------
// Demo upstream: an echo model for `deno task demo`
// ---------------------------------------------------------------------------

/**
 * A tiny OpenAI-compatible upstream that echoes the last user message back, on every route the common SDKs call:
 * chat completions, completions, the Responses API (streamed word by word when asked) and embeddings. Only
 * `deno task demo` uses it; it is never used when UPSTREAM_BASE_URL is set. It checks the key so the demo shows
 * the relay adding it.
 */
export function createDemoUpstream(apiKey: string): (request: Request) => Promise<Response> {
  const demoError = (status: number, message: string, code: string) =>
    Response.json({ error: { message: `demo upstream: ${message}`, type: "invalid_request_error", code } }, { status });
  return async (request) => {
    const path = new URL(request.url).pathname;
    if (request.headers.get("authorization") !== `Bearer ${apiKey}`) {
      return demoError(401, "wrong key", "invalid_api_key");
    }
    if (path === "/models" && request.method === "GET") {
      return Response.json({
        object: "list",
        data: [{ id: DEMO_MODEL, object: "model", created: 0, owned_by: "mc-relay-demo" }],
      });
    }
    const answer = request.method === "POST" ? DEMO_ROUTES[path] : undefined;
    if (answer === undefined) return demoError(404, "not found", "unknown_url");
    let payload: DemoRequest;
    try {
      payload = await request.json();
    } catch {
      return demoError(400, "body is not JSON", "invalid_json");
    }
    return answer(payload);
  };
}

/** The demo's one model. */
const DEMO_MODEL = "echo";

/** What the demo reads from a request body, whichever route it came to. */
interface DemoRequest {
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  messages?: { role?: string; content?: unknown }[];
  prompt?: unknown;
  input?: unknown;
}

/** The text of a message's content: a string, or the text parts of a list. */
function demoText(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content.map((part) => typeof part === "string" ? part : part?.text ?? "").join(" ");
}

/** The last user message of a chat, a completion prompt, or a Responses API input. */
function demoPrompt(payload: DemoRequest): string {
  if (Array.isArray(payload.messages)) {
    return demoText([...payload.messages].reverse().find((message) => message.role === "user")?.content);
  }
  if (payload.prompt !== undefined) return demoText(payload.prompt);
  if (typeof payload.input === "string") return payload.input;
  if (Array.isArray(payload.input)) {
    const users = payload.input.filter((item) => item?.role === "user" || typeof item === "string");
    const last = users.at(-1);
    return typeof last === "string" ? last : demoText(last?.content);
  }
  return "";
}

/** The echo, and its token counts (a word a token). */
function demoReply(payload: DemoRequest) {
  const prompt = demoPrompt(payload);
  const text = `Echo: ${prompt || "(no user message)"}`;
  const promptTokens = prompt.split(/\s+/).filter(Boolean).length;
  const completionTokens = text.split(/\s+/).length;
  return { text, words: text.split(/(?<= )/), promptTokens, completionTokens, created: Math.floor(Date.now() / 1000) };
}

/** A stream of server-sent events, `pause` ms apart, from a list of events to send (`event:` name optional). */
function demoStream(events: { event?: string; data: unknown }[], pause = 60): Response {
  const encoder = new TextEncoder();
  let index = 0;
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (index >= events.length) {
        controller.close();
        return;
      }
      if (index > 0) await new Promise((resolve) => setTimeout(resolve, pause));
      const { event, data } = events[index++];
      const text = typeof data === "string" ? data : JSON.stringify(data);
      controller.enqueue(encoder.encode(`${event ? `event: ${event}\n` : ""}data: ${text}\n\n`));
    },
  });
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
}

/** The demo's answer for each POST route. */
const DEMO_ROUTES: Record<string, (payload: DemoRequest) => Response> = {
  "/chat/completions"(payload) {
    const reply = demoReply(payload);
    const id = `chatcmpl-demo-${crypto.randomUUID()}`;
    const usage = {
      prompt_tokens: reply.promptTokens,
      completion_tokens: reply.completionTokens,
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    const base = { id, created: reply.created, model: DEMO_MODEL };
    if (!payload.stream) {
      return Response.json({
        ...base,
        object: "chat.completion",
        choices: [{ index: 0, message: { role: "assistant", content: reply.text }, finish_reason: "stop" }],
        usage,
      });
    }
    const chunk = (delta: Record<string, string>, finish: string | null) => ({
      ...base,
      object: "chat.completion.chunk",
      choices: [{ index: 0, delta, finish_reason: finish }],
    });
    return demoStream([
      { data: chunk({ role: "assistant", content: "" }, null) },
      ...reply.words.map((word) => ({ data: chunk({ content: word }, null) })),
      { data: chunk({}, "stop") },
      ...(payload.stream_options?.include_usage === true
        ? [{ data: { ...base, object: "chat.completion.chunk", choices: [], usage } }]
        : []),
      { data: "[DONE]" },
    ]);
  },
  "/completions"(payload) {
    const reply = demoReply(payload);
    const base = {
      id: `cmpl-demo-${crypto.randomUUID()}`,
      object: "text_completion",
      created: reply.created,
      model: DEMO_MODEL,
    };
    const usage = {
      prompt_tokens: reply.promptTokens,
      completion_tokens: reply.completionTokens,
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    if (!payload.stream) {
      return Response.json({ ...base, choices: [{ index: 0, text: reply.text, finish_reason: "stop" }], usage });
    }
    return demoStream([
      ...reply.words.map((word) => ({ data: { ...base, choices: [{ index: 0, text: word, finish_reason: null }] } })),
      {
        data: {
          ...base,
          choices: [{ index: 0, text: "", finish_reason: "stop" }],
          ...(payload.stream_options?.include_usage === true && { usage }),
        },
      },
      { data: "[DONE]" },
    ]);
  },
  "/embeddings"(payload) {
    const inputs = Array.isArray(payload.input) ? payload.input : [payload.input];
    const vector = (text: unknown) =>
      Array.from(
        { length: 8 },
        (_, index) => ((String(text).charCodeAt(index % Math.max(1, String(text).length)) || 0) % 17) / 16,
      );
    const tokens = inputs.map((input) => String(input).split(/\s+/).filter(Boolean).length).reduce((a, b) => a + b, 0);
    return Response.json({
      object: "list",
      data: inputs.map((input, index) => ({ object: "embedding", index, embedding: vector(input) })),
      model: DEMO_MODEL,
      usage: { prompt_tokens: tokens, total_tokens: tokens },
    });
  },
  "/responses"(payload) {
    const reply = demoReply(payload);
    const id = `resp_demo${crypto.randomUUID().replaceAll("-", "")}`;
    const messageId = `msg_demo${crypto.randomUUID().replaceAll("-", "")}`;
    const usage = {
      input_tokens: reply.promptTokens,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: reply.completionTokens,
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    const part = { type: "output_text", text: reply.text, annotations: [] };
    const message = { type: "message", id: messageId, status: "completed", role: "assistant", content: [part] };
    const response = (status: string, extra: Record<string, unknown>) => ({
      id,
      object: "response",
      created_at: reply.created,
      status,
      model: DEMO_MODEL,
      output: [],
      incomplete_details: null,
      error: null,
      ...extra,
    });
    if (!payload.stream) {
      return Response.json(response("completed", { output: [message], output_text: reply.text, usage }));
    }
    let sequence = 0;
    const event = (type: string, data: Record<string, unknown>) => ({
      event: type,
      data: { type, sequence_number: sequence++, ...data },
    });
    const at = { item_id: messageId, output_index: 0, content_index: 0 };
    return demoStream([
      event("response.created", { response: response("in_progress", {}) }),
      event("response.output_item.added", {
        output_index: 0,
        item: { ...message, status: "in_progress", content: [] },
      }),
      event("response.content_part.added", { ...at, part: { ...part, text: "" } }),
      ...reply.words.map((delta) => event("response.output_text.delta", { ...at, delta, logprobs: [] })),
      event("response.output_text.done", { ...at, text: reply.text, logprobs: [] }),
      event("response.content_part.done", { ...at, part }),
      event("response.output_item.done", { output_index: 0, item: message }),
      event("response.completed", { response: response("completed", { output: [message], usage }) }),
    ]);
  },
};

// ---------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------

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
function errorName(error: unknown): string {
  return error instanceof Error ? error.name : "error";
}

function exitWithErrors(errors: string[], hint = ""): never {
  console.error(`mc-relay: cannot start, ${errors.length} configuration problem(s):`);
  for (const error of errors) console.error(`  ${error}`);
  if (hint) console.error(hint);
  console.error("See 'mc-relay --help' or README.md for every variable.");
  Deno.exit(1);
}

/** Where a start without env file can look for one: a `.env` beside it that was not read. */
function envFileHint(files: EnvFileOptions["files"]): string {
  if (files.length > 0) return "";
  try {
    Deno.statSync(".env");
    return "A .env file is in this folder but was not read: run 'mc-relay --env-file .env' (deno task start reads it).";
  } catch {
    return "Set the variables in the environment, or put them in a .env file (from examples/.env.example) and run 'mc-relay --env-file .env' or 'deno task start'.";
  }
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

/**
 * Starts the relay server for a config and wires graceful shutdown; resolves when it has stopped. `announce` hears
 * the port once the relay listens (the demo prints its banner then). With WORKERS above 1 the same port is served by
 * that many threads (`startWorkers`); this one also serves METRICS_PORT and handles the signals for all.
 */
export async function serve(
  config: RelayConfig,
  warnings: string[] = [],
  announce?: (port: number) => void,
): Promise<void> {
  const log = createLogger(config);
  for (const warning of warnings) log.warn(warning);
  let workers: Worker[] = [];
  // The WORKERS threads take turns at the SQLite file through one lock in shared memory (`ThreadLock`).
  const lock = config.workers > 1 ? new ThreadLock() : undefined;
  const { server, counters, metrics } = await startServer(config, log, lock, (port, url) => {
    log.info(`mc-relay ${VERSION} listening`, {
      url,
      upstream: new URL(config.upstreams[0].baseUrl).host,
      ...(config.upstreams.length > 1 &&
        { upstreams: config.upstreams.map((upstream) => `${upstream.name}=${new URL(upstream.baseUrl).host}`) }),
      allowed_origins: config.allowedOrigins,
      ...(config.workers > 1 && { workers: config.workers }),
    });
    workers = startWorkers({ ...config, port }, config.workers - 1, lock);
    announce?.(port);
  });
  // METRICS_PORT: /metrics without auth on its own port, for a scraper on a private network.
  const metricsServer = config.metricsPort === undefined ? undefined : listen(
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

  let stopping = false;
  const stop = (signal: Deno.Signal) => {
    // A second signal (process managers often send one per process in the group) changes nothing.
    if (stopping) return;
    stopping = true;
    log.info("shutting down: no new connections, in-flight requests may finish", {
      signal,
      timeout_seconds: config.shutdownTimeoutMs / 1000,
    });
    const deadline = setTimeout(() => {
      log.warn("shutdown timeout reached; closing remaining requests");
      Deno.exit(0);
    }, config.shutdownTimeoutMs);
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
      Deno.addSignalListener(signal, () => stop(signal));
    } catch {
      // Some hosts (Deno Deploy) manage the process themselves and offer no signals.
    }
  }
  await server.finished;
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
  const handler = createHandler(config, { metrics, counters });
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
  }, handler);
  return { server, counters, metrics };
}

/** The name WORKERS threads get, so the module knows it runs in one. */
const WORKER_NAME = "mc-relay-worker";

/** Starts `count` threads that serve `config` (its port already chosen) beside this one, on the same port. */
function startWorkers(config: RelayConfig, count: number, lock?: ThreadLock): Worker[] {
  return Array.from({ length: count }, () => {
    const worker = new Worker(import.meta.url, { type: "module", name: WORKER_NAME });
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
function runWorker(): void {
  const scope = globalThis as unknown as {
    onmessage: (event: MessageEvent) => void;
    postMessage: (message: unknown) => void;
  };
  let stopping: (() => Promise<void>) | undefined;
  scope.onmessage = async (event) => {
    if (event.data === "stop") {
      await stopping?.();
      scope.postMessage("stopped");
      return;
    }
    const config = event.data.serve as RelayConfig;
    const memory = event.data.lock as SharedArrayBuffer | undefined;
    const lock = memory === undefined ? undefined : new ThreadLock(memory);
    const { server, counters } = await startServer(config, createLogger(config), lock, () => {});
    stopping = async () => {
      await server.shutdown();
      await counters.close?.();
    };
  };
}

/**
 * `mc-relay healthcheck`: asks the running relay's /health over loopback; 0 when it answers ok.
 * It speaks HTTP/1.1 over a plain or TLS socket itself: with TLS the certificate chain is checked
 * (the relay's own certificate is trusted too, so self-signed ones pass) but not the host name,
 * since a certificate for relay.example.com is fine even though the check connects to 127.0.0.1.
 */
async function healthcheck(env: RelayEnv): Promise<number> {
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
async function hashPasswordCommand(): Promise<number> {
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
async function sealCommand(args: string[], env: RelayEnv): Promise<number> {
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

/** What `mc-relay usage` was asked for. */
export interface UsageQuery {
  /** First UTC day, `YYYY-MM-DD`. */
  since: string;
  /** Last UTC day, `YYYY-MM-DD`. */
  until: string;
  /** The column the rows are summed by. */
  by: "user" | "model" | "upstream" | "day";
  /** The output format. */
  format: "table" | "csv" | "json";
}

/** Reads `--since`, `--until`, `--by` and `--format` (each `--name value` or `--name=value`); a problem as text. */
export function parseUsageArgs(args: string[], today: string): UsageQuery | { problem: string } {
  const query: UsageQuery = { since: `${today.slice(0, 7)}-01`, until: today, by: "user", format: "table" };
  const allowed: Record<string, RegExp> = {
    since: /^\d{4}-\d{2}-\d{2}$/,
    until: /^\d{4}-\d{2}-\d{2}$/,
    by: /^(user|model|upstream|day)$/,
    format: /^(table|csv|json)$/,
  };
  for (let index = 0; index < args.length; index++) {
    const [flag, inline] = args[index].split(/=(.*)/s);
    const name = flag.replace(/^--/, "");
    const value = inline ?? args[++index];
    if (!flag.startsWith("--") || !(name in allowed)) return { problem: `unknown option "${flag}"` };
    if (value === undefined || !allowed[name].test(value)) {
      return { problem: `--${name} takes ${String(allowed[name]).replace(/^\/\^|\$\/$/g, "")}, got "${value ?? ""}"` };
    }
    (query as unknown as Record<string, string>)[name] = value;
  }
  return query;
}

/** Sums ledger rows by one column: one row per user (or address), model, upstream or day, sorted. */
export function summariseUsage(
  rows: LedgerRow[],
  by: UsageQuery["by"],
): (Omit<LedgerRow, "day" | "who" | "model" | "upstream"> & { key: string })[] {
  const sums = new Map<string, Omit<LedgerRow, "day" | "who" | "model" | "upstream"> & { key: string }>();
  for (const row of rows) {
    const key = by === "user" ? row.who : row[by];
    const sum = sums.get(key) ??
      { key, requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, estimated_requests: 0 };
    sum.requests += row.requests;
    sum.prompt_tokens += row.prompt_tokens;
    sum.completion_tokens += row.completion_tokens;
    sum.total_tokens += row.total_tokens;
    sum.estimated_requests += row.estimated_requests;
    sums.set(key, sum);
  }
  return [...sums.values()].sort((a, b) => a.key.localeCompare(b.key));
}

/**
 * `mc-relay usage`: the usage ledger from STATE_PATH or REDIS_URL (the relay's own settings), summed by user,
 * model, upstream or day, as a table, CSV or JSON, so an operator can bill or audit without a log pipeline.
 */
async function usageCommand(args: string[], env: RelayEnv): Promise<number> {
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

/**
 * Characters a terminal or an editor acts on rather than shows: C0 and C1 controls (ESC starts the escapes that
 * move the cursor, retitle the window or make links), DEL, the line and paragraph separators and the bidirectional
 * overrides (which reorder what is shown), and the backslash that starts an escape.
 */
// deno-lint-ignore no-control-regex -- matching control characters is the point
const UNSHOWABLE = /[\x00-\x1f\x7f-\x9f\\\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/**
 * A name a client chose (a model, an address) as text that shows as it is: every `UNSHOWABLE` character as an
 * escape, `\x1b` or `\u202e` (`\\` for the backslash), so names stay readable and different names stay different.
 */
function escapeControls(text: string): string {
  return text.replace(UNSHOWABLE, (char) => {
    if (char === "\\") return "\\\\";
    const code = char.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

/**
 * A CSV cell (RFC 4180) that a spreadsheet shows and never runs: controls escaped as in the table (the CSV is
 * printed to a terminal too), a cell that would start a formula (=, +, -, @, tab, carriage return, or those after
 * spaces, or their full-width forms) prefixed with a single quote as OWASP's CSV-injection guidance says, and such a
 * cell, or one with a quote or comma, quoted.
 */
function csvCell(text: string): string {
  const shown = escapeControls(text);
  const formula = /^[\s\u3000]*[=+\-@\t\r\uff1d\uff0b\uff0d\uff20]/.test(shown);
  const cell = formula ? `'${shown}` : shown;
  return formula || /[",]/.test(cell) ? `"${cell.replaceAll('"', '""')}"` : cell;
}

/** The summed ledger as a table (with a total line), CSV or JSON; client-chosen names are shown safely. */
function formatUsage(sums: ReturnType<typeof summariseUsage>, query: UsageQuery): string {
  const columns = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_requests"] as const;
  if (query.format === "json") {
    return JSON.stringify(
      {
        since: query.since,
        until: query.until,
        by: query.by,
        rows: sums.map(({ key, ...sum }) => ({ [query.by]: key, ...sum })),
      },
      null,
      2,
    );
  }
  if (query.format === "csv") {
    return [
      [query.by, ...columns].join(","),
      ...sums.map((sum) => [csvCell(sum.key), ...columns.map((name) => sum[name])].join(",")),
    ].join("\n");
  }
  const total = {
    key: "total",
    requests: 0,
    prompt_tokens: 0,
    completion_tokens: 0,
    total_tokens: 0,
    estimated_requests: 0,
  };
  for (const sum of sums) for (const name of columns) total[name] += sum[name];
  const lines = [
    [query.by, ...columns],
    ...[...sums, total].map((sum) => [escapeControls(sum.key), ...columns.map((name) => String(sum[name]))]),
  ];
  const widths = lines[0].map((_, column) => Math.max(...lines.map((line) => line[column].length)));
  const render = (line: string[]) =>
    line.map((cell, column) => column === 0 ? cell.padEnd(widths[column]) : cell.padStart(widths[column])).join("  ");
  return [`usage ${query.since} to ${query.until} (UTC days), by ${query.by}`, ...lines.map(render)].join("\n");
}

/** `mc-relay demo`: the relay in front of the built-in echo model, with generated credentials. */
async function demo(env: RelayEnv): Promise<void> {
  if (env.UPSTREAM_BASE_URL) {
    exitWithErrors([
      "UPSTREAM_BASE_URL is set, so the demo will not start (it never stands in for a real upstream); unset it for the demo, or run 'deno task start'",
    ]);
  }
  const random = (bytes: number) =>
    btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(bytes))))
      .replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
  const apiKey = `demo-${random(12)}`;
  const upstream = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, createDemoUpstream(apiKey));
  const result = parseConfig({
    ALLOWED_ORIGIN: METACONFIGURATOR_ORIGINS.join(","),
    HOST: "127.0.0.1",
    ...env,
    UPSTREAM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}`,
    UPSTREAM_API_KEY: apiKey,
    MC_RELAY_USERNAME: "demo",
    MC_RELAY_PASSWORD: random(18),
    DEFAULT_MODEL: env.DEFAULT_MODEL ?? DEMO_MODEL,
  });
  if (!result.ok) exitWithErrors(result.errors);
  const { config } = result;
  const shownHost = config.host === "0.0.0.0" || config.host === "127.0.0.1" ? "localhost" : config.host;
  const apiKeyForClients = `${config.users[0].name}:${config.users[0].password}`;
  // Printed once the port is known (PORT=0 picks a free one).
  const banner = (port: number) => {
    const base = `http://${shownHost}:${port}${config.basePath}`;
    console.log(`
mc-relay demo: the relay runs in front of a built-in echo model; nothing leaves this machine.

  This relay's page:          ${base}/
  MetaConfigurator, one link: ${mcSettingsLink(base)}
  MetaConfigurator, by hand:  Relay URL ${base}  (without /v1)
                              Endpoint  ${config.upstreams[0].baseUrl}
  An OpenAI SDK's baseURL:    ${base}/v1
  API key (username:password): ${apiKeyForClients}
  Model:                      ${DEMO_MODEL}
  Allowed browser origins:    ${config.allowedOrigins.join(", ") || "none"}

Try it:
  curl -N ${base}/v1/chat/completions -H "Authorization: Bearer ${apiKeyForClients}" -H "Content-Type: application/json" -d '{"model":"${DEMO_MODEL}","stream":true,"messages":[{"role":"user","content":"Hello relay"}]}'

Stop with Ctrl+C. For a real provider, set the variables in README.md and run 'deno task start'.
`);
  };
  await serve(config, [], banner);
}

/** Runs the command line: the relay, `demo`, `healthcheck`, `--help` or `--version`. */
export async function main(argv: string[]): Promise<number> {
  const options = takeEnvFileOptions(argv);
  if ("problem" in options) {
    console.error(`mc-relay: ${options.problem}`);
    return 2;
  }
  const args = options.rest;
  const command = args[0];
  if (command === "--help" || command === "-h" || command === "help") {
    console.log(HELP);
    return 0;
  }
  if (command === "--version" || command === "-V" || command === "version") {
    console.log(`mc-relay ${VERSION}`);
    return 0;
  }
  if (command === "hash-password") return await hashPasswordCommand();
  const { env, notes, problems } = await readEnv(options.files);
  if (problems.length > 0) exitWithErrors(problems);
  if (command === "healthcheck") return await healthcheck(env);
  if (command === "usage") return await usageCommand(args.slice(1), env);
  if (command === "seal") return await sealCommand(args.slice(1), env);
  if (command === "demo") {
    await demo(env);
    return 0;
  }
  if (command !== undefined) {
    console.error(`mc-relay: unknown command "${command}"; see 'mc-relay --help'`);
    return 2;
  }
  const result = parseConfig(env);
  if (!result.ok) exitWithErrors(result.errors, envFileHint(options.files));
  await serve(result.config, [...notes, ...result.warnings]);
  return 0;
}

if ((globalThis as { name?: string }).name === WORKER_NAME) {
  runWorker(); // a WORKERS thread (Deno sets import.meta.main in workers too)
} else if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
