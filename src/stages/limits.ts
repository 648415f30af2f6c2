/**
 * The limit stages: request rates and requests in flight (RATE_LIMIT_PER_*, CONCURRENT_REQUESTS), the answer length
 * (MAX_TOKENS_PER_REQUEST), token budgets (TOKEN_BUDGET_PER_*), and GET /usage, which reports them to the caller.
 *
 * @module
 */

import type { RelayConfig } from "../config/variables.ts";
import {
  type Caller,
  refuse,
  type Relay,
  type RequestContext,
  type RequestLimit,
  type StageAnswer,
} from "../context.ts";
import { jsonResponse } from "../http.ts";
import { giveBack, hold } from "../stores/counter.ts";
import type { JsonObject } from "../streams.ts";

/** The request limits that are on, shortest window first. */
export function requestLimits(config: RelayConfig): RequestLimit[] {
  const limits: RequestLimit[] = [
    {
      variable: "RATE_LIMIT_PER_MINUTE",
      window: "minute",
      rule: { capacity: config.rateLimitPerMinute, periodMs: 60_000 },
    },
    {
      variable: "RATE_LIMIT_PER_HOUR",
      window: "hour",
      rule: { capacity: config.rateLimitPerHour, periodMs: 3_600_000 },
    },
    { variable: "RATE_LIMIT_PER_DAY", window: "day", rule: { capacity: config.rateLimitPerDay, periodMs: 86_400_000 } },
  ];
  return limits.filter((limit) => limit.rule.capacity > 0);
}

/** "this user" or "this address": whom a limit counted, for messages. */
function subjectWords(context: RequestContext): string {
  return context.caller.subject?.startsWith("user:") ? `user ${context.caller.user}` : "this address";
}

/**
 * Several independent store calls of one stage, together: one transaction where the store has them (SQLite), else
 * issued at once, so a shared store (Redis) gets them in one round trip.
 */
export function storeCalls<T>(relay: Relay, calls: () => T[]): Promise<Awaited<T>[]> {
  try {
    return Promise.all(relay.counters.batch ? relay.counters.batch(calls) : calls());
  } catch (error) {
    return Promise.reject(error); // a synchronous store's failure arrives like an asynchronous one's
  }
}

/**
 * Stage: limits. RATE_LIMIT_PER_MINUTE, _HOUR and _DAY per signed-in user (so one user cannot use up a team's
 * shared address), or per client address for anonymous requests: each window is a token bucket that refills evenly,
 * and a request takes one event from each. CONCURRENT_REQUESTS per user or address, open streams included: a
 * request takes a place, held until `finish` gives it back, when the response (or its stream) has ended. All are asked in
 * one store call (one SQLite transaction, one Redis round trip); a refusal gives back everything it took: 429 with
 * Retry-After, naming the limit, its window and when one more request is allowed.
 */
export function applyLimits(relay: Relay, context: RequestContext): StageAnswer {
  if (relay.requestLimits.length === 0 && relay.config.concurrentRequests === 0) return undefined;
  return takeLimits(relay, context);
}

