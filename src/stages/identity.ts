/**
 * The identity stage: who the caller is (a user's credentials, a caller's own key, or an address on a public relay),
 * with the sign-in lockout; and /metrics for the users METRICS names.
 *
 * @module
 */

import { ADDRESS_BUSY, addressKey, constantTimeEqual, type HASHING_BUSY, readCredentials } from "../auth.ts";
import { bearerToken } from "../byok.ts";
import { BARE_PASSWORD_USER } from "../config/parse.ts";
import type { RelayUser } from "../config/variables.ts";
import { refuse, type Relay, type RequestContext, type StageAnswer } from "../context.ts";
import { errorResponse } from "../http.ts";
import { metricsResponse } from "../observe.ts";
import { type CounterStore, giveBack, hold, startCheck } from "../stores/counter.ts";

/**
 * Stage: identity. Checks `username:password`: 401 when it is missing or wrong. Wrong guesses are limited per
 * user name and client address (AUTH_FAILURES_PER_MINUTE): a check starts only while the allowance left is larger
 * than the checks already running for that name and address (`admitSignInCheck`), and only a wrong password uses
 * the allowance up. So at most the allowance of wrong guesses is ever checked, however many arrive at once, while
 * any number of right ones pass; and one client cannot lock out other users behind the same address. Once the
 * allowance is used up, the right password waits too (429): otherwise guessing would simply go on. 503 when
 * password hashing is saturated. With PUBLIC_ACCESS, credentials that name no configured user are anonymous.
 */
export function identifyCaller(relay: Relay, context: RequestContext): StageAnswer {
  const authorization = context.request.headers.get("authorization");
  const read = readCredentials(authorization, relay.usersByName.has(BARE_PASSWORD_USER));
  const name = "credentials" in read ? read.credentials.slice(0, read.credentials.indexOf(":")) : "";
  const apiKeyHeader = context.request.headers.get("x-api-key")?.trim() || undefined;
  // No relay user: with PUBLIC_ACCESS (credentials naming no configured user; MC's public preset sends "Bearer "
  // with nothing, or a key typed once for another provider) or, with BYOK upstreams, a token without a colon (a
  // provider key; `name:password` is always checked as relay credentials, so names cannot be told apart). Counted
  // by address; the header is never logged, nor forwarded anywhere but to a BYOK upstream the caller chose, where
  // `useCallerKey` checks it.
  const anonymous = relay.config.publicAccess && !relay.usersByName.has(name);
  if (anonymous || (relay.byok && !("credentials" in read))) {
    context.caller.subject = `address:${addressKey(context.caller.address)}`;
    const token = bearerToken(authorization);
    if (relay.byok) context.caller.key = apiKeyHeader ?? (token?.includes(":") ? undefined : token);
    return undefined;
  }
  const guessKey = `sign-in:${addressKey(context.caller.address)}:${name.slice(0, 64)}`;
  const known = relay.usersByName.get(name);
  if (relay.counters.synchronous && known?.password !== undefined && "credentials" in read) {
    return signInWithPlainPassword(relay, context, read.credentials, known, guessKey, apiKeyHeader);
  }
  return checkSignIn(relay, context, read, guessKey, apiKeyHeader);
}

/**
 * The general sign-in: admitted past the lockout (`admitSignInCheck`), the password checked (a hash takes its
 * time), a wrong guess counted, the admission given back whatever happens.
 */
async function checkSignIn(
  relay: Relay,
  context: RequestContext,
  read: ReturnType<typeof readCredentials>,
  guessKey: string,
  apiKeyHeader: string | undefined,
): Promise<Response | undefined> {
  const admitted = await admitSignInCheck(relay, context, guessKey);
  if (admitted instanceof Response) return admitted;
  let user: Awaited<ReturnType<Relay["authenticate"]>>;
  try {
    user = "credentials" in read
      ? await relay.authenticate(read.credentials, addressKey(context.caller.address))
      : undefined;
    // A wrong guess uses its allowance before its check ends: a check waiting for the place sees the allowance
    // already smaller, so no more checks run than there are guesses left.
    if (user === undefined) await relay.counters.take(guessKey, relay.signInRule);
  } finally {
    await giveBack(relay.counters, admitted, (store) => store.add(`${guessKey}:checking`, -1));
  }
  if (user === undefined) {
    return signInRefused(context, "problem" in read ? read.problem : "wrong username or password");
  }
  if (typeof user === "symbol") return hashingBusy(context, user);
  return signedIn(context, user, apiKeyHeader);
}

/**
 * The answer when a sign-in found no place to be checked: 429 when its address has its share of the hashing queue
 * (it is that address that sends too many), 503 when the whole queue is full.
 */
function hashingBusy(context: RequestContext, busy: typeof HASHING_BUSY | typeof ADDRESS_BUSY): Response {
  if (busy === ADDRESS_BUSY) {
    return refuse(
      context,
      "sign_in_address_busy",
      429,
      "too many sign-ins from this address are being checked at once; try again in a second",
      "too_many_sign_ins",
      { "retry-after": "1" },
    );
  }
  return signInBusy(context);
}

