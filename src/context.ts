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

/**
 * What one request carries through the stages: the request as it came in (read-only), what the stages decided about
 * it in four groups (`caller`, `body`, `upstream`, `log`), and what it holds until `finish` (`releases`).
 */
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
  readonly startedAt: number;
  /** False when the Host header could change the path; `checkHost` answers 400. */
  readonly validHost: boolean;
  /** The route matched by `matchRoute`; undefined before it (and for the answers before it). */
  route?: Route;
  /** The path inside BASE_PATH that `matchRoute` matched, e.g. `/v1/models`; undefined before it. */
  routePath?: string;
  /** Who asks: set by `identifyCaller`. */
  readonly caller: Caller;
  /** The request body and what it asks for: set by `readRequestBody`, `chooseUpstream`, `capAnswerTokens`. */
  readonly body: RequestBody;
  /** Where the request goes and what came back: set by `chooseUpstream`, `useCallerKey`, `forwardRequest`. */
  readonly upstream: UpstreamCall;
  /** What the log line, the metrics and the ledger record of the request: filled in by every stage. */
  readonly log: RequestLog;
  /**
   * What the request holds (a place in flight, budget reservations, body bytes, the client watch), each with what
   * gives it back: registered by the stage that takes it, at the moment it takes it, and run by `finish`.
   */
  readonly releases: Releases;
}

/** Who asks. */
export interface Caller {
  /** The client's address (TRUST_PROXY decides which). */
  readonly address: string;
  /** The signed-in user; undefined for anonymous requests (PUBLIC_ACCESS, BYOK). */
  user?: string;
  /** Whom limits and budgets count for: `user:<name>`, or `address:<address>` for anonymous requests. */
  subject?: string;
  /** The key the caller brought for a BYOK upstream (raw or sealed): X-Api-Key, or a bearer token naming no user. */
  key?: string;
}

/** The request body (POST only) and what it asks for. */
export interface RequestBody {
  /** The body as read by `readRequestBody`; dropped once it has been sent upstream. */
  bytes?: Uint8Array<ArrayBuffer>;
  /** The body parsed as a JSON object, when a stage needs to look inside it. */
  payload?: JsonObject;
  /** True when a stage changed `payload`: the body is serialised again before it is forwarded. */
  changed: boolean;
  /** Bytes of the body counted against MAX_BUFFERED_BYTES until it has been sent upstream. */
  held: number;
  /** Gives the body's bytes back as soon as it has been sent upstream, before `finish` (which then skips it). */
  release?: () => unknown;
  /** The model the client asked for (chat and completions); without the upstream's name once that chose it. */
  model?: string;
  /**
   * The most answer tokens this request may get, all its answers (`n`, `best_of`, prompts) together, after
   * MAX_TOKENS_PER_REQUEST; undefined when unbounded.
   */
  answerTokens?: number;
}

/** Where the request goes, how it is sent, and what came back. */
export interface UpstreamCall {
  /** The upstream chosen by `chooseUpstream` (the first one until then); for an alias, the target tried last. */
  target: UpstreamTarget;
  /** The upstream's name in the log and X-Relay-Upstream, when there are several (for an alias: `upstream/model`). */
  label?: string;
  /** The model alias the client asked for (MODEL_ALIASES_JSON), if it did. */
  alias?: string;
  /** Every attempt at an alias's targets, for the log line: target, outcome, milliseconds. */
  attempts?: { target: string; outcome: string; ms: number }[];
  /** The auth header value for a BYOK upstream, made from the caller's key by `useCallerKey`. */
  auth?: string;
  /** Masks secrets in what the upstream sends back: the relay's, plus the caller's own key for a BYOK upstream. */
  masker?: ReturnType<typeof createSecretMasker>;
  /** Aborts the current attempt: the client left, or the upstream was too slow. */
  call?: AbortController;
  /** True once the client has gone (noticed by the client watch). */
  clientGone?: boolean;
  /** The upstream's response, once `forwardRequest` has one. */
  response?: Response;
  /**
   * The status of the upstream's answer, once its headers came: its first byte. From then on a metered request is
   * charged (usage or an estimate) unless the status is an error; before, it is charged nothing.
   */
  status?: number;
  /** True when the answer is the upstream's, relayed: it already carries the relay's own headers. */
  relayed?: boolean;
}

