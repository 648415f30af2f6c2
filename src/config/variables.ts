/**
 * The configuration's vocabulary: the relay's version, the one table of every environment variable it reads
 * (`VARIABLES`, and `ENV_VARS` from it), the defaults, and the shape of a validated config (`RelayConfig`,
 * `Upstream`, `RelayUser`).
 *
 * @module
 */

/** The relay's version; `--version` prints it and CHANGELOG.md's newest entry matches it. */
export const VERSION = "0.1.0";

/** One environment variable: its name, where it belongs, its default, a valid example and what it does. */
export interface Variable {
  /** The name, as the environment spells it. */
  readonly name: string;
  /** The group `--help`, `.env.example` and the configuration reference list it under. */
  readonly group: VariableGroup;
  /** Its default, as a person reads it (Markdown: `8080`, "none", "memory"). */
  readonly default: string;
  /** One valid value: `.env.example` shows it, the reference names it. */
  readonly example: string;
  /** What it does, in one line of plain text: `--help` and `.env.example`. */
  readonly summary: string;
  /** What it does, in full (Markdown): the table in docs/configuration.md. */
  readonly details: string;
  /** Set, not commented out, in `.env.example`: the values a first `.env` fills in. */
  readonly starter?: true;
  /** Holds a secret: `.env.example` shows a placeholder, and no message repeats its value. */
  readonly secret?: true;
}

/** The groups, in the order `--help`, `.env.example` and the docs list them. */
export const VARIABLE_GROUPS = [
  "Upstream",
  "Users",
  "Browsers and the page",
  "Limits and budgets",
  "State",
  "Failover",
  "Bring your own key",
  "Server",
  "Operator's view",
] as const;

/** One group's name. */
export type VariableGroup = typeof VARIABLE_GROUPS[number];

/**
 * Every environment variable the relay reads, described once. `ENV_VARS`, `--help` (src/cli.ts),
 * `examples/.env.example` and the table in docs/configuration.md are made from it (`deno task variables` writes the
 * two files; a test checks they are current), and a test checks deno.json's `env` permission against it. A new
 * variable is one entry here.
 */
