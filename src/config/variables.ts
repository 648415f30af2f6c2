/**
 * The configuration's vocabulary: the relay's version, every environment variable it reads (`ENV_VARS`), the
 * defaults, and the shape of a validated config (`RelayConfig`, `Upstream`, `RelayUser`).
 *
 * @module
 */

/** The relay's version; `--version` prints it and CHANGELOG.md's newest entry matches it. */
export const VERSION = "0.1.0";

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
  "ADMINS",
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
  /** Users who may open the operator's view, /admin and /admin/usage (ADMINS); empty serves neither. */
  admins: string[];
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
