/**
 * The forward stage: the usage request added to a stream, the call to the upstream (its headers, the client watch,
 * the timeouts), failover from one attempt to the next, and the answers when no upstream answered.
 *
 * @module
 */

import { addressKey } from "../auth.ts";
import { type Attempt, refuse, type Relay, type RequestContext } from "../context.ts";
import { DEADLINE_TICK_MS, deadlines } from "../deadlines.ts";
import { describeNetworkError, RelayAbort } from "../http.ts";
import { attemptPlan, upstreamHeaders } from "./choose.ts";
import { errorText, textEncoder } from "../text.ts";

/**
 * Stage: usage request. A streamed chat only reports token usage when asked, so the relay asks, and takes the
 * extra usage event back out of the stream when the client had not asked for it itself. A changed body is
 * serialised again here, once.
 */
export function requestUsage(_relay: Relay, context: RequestContext): undefined {
  const { payload } = context.body;
  const { usageWatch } = context.log;
  const asksForUsage = context.route?.upstreamPath === "/chat/completions" ||
    context.route?.upstreamPath === "/completions";
  if (usageWatch !== undefined && payload !== undefined && asksForUsage) {
    const options = payload.stream_options;
    if (payload.stream === true && !(typeof options === "object" && options?.include_usage === true)) {
      payload.stream_options = { ...(typeof options === "object" ? options : {}), include_usage: true };
      context.body.changed = true;
      usageWatch.stripUsageEvent = true;
    }
  }
  if (context.body.changed) context.body.bytes = textEncoder.encode(JSON.stringify(payload)) as Uint8Array<ArrayBuffer>;
  return undefined;
}

/** Why the current upstream call was aborted, if it was: a `RelayAbort`, or undefined. */
export function abortReason(context: RequestContext): unknown {
  return context.upstream.call?.signal.reason;
}

/** The answer when the upstream call failed before any response: 499, 504 or 502. */
export function upstreamFailure(relay: Relay, context: RequestContext, error: unknown): Response {
  const reason = abortReason(context);
  const host = context.upstream.target.shown;
  if (reason instanceof RelayAbort && reason.kind === "client_gone") {
    return refuse(context, "client_gone", 499, "the client closed the request", "client_closed_request");
  }
  if (reason instanceof RelayAbort && reason.kind === "upstream_timeout") {
    return refuse(
      context,
      "upstream_timeout",
      504,
      `the upstream ${host} sent no response within ${
        relay.config.requestTimeoutMs / 1000
      } s (REQUEST_TIMEOUT_SECONDS)`,
      "upstream_timeout",
    );
  }
  context.log.error = errorText(error);
  return refuse(
    context,
    "upstream_unreachable",
    502,
    `could not reach the upstream ${host}: ${
      describeNetworkError(context.log.error)
    }; check UPSTREAM_BASE_URL and that the provider is reachable from the relay`,
    "upstream_unreachable",
  );
}

/** The answer to an upstream redirect: 502 naming the target's host, never following it. */
function upstreamRedirect(context: RequestContext, location: string): Response {
  let redirectTarget = "another location";
  try {
    const to = new URL(location, context.upstream.target.baseUrl);
    // An internal upstream's redirect (a relative Location, or an internal name) would name what is kept from
    // clients: the host goes to the log only.
    context.log.error = `redirected to ${to.host}`;
    if (context.upstream.target.shown === context.upstream.target.host) redirectTarget = to.host;
  } catch {
    // keep the generic wording
  }
  return refuse(
    context,
    "upstream_redirect",
    502,
    `the upstream ${context.upstream.target.shown} redirected to ${redirectTarget}; set ${
      context.upstream.target.name === "default"
        ? "UPSTREAM_BASE_URL"
        : `the baseUrl of upstream "${context.upstream.target.name}"`
    } to the final URL`,
    "upstream_redirect",
  );
}

/** An answer from the upstream that lets a request move on to the next target, when there is one. */
const FAILOVER_STATUSES = new Set([429, 500, 502, 503, 504]);

/**
 * Stage: forward. Calls the upstream with the client's body, Content-Type and Accept, and the upstream's key. For
 * a model alias, the targets are tried in order: a connection, DNS or TLS failure, no response headers within the
 * attempt's share of REQUEST_TIMEOUT_SECONDS, or a 429/500/502/503/504 moves on to the next target (whose breaker is
 * not open) with the same body, model replaced; any other answer is the answer. A client that leaves aborts the call
 * (499); with no target left the last failure is answered (502 or 504, or the last upstream answer); a redirect is
 * 502, since following it could carry the key elsewhere.
 */