export const VARIABLES = [
  {
    name: "UPSTREAM_BASE_URL",
    group: "Upstream",
    default: "required unless `UPSTREAMS_JSON`",
    example: "https://api.openai.com/v1",
    summary: "the provider's OpenAI-compatible base URL, /v1 included: /v1/X on the relay goes to UPSTREAM_BASE_URL/X",
    details:
      "The provider's OpenAI-compatible base URL: `/v1/X` on the relay goes to `UPSTREAM_BASE_URL/X`. vLLM (`http://127.0.0.1:8000/v1`) and Ollama (`http://127.0.0.1:11434/v1`) need the `/v1`. An absolute `http://` or `https://` URL without credentials, query or fragment; trailing slashes are dropped. It makes the first upstream, named `default`.",
    starter: true,
  },
  {
    name: "UPSTREAM_API_KEY",
    group: "Upstream",
    default: "required with `UPSTREAM_BASE_URL`",
    example: "sk-replace-me",
    summary: "the provider key; never sent to browsers or logged (`none` for a local server that needs none)",
    details:
      "The provider key. Sent to that upstream only; never to clients, never logged. A local server that needs none: any placeholder, e.g. `none`.",
    starter: true,
    secret: true,
  },
  {
    name: "UPSTREAM_AUTH_HEADER",
    group: "Upstream",
    default: "`Authorization`",
    example: "api-key",
    summary: "the header that carries the provider key (Azure: api-key; Anthropic: x-api-key)",
    details: "The header that carries the provider key.",
  },
  {
    name: "UPSTREAM_AUTH_PREFIX",
    group: "Upstream",
    default: "`Bearer`",
    example: "",
    summary: "the prefix before the key in that header; set it empty for a raw key",
    details:
      "The word before the key. Set it to the empty string for a raw key (`UPSTREAM_AUTH_PREFIX=`); unset means `Bearer`.",
  },
  {
    name: "UPSTREAM_EXTRA_HEADERS_JSON",
    group: "Upstream",
    default: "none",
    example: '{"HTTP-Referer":"https://example.com","X-Title":"MetaConfigurator"}',
    summary: "a JSON object of extra headers sent with every upstream request",
    details:
      "Extra headers for every request to the `default` upstream (OpenRouter's attribution headers, for example). Values are treated as secrets. It may not set `Host`, `Content-Length`, `Content-Type`, `Accept-Encoding`, hop-by-hop headers or the auth header.",
  },
  {
    name: "UPSTREAMS_JSON",
    group: "Upstream",
    default: "none",
    example:
      '[{"name":"azure","baseUrl":"https://example.openai.azure.com/openai/v1","apiKey":"...","authHeader":"api-key","authPrefix":""}]',
    summary:
      'more upstreams: [{"name","baseUrl","apiKey","authHeader","authPrefix","extraHeaders"}]; "byok":true instead of "apiKey" for callers\' own keys',
    details:
      'More upstreams, each with `name`, `baseUrl` and `apiKey`, optional `authHeader`, `authPrefix`, `extraHeaders`; or `"byok": true` (and an optional `keyPattern`) instead of `apiKey` for callers\' own keys. With `UPSTREAM_BASE_URL` set too, that one comes first as `default`. See [failover.md](failover.md) and [byok.md](byok.md).',
  },
  {
    name: "ALLOWED_MODELS",
    group: "Upstream",
    default: "any model",
    example: "gpt-4o-mini,azure/gpt-4o",
    summary: "comma-separated models clients may use; others get 400",
    details:
      "Models clients may ask for; others get 400 `model_not_allowed` before the upstream is called, and `GET /v1/models` lists only these (and the aliases). An entry may name one upstream's model (`azure/gpt-4o`) or a model on any upstream (`gpt-4o`).",
  },
  {
    name: "DEFAULT_MODEL",
    group: "Upstream",
    default: "the first of `ALLOWED_MODELS`, else the upstream's first model",
    example: "gpt-4o-mini",
    summary: "the model MetaConfigurator's one-link settings select (default: the upstream's first listed model)",
    details:
      "The model `/mc-settings.json` and the page name for MetaConfigurator (and the page's test chat preselects). Unset: the first of `ALLOWED_MODELS`, else the first model the first upstream lists at its `/models` (asked once, cached, renewed at most every 30 s while someone asks); when there is none, the relay warns at start and the settings name no model, so MC would keep its own default (`alias-fast`).",
  },
  {
    name: "MC_RELAY_USERNAME",
    group: "Users",
    default: "required unless `MC_RELAY_USERS`, `PUBLIC_ACCESS` or BYOK",
    example: "team",
    summary: 'a user name; clients send "username:password" as their API key',
    details:
      "The user name clients send before the colon (no `:` in it). Not needed when `MC_RELAY_USERS` lists users, with `PUBLIC_ACCESS=true`, or when every upstream is BYOK.",
    starter: true,
  },
  {
    name: "MC_RELAY_PASSWORD",
    group: "Users",
    default: "required with `MC_RELAY_USERNAME`",
    example: "replace-with-a-long-random-password",
    summary: "that user's password (e.g. the output of: openssl rand -base64 24)",
    details:
      "The password clients send after the colon. Shorter than 12 characters, or equal to the user name, gives a start-up warning.",
    starter: true,
    secret: true,
  },
  {
    name: "MC_RELAY_USERS",
    group: "Users",
    default: "none",
    example: "alice:pbkdf2-sha256:600000:<salt>:<hash>,bob;day=200000:<password>",
    summary:
      "more users, comma-separated: name:password or name:hash from 'mc-relay hash-password'; name;day=N;month=N for a user's own budgets",
    details:
      "More users, comma-separated: `name:password`, or better `name:hash` with a hash from `mc-relay hash-password`. A name may carry its own token budgets: `alice;day=200000;month=0:...` (0: none for her). With or instead of `MC_RELAY_USERNAME`/`MC_RELAY_PASSWORD`. See [access.md](access.md).",
    secret: true,
  },
  {
    name: "PUBLIC_ACCESS",
    group: "Users",
    default: "`false`",
    example: "true",
    summary:
      "true: requests without credentials pass, limited and budgeted per address; needs ALLOWED_ORIGIN, a request limit and a token budget",
    details:
      "Requests without credentials (or with credentials that name no configured user) pass as anonymous, limited and budgeted per client address. Refuses to start unless `ALLOWED_ORIGIN`, a request limit (`RATE_LIMIT_PER_*` or `CONCURRENT_REQUESTS`) and a token budget are set. Configured users who sign in are still checked.",
  },
  {
    name: "AUTH_FAILURES_PER_MINUTE",
    group: "Users",
    default: "`10`",
    example: "10",
    summary: "failed sign-ins per user name and client address per minute, then 429; 0 = no limit",
    details:
      "Wrong passwords allowed per user name and client address per minute (a token bucket); then 429 `too_many_failed_sign_ins` with `Retry-After` for that name from that address, even for the right password. Other users behind the same address are not affected. `0` turns it off, with a start-up warning.",
  },
  {
    name: "ALLOWED_ORIGIN",
    group: "Browsers and the page",
    default: "none (no browser origin)",
    example: "https://www.metaconfigurator.org,https://metaconfigurator.github.io",
    summary: "exact browser origins allowed to call the relay, comma-separated, never *",
    details:
      "Browser origins allowed to call the relay, exact and comma-separated. `*`, paths and trailing slashes are refused. Unset: a start-up warning, and no browser page but the relay's own may call it (servers and curl still can).",
    starter: true,
  },
  {
    name: "PUBLIC_URL",
    group: "Browsers and the page",
    default: "derived on loopback only",
    example: "https://relay.example.com",
    summary: "the address users reach the relay at (BASE_PATH included), for the page and /mc-settings.json",
    details:
      "The address users reach the relay at, with any path prefix, for the page and `/mc-settings.json`. Unset: only a relay with a loopback `HOST` derives it, from a loopback `Host` header; otherwise `/mc-settings.json` answers 404 `public_url_unknown`.",
  },
  {
    name: "PUBLISH_UPSTREAM_URL",
    group: "Browsers and the page",
    default: "`auto`",
    example: "false",
    summary:
      "whether the page and /mc-settings.json show the upstream's URL as MC's endpoint (auto: not when it is private)",
    details:
      "What the page and `/mc-settings.json` give as MetaConfigurator's \"Endpoint\" (MC sends it back as `X-Relay-Endpoint` to pick an upstream). `auto`: the upstream's base URL as configured, unless its host is a loopback or private address, `localhost`, a name without a dot (a compose service such as `vllm`) or under `.local`, `.internal`, `.lan` or `.home.arpa`; such an upstream is shown as `upstream:<name>` (e.g. `upstream:default`), which the relay accepts besides the URL. `false`: every upstream is shown by name; `true`: every URL is shown.",
  },
  {
    name: "BANNER",
    group: "Server",
    default: "`auto`",
    example: "false",
    summary:
      "the short human banner at start (page, one link, values for MC and an SDK) on stderr: auto = when stderr is a terminal",
    details:
      "At start the relay prints a short banner for people on stderr: its page, MetaConfigurator's one link, the values to type into MC (relay URL, endpoint, model) and an SDK's base URL. Nothing secret is in it. `auto`: only when stderr is a terminal, so `docker logs`, systemd and scripts see the JSON log lines on stdout alone; `true` always; `false` never.",
  },
  {
    name: "PAGE",
    group: "Browsers and the page",
    default: "`true`",
    example: "false",
    summary: "false turns the relay's own page at / off",
    details: "The relay's own page at `/` (under `BASE_PATH`). `false` removes the route.",
  },
  {
    name: "BASE_PATH",
    group: "Browsers and the page",
    default: "none",
    example: "/relay",
    summary: "serve every route under this prefix, for a proxy that forwards /relay/... unchanged",
    details:
      "Serve every route (the page, `/health`, `/usage`, `/v1/...`) under this prefix, for a reverse proxy that forwards the path unchanged. No trailing slash, no query.",
  },
  {
    name: "DISABLED_PATHS",
    group: "Browsers and the page",
    default: "none",
    example: "/v1/models,/v1/embeddings",
    summary: "routes to switch off",
    details:
      "Routes to switch off (404): any of `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`.",
  },
  {
    name: "ALLOWED_PATHS",
    group: "Browsers and the page",
    default: "all routes on",
    example: "/v1/embeddings",
    summary: "no longer needed: every route is on (kept so old files still start)",
    details:
      "No longer needed: every route is on. Still accepted (`/v1/embeddings`, `/v1/completions`, `/v1/responses`), with a start-up warning.",
  },
  {
    name: "RATE_LIMIT_PER_MINUTE",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "20",
    summary: "requests per user (anonymous: per address) per minute; 0 = no limit",
    details:
      "Requests per signed-in user (anonymous and BYOK callers: per client address) per minute; then 429 `relay_rate_limit_exceeded` with `Retry-After`, naming the limit and when one more is allowed. A token bucket that refills evenly.",
  },
  {
    name: "RATE_LIMIT_PER_HOUR",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "200",
    summary: "the same per hour",
    details: "The same per hour.",
  },
  {
    name: "RATE_LIMIT_PER_DAY",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "1000",
    summary: "the same per day",
    details: "The same per day (a bucket that refills over 24 hours, not a calendar day).",
  },
  {
    name: "CONCURRENT_REQUESTS",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "5",
    summary: "requests in flight at once per user or address, streams included; 0 = no limit",
    details:
      "Requests in flight at once per user or address, open streams included; one more gets 429 `relay_concurrency_limit_exceeded`.",
  },
  {
    name: "TOKEN_BUDGET_PER_DAY",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "100000",
    summary: "tokens per user or address per UTC day (real usage, else an estimate); 0 = no budget",
    details:
      "Tokens per user or address per UTC calendar day, counted from the upstream's reported usage (streamed or not, every route), or an estimate when none arrives. Spent: 429 `token_budget_exceeded` until UTC midnight. A user's own: `alice;day=200000:...` in `MC_RELAY_USERS`. BYOK requests are not counted.",
  },
  {
    name: "TOKEN_BUDGET_PER_MONTH",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "2000000",
    summary: "tokens per user or address per UTC calendar month; 0 = no budget",
    details: "The same per UTC calendar month (`;month=N` for one user).",
  },
  {
    name: "MAX_TOKENS_PER_REQUEST",
    group: "Limits and budgets",
    default: "`0` (off)",
    example: "10000",
    summary:
      "cap on max_tokens / max_completion_tokens / max_output_tokens, added when a request names none; 0 = no cap",
    details:
      "The most answer tokens a request may ask for, all its answers together (`n`, `best_of` and prompt lists share it): lowers `max_tokens` and `max_completion_tokens` (chat), `max_tokens` (completions) and `max_output_tokens` (Responses API) to each answer's share, and adds it when a request names none. Values that are not whole numbers from 1 to 1,000,000 get 400 `invalid_max_tokens` (with or without the cap). See [access.md](access.md#max_tokens_per_request).",
  },
  {
    name: "MAX_REQUEST_BYTES",
    group: "Limits and budgets",
    default: "`33554432` (32 MiB)",
    example: "2097152",
    summary: "largest request body in bytes",
    details:
      "The largest request body; larger gets 413 while it is read, whatever `Content-Length` says, and never reaches the upstream. 2 MiB is too small for image inputs.",
  },
  {
    name: "MAX_BUFFERED_BYTES",
    group: "Limits and budgets",
    default: "`67108864` (64 MiB), or `MAX_REQUEST_BYTES` if that is more",
    example: "67108864",
    summary: "request bodies held in memory at once, all requests together; then 503",
    details:
      "Request bodies held in memory at once, all requests together; a body that would pass it gets 503 with `Retry-After: 1`. Must be at least `MAX_REQUEST_BYTES`. A body costs up to about 7 times its size while it is checked and sent (measured: [security.md](security.md#threat-by-threat)).",
  },
  {
    name: "REQUEST_TIMEOUT_SECONDS",
    group: "Limits and budgets",
    default: "`180`",
    example: "180",
    summary: "longest wait for upstream headers, longest silence inside a stream",
    details:
      "The longest wait for the upstream's response headers (then 504), the longest silence between two chunks of an answer, the longest upload of a request body (then 408). A stream that keeps flowing is never cut. Checked every 25 ms, so a timeout fires up to 25 ms late. Fractions allowed, up to 86400.",
  },
  {
    name: "STATE_PATH",
    group: "State",
    default: "memory (the image: `/data/state.db`)",
    example: "/data/state.db",
    summary: "a SQLite file for lockouts, limits, budgets and the usage ledger; survives restarts",
    details:
      "A SQLite file for lockouts, limits, budgets and the usage ledger: they survive restarts. Ignored, with a start-up warning, when `REDIS_URL` is set. See [state.md](state.md).",
  },
  {
    name: "REDIS_URL",
    group: "State",
    default: "none",
    example: "redis://valkey:6379",
    summary: "a redis:// or rediss:// URL: the same, shared by every copy (wins over STATE_PATH)",
    details:
      'Redis or Valkey for the same state, shared by every copy (wins over `STATE_PATH`). Loads the `redis` npm package. Unreachable: each copy counts alone and `/health` says `"state":"degraded"`.',
    secret: true,
  },
  {
    name: "USAGE_RETENTION_DAYS",
    group: "State",
    default: "`400`",
    example: "90",
    summary: "days of the usage ledger kept",
    details: "Days of the usage ledger kept (1 to 36500).",
  },
  {
    name: "MEMORY_STORE_KEYS",
    group: "State",
    default: "`100000`",
    example: "100000",
    summary: "buckets and counters the in-memory store holds (no STATE_PATH or REDIS_URL, or while Redis is down)",
    details:
      "How many buckets (rate limits, lockouts), and as many counters (places in flight, budgets), the in-memory store holds: the default store, and the stand-in while Redis is down. Full, it forgets refilled buckets, then the least-used tenth; a counter that holds something is never evicted, so past this many callers with budgets a newcomer is refused until one expires. From 1,000 to 10,000,000. See [state.md](state.md#memory).",
  },
  {
    name: "MODEL_ALIASES_JSON",
    group: "Failover",
    default: "none",
    example: '{"fast":["default/gpt-4o-mini","azure/gpt-4o-mini"]}',
    summary: "an alias and its targets (upstream/model), served by the first target that answers",
    details:
      "Model aliases, each served by the first of its `upstream/model` targets that answers; targets must be keyed upstreams. See [failover.md](failover.md).",
  },
  {
    name: "FAILOVER_BREAKER_FAILURES",
    group: "Failover",
    default: "`3`",
    example: "3",
    summary: "failures in a row that open a target's circuit breaker",
    details: "Failures in a row that open an alias target's circuit breaker (1 to 1000).",
  },
  {
    name: "FAILOVER_BREAKER_SECONDS",
    group: "Failover",
    default: "`30`",
    example: "30",
    summary: "how long an open breaker skips its target",
    details: "How long an open breaker skips its target; then one request tries it.",
  },
  {
    name: "SEAL_SECRET",
    group: "Bring your own key",
    default: "unset (no `/seal`)",
    example: "<openssl rand -base64 32>",
    summary: "seals callers' keys for BYOK upstreams: POST /seal, 'mc-relay seal'",
    details:
      "At least 32 characters. Seals callers' keys for BYOK upstreams (`POST /seal`, `mc-relay seal`); only with a BYOK upstream in `UPSTREAMS_JSON`. See [byok.md](byok.md#sealed-keys).",
    secret: true,
  },
  {
    name: "SEAL_SECRETS_PREVIOUS",
    group: "Bring your own key",
    default: "none",
    example: "<the former SEAL_SECRET>",
    summary: "former SEAL_SECRETs whose sealed keys still open, comma-separated",
    details:
      "Former seal secrets (each at least 32 characters) whose sealed keys still open during a rotation; needs `SEAL_SECRET`.",
    secret: true,
  },
  {
    name: "PORT",
    group: "Server",
    default: "`8080`",
    example: "8080",
    summary: "the port to listen on",
    details: "The port to listen on; `0` picks a free one.",
    starter: true,
  },
  {
    name: "HOST",
    group: "Server",
    default: "`0.0.0.0`",
    example: "127.0.0.1",
    summary: "the interface to listen on",
    details:
      "The interface to listen on. `127.0.0.1` behind a reverse proxy on the same machine, or for a relay only you use. `0.0.0.0` without `TLS_CERT_FILE` gives a start-up warning.",
  },
  {
    name: "TRUST_PROXY",
    group: "Server",
    default: "`false`",
    example: "127.0.0.1",
    summary:
      "proxies whose X-Forwarded-For counts: addresses/CIDRs, or true / a number of proxies on loopback or private addresses",
    details:
      "Which reverse proxies may name the client in `X-Forwarded-For`: their addresses or CIDR ranges (the header is read from the right, past every entry that is one of them), or `true` (one proxy) or a number of proxies, trusted only when the connection comes from a loopback or private address. From anyone else the header is ignored. With a `HOST` other than loopback it gives a start-up warning.",
  },
  {
    name: "TLS_CERT_FILE",
    group: "Server",
    default: "unset",
    example: "/etc/mc-relay/fullchain.pem",
    summary: "a PEM certificate chain; with TLS_KEY_FILE the relay serves HTTPS itself",
    details:
      "A PEM certificate chain. With `TLS_KEY_FILE` the relay serves HTTPS itself. One without the other refuses to start.",
  },
  {
    name: "TLS_KEY_FILE",
    group: "Server",
    default: "unset",
    example: "/etc/mc-relay/privkey.pem",
    summary: "the PEM private key for TLS_CERT_FILE",
    details: "The PEM private key for `TLS_CERT_FILE`.",
  },
  {
    name: "SHUTDOWN_TIMEOUT_SECONDS",
    starter: true,
    group: "Server",
    default: "`10` (the image: `8`)",
    example: "8",
    summary: "how long in-flight requests may finish after SIGTERM",
    details:
      "After SIGTERM or SIGINT: how long in-flight requests, streams included, may finish before the relay exits.",
  },
  {
    name: "LOG_LEVEL",
    group: "Server",
    default: "`info`",
    example: "info",
    summary: "debug, info (one line per request), warn or error",
    details: "`debug`, `info` (one line per request; `/health` requests at `debug`), `warn`, `error`. Any case.",
  },
  {
    name: "WORKERS",
    group: "Server",
    default: "`1`",
    example: "auto",
    summary: "threads serving the port: a number, or auto (every core); above 1 needs STATE_PATH or REDIS_URL",
    details:
      "Threads serving the port (SO_REUSEPORT, not on Windows); `auto` is one per core. Above 1 needs `STATE_PATH` or `REDIS_URL`, so that all workers count limits and budgets together.",
  },
  {
    name: "METRICS",
    group: "Operator's view",
    default: "`false`",
    example: "admin",
    summary: "users who may read Prometheus metrics at /metrics",
    details:
      "Configured users who may read Prometheus metrics at `/metrics` on the main port (others get 403): they show every user's traffic. `true` is refused.",
  },
  {
    name: "METRICS_PORT",
    group: "Operator's view",
    default: "none",
    example: "9464",
    summary: "a separate port serving /metrics without auth",
    details: "Serve `/metrics` without auth on this port, on `METRICS_HOST`: for a scraper on a private network only.",
  },
  {
    name: "METRICS_HOST",
    group: "Operator's view",
    default: "`127.0.0.1`",
    example: "127.0.0.1",
    summary: "the interface METRICS_PORT listens on",
    details: "The interface `METRICS_PORT` listens on. Anything but loopback gives a start-up warning.",
  },
  {
    name: "ADMINS",
    group: "Operator's view",
    default: "none",
    example: "admin",
    summary: "users who may open the operator's view at /admin and /admin/usage",
    details:
      "Configured users who may open the operator's view at `/admin` and `/admin/usage` (others get 403, nobody signed in 401): every caller's usage, the upstreams' health and the refusals. Unset serves neither route. See [admin.md](admin.md).",
  },
] as const satisfies readonly Variable[];

