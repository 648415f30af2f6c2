/**
 * The stages of bring your own key: POST /seal seals a caller's key, and `useCallerKey` checks (and opens) the key a
 * caller brings for a BYOK upstream.
 *
 * @module
 */

import { addressKey } from "../auth.ts";
import { callerKeyProblem, SEALED_PREFIX } from "../byok.ts";
import { refuse, type Relay, type RequestContext, type StageAnswer } from "../context.ts";
import { errorResponse, jsonResponse } from "../http.ts";
import { createSecretMasker } from "../secrets.ts";
import { reserveBodyBytes } from "./choose.ts";
import { parseJson, readBody } from "../streams.ts";

/** Seals per client address per minute at POST /seal. */
const SEALS_PER_MINUTE = 10;

/**
 * Stage: the caller's own key. For a BYOK upstream, the key the caller brought (raw, or sealed and opened here) is
 * checked before it leaves (401 when it is missing, malformed, or does not match the upstream's keyPattern) and
 * goes in that upstream's auth header; it is masked in everything the upstream sends back. A keyed upstream needs
 * relay credentials (or PUBLIC_ACCESS): a caller with only its own key gets 401, and its key goes nowhere.
 */
export function useCallerKey(relay: Relay, context: RequestContext): StageAnswer {
  const { target } = context.upstream;
  if (!target.byok) {
    if (context.caller.user !== undefined || relay.config.publicAccess) return undefined;
    return refuse(
      context,
      "auth_required",
      401,
      `the upstream "${target.name}" uses this relay's own key: sign in with username:password as the API key`,
      "invalid_api_key",
    );
  }
  return checkCallerKey(relay, context);
}

/** The caller's key for a BYOK upstream: opened when sealed, checked, and masked in everything sent back. */
async function checkCallerKey(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { target } = context.upstream;
  let key = context.caller.key;
  if (key?.startsWith(SEALED_PREFIX)) {
    const opened = relay.sealer === undefined
      ? { problem: "this relay opens no sealed keys (SEAL_SECRET is not set); send the key itself" }
      : await relay.sealer.open(key, target.name);
    if ("problem" in opened) {
      return refuse(context, "sealed_key_refused", 401, opened.problem, "invalid_api_key");
    }
    key = opened.key;
  }
  const problem = callerKeyProblem(key, target);
  if (problem !== undefined) {
    return refuse(context, "caller_key_refused", 401, problem, "invalid_api_key");
  }
  context.upstream.auth = target.authPrefix ? `${target.authPrefix} ${key}` : key;
  // callerKeyProblem refuses a missing key: both the key and the form it was brought in are strings here.
  context.upstream.masker = createSecretMasker([...relay.upstreamSecrets, key!, context.caller.key!]);
  return undefined;
}

/**
 * Stage: POST /seal (with SEAL_SECRET), without relay credentials and limited per address: `{"key", "upstream",
 * "expiresInDays"}` in, `{"sealed", "upstream", "expires_at"}` out. The key is checked like a raw one first.
 */
export async function answerSeal(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const waitFor = await relay.counters.take(`seals:${addressKey(context.caller.address)}`, {
    capacity: SEALS_PER_MINUTE,
    periodMs: 60_000,
  });
  if (waitFor > 0) {
    return refuse(
      context,
      "seal_rate_limited",
      429,
      `at most ${SEALS_PER_MINUTE} seals a minute from one address; try again in ${waitFor} s`,
      "relay_rate_limit_exceeded",
      {
        "retry-after": String(waitFor),
      },
    );
  }
  const read = await readBody(context.request, relay.bodyLimits, reserveBodyBytes(relay, context));
  if ("status" in read) return errorResponse(read.status, read.message, read.code, read.headers);
  const request = parseJson(read.body) as { key?: unknown; upstream?: unknown; expiresInDays?: unknown } | undefined;
  const target = typeof request?.upstream === "string" ? relay.upstreamsByName.get(request.upstream) : undefined;
  const days = request?.expiresInDays ?? 90;
  const problem = request === undefined
    ? 'the body must be {"key": "...", "upstream": "<name>", "expiresInDays": 90}'
    : target === undefined || !target.byok
    ? `"upstream" must name a BYOK upstream of this relay: ${
      relay.upstreams.filter((u) => u.byok).map((u) => u.name).join(", ")
    }`
    : typeof days !== "number" || !Number.isInteger(days) || days < 1 || days > 3650
    ? '"expiresInDays" must be a whole number of days from 1 to 3650'
    : callerKeyProblem(typeof request.key === "string" ? request.key : undefined, target);
  if (problem !== undefined) {
    return refuse(context, "seal_refused", 400, problem, "invalid_seal_request");
  }
  const expiresAt = relay.now() + (days as number) * 86_400_000;
  const sealed = await relay.sealer!.seal(request!.key as string, target!.name, expiresAt);
  return jsonResponse(
    { sealed, upstream: target!.name, expires_at: new Date(Math.floor(expiresAt / 1000) * 1000).toISOString() },
    { headers: { "cache-control": "no-store" } },
  );
}