export async function forwardRequest(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const plan = attemptPlan(relay, context);
  watchClient(context);
  const deadline = performance.now() + relay.config.requestTimeoutMs;
  let failure: unknown;
  try {
    for (let index = 0; index < plan.length; index++) {
      const attempt = plan[index];
      if (context.upstream.clientGone) break;
      if (plan.length > 1 && !relay.breakers.admit(attempt.label)) {
        context.upstream.attempts?.push({ target: attempt.label, outcome: "breaker_open", ms: 0 });
        continue;
      }
      // Each target left gets an equal share of the time left for the first byte.
      const share = (deadline - performance.now()) / (plan.length - index);
      const result = await callUpstream(relay, context, attempt, Math.max(1, share));
      const last = index === plan.length - 1;
      if (!("response" in result) || (FAILOVER_STATUSES.has(result.response.status) && !last)) {
        if (plan.length > 1 && !context.upstream.clientGone) countFailure(relay, context, attempt, result);
        if ("response" in result) await result.response.body?.cancel();
        failure = "error" in result ? result.error : undefined;
        continue;
      }
      if (plan.length > 1) relay.breakers.succeeded(attempt.label);
      context.upstream.response = result.response;
      break;
    }
  } finally {
    // Sent (or never to be): its bytes no longer count against MAX_BUFFERED_BYTES, however long the answer takes.
    context.body.release?.();
  }
  if (context.upstream.response === undefined) return noAnswer(relay, context, plan, failure);
  const response = context.upstream.response;
  context.upstream.status = response.status;
  if (response.status >= 300 && response.status < 400 && response.headers.has("location")) {
    await response.body?.cancel();
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
  const reason = abortReason(context);
  if (reason instanceof RelayAbort && reason.kind === "breaker_open") return;
  const timeout = "response" in result
    ? result.response.status === 504
    : reason instanceof RelayAbort && reason.kind === "upstream_timeout";
  relay.breakers.failed(
    attempt.label,
    context.caller.subject ?? `address:${addressKey(context.caller.address)}`,
    timeout,
  );
}

/** Listener options for a listener that runs at most once (one object for every request). */
const ONCE = { once: true } as const;

/** The client's request headers the upstream gets (every other one stays with the relay). */
const FORWARDED_REQUEST_HEADERS = ["content-type", "accept"] as const;

/**
 * Aborts the upstream call when the client leaves, once the call has run for DEADLINE_TICK_MS (so within two ticks,
 * 50 ms): an answer that comes sooner never needs `request.signal`, which costs a fifth of a fast request's
 * instructions (measured under callgrind, Deno 2.9.6). A client that left before the watch starts is noticed when it
 * starts. A relayed stream notices a client that leaves by its own cancellation. The watch ends when the request is
 * over (its release, run by `finish`).
 */
function watchClient(context: RequestContext): void {
  let stop = () => {};
  const start = deadlines.add(DEADLINE_TICK_MS, () => {
    const signal = context.request.signal;
    const onClientGone = () => {
      context.upstream.clientGone = true;
      context.upstream.call?.abort(new RelayAbort("client_gone"));
    };
    if (signal.aborted) return onClientGone();
    signal.addEventListener("abort", onClientGone, ONCE);
    stop = () => signal.removeEventListener("abort", onClientGone);
  });
  context.releases.add(() => {
    deadlines.cancel(start);
    stop();
  });
}

/** One attempt: the request to `attempt`'s upstream, with its own abort, within `timeoutMs` for the headers. */
async function callUpstream(
  relay: Relay,
  context: RequestContext,
  attempt: Attempt,
  timeoutMs: number,
): Promise<{ response: Response } | { error: unknown }> {
  const { request } = context;
  context.upstream.target = attempt.target;
  context.upstream.label = relay.upstreams.length > 1 || attempt.model !== undefined ? attempt.label : undefined;
  const headers = upstreamHeaders(attempt.target, context.upstream.auth);
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = request.headers.get(name);
    // The client's value replaces an extra header of the same name, as it always did.
    if (value !== null) headers[name] = value;
  }
  // The body sent is the relay's own serialisation (UTF-8 JSON), whatever type and charset the client declared.
  if (context.body.bytes !== undefined) headers["content-type"] = "application/json";
  // An alias is a model the body named: an attempt with a model has a payload to put it in.
  if (attempt.model !== undefined && context.body.payload !== undefined) {
    context.body.payload.model = attempt.model;
    context.body.bytes = textEncoder.encode(JSON.stringify(context.body.payload)) as Uint8Array<ArrayBuffer>;
  }
  const call = new AbortController();
  context.upstream.call = call;
  // Only an alias's targets have breakers that may abort a waiting attempt.
  const unwatch = attempt.model === undefined ? undefined : relay.breakers.watch(attempt.label, call);
  const deadline = deadlines.add(timeoutMs, () => call.abort(new RelayAbort("upstream_timeout")));
  const started = performance.now();
  try {
    const response = await fetch(`${attempt.target.baseUrl}${context.route?.upstreamPath}${context.url.search}`, {
      method: request.method,
      headers,
      body: context.body.bytes,
      signal: call.signal,
      redirect: "manual",
    });
    relay.metrics.observeUpstreamLatency((performance.now() - started) / 1000);
    context.upstream.attempts?.push({
      target: attempt.label,
      outcome: String(response.status),
      ms: Math.round(performance.now() - started),
    });
    return { response };
  } catch (error) {
    const reason = call.signal.reason;
    const outcome = reason instanceof RelayAbort ? reason.kind : describeNetworkError(errorText(error));
    context.upstream.attempts?.push({ target: attempt.label, outcome, ms: Math.round(performance.now() - started) });
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
  const tried = context.upstream.attempts?.some((attempt) => attempt.outcome !== "breaker_open") ?? true;
  if (!tried && !context.upstream.clientGone) {
    const waitFor = relay.breakers.secondsToRetry(plan.map((attempt) => attempt.label));
    return refuse(
      context,
      "upstreams_unavailable",
      503,
      `every target of ${context.upstream.alias} failed just now (${
        plan.map((attempt) => attempt.label).join(", ")
      }); try again in ${waitFor} s`,
      "upstreams_unavailable",
      { "retry-after": String(waitFor) },
    );
  }
  return upstreamFailure(relay, context, failure);
}