/** Every environment variable the relay reads, in the table's order; deno.json's `--allow-env` list must match it. */
export const ENV_VARS: readonly EnvVar[] = VARIABLES.map((variable) => variable.name);

/** The name of one environment variable the relay reads. */
export type EnvVar = typeof VARIABLES[number]["name"];

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
  /** Buckets, and as many counters, the in-memory store holds (MEMORY_STORE_KEYS). */
  memoryStoreKeys: number;
  /** Serve the relay's own page at `/` (PAGE, default true). */
  page: boolean;
  /** The address users reach the relay at, BASE_PATH included (PUBLIC_URL), e.g. `https://relay.example.com`. */
  publicUrl?: string;
  /** The model the one-link MC settings select (DEFAULT_MODEL). */
  defaultModel?: string;
  /**
   * Whether the page and /mc-settings.json show the upstreams' base URLs (PUBLISH_UPSTREAM_URL): undefined (`auto`)
   * shows those not on a private or loopback address (`endpointIsInternal`); the others are named `upstream:<name>`.
   */
  publishUpstreamUrl?: boolean;
  /** Whether the start-up banner is printed on stderr (BANNER): undefined (`auto`) when stderr is a terminal. */
  banner?: boolean;
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
  /** The base URL as configured, when that differs from `baseUrl` by a trailing slash: what MC is shown. */
  shownUrl?: string;
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
