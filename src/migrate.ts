/**
 * `mc-relay migrate`: MC's Flask relay (backend/relay/ in MC's repository) configured by a config.yaml, turned into
 * the environment mc-relay starts with. Pure: the YAML is parsed by the command (src/cli.ts), and this module turns
 * the parsed object into .env lines (secrets included: they go to standard output only) and notes about what
 * differs (never a secret: the notes go to standard error, which ends up in terminals and CI logs).
 *
 * Keys the Flask relay reads but the file leaves out take the Flask relay's own defaults, since that is how the
 * running relay behaved.
 *
 * @module
 */

import { METACONFIGURATOR_ORIGINS } from "./config/variables.ts";

/** What `migrateFlaskConfig` gives: the .env lines, notes on what differs, and problems that leave no .env. */
export interface Migration {
  /** The .env file, line by line: comments, `NAME=value` lines, and commented lines to consider. */
  lines: string[];
  /** What differs or needs a look, one sentence each, without secrets. */
  notes: string[];
  /** Why no .env can be made (the Flask relay would not have started either); empty when there is one. */
  problems: string[];
}

/** The Flask relay's defaults (app.py `load_config`), used for keys a config.yaml leaves out. */
const FLASK_DEFAULTS = {
  rateLimitsEnabled: true,
  requestsPerMinute: 10,
  requestsPerHour: 60,
  requestsPerDay: 200,
  maxRequestTokens: 10000,
  maxDailyTokensPerIp: 50000,
  maxRequestBytes: 2 * 1024 * 1024,
  requestTimeout: 180,
};

/** Every origin MC itself is served from (mc-facts): the starting point where the Flask relay allowed any origin. */
const MC_ORIGINS = [
  ...METACONFIGURATOR_ORIGINS,
  "https://metaconfigurator.org",
  "https://metaconfigurator.informatik.uni-stuttgart.de",
  "http://localhost:5173",
].filter((origin, index, all) => all.indexOf(origin) === index);

/** The keys of a Flask config.yaml (and the old singular `allowed_origin`). */
const KNOWN_KEYS = new Set([
  "relay_password",
  "allowed_origins",
  "allowed_origin",
  "rate_limits",
  "limits",
  "request_timeout",
  "enable_streaming",
  "enable_models_proxy",
  "log_level",
  "endpoints",
]);

const LOG_LEVELS: Record<string, string> = {
  DEBUG: "debug",
  INFO: "info",
  WARNING: "warn",
  WARN: "warn",
  ERROR: "error",
  CRITICAL: "error",
};

type Yaml = Record<string, unknown>;

const isObject = (value: unknown): value is Yaml =>
  typeof value === "object" && value !== null && !Array.isArray(value);

/**
 * A value as a .env file holds it for `node:util` parseEnv (how mc-relay reads --env-file): bare when it is made
 * of characters no parser treats specially, else in single quotes (taken literally), else backticks (literal too),
 * else double quotes (where `\n` would become a line break). Undefined when no quoting keeps it as it is.
 */
export function envValue(value: string): string | undefined {
  if (/^[A-Za-z0-9_./:@,+=-]*$/.test(value)) return value;
  if (/[\r\n]/.test(value)) return undefined;
  for (const quote of ["'", "`"]) if (!value.includes(quote)) return `${quote}${value}${quote}`;
  if (!value.includes('"') && !value.includes("\\n")) return `"${value}"`;
  return undefined;
}

/** A whole number from the YAML, or the default when the key is missing; undefined (with a note) otherwise. */
function whole(raw: unknown, fallback: number, key: string, notes: string[]): number | undefined {
  if (raw === undefined || raw === null) return fallback;
  const number = typeof raw === "string" && /^\d+$/.test(raw.trim()) ? Number(raw) : raw;
  if (typeof number === "number" && Number.isInteger(number) && number >= 0) return number;
  notes.push(`${key} is not a whole number; it was left out (mc-relay's default applies)`);
  return undefined;
}

/**
 * Turns a Flask config.yaml (parsed) into mc-relay's environment. `relay_password` becomes a bare MC_RELAY_PASSWORD
 * (users keep typing what they typed), an empty one PUBLIC_ACCESS=true with the limits and budget mc-relay needs for
 * it; the first endpoint becomes UPSTREAM_BASE_URL and its key, the others UPSTREAMS_JSON under their names.
 */