/** What the log line, the metrics and the ledger record of the request. */
export interface RequestLog {
  /** The status the client got. */
  status?: number;
  /** Why the request ended as it did, e.g. `completed`, `token_budget_exceeded`, `client_gone`. */
  outcome?: string;
  /** An error's text (secrets masked before it is logged). */
  error?: string;
  bytesIn: number;
  bytesOut: number;
  /** How token usage is read from the answer; set for chat and completions, which are charged. */
  usageWatch?: UsageWatch;
  /** Token usage the upstream reported (or `finish`'s estimate). */
  usage?: TokenUsage;
  /** Server-sent events relayed, for a usage estimate when the upstream reports none. */
  events?: () => number;
}

/** An upstream with what is derived from it once: its host for messages and its ready auth header value. */
export type UpstreamTarget = Upstream & {
  host: string;
  /** How messages to clients name it: its host, or `upstream:<name>` when its address is not published. */
  shown: string;
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
  /** True when a token budget may apply to someone (TOKEN_BUDGET_PER_*, or a user's own): else none is looked up. */
  readonly tokenBudgetsOn: boolean;
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
 * (`errorResponse`). Stages answer through it wherever the log line should say why; the answers that keep an empty
 * outcome (a disallowed origin's 403, an unknown path's 404 and 405, a refused sign-in's 401, the /metrics and
 * /admin refusals) call `errorResponse` themselves, and their status says it.
 */
export function refuse(
  context: RequestContext,
  outcome: string,
  status: number,
  message: string,
  code: string,
  headers?: Record<string, string>,
): Response {
  context.log.outcome = outcome;
  return errorResponse(status, message, code, headers);
}

/**
 * Gives back one thing a request took. `used` is the tokens the request is charged in the end (0 when it is charged
 * nothing): a budget reservation is settled with it, anything else ignores it. May return a store write's promise.
 */
export type Release = (used: number) => unknown;

/**
 * What a request holds, as the releases that give it back, and the parts of its answer still under way (the
 * handler's, and a body relayed after the handler returned). A stage registers a release where it takes the thing
 * (`add`); `finish` runs every release once, when the last part is over: the stages are done and the relayed body
 * (if any) has ended, been cut or lost its client. Like a Go `defer`: whatever way the request ends, a refusal, an
 * exception, a client that leaves, nothing taken is lost and nothing is given back twice.
 */
export class Releases {
  /** Releases of what lives in this process (body bytes, the client watch); undefined once run. */
  #local: (Release | undefined)[] = [];
  /** Releases that write to the counter store (places, reservations): `finish` runs them in one store call. */
  #store: (Release | undefined)[] = [];
  #parts = 1;
  #finished = false;

  /**
   * Registers `release` for what was just taken (`store`: it writes to the counter store). The function returned
   * runs it now instead, at most once (a refusal that gives back at once, a body freed once it has been sent);
   * `finish` then skips it.
   */
  add(release: Release, store = false): (used?: number) => unknown {
    const list = store ? this.#store : this.#local;
    const index = list.push(release) - 1;
    return (used = 0) => {
      const pending = list[index];
      list[index] = undefined;
      return pending?.(used);
    };
  }

  /** One more part of the answer to wait for: a body relayed to the client after the handler has returned. */
  waitForBody(): void {
    this.#parts++;
  }

  /** The answer will have no more parts (a stage threw: a relayed body, if any, is never sent). */
  waitForNothing(): void {
    this.#parts = 1;
  }

  /** Ends one part of the answer; true (once) when it was the last: the request is over. */
  partEnded(): boolean {
    if (this.#finished || --this.#parts > 0) return false;
    this.#finished = true;
    return true;
  }

  /** The releases not run yet, of the process or of the store, the last taken first (as Go runs its defers). */
  take(store: boolean): Release[] {
    const list = store ? this.#store : this.#local;
    const taken: Release[] = [];
    for (let index = list.length - 1; index >= 0; index--) {
      const release = list[index];
      list[index] = undefined;
      if (release !== undefined) taken.push(release);
    }
    return taken;
  }
}
