/**
 * The request handler: `STAGES` (the table of contents of a request), `createHandler` (one `RequestContext` per
 * request through the stages, then `finish`), and `createRelay` (what is built once from the config).
 *
 * @module
 */

import { clientAddress, createAuthenticator } from "./auth.ts";
import { CircuitBreakers } from "./breakers.ts";
import { KeySealer } from "./byok.ts";
import { type Route, ROUTES } from "./config/routes.ts";
import { type RelayConfig, VERSION } from "./config/variables.ts";
import { type Relay, Releases, type RequestContext, type Stage, type UpstreamTarget } from "./context.ts";
import { addRelayHeaders, corsHeaders, errorResponse } from "./http.ts";
import { createLogger, RelayMetrics } from "./observe.ts";
import { answerMcSettings, answerPage } from "./page.ts";
import { shownHost } from "./endpoint.ts";
import { createSecretMasker } from "./secrets.ts";
import { answerAdmin } from "./stages/admin.ts";
import { answerSeal, useCallerKey } from "./stages/byok.ts";
import { checkModel, chooseUpstream, readRequestBody } from "./stages/choose.ts";
import { finish } from "./stages/finish.ts";
import { forwardRequest, requestUsage } from "./stages/forward.ts";
import { answerHealth, answerPreflight, checkHost, checkOrigin, matchRoute, servedHostNames } from "./stages/gate.ts";
import { answerMetrics, identifyCaller } from "./stages/identity.ts";
import { answerUsage, applyLimits, capAnswerTokens, requestLimits, reserveTokens } from "./stages/limits.ts";
import { relayResponse } from "./stages/respond.ts";
import type { CounterStore } from "./stores/counter.ts";
import { MemoryCounterStore } from "./stores/memory.ts";
import { BODY_IDLE_MS, ByteBudget } from "./streams.ts";
import { errorText } from "./text.ts";

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
  /**
   * The handler a reload replaces: what its config shares with the new one is carried over (the verified sign-ins,
   * the body allowance and the requests holding it, the breakers), so a reload neither makes every hashed user pay
   * PBKDF2 again nor lets old and new requests each fill MAX_BUFFERED_BYTES, nor closes an open breaker.
   */
  previous?: RelayHandler;
}

/** A `Deno.serve` handler, and what it shares across requests (for the reload that replaces it). */
export type RelayHandler = ((request: Request, info: Deno.ServeHandlerInfo) => Promise<Response>) & {
  readonly relay?: Relay;
};

/**
 * The stages every request passes, in this order: the table of contents of a request. Each decides one thing; the
 * first that returns a `Response` ends the stages (`refuse` for a refusal), and `relayResponse` always does.
 *
 * - `checkHost`: a Host that could move the path is 400.
 * - `checkOrigin`: a browser origin not in ALLOWED_ORIGIN (nor the relay's own page) is 403.
 * - `answerPreflight`: an OPTIONS request is answered here, before credentials.
 * - `matchRoute`: the route (`context.route`), or 404 / 405.
 * - `answerHealth`, `answerMcSettings`, `answerPage`, `answerSeal`: the relay's own routes without credentials.
 * - `identifyCaller`: who asks (`context.caller`): a user (401, sign-in lockout 429), an address, a caller's key.
 * - `answerUsage`, `answerMetrics`: the caller's own routes, outside the request limits.
 * - `applyLimits`: RATE_LIMIT_PER_* and CONCURRENT_REQUESTS (429); takes a place in flight (a release).
 * - `readRequestBody`: a POST body read whole, one JSON object (`context.body`); takes body bytes (a release).
 * - `chooseUpstream`: which upstream or alias (`context.upstream.target`), or the merged model list.
 * - `useCallerKey`: the caller's own key for a BYOK upstream, or relay credentials for a keyed one (401).
 * - `checkModel`: ALLOWED_MODELS (400).
 * - `capAnswerTokens`: MAX_TOKENS_PER_REQUEST, the answer's length bounded (400 for impossible values).
 * - `reserveTokens`: TOKEN_BUDGET_PER_* reservations (429 when spent); each a release, settled with the usage.
 * - `requestUsage`: a streamed chat asks for its usage; a changed body is serialised again.
 * - `forwardRequest`: the upstream call, failover between an alias's targets, 502/503/504/499 when none answers;
 *   watches the client (a release), gives the body bytes back once sent.
 * - `relayResponse`: the upstream's answer relayed (streamed, or read whole), its headers filtered, errors masked.
 *
 * Then `finish` (src/stages/finish.ts), once, when the stages are done and the relayed body (if any) has ended, been
 * cut or lost its client: the usage charged (reported, or estimated), every release the stages registered run (the
 * process's first, then the store's and the ledger row in one store call), the metrics and the log line.
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
  answerAdmin,
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
 * `RequestContext` per request, then `finish`: what the stages took given back, the log line and metrics. An exception in a stage is
 * answered with a 500 naming the request id (the details go to the log, never to the client).
 */