export function migrateFlaskConfig(config: unknown): Migration {
  const lines: string[] = [];
  const notes: string[] = [];
  const problems: string[] = [];
  if (!isObject(config)) {
    return { lines, notes, problems: ["the file is not a YAML mapping of MC's Flask relay settings"] };
  }
  for (const key of Object.keys(config)) {
    if (!KNOWN_KEYS.has(key)) notes.push(`"${key}" is no setting of MC's Flask relay; it was left out`);
  }
  const set = (name: string, value: string, label = name) => {
    const written = envValue(value);
    if (written === undefined) {
      problems.push(`${label} holds quotes of every kind or a line break: no .env can carry it; change it`);
    } else lines.push(`${name}=${written}`);
  };
  const publicAccess = migrateAccess(config, set, lines, notes, problems);
  migrateOrigins(config, publicAccess, set, lines, notes);
  migrateLimits(config, publicAccess, set, lines, notes);
  migrateEndpoints(config, set, lines, notes, problems);
  return { lines, notes, problems };
}

type Setter = (name: string, value: string, label?: string) => void;

/** `relay_password` and `log_level`, `request_timeout`, `enable_*`: who may call, and how the relay runs. */
function migrateAccess(config: Yaml, set: Setter, lines: string[], notes: string[], problems: string[]): boolean {
  const password = config.relay_password === undefined || config.relay_password === null
    ? ""
    : String(config.relay_password);
  lines.push("", "# Who may call: MC's Flask relay's relay_password");
  if (password === "") {
    set("PUBLIC_ACCESS", "true");
    notes.push(
      "relay_password is empty: PUBLIC_ACCESS=true, anyone may call within the request limits and the token budget per address",
    );
  } else if (/[:\s]/.test(password)) {
    // mc-relay reads a token with a colon as name:password, and a space splits the header: no caller could send it.
    problems.push(
      "relay_password contains ':' or a space, which mc-relay cannot take as a bare password (it reads a key with a colon as name:password, and a space ends the header); choose a new one (e.g. openssl rand -base64 24) and tell your users",
    );
  } else {
    set("MC_RELAY_PASSWORD", password, "relay_password");
    notes.push(
      "relay_password: MC_RELAY_PASSWORD without MC_RELAY_USERNAME, so callers keep sending it as it is (Bearer <password>); to give people their own passwords later, add MC_RELAY_USERS",
    );
  }
  lines.push("", "# How the relay runs");
  const level = String(config.log_level ?? "INFO").toUpperCase();
  if (LOG_LEVELS[level]) set("LOG_LEVEL", LOG_LEVELS[level]);
  else notes.push(`log_level "${level}" is none of DEBUG, INFO, WARNING, ERROR; LOG_LEVEL was left at info`);
  const timeout = whole(config.request_timeout, FLASK_DEFAULTS.requestTimeout, "request_timeout", notes);
  if (timeout !== undefined && timeout > 0) set("REQUEST_TIMEOUT_SECONDS", String(Math.min(timeout, 86400)));
  if (config.enable_models_proxy === false) set("DISABLED_PATHS", "/v1/models");
  if (config.enable_streaming === false) {
    notes.push("enable_streaming is false: mc-relay always streams what a client asks to have streamed");
  }
  return password === "";
}