/** The limits stage's store work: every limit asked at once, everything given back on a refusal. */
async function takeLimits(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { requestLimits } = relay;
  const concurrency = relay.config.concurrentRequests;
  const key = (limit: RequestLimit) => `requests-per-${limit.window}:${context.caller.subject}`;
  const inFlightKey = concurrency === 0 ? undefined : `in-flight:${context.caller.subject}`;
  const { counters } = relay;
  const held = await storeCalls(relay, () => {
    const calls = requestLimits.map((limit) =>
      hold(counters, (store) => store.take(key(limit), limit.rule), (store, waitFor) => {
        if (waitFor === 0) return store.give(key(limit), limit.rule);
      })
    );
    // A safety expiry on the place: should a copy die holding places, they free themselves after a day.
    if (inFlightKey !== undefined) {
      calls.push(hold(
        counters,
        (store) => store.add(inFlightKey, 1, relay.now() + 86_400_000),
        (store) => store.add(inFlightKey, -1),
      ));
    }
    return calls;
  });
  const answers = held.map(({ value }) => value);
  const refusedRate = answers.findIndex((waitFor, index) => index < requestLimits.length && waitFor > 0);
  const refusedPlace = inFlightKey !== undefined && answers[requestLimits.length] > concurrency;
  if (refusedRate === -1 && !refusedPlace) {
    if (inFlightKey !== undefined) {
      // The place is held until the request is over, given back to the store that gave it.
      const { store } = held[requestLimits.length];
      context.releases.add(() => giveBack(counters, store, (counters) => counters.add(inFlightKey, -1)), true);
    }
    return undefined;
  }
  // Everything goes back to the store that gave it, even when Redis came or went meanwhile.
  await storeCalls(relay, () => {
    const calls: unknown[] = [];
    requestLimits.forEach((limit, index) => {
      if (answers[index] === 0) {
        calls.push(giveBack(counters, held[index].store, (s) => s.give(key(limit), limit.rule)));
      }
    });
    // A full store that refused a new counter (Infinity) stored nothing: nothing to give back.
    if (inFlightKey !== undefined && Number.isFinite(answers[requestLimits.length])) {
      calls.push(giveBack(counters, held[requestLimits.length].store, (store) => store.add(inFlightKey, -1)));
    }
    return calls;
  });
  if (refusedRate === -1 && !Number.isFinite(answers[requestLimits.length])) return storeFull(context);
  return refusedRate === -1
    ? tooManyInFlight(context, concurrency)
    : rateLimited(context, requestLimits[refusedRate], answers[refusedRate]);
}

/** The answer when a request window's limit is reached: 429 with Retry-After. */
function rateLimited(context: RequestContext, limit: RequestLimit, waitFor: number): Response {
  return refuse(
    context,
    "relay_rate_limited",
    429,
    `the relay's limit of ${limit.rule.capacity} requests per ${limit.window} (${limit.variable}) is reached for ${
      subjectWords(context)
    }; one more is allowed in ${waitFor} s`,
    "relay_rate_limit_exceeded",
    { "retry-after": String(waitFor) },
  );
}

/** The answer when CONCURRENT_REQUESTS are in flight already: 429, try again in a second. */
function tooManyInFlight(context: RequestContext, limit: number): Response {
  return refuse(
    context,
    "relay_concurrency_limited",
    429,
    `${
      subjectWords(context)
    } already has ${limit} requests in flight (CONCURRENT_REQUESTS); try again when one has finished`,
    "relay_concurrency_limit_exceeded",
    { "retry-after": "1" },
  );
}

/**
 * 503 when the in-memory store is full of counters that hold something (MEMORY_STORE_KEYS callers with places or
 * budgets in use) and cannot count this caller: nothing was spent, room comes back as counters expire.
 */
function storeFull(context: RequestContext): Response {
  return refuse(
    context,
    "store_full",
    503,
    "the relay cannot count one more caller now: its memory store is full (MEMORY_STORE_KEYS); try again in a minute",
    "relay_busy",
    { "retry-after": "60" },
  );
}

/** One token budget that applies now: its variable, its UTC window, its counter and when the window ends. */
interface TokenBudget {
  variable: "TOKEN_BUDGET_PER_DAY" | "TOKEN_BUDGET_PER_MONTH";
  window: "day" | "month";
  budget: number;
  key: string;
  resetsAt: number;
}

/**
 * The token budgets that apply to this request's user or address now: TOKEN_BUDGET_PER_DAY and _MONTH, or the
 * user's own from MC_RELAY_USERS. Windows are UTC calendar days and months.
 */
