/**
 * The types the stages share: `Relay` (what is built once from the config), `RequestContext` (one per request,
 * passed through the stages), `Stage`, and the upstream targets and request limits they refer to.
 *
 * @module
 */

import type { ADDRESS_BUSY, HASHING_BUSY } from "./auth.ts";
import type { CircuitBreakers } from "./breakers.ts";
import type { KeySealer } from "./byok.ts";
import type { Route } from "./config/routes.ts";
import type { EnvVar, RelayConfig, RelayUser, Upstream } from "./config/variables.ts";
import { errorResponse } from "./http.ts";
import type { Logger, RelayMetrics } from "./observe.ts";
import type { createSecretMasker } from "./secrets.ts";
import type { BucketRule, CounterStore } from "./stores/counter.ts";
import type { BodyLimits, ByteBudget, JsonObject } from "./streams.ts";
import type { TokenUsage, UsageWatch } from "./usage.ts";

/** What one request carries through the stages: the request, what the stages decided, and its log record. */
export interface RequestContext {
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

/** An upstream with what is derived from it once: its host for messages and its ready auth header value. */
export type UpstreamTarget = Upstream & {
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

/** What the stages share across requests: the config and everything built from it once. */
export interface Relay {
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
export type StageAnswer = Response | undefined | Promise<Response | undefined>;

/** One stage of the handler. */
export type Stage = (relay: Relay, context: RequestContext) => StageAnswer;

/** One request limit: its variable, its window, its token bucket. */
export interface RequestLimit {
  variable: EnvVar;
  window: "minute" | "hour" | "day";
  rule: BucketRule;
}

/** One target a request may be sent to: an upstream and, for an alias, the model to ask it for. */
export interface Attempt {
  target: UpstreamTarget;
  /** The model this target is asked for; undefined keeps the body as it is. */
  model?: string;
  /** `upstream/model` for an alias target, else the upstream's name: in logs, metrics, breakers, X-Relay-Upstream. */
  label: string;
}

/**
 * A refusal: records why in the request's log line (`outcome`) and answers with the OpenAI-shaped `mc-relay:` error
 * (`errorResponse`). Every stage that turns a request away answers through it, so the log and the answer agree.
 */
export function refuse(
  context: RequestContext,
  outcome: string,
  status: number,
  message: string,
  code: string,
  headers?: Record<string, string>,
): Response {
  context.outcome = outcome;
  return errorResponse(status, message, code, headers);
}
