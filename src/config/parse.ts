/**
 * `parseConfig`: every environment variable validated at once, each problem naming its variable and a valid example;
 * the start-up warnings about risky settings; and the parsers of the values the config holds (password hashes,
 * address ranges, header names and values).
 *
 * @module
 */

import { OPTIONAL_ROUTES, ROUTES } from "./routes.ts";
import { addressBytes, inRanges, parseAddressRange, parsePasswordHash, PRIVATE_RANGES } from "./values.ts";
import {
  type AddressRange,
  DEFAULTS,
  type EnvVar,
  LOG_LEVELS,
  type LogLevel,
  type RelayConfig,
  type RelayEnv,
  type RelayUser,
  type TrustedProxies,
  type Upstream,
} from "./variables.ts";

/** The outcome of `parseConfig`: a config plus warnings, or every problem found. */
export type ConfigResult =
  | { ok: true; config: RelayConfig; warnings: string[] }
  | { ok: false; errors: string[] };

/** A host (or HOST, or Host header) that only this machine reaches: localhost, 127.x.x.x or ::1, port optional. */
export const LOOPBACK_AUTHORITY = /^(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]|::1)(:\d{1,5})?$/;

/** A valid HTTP header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** A header value without control characters other than tab. */
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

/** Hop-by-hop and framing headers that never cross the relay in either direction. */
export const HOP_BY_HOP = new Set([
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
  if (users.some((user) => user.name === BARE_PASSWORD_USER)) barePasswordProblems(publicAccess, upstreams, errors);
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
  const admins = parseAdmins(read.text("ADMINS"), users, errors);
  if (errors.length > 0) return { ok: false, errors };
  const config: RelayConfig = {
    upstreams,
    users,
    publicAccess,
    allowedOrigins,
    metricsUsers,
    admins,
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
    memoryStoreKeys: read.number("MEMORY_STORE_KEYS", 100_000, {
      integer: true,
      min: 1000,
      max: 10_000_000,
      example: "a whole number, e.g. 100000",
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
export function parseSealing(env: RelayEnv, upstreams: Upstream[], errors: string[]) {
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

/** The relay's own page, one-link MC settings and banner: PAGE, PUBLIC_URL, DEFAULT_MODEL, PUBLISH_UPSTREAM_URL, BANNER. */
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
  const publish = read.text("PUBLISH_UPSTREAM_URL")?.toLowerCase();
  if (publish !== undefined && !["auto", "true", "false"].includes(publish)) {
    errors.push(
      `PUBLISH_UPSTREAM_URL must be auto (publish unless the upstream is on a private or loopback address), true or false, got "${
        read.text("PUBLISH_UPSTREAM_URL")
      }"`,
    );
  }
  const publishUpstreamUrl = publish === "true" ? true : publish === "false" ? false : undefined;
  const bannerText = read.text("BANNER")?.toLowerCase();
  if (bannerText !== undefined && !["auto", "true", "false"].includes(bannerText)) {
    errors.push(
      `BANNER must be auto (the start-up banner when stderr is a terminal), true or false, got "${
        read.text("BANNER")
      }"`,
    );
  }
  const banner = bannerText === "true" ? true : bannerText === "false" ? false : undefined;
  return { page, publicUrl, defaultModel: read.text("DEFAULT_MODEL"), publishUpstreamUrl, banner };
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
 * A bare MC_RELAY_PASSWORD (no MC_RELAY_USERNAME) is the one key of a closed relay, as `relay_password` is in MC's
 * Flask relay. It cannot sit beside PUBLIC_ACCESS (a wrong key would then pass as anonymous, so the password would
 * guard nothing), nor beside a BYOK upstream (a bare token there is the caller's own provider key: a wrong password
 * could not be told from a key, and guesses would escape the sign-in lockout).
 */
function barePasswordProblems(publicAccess: boolean, upstreams: Upstream[], errors: string[]): void {
  const alone = "MC_RELAY_PASSWORD without MC_RELAY_USERNAME (a bare password, as MC's Flask relay takes it)";
  if (publicAccess) {
    errors.push(
      `${alone} closes the relay, and PUBLIC_ACCESS=true opens it: remove one (or set MC_RELAY_USERNAME for a user besides public access)`,
    );
  }
  if (upstreams.some((upstream) => upstream.byok)) {
    errors.push(
      `${alone} cannot be told from a caller's own key for a BYOK upstream: set MC_RELAY_USERNAME too (callers then send username:password)`,
    );
  }
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
export function parseTrustProxy(raw: string | undefined, errors: string[]): TrustedProxies {
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
  // The bare password's holders are nobody in particular: they may not read every user's traffic.
  const known = new Set(users.map((user) => user.name).filter((name) => name !== BARE_PASSWORD_USER));
  if (raw.toLowerCase() === "true") {
    errors.push(
      "METRICS names the users who may read /metrics (it shows every user's traffic), e.g. METRICS=admin; true is no longer accepted",
    );
  } else if (names.length === 0 || names.some((name) => !known.has(name))) {
    errors.push(`METRICS must be false or names of configured users, e.g. METRICS=admin, got "${raw}"`);
  }
  return names;
}

/** ADMINS: the configured users who may open /admin (every caller's usage); unset or empty names none. */
function parseAdmins(raw: string | undefined, users: RelayUser[], errors: string[]): string[] {
  if (raw === undefined) return [];
  const names = raw.split(",").map((name) => name.trim()).filter(Boolean);
  // The bare password's holders are nobody in particular: they may not see every caller's usage.
  const known = new Set(users.map((user) => user.name).filter((name) => name !== BARE_PASSWORD_USER));
  const unknown = names.filter((name) => !known.has(name));
  if (unknown.length > 0) {
    errors.push(
      `ADMINS must name configured users (MC_RELAY_USERNAME or MC_RELAY_USERS), e.g. ADMINS=admin; ${
        unknown.map((name) => `"${name}"`).join(", ")
      } ${unknown.length === 1 ? "is" : "are"} not one`,
    );
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
    if (url.protocol === "http:" && !LOOPBACK_AUTHORITY.test(url.hostname) && !keylessLocalUpstream(upstream, url)) {
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
  // TLS ends in front of the relay when its users reach it at an https:// PUBLIC_URL (the compose file's Caddy).
  const behindHttps = config.publicUrl?.startsWith("https://") ?? false;
  // TRUST_PROXY=true (or a number) trusts every private address; named addresses trust only those. Behind an HTTPS
  // front the relay's port is the proxy's to reach (compose publishes only Caddy's).
  if (config.trustProxy.hops > 0 && !LOOPBACK_AUTHORITY.test(config.host) && !behindHttps) {
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
  if (config.host === "0.0.0.0" && !config.tlsCertFile && !behindHttps) {
    warnings.push(
      "HOST=0.0.0.0 without TLS_CERT_FILE: serve the relay behind HTTPS (see README, 'Deploy': Caddy, nginx) so passwords never cross a network in clear text, and set PUBLIC_URL=https://... to say so",
    );
  }
  return warnings;
}

/**
 * Placeholders for "no key" that local servers' docs use (vLLM's EMPTY, Ollama's ollama, llama.cpp's
 * sk-no-key-required): nothing secret travels with them.
 */
const PLACEHOLDER_KEY = /^(none|no|empty|dummy|placeholder|not[-_]?needed|ollama|x|-|sk-no-key-required)$/i;

/**
 * An http:// upstream on this machine or network that takes no key (a local vLLM or Ollama): no key to leak, and
 * its traffic stays local, so plain HTTP is no risk worth a warning. Local: a private address, or a one-label host
 * name (a compose service such as `vllm`, or a name only the local network resolves).
 */
function keylessLocalUpstream(upstream: Upstream, url: URL): boolean {
  if (upstream.byok || !PLACEHOLDER_KEY.test(upstream.apiKey)) return false;
  const host = url.hostname.replace(/^\[|\]$/g, "");
  if (addressBytes(host) !== undefined) {
    return inRanges(host, PRIVATE_RANGES.map((range) => parseAddressRange(range)!));
  }
  return !host.includes(".") || host.endsWith(".local") || host.endsWith(".internal");
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
  if (password && !username) {
    // The bare password of MC's Flask relay: a migrated relay's users type nothing new. A colon would make it read as
    // name:password, a space would split the Authorization header: no caller could ever send it.
    if (/[:\s]/.test(password)) {
      errors.push(
        "MC_RELAY_PASSWORD on its own (sent as 'Bearer <password>') must not contain ':' or spaces: mc-relay reads a key with a colon as name:password, and a space ends the header; choose another, e.g. the output of 'openssl rand -base64 24', or set MC_RELAY_USERNAME too",
      );
    } else if (password.length < 12) {
      warnings.push("MC_RELAY_PASSWORD is shorter than 12 characters; anyone who can reach the relay may guess it");
    }
    users.push({ name: BARE_PASSWORD_USER, password });
  } else if (username || password || (!listed && !usersOptional)) {
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
    // Without a colon the whole entry may be a password typed with ';' for ':' (one key apart): nothing of it is read
    // as budgets, so nothing of it is quoted back.
    const tokenBudgets = colon < 1 ? undefined : parseUserBudgets(options, where, errors);
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
    else {
      // Quoted only when it has an option's shape (`week=5`): an entry's text may hold a password anywhere.
      const shown = /^[a-z]{1,10}=[0-9]{0,15}$/i.test(option)
        ? `"${option}"`
        : "an option that is not day=N or month=N";
      errors.push(`${where} has ${shown} after its name; use e.g. alice;day=200000;month=3000000:...`);
    }
  }
  return budgets;
}

/**
 * The upstreams: UPSTREAM_BASE_URL with UPSTREAM_API_KEY and its UPSTREAM_AUTH_* and extra headers (required
 * unless UPSTREAMS_JSON is set), then the entries of UPSTREAMS_JSON. Keys are checked, never repeated.
 */
export function parseUpstreams(env: RelayEnv, errors: string[]): Upstream[] {
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
      const shown = shownBaseUrl(baseUrl, value("UPSTREAM_BASE_URL"));
      upstreams.push({ name: "default", baseUrl, ...shown, apiKey, authHeader, authPrefix, extraHeaders, byok: false });
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
      const parsedBase = parseBaseUrl(text(baseUrl), `${where} baseUrl`, errors);
      const upstream: Upstream = {
        name: String(name),
        baseUrl: parsedBase ?? "",
        ...shownBaseUrl(parsedBase, text(baseUrl)),
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

/**
 * A base URL as MC is shown it: as configured, so a trailing slash stays (MC compares its own relay preset's endpoint
 * as an exact string, slash included), in the normalised form the relay matches X-Relay-Endpoint against.
 */
function shownBaseUrl(baseUrl: string | undefined, raw: string | undefined): { shownUrl?: string } {
  return baseUrl && raw?.endsWith("/") ? { shownUrl: `${baseUrl}/` } : {};
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

/**
 * The user a bare MC_RELAY_PASSWORD (without MC_RELAY_USERNAME) signs in as: callers send `Bearer <password>`, as
 * MC's Flask relay takes its `relay_password`. A name with a character no MC_RELAY_USERS name can hold (';' starts a
 * name's budgets there), so it never collides with a configured user.
 */
export const BARE_PASSWORD_USER = "relay;password";