export function tokenBudgets(relay: Relay, caller: Pick<Caller, "user" | "subject">): TokenBudget[] {
  // Most relays have none: no date worked out per request for nothing.
  if (!relay.tokenBudgetsOn) return [];
  const now = new Date(relay.now());
  const own = caller.user === undefined ? undefined : relay.usersByName.get(caller.user)?.tokenBudgets;
  const [year, month, day] = [now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()];
  const today = now.toISOString().slice(0, 10);
  const budgets: TokenBudget[] = [];
  const perDay = own?.day ?? relay.config.tokenBudgetPerDay;
  const perMonth = own?.month ?? relay.config.tokenBudgetPerMonth;
  if (perDay > 0) {
    const key = `tokens-day:${today}:${caller.subject}`;
    budgets.push({
      variable: "TOKEN_BUDGET_PER_DAY",
      window: "day",
      budget: perDay,
      key,
      resetsAt: Date.UTC(year, month, day + 1),
    });
  }
  if (perMonth > 0) {
    const key = `tokens-month:${today.slice(0, 7)}:${caller.subject}`;
    budgets.push({
      variable: "TOKEN_BUDGET_PER_MONTH",
      window: "month",
      budget: perMonth,
      key,
      resetsAt: Date.UTC(year, month + 1, 1),
    });
  }
  return budgets;
}

/** Stage: GET /usage: for the caller (user, or address with PUBLIC_ACCESS), every limit and budget, used and left. */
export async function answerUsage(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const { counters, config } = relay;
  const limits = await Promise.all(relay.requestLimits.map(async ({ variable, window, rule }) => {
    const key = `requests-per-${window}:${context.caller.subject}`;
    const remaining = await counters.remaining(key, rule);
    const nextInSeconds = await counters.wait(key, rule);
    return {
      name: variable,
      window,
      limit: rule.capacity,
      used: rule.capacity - remaining,
      remaining,
      next_in_seconds: nextInSeconds,
    };
  }));
  const budgets = await Promise.all(
    tokenBudgets(relay, context.caller).map(async ({ variable, window, budget, key, resetsAt }) => {
      const used = await counters.get(key);
      return {
        name: variable,
        window,
        budget,
        used,
        remaining: Math.max(0, budget - used),
        resets_at: new Date(resetsAt).toISOString(),
      };
    }),
  );
  const concurrent = config.concurrentRequests === 0 ? null : {
    name: "CONCURRENT_REQUESTS",
    limit: config.concurrentRequests,
    in_flight: await counters.get(`in-flight:${context.caller.subject}`),
  };
  return jsonResponse({
    // The bare password's holders are counted, and shown, by address, like anonymous callers (the user behind the
    // password is an internal name that means nothing to them).
    caller: context.caller.subject?.startsWith("user:") ? { user: context.caller.user } : { anonymous: true },
    limits,
    concurrent,
    budgets,
    max_tokens_per_request: config.maxTokensPerRequest || null,
  }, { headers: { "cache-control": "no-store" } });
}

/** The fields that bound an answer's length, per upstream path. */
const ANSWER_TOKEN_FIELDS: Record<string, string[]> = {
  "/chat/completions": ["max_tokens", "max_completion_tokens"],
  "/completions": ["max_tokens"],
  "/responses": ["max_output_tokens"],
};

/**
 * The longest answer a request may ask for, per answer: far above every model's output limit (the largest take
 * about 128,000 tokens), so no provider takes more, and small enough that a reservation made of it stays an exact
 * integer. Larger values (1e300, 1e21) are refused rather than lowered: added to a budget's counter they used to
 * drown it in floating point, and taking them back reset a spent budget to 0.
 */
const MAX_ANSWER_TOKENS = 1_000_000;

/** The most answers `n` and `best_of` may ask for per prompt: OpenAI's own limit for `n`. */
const MAX_ANSWERS_PER_PROMPT = 128;

/**
 * How many answers a request asks for: its prompts (a completion's `prompt` may be a list of them; a list of token
 * numbers is one prompt) times the larger of `n` and `best_of` (best_of answers are generated, and billed, to
 * return n). A text when `n` or `best_of` is not a whole number from 1 to MAX_ANSWERS_PER_PROMPT.
 */