/** `allowed_origins` (or the old `allowed_origin`): exact origins; `[]`, which was `*`, becomes MC's own, commented. */
function migrateOrigins(config: Yaml, publicAccess: boolean, set: Setter, lines: string[], notes: string[]) {
  const raw = config.allowed_origins ?? config.allowed_origin ?? [];
  const listed = (Array.isArray(raw) ? raw : [raw]).filter((entry) => typeof entry === "string")
    .map((entry) => entry.trim().replace(/\/+$/, "")).filter(Boolean);
  const origins = listed.filter((entry) => {
    try {
      return new URL(entry).origin === entry;
    } catch {
      return false;
    }
  });
  for (const entry of listed.filter((entry) => !origins.includes(entry))) {
    notes.push(`allowed_origins entry "${entry}" is not an exact origin (scheme://host[:port]); it was left out`);
  }
  lines.push("", "# Browser pages that may call the relay (CORS); mc-relay never allows every origin");
  if (origins.length > 0) {
    set("ALLOWED_ORIGIN", origins.join(","));
    return;
  }
  lines.push(`# ALLOWED_ORIGIN=${MC_ORIGINS.join(",")}`);
  notes.push(
    `allowed_origins is empty, which let every origin call MC's Flask relay ("*"); mc-relay never allows "*". The .env lists MC's own origins, commented: ${
      publicAccess
        ? "a public relay does not start without them, so uncomment ALLOWED_ORIGIN (and keep only the origins of the MC your users open)"
        : "uncomment ALLOWED_ORIGIN (keeping the origins of the MC your users open), or no browser page may call the relay"
    }`,
  );
}

/** `rate_limits` and `limits`: requests per address, answer tokens per request, the daily budget, body size. */
function migrateLimits(config: Yaml, publicAccess: boolean, set: Setter, lines: string[], notes: string[]) {
  const rate = isObject(config.rate_limits) ? config.rate_limits : {};
  const limits = isObject(config.limits) ? config.limits : {};
  lines.push("", "# Limits: per address for anonymous callers and holders of the bare password, as in the Flask relay");
  let requestLimit = false;
  if ((rate.enabled ?? FLASK_DEFAULTS.rateLimitsEnabled) !== false) {
    for (
      const [key, name, fallback] of [
        ["requests_per_minute", "RATE_LIMIT_PER_MINUTE", FLASK_DEFAULTS.requestsPerMinute],
        ["requests_per_hour", "RATE_LIMIT_PER_HOUR", FLASK_DEFAULTS.requestsPerHour],
        ["requests_per_day", "RATE_LIMIT_PER_DAY", FLASK_DEFAULTS.requestsPerDay],
      ] as const
    ) {
      const value = whole(rate[key], fallback, `rate_limits.${key}`, notes);
      if (value !== undefined && value > 0) {
        set(name, String(value));
        requestLimit = true;
      }
    }
  }
  if (publicAccess && !requestLimit) {
    lines.push("# RATE_LIMIT_PER_MINUTE=20");
    notes.push(
      "rate_limits are off, and a public relay does not start without a request limit: uncomment RATE_LIMIT_PER_MINUTE (or set RATE_LIMIT_PER_HOUR, RATE_LIMIT_PER_DAY or CONCURRENT_REQUESTS)",
    );
  }
  const cap = whole(limits.max_request_tokens, FLASK_DEFAULTS.maxRequestTokens, "limits.max_request_tokens", notes);
  if (cap !== undefined && cap > 0) set("MAX_TOKENS_PER_REQUEST", String(cap));
  const daily = whole(
    limits.max_daily_tokens_per_ip,
    FLASK_DEFAULTS.maxDailyTokensPerIp,
    "limits.max_daily_tokens_per_ip",
    notes,
  );
  if (daily !== undefined && daily > 0) {
    set("TOKEN_BUDGET_PER_DAY", String(daily));
    notes.push(
      "max_daily_tokens_per_ip becomes TOKEN_BUDGET_PER_DAY: per UTC day rather than a rolling 24 hours, counted from the tokens the upstream reports (an estimate only when it reports none) rather than from the request's size and max_tokens",
    );
  } else if (publicAccess) {
    lines.push("# TOKEN_BUDGET_PER_DAY=100000");
    notes.push(
      "max_daily_tokens_per_ip is 0 (off), and a public relay does not start without a token budget: uncomment TOKEN_BUDGET_PER_DAY (or set TOKEN_BUDGET_PER_MONTH)",
    );
  }
  const bytes = whole(limits.max_request_bytes, FLASK_DEFAULTS.maxRequestBytes, "limits.max_request_bytes", notes);
  if (bytes !== undefined && bytes > 0) set("MAX_REQUEST_BYTES", String(Math.min(bytes, 2 ** 31)));
  notes.push(
    "the Flask relay counted every client by the address it saw; behind a reverse proxy (nginx, Caddy) set TRUST_PROXY so mc-relay counts the clients, not the proxy",
  );
}

