/**
 * What the relay tells its operator: the metrics (`RelayMetrics`, the Prometheus text of /metrics) and the log
 * (`createLogger`: one JSON line per request and event, secrets kept out).
 *
 * @module
 */

import { LOG_LEVELS, type LogLevel, type RelayConfig } from "./config/variables.ts";
import { textEncoder } from "./text.ts";
import type { TokenUsage } from "./usage.ts";

/** Upper bounds (seconds) of the upstream latency histogram's buckets. */
const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

/** At most this many label combinations per counter: past it, new ones are counted under "other" (kinds kept apart). */
const MAX_LABEL_SETS = 2000;

/** The kinds of tokens counted per answer. */
const TOKEN_KINDS = ["prompt", "completion"] as const;

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
  /** When this process started counting: refusals and upstream answers are counted since. */
  readonly startedAt = Date.now();

  #refusals = new Map<string, number>();
  #upstreamAnswers = new Map<string, { answered: number; failed: number }>();

  /**
   * Counts a request the relay answered with an error status (4xx, 5xx), by status and reason (the log line's
   * outcome, or "" when the status says it all: a refused sign-in, an origin or user not allowed). Relay-chosen
   * words only, so the map stays small; for /admin's refusals.
   */
  countRefusal(status: number, reason: string) {
    const key = `${status} ${reason}`;
    if (this.#refusals.has(key) || this.#refusals.size < MAX_LABEL_SETS) {
      this.#refusals.set(key, (this.#refusals.get(key) ?? 0) + 1);
    }
  }

  /** The refusals since start, by status and reason, most first. */
  refusals(): { status: number; reason: string; count: number }[] {
    return [...this.#refusals].map(([key, count]) => {
      const space = key.indexOf(" ");
      return { status: Number(key.slice(0, space)), reason: key.slice(space + 1), count };
    }).sort((a, b) => b.count - a.count || a.status - b.status);
  }

  /** Counts one call of an upstream (by its configured name): answered (below 500), or failed. */
  countUpstreamAnswer(upstream: string, failed: boolean) {
    let tally = this.#upstreamAnswers.get(upstream);
    if (tally === undefined) this.#upstreamAnswers.set(upstream, tally = { answered: 0, failed: 0 });
    if (failed) tally.failed++;
    else tally.answered++;
  }

  /** Each upstream's answers and failures since start (`countUpstreamAnswer`). */
  upstreamAnswers(name: string): { answered: number; failed: number } {
    return this.#upstreamAnswers.get(name) ?? { answered: 0, failed: 0 };
  }

  /** Counts a failed attempt at an alias target that moved the request on. */
  countFailover(target: string) {
    RelayMetrics.#add(this.#failovers, { target }, 1);
  }

  static #label(value: string) {
    return value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
  }

  #modelsByUser = new Map<string, Set<string>>();

  /** The label text of a set of labels, as Prometheus reads it. */
  static #key(labels: Record<string, string>): string {
    return Object.entries(labels).map(([name, value]) => `${name}="${RelayMetrics.#label(value)}"`).join(",");
  }

  /**
   * Adds `amount` under `labels` (their text `key`, made here unless given); past MAX_LABEL_SETS a new set counts as
   * "other", kinds kept apart.
   */
  static #add(
    counter: Map<string, number>,
    labels: Record<string, string>,
    amount: number,
    key = RelayMetrics.#key(labels),
  ) {
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

  /**
   * The label text of `labels`, made once per `id` (the labels' values joined) and kept for the first MAX_LABEL_SETS
   * ids: a request's and an answer's labels are a bounded set, and escaping them per request cost a fast chat time.
   */
  static #cachedKey(cache: Map<string, string>, id: string, labels: Record<string, string>): string {
    let key = cache.get(id);
    if (key === undefined) {
      key = RelayMetrics.#key(labels);
      if (cache.size < MAX_LABEL_SETS) cache.set(id, key);
    }
    return key;
  }

  /** The label text of each route, status and user seen so far (at most MAX_LABEL_SETS). */
  #requestKeys = new Map<string, string>();

  /** Counts one answered request. */
  countRequest(route: string, status: number, user: string) {
    const labels = { route, status: String(status), user };
    const key = RelayMetrics.#cachedKey(this.#requestKeys, `${route}\n${status}\n${user}`, labels);
    RelayMetrics.#add(this.#requests, labels, 1, key);
  }

  /** Records how long the upstream took to send its response headers. */
  observeUpstreamLatency(seconds: number) {
    LATENCY_BUCKETS.forEach((bound, index) => {
      if (seconds <= bound) this.#latency.buckets[index]++;
    });
    this.#latency.sum += seconds;
    this.#latency.count++;
  }

  /** The label text of each user, model and kind of tokens seen so far (at most MAX_LABEL_SETS). */
  #tokenKeys = new Map<string, string>();

  /** Adds the tokens of one answer. */
  countTokens(user: string, requestedModel: string, usage: TokenUsage) {
    const model = this.#modelLabel(user, requestedModel);
    for (const kind of TOKEN_KINDS) {
      const tokens = usage[`${kind}_tokens`];
      if (tokens === undefined) continue;
      const labels = { user, model, kind };
      const key = RelayMetrics.#cachedKey(this.#tokenKeys, `${user}\n${model}\n${kind}`, labels);
      RelayMetrics.#add(this.#tokens, labels, tokens, key);
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