function answerCount(path: string, payload: JsonObject): number | string {
  let perPrompt = 1;
  for (const field of ["n", "best_of"]) {
    const value = payload[field];
    if (value === undefined || value === null) continue;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > MAX_ANSWERS_PER_PROMPT) {
      return `"${field}" must be a whole number from 1 to ${MAX_ANSWERS_PER_PROMPT}`;
    }
    perPrompt = Math.max(perPrompt, value);
  }
  const prompt = payload.prompt;
  const listed = path === "/completions" && Array.isArray(prompt) && prompt.some((item) => typeof item !== "number");
  return (listed ? Math.max(1, (prompt as unknown[]).length) : 1) * perPrompt;
}

/**
 * Stage: answer length. `max_tokens`, `max_completion_tokens` (chat) and `max_output_tokens` (Responses API)
 * must be whole numbers from 1 to MAX_ANSWER_TOKENS (400 `invalid_max_tokens` otherwise, before anything is
 * counted). MAX_TOKENS_PER_REQUEST bounds all the answers of a request together (`answerCount`): each answer gets
 * its share, and a request asking for more answers than the cap has tokens gets 400 `invalid_answer_count`.
 * Values above the share are lowered to it; when a request names none, the share is added as the field its
 * upstream takes: `max_completion_tokens` for OpenAI and Azure OpenAI (their reasoning models refuse `max_tokens`),
 * `max_tokens` for every other chat upstream (most OpenAI-compatible servers know only that one).
 */
export function capAnswerTokens(relay: Relay, context: RequestContext): Response | undefined {
  const path = context.route?.upstreamPath ?? "";
  const fields = ANSWER_TOKEN_FIELDS[path];
  const { payload } = context.body;
  if (fields === undefined || payload === undefined) return undefined;
  const cap = relay.config.maxTokensPerRequest;
  const answers = answerCount(path, payload);
  if (typeof answers === "string" || (cap > 0 && answers > cap)) {
    const tooMany = `this request asks for ${answers} answers (n, best_of, prompts), more than the ${cap} tokens ` +
      `per request of MAX_TOKENS_PER_REQUEST can hold; ask for at most ${cap}`;
    return refuse(
      context,
      "invalid_body",
      400,
      typeof answers === "string" ? answers : tooMany,
      "invalid_answer_count",
    );
  }
  const share = cap > 0 ? Math.floor(cap / answers) : MAX_ANSWER_TOKENS;
  let answer: number | undefined;
  for (const field of fields) {
    const value = payload[field];
    if (value === undefined || value === null) continue;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > MAX_ANSWER_TOKENS) {
      return refuse(
        context,
        "invalid_body",
        400,
        `"${field}" must be a whole number from 1 to ${MAX_ANSWER_TOKENS}; no model answers at more length`,
        "invalid_max_tokens",
      );
    }
    const capped = Math.min(value, share);
    payload[field] = capped;
    answer = Math.max(answer ?? 0, capped);
  }
  if (answer === undefined && cap > 0) {
    const openAi = /(^|\.)openai\.com(:\d+)?$|\.openai\.azure\.com(:\d+)?$/.test(context.upstream.target.host);
    payload[fields.length === 2 && openAi ? fields[1] : fields[0]] = share;
    answer = share;
  }
  // Every answer may be that long: the reservation counts them all. Bounded so that it stays an exact integer in
  // the counters whatever a list of prompts holds; a reservation of that size spends any budget already.
  context.body.answerTokens = answer === undefined
    ? undefined
    : Math.min(answer * answers, MAX_ANSWER_TOKENS * MAX_ANSWERS_PER_PROMPT);
  return undefined;
}