/**
 * The sign-in of a user with a plain password when the counters answer at once: the lockout look, the comparison
 * and the count of a wrong guess run as one step, so no other check can slip in between and nothing needs
 * admitting. Same answers as `identifyCaller`'s general path.
 */
function signInWithPlainPassword(
  relay: Relay,
  context: RequestContext,
  credentials: string,
  user: RelayUser,
  guessKey: string,
  apiKeyHeader: string | undefined,
): StageAnswer {
  const lockedFor = relay.counters.wait(guessKey, relay.signInRule) as number;
  if (lockedFor > 0) {
    return lockedOut(context, lockedFor);
  }
  if (!constantTimeEqual(credentials.slice(user.name.length + 1), user.password!)) {
    relay.counters.take(guessKey, relay.signInRule);
    if (!relay.hashedUsers) return signInRefused(context, "wrong username or password");
    // Counted above, in the same step as the look; the answer then waits for the decoy check an unknown name
    // costs, so a wrong plain password cannot be told from an unknown name by its time.
    return relay.authenticate(credentials, addressKey(context.caller.address)).then((failed) =>
      typeof failed === "symbol" ? hashingBusy(context, failed) : signInRefused(context, "wrong username or password")
    );
  }
  return signedIn(context, user.name, apiKeyHeader);
}

/** The answer while a user name's guesses from an address are used up: 429 with Retry-After. */
function lockedOut(context: RequestContext, seconds: number): Response {
  return refuse(
    context,
    "auth_locked_out",
    429,
    `too many failed sign-ins for this user from this address; try again in ${seconds} s`,
    "too_many_failed_sign_ins",
    { "retry-after": String(seconds) },
  );
}

/**
 * A refused sign-in: 401, with a Basic challenge only for a client that can use one without a surprise: no Origin
 * (not a cross-origin page), and no Sec-Fetch-Mode or `navigate` (a page's own fetch() carries `cors` or
 * `same-origin` and no Origin on a GET; a challenge there would pop up the browser's login dialog over the page).
 */
function signInRefused(context: RequestContext, message: string): Response {
  const mode = context.request.headers.get("sec-fetch-mode");
  const challenge: Record<string, string> = context.origin === null && (mode === null || mode === "navigate")
    ? { "www-authenticate": 'Basic realm="mc-relay", charset="UTF-8"' }
    : {};
  return errorResponse(401, message, "invalid_api_key", challenge);
}

/** Records a signed-in user; a key it brings for a BYOK upstream comes in X-Api-Key. */
function signedIn(context: RequestContext, user: string, apiKeyHeader: string | undefined): undefined {
  context.caller.user = user;
  // Everyone who holds the bare password is counted by address, as MC's Flask relay counts: one of them spending
  // the limits and budgets must not lock the others out.
  context.caller.subject = user === BARE_PASSWORD_USER
    ? `address:${addressKey(context.caller.address)}`
    : `user:${user}`;
  context.caller.key = apiKeyHeader;
  return undefined;
}

/** How long a sign-in waits for the checks running for its name and address before it gets 503. */
const SIGN_IN_WAIT_MS = 2000;

/**
 * Lets a sign-in check start when the guesses left for its name and address outnumber the checks already
 * running (counted in `<key>:checking`, which the caller gives back, to the store this answers, afterwards); waits
 * while only running checks fill the allowance. A used-up allowance answers 429 with Retry-After.
 */
async function admitSignInCheck(
  relay: Relay,
  context: RequestContext,
  guessKey: string,
): Promise<Response | CounterStore> {
  for (const started = performance.now(); performance.now() - started < SIGN_IN_WAIT_MS;) {
    // A safety expiry: places held by a copy that died free themselves within a minute.
    const { value: start, store } = await hold(
      relay.counters,
      (counters) => startCheck(counters, guessKey, relay.signInRule, relay.now() + 60_000),
      (counters, start) => "started" in start ? counters.add(`${guessKey}:checking`, -1) : undefined,
    );
    if ("started" in start) return store;
    if ("lockedFor" in start) return lockedOut(context, start.lockedFor);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return signInBusy(context);
}

/**
 * Stage: GET /metrics on the main port, for the users METRICS names only (it shows every user's traffic). Like
 * /usage, a read that does not count against the caller's request limits.
 */
export function answerMetrics(relay: Relay, context: RequestContext): Response | undefined {
  const { user } = context.caller;
  if (user === undefined || !relay.config.metricsUsers.includes(user)) {
    return errorResponse(403, "this user may not read /metrics; METRICS names who may", "metrics_not_allowed");
  }
  return metricsResponse(relay.metrics);
}

/** 503 while every place for a sign-in check is taken (the hashing queue, or the checks of one name and address). */
function signInBusy(context: RequestContext): Response {
  return refuse(
    context,
    "sign_in_busy",
    503,
    "too many sign-ins are being checked; try again in a second",
    "relay_busy",
    { "retry-after": "1" },
  );
}
