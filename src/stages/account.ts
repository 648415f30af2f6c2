/**
 * `account`: what runs once a request is over (after the last stage, or when a relayed body ends): the log line, the
 * metrics, the token budgets settled with the real usage, the places and bytes given back.
 *
 * @module
 */

import { addressKey } from "../auth.ts";
import type { Relay, RequestContext } from "../context.ts";
import { releaseBody } from "./choose.ts";
import { storeCalls } from "./limits.ts";
import { giveBack } from "../stores/counter.ts";
import { errorText } from "../text.ts";
import type { TokenUsage } from "../usage.ts";

/** The tokens an answer used in all: `total_tokens`, or prompt and completion added up. */
function usageTotal(usage: TokenUsage): number {
  return usage.total_tokens ?? (usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0);
}

/**
 * Replaces the request's token reservations with what it used, frees its in-flight place, and adds a charged
 * request to the usage ledger (per UTC day, caller, model and upstream).
 */
function settle(relay: Relay, context: RequestContext, usage: TokenUsage | undefined): Promise<unknown> | undefined {
  // BYOK requests spend the caller's own quota: the relay keeps no record of them.
  const recorded = usage !== undefined && !context.target.byok;
  if (!context.reservations?.length && !recorded && context.inFlightKey === undefined) return undefined;
  const used = usage === undefined ? 0 : usageTotal(usage);
  return storeCalls(relay, () => {
    const writes: unknown[] = [];
    // The real usage replaces each reservation in the store that holds it, whichever store counts by now.
    for (const { key, amount, expiresAt, store } of context.reservations?.splice(0) ?? []) {
      writes.push(giveBack(relay.counters, store, (counters) => counters.add(key, used - amount, expiresAt)));
    }
    if (recorded) {
      writes.push(relay.counters.recordUsage({
        day: new Date(relay.now()).toISOString().slice(0, 10),
        who: context.subject ?? `address:${addressKey(context.client)}`,
        model: context.model?.slice(0, 100) ?? "",
        upstream: context.target.name,
        prompt: usage.prompt_tokens ?? 0,
        completion: usage.completion_tokens ?? 0,
        total: used,
        estimated: usage.estimated === true,
      }));
    }
    if (context.inFlightKey !== undefined) {
      const key = context.inFlightKey;
      context.inFlightKey = undefined;
      writes.push(giveBack(relay.counters, context.inFlightStore ?? relay.counters, (store) => store.add(key, -1)));
    }
    return writes;
  });
}

/**
 * A usage estimate for an answer whose usage never arrived (the client left first, the upstream reports none),
 * so that no request is free: about four bytes a token for the prompt and a JSON answer, one token per
 * server-sent event of a stream. Marked `estimated`.
 */
function estimateUsage(context: RequestContext): TokenUsage {
  const prompt = Math.ceil(context.bytesIn / 4);
  const completion = context.events ? context.events() : Math.ceil(context.bytesOut / 4);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion, estimated: true };
}

/**
 * The figures /admin shows from memory: refusals by status and reason (an error the upstream sent itself counts as
 * "upstream"), and each upstream's answers and failures (no answer, or 5xx).
 */
function countForAdmin(relay: Relay, context: RequestContext): void {
  const status = context.status ?? 0;
  const passedOn = context.forwarded === true && context.upstreamStatus === status;
  if (status >= 400) relay.metrics.countRefusal(status, passedOn ? "upstream" : context.outcome ?? "");
  if (context.forwarded) {
    relay.metrics.countUpstreamAnswer(context.target.name, !((context.upstreamStatus ?? 500) < 500));
  }
}

/** Stage: account. Counts the request in the metrics and writes its log line (when info is logged). */
export function account(relay: Relay, context: RequestContext): void {
  releaseBody(relay, context);
  const charged = context.usageWatch !== undefined && context.forwarded && !((context.upstreamStatus ?? 0) >= 300);
  if (context.usage === undefined && charged) {
    context.usage = estimateUsage(context);
  }
  settle(relay, context, charged ? context.usage : undefined)?.catch((error) =>
    relay.log.error("counter store: could not settle a request", { request_id: context.id, error: errorText(error) })
  );
  const route = context.routePath !== undefined && Object.hasOwn(relay.routes, context.routePath)
    ? context.routePath
    : "other";
  const model = context.model?.slice(0, 100);
  relay.metrics.countRequest(route, context.status ?? 0, context.user ?? "");
  countForAdmin(relay, context);
  if (context.usage && context.user) relay.metrics.countTokens(context.user, model ?? "", context.usage);
  // Health probes come every few seconds: their lines are debug, not info.
  const level = context.routePath === "/health" ? "debug" : "info";
  if (!relay.log.enabled(level)) return;
  relay.log[level]("request", {
    request_id: context.id,
    method: context.method,
    path: context.path,
    client: context.client,
    user: context.user,
    upstream: context.upstream,
    model,
    usage: context.usage,
    status: context.status,
    upstream_status: context.upstreamStatus,
    duration_ms: Math.round((performance.now() - context.startedAt) * 10) / 10,
    bytes_in: context.bytesIn,
    bytes_out: context.bytesOut,
    alias: context.alias,
    attempts: context.attempts && context.attempts.length > 1 ? context.attempts : undefined,
    outcome: context.outcome,
    error: context.error && context.masker ? context.masker.mask(context.error) ?? "[REDACTED]" : context.error,
  });
}