/**
 * Stage: token budgets. A request is charged a reservation when it starts (about four bytes a token of its body,
 * plus the answer tokens it may get, all its answers counted) on every budget that applies, and the real usage
 * replaces it when the request is over (the reservation's release, run by `finish`).
 * It may start while the budget is not spent; so together with the reservations of requests in flight, a budget
 * is overshot by at most one request's answer. Spent: 429 `token_budget_exceeded` with Retry-After until the
 * UTC day or month ends.
 *
 * Budgets count tokens only. What a provider bills per call of a hosted tool on the Responses API (web search, code
 * interpreter, file search: a fee per call or per session, not tokens) is outside them, and the relay does not refuse
 * such tools: it cannot price them across providers, and an operator who must bound that spend limits the paths
 * (DISABLED_PATHS=/v1/responses) or the provider key's own spending limit does.
 */
export function reserveTokens(relay: Relay, context: RequestContext): StageAnswer {
  // A BYOK request spends the caller's own quota, not the operator's: no budget applies.
  if (context.log.usageWatch === undefined || context.upstream.target.byok || !relay.tokenBudgetsOn) return undefined;
  return refuseBackground(relay, context) ?? reserveBudgets(relay, context);
}

/**
 * A background response (`"background": true`, Responses API) while a token budget applies: 400
 * `background_not_allowed`. The provider answers "queued" with no usage and bills the whole answer later, where the
 * relay never sees it: charging the reservation instead would leave an answer with no MAX_TOKENS_PER_REQUEST
 * unbounded, so such a request is refused rather than counted wrong. Without a budget it passes.
 */
function refuseBackground(relay: Relay, context: RequestContext): Response | undefined {
  const background = context.body.payload?.background;
  if (background === undefined || background === null || background === false) return undefined;
  const [budget] = tokenBudgets(relay, context.caller);
  if (budget === undefined) return undefined;
  const message = `background responses cannot be counted against this relay's token budget (${budget.variable}): ` +
    `their usage arrives after the request ends; send the request without "background"`;
  return refuse(context, "background_not_allowed", 400, message, "background_not_allowed");
}

/** The budgets stage's store work: the request's estimate added to each budget, all taken back on a refusal. */
async function reserveBudgets(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const amount = Math.ceil(context.log.bytesIn / 4) + (context.body.answerTokens ?? 0);
  const settlements: ((used?: number) => unknown)[] = [];
  for (const budget of tokenBudgets(relay, context.caller)) {
    const expiresAt = budget.resetsAt + 3_600_000;
    const { value: total, store } = await hold(
      relay.counters,
      (counters) => counters.add(budget.key, amount, expiresAt),
      (counters) => counters.add(budget.key, -amount, expiresAt),
    );
    // A full store that refused a new counter (Infinity) stored nothing: there is nothing to settle for it.
    const stored = Number.isFinite(total);
    if (stored) {
      // Settled when the request is over: the tokens it used replace the reservation, in the store that holds it
      // (memory during a Redis outage, Redis else), whichever store counts by then.
      settlements.push(context.releases.add(
        (used) => giveBack(relay.counters, store, (counters) => counters.add(budget.key, used - amount, expiresAt)),
        true,
      ));
      if (total - amount < budget.budget) continue;
    }
    // Refused (the budget is spent, or the store is full): every reservation made goes back now, whole.
    for (const settle of settlements) await settle(0);
    return stored ? budgetSpent(context, budget, relay.now()) : storeFull(context);
  }
  return undefined;
}

/** 429 for a spent token budget, naming it and when it renews. */
function budgetSpent(context: RequestContext, budget: TokenBudget, now: number): Response {
  const waitFor = Math.max(1, Math.ceil((budget.resetsAt - now) / 1000));
  return refuse(
    context,
    "token_budget_exceeded",
    429,
    `the token budget of ${budget.budget} tokens per UTC ${budget.window} (${budget.variable}) is used up for ${
      subjectWords(context)
    }; it renews at ${new Date(budget.resetsAt).toISOString()}`,
    "token_budget_exceeded",
    { "retry-after": String(waitFor) },
  );
}