/** `endpoints`: the first becomes UPSTREAM_*, the others UPSTREAMS_JSON entries under their names. */
function migrateEndpoints(config: Yaml, set: Setter, lines: string[], notes: string[], problems: string[]) {
  const endpoints = Array.isArray(config.endpoints) ? config.endpoints : [];
  if (endpoints.length === 0) {
    problems.push("the file has no endpoints: MC's Flask relay needs at least one (name, url, api_key)");
    return;
  }
  const entries: Record<string, unknown>[] = [];
  const names = new Set(["default"]);
  for (const [index, endpoint] of endpoints.entries()) {
    const where = `endpoints entry ${index + 1}`;
    if (!isObject(endpoint) || typeof endpoint.url !== "string" || !endpoint.url.trim()) {
      problems.push(`${where} needs a "url", as MC's Flask relay does`);
      continue;
    }
    const label = typeof endpoint.name === "string" && endpoint.name ? `${where} ("${endpoint.name}")` : where;
    const entry: Record<string, unknown> = {
      name: endpointName(endpoint.name, index, names, label, notes),
      baseUrl: endpoint.url.trim().replace(/\/+$/, ""),
      apiKey: endpoint.api_key === undefined || endpoint.api_key === null ? "" : String(endpoint.api_key),
    };
    if (entry.apiKey === "") {
      entry.apiKey = "none";
      notes.push(`${label} has no api_key: it gets the placeholder "none" (fine for a local server that needs none)`);
    }
    if (typeof endpoint.auth_header === "string" && endpoint.auth_header !== "Authorization") {
      entry.authHeader = endpoint.auth_header;
    }
    if (endpoint.auth_prefix !== undefined && endpoint.auth_prefix !== null && endpoint.auth_prefix !== "Bearer") {
      entry.authPrefix = String(endpoint.auth_prefix);
    }
    if (isObject(endpoint.extra_headers) && Object.keys(endpoint.extra_headers).length > 0) {
      entry.extraHeaders = Object.fromEntries(
        Object.entries(endpoint.extra_headers).map(([name, value]) => [name, String(value)]),
      );
    }
    entries.push(entry);
  }
  if (entries.length === 0) return;
  const [first, ...others] = entries;
  lines.push("", `# The upstream: MC's endpoint setting must name its URL (the Flask relay's first endpoint)`);
  set("UPSTREAM_BASE_URL", String(first.baseUrl), "endpoints entry 1 url");
  set("UPSTREAM_API_KEY", String(first.apiKey), "endpoints entry 1 api_key");
  if (first.authHeader !== undefined) set("UPSTREAM_AUTH_HEADER", String(first.authHeader));
  if (first.authPrefix !== undefined) set("UPSTREAM_AUTH_PREFIX", String(first.authPrefix));
  if (first.extraHeaders !== undefined) {
    set("UPSTREAM_EXTRA_HEADERS_JSON", JSON.stringify(first.extraHeaders), "endpoints entry 1 extra_headers");
  }
  if (others.length > 0) {
    lines.push("# The other endpoints, picked by MC's endpoint setting (X-Relay-Endpoint) as before");
    set("UPSTREAMS_JSON", JSON.stringify(others), "the endpoints' keys or headers");
    notes.push(
      `the first endpoint ("${first.name}") is mc-relay's upstream "default"; the others keep their names, which SDK clients may also use as a model prefix ("name/model")`,
    );
  }
}

/** An endpoint's name as an UPSTREAMS_JSON name: letters, digits, '.', '_', '-', unique, never "default". */
function endpointName(raw: unknown, index: number, names: Set<string>, label: string, notes: string[]): string {
  const wanted = typeof raw === "string" ? raw.trim() : "";
  let name = wanted.replace(/[^A-Za-z0-9_.-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64) ||
    `endpoint-${index + 1}`;
  if (index > 0 && names.has(name)) name = `${name}-${index + 1}`;
  if (index > 0 && name !== wanted) notes.push(`${label} is named "${name}" in UPSTREAMS_JSON`);
  names.add(name);
  return name;
}
