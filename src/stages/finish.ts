/**
 * `finish`: what runs once a request is over (after the last stage, or when a relayed body ends): what its stages took
 * given back (the token budgets settled with the real usage, places, body bytes, the client watch), the ledger, the
 * metrics, the log line.
 *
 * @module
 */

import { addressKey } from "../auth.ts";
import type { Relay, RequestContext } from "../context.ts";
import { storeCalls } from "./limits.ts";
import { errorText } from "../text.ts";
import type { TokenUsage } from "../usage.ts";

/** The tokens an answer used in all: `total_tokens`, or prompt and completion added up. */
function usageTotal(usage: TokenUsage): number {
  return usage.total_tokens ?? (usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0);
}

/**
 * Runs what the request holds back to the store and the process: first its releases of what lives in the process
 * (the client watch, body bytes), then, in one store call (one SQLite transaction, one Redis round trip), its
 * releases that write to the store (reservations settled with `usage`, the place in flight freed) and the ledger row
 * of a charged request (per UTC day, caller, model and upstream). Each release runs once; an error in one is logged
 * and the others still run.
 */
function giveBackAll(relay: Relay, context: RequestContext, usage: TokenUsage | undefined): void {
  const used = usage === undefined ? 0 : usageTotal(usage);
  for (const release of context.releases.take(false)) {
    try {
      release(used);
    } catch (error) {
      relay.log.error("could not give back what a request held", { request_id: context.id, error: errorText(error) });
    }
  }
  const releases = context.releases.take(true);
  // BYOK requests spend the caller's own quota: the relay keeps no record of them. Nor does a store without a ledger.
  const recorded = usage !== undefined && !context.upstream.target.byok && relay.counters.keepsLedger;
  if (releases.length === 0 && !recorded) return;
  storeCalls(relay, () => {
    const writes: unknown[] = [];
    for (const release of releases) {
      try {
        writes.push(release(used));
      } catch (error) {
        writes.push(Promise.reject(error));
      }
    }
    if (recorded) {
      writes.push(relay.counters.recordUsage({
        day: new Date(relay.now()).toISOString().slice(0, 10),
        who: context.caller.subject ?? `address:${addressKey(context.caller.address)}`,
        model: context.body.model?.slice(0, 100) ?? "",
        upstream: context.upstream.target.name,
        prompt: usage.prompt_tokens ?? 0,
        completion: usage.completion_tokens ?? 0,
        total: used,
        estimated: usage.estimated === true,
      }));
    }
    return writes;
  }).catch((error) =>
    relay.log.error("counter store: could not settle a request", { request_id: context.id, error: errorText(error) })
  );
}

/**
 * A usage estimate for an answer whose usage never arrived (the client left first, the upstream reports none),
 * so that no request is free: about four bytes a token for the prompt and a JSON answer, one token per
 * server-sent event of a stream. Marked `estimated`.
 */
function estimateUsage(context: RequestContext): TokenUsage {
  const prompt = Math.ceil(context.log.bytesIn / 4);
  const completion = context.log.events ? context.log.events() : Math.ceil(context.log.bytesOut / 4);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion, estimated: true };
}

/**
 * The end of a request: called by the handler when the stages are done, and by a body relayed after that when it
 * ends, is cut, or loses its client. The last of these calls (`Releases.partEnded`) finishes the request, once: the
 * usage it is charged (reported, or estimated when it never arrived; nothing when the upstream never began to
 * answer), every release its stages registered
 * (`giveBackAll`), then its metrics and log line (`account`).
 */
export function finish(relay: Relay, context: RequestContext): void {
  if (!context.releases.partEnded()) return;
  // Charged: a metered request the upstream began to answer (its status and headers came), and not with an error.
  // One that got no upstream byte (refused, down, timed out, breakers open, the client gone first) was never
  // answered: its reservations go back whole and the ledger gets no row.
  const status = context.upstream.status;
  const charged = context.log.usageWatch !== undefined && status !== undefined && status < 300;
  if (context.log.usage === undefined && charged) {
    context.log.usage = estimateUsage(context);
  }
  giveBackAll(relay, context, charged ? context.log.usage : undefined);
  account(relay, context);
}

/**
 * The figures /admin shows from memory: refusals by status and reason (an error the upstream sent itself counts as
 * "upstream"), and each upstream's answers and failures (no answer, or 5xx) for the requests sent to it.
 */
function countForAdmin(relay: Relay, context: RequestContext): void {
  const status = context.log.status ?? 0;
  const sent = context.upstream.call !== undefined;
  const passedOn = sent && context.upstream.status === status;
  if (status >= 400) relay.metrics.countRefusal(status, passedOn ? "upstream" : context.log.outcome ?? "");
  // A client that left before the answer says nothing of the upstream: anyone could make a target look failing.
  if (sent && context.log.outcome !== "client_gone") {
    relay.metrics.countUpstreamAnswer(context.upstream.target.name, !((context.upstream.status ?? 500) < 500));
  }
}

/** Counts the finished request in the metrics and writes its log line (when info is logged). */
function account(relay: Relay, context: RequestContext): void {
  const route = context.routePath !== undefined && Object.hasOwn(relay.routes, context.routePath)
    ? context.routePath
    : "other";
  const model = context.body.model?.slice(0, 100);
  relay.metrics.countRequest(route, context.log.status ?? 0, context.caller.user ?? "");
  countForAdmin(relay, context);
  if (context.log.usage && context.caller.user) {
    relay.metrics.countTokens(context.caller.user, model ?? "", context.log.usage);
  }
  // Health probes come every few seconds: their lines are debug, not info.
  const level = context.routePath === "/health" ? "debug" : "info";
  if (!relay.log.enabled(level)) return;
  relay.log[level]("request", {
    request_id: context.id,
    method: context.method,
    path: context.path,
    client: context.caller.address,
    user: context.caller.user,
    upstream: context.upstream.label,
    model,
    usage: context.log.usage,
    status: context.log.status,
    upstream_status: context.upstream.status,
    duration_ms: Math.round((performance.now() - context.startedAt) * 10) / 10,
    bytes_in: context.log.bytesIn,
    bytes_out: context.log.bytesOut,
    alias: context.upstream.alias,
    attempts: context.upstream.attempts && context.upstream.attempts.length > 1 ? context.upstream.attempts : undefined,
    outcome: context.log.outcome,
    error: context.log.error && context.upstream.masker
      ? context.upstream.masker.mask(context.log.error) ?? "[REDACTED]"
      : context.log.error,
  });
}