export function createHandler(config: RelayConfig, options: HandlerOptions = {}): RelayHandler {
  const relay = createRelay(config, options);
  const handler = async (request: Request, info: Deno.ServeHandlerInfo) => {
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
      context.log.error = errorText(error);
      context.log.outcome = "relay_error";
      response = undefined;
      // The stage's answer is dropped, and with it any body it was relaying: that body never ends.
      context.releases.waitForNothing();
    }
    response ??= errorResponse(500, `internal error (request id ${context.id}); see the relay's log`, "relay_error");
    context.log.status = response.status;
    if (!context.upstream.relayed) {
      // A response the relay made itself: it carries its length (0 for none).
      context.log.bytesOut = Number(response.headers.get("content-length") ?? 0);
      const added = addRelayHeaders({}, context.id, context.cors);
      for (const name in added) response.headers.set(name, added[name]);
    }
    finish(relay, context);
    return response;
  };
  return Object.assign(handler, { relay });
}

/** Builds what the stages share from the config: routes, upstream targets, sign-in checks, counters. */
function createRelay(config: RelayConfig, options: HandlerOptions): Relay {
  const routes: Record<string, Route> = { ...ROUTES };
  if (config.metricsUsers.length > 0) routes["/metrics"] = { method: "GET" };
  if (config.admins.length > 0) {
    Object.assign(routes, { "/admin": { method: "GET" }, "/admin/usage": { method: "GET" } });
  }
  for (const path of config.disabledPaths) delete routes[path];
  if (!config.page) delete routes["/"];
  if (config.sealSecret === undefined) delete routes["/seal"];
  const upstreams = config.upstreams.map((upstream) => {
    const target: UpstreamTarget = {
      ...upstream,
      // Lower case like every other header name the relay sends, once, not per request.
      authHeader: upstream.authHeader.toLowerCase(),
      host: new URL(upstream.baseUrl).host,
      shown: shownHost(config, upstream),
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
  const kept = keptParts(config, options.previous?.relay);
  const log = createLogger(config, options.log);
  const breakerChanged = (label: string, open: boolean) => {
    metrics.breakerOpen.set(label, open ? 1 : 0);
    if (open) log.warn("breaker open: target skipped", { target: label, seconds: config.breakerOpenMs / 1000 });
    else log.info("breaker closed: target answers again", { target: label });
  };
  if (kept.breakers) {
    // Carried over from the handler a reload replaced: its open breakers stay open, in the metrics too, and what
    // they log goes through this handler's log.
    kept.breakers.onChange = breakerChanged;
  } else {
    for (const targets of Object.values(config.modelAliases)) {
      for (const label of targets) metrics.breakerOpen.set(label, 0);
    }
  }
  return {
    config,
    log,
    metrics,
    counters: options.counters ?? new MemoryCounterStore(options.now, config.memoryStoreKeys),
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
    tokenBudgetsOn: config.tokenBudgetPerDay > 0 || config.tokenBudgetPerMonth > 0 ||
      config.users.some(({ tokenBudgets }) => (tokenBudgets?.day ?? 0) > 0 || (tokenBudgets?.month ?? 0) > 0),
    now,
    authenticate: kept.authenticate ?? createAuthenticator(config.users, metrics),
    hashedUsers: config.users.some((user) => user.hash !== undefined),
    bodyBudget: kept.bodyBudget ?? new ByteBudget(config.maxBufferedBytes, config.maxRequestBytes),
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
    breakers: kept.breakers ?? new CircuitBreakers(config.breakerFailures, config.breakerOpenMs, now, breakerChanged),
  };
}

/** The parts of the handler a reload replaces that the new config would build the same: those are carried over. */
function keptParts(config: RelayConfig, previous: Relay | undefined): Partial<Pick<Relay, KeptPart>> {
  if (previous === undefined) return {};
  const old = previous.config;
  const same = (pick: (config: RelayConfig) => unknown) => JSON.stringify(pick(old)) === JSON.stringify(pick(config));
  return {
    authenticate: same((config) => config.users) ? previous.authenticate : undefined,
    bodyBudget: same((config) => [config.maxBufferedBytes, config.maxRequestBytes]) ? previous.bodyBudget : undefined,
    // An upstream whose address or key changed is a new target: its breaker starts closed.
    breakers: same((config) => [config.modelAliases, config.breakerFailures, config.breakerOpenMs, config.upstreams])
      ? previous.breakers
      : undefined,
  };
}

/** What a reload may carry over. */
type KeptPart = "authenticate" | "bodyBudget" | "breakers";

/** A fresh context for one request: its id, its client's address, and the CORS headers its origin gets. */
function newContext(relay: Relay, request: Request, info: Deno.ServeHandlerInfo): RequestContext {
  const host = request.headers.get("host");
  const validHost = host === null || VALID_HOST.test(host);
  // Deno builds request.url from Host and the request target: only a valid Host keeps the path the target's.
  const url = new URL(validHost ? request.url : "http://invalid-host/");
  const path = url.pathname;
  const origin = request.headers.get("origin");
  // Every field a stage may set, set here: objects of one shape per request, not grown field by field.
  return {
    request,
    url,
    origin,
    cors: origin !== null && relay.allowedOrigins.has(origin) ? corsHeaders(origin) : NO_CORS,
    completed: info.completed,
    // Random, not a counter: an id goes to every client, and a counter would tell any caller how many requests
    // others made between two of its own.
    id: crypto.randomUUID(),
    method: request.method.slice(0, 16),
    path: path.length > 200 ? `${path.slice(0, 200)}...` : path,
    startedAt: performance.now(),
    validHost,
    route: undefined,
    routePath: undefined,
    caller: {
      address: clientAddress(request, info, relay.config.trustProxy),
      user: undefined,
      subject: undefined,
      key: undefined,
    },
    body: {
      bytes: undefined,
      payload: undefined,
      changed: false,
      held: 0,
      release: undefined,
      model: undefined,
      answerTokens: undefined,
    },
    upstream: {
      target: relay.upstreams[0],
      label: undefined,
      alias: undefined,
      attempts: undefined,
      auth: undefined,
      masker: undefined,
      call: undefined,
      clientGone: undefined,
      response: undefined,
      status: undefined,
      relayed: undefined,
    },
    log: {
      status: undefined,
      outcome: undefined,
      error: undefined,
      bytesIn: 0,
      bytesOut: 0,
      usageWatch: undefined,
      usage: undefined,
      events: undefined,
    },
    releases: new Releases(),
  };
}

/** The CORS headers of a request from no allowed origin: none (one object, never changed). */
const NO_CORS: Record<string, string> = Object.freeze({});

/** A Host header: a name, an IPv4 address or a bracketed IPv6 address, with an optional port. */
const VALID_HOST = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$/;
