/**
 * The `CounterStore` interface behind every limit, lockout and budget, and the token-bucket and ledger arithmetic
 * the stores share.
 *
 * @module
 */

/** A token bucket: `capacity` events, refilled evenly over `periodMs`; a capacity of 0 means no limit. */
export interface BucketRule {
  /** Events allowed at once (and per period). */
  capacity: number;
  /** Milliseconds to refill an empty bucket. */
  periodMs: number;
}

/**
 * Where the relay counts: every limit and lockout goes through this interface, so a durable or shared store
 * is a new implementation of it, not a change to the handler. Keys name what is counted and for whom, e.g.
 * `sign-in:203.0.113.7:team`.
 */
export interface CounterStore {
  /** Whole seconds until `key` may act again under `rule` (0: now), without using anything. */
  wait(key: string, rule: BucketRule): number | Promise<number>;
  /** Uses one event of `key`'s allowance: 0, or the whole seconds to wait when none is left. */
  take(key: string, rule: BucketRule): number | Promise<number>;
  /** Gives one event back to `key`'s allowance (a sign-in guess that was right, a request never sent). */
  give(key: string, rule: BucketRule): void | Promise<void>;
  /** Whole events left in `key`'s bucket now. */
  remaining(key: string, rule: BucketRule): number | Promise<number>;
  /**
   * Adds `amount` (negative to take back) to the counter `key` and returns its new value; the counter is forgotten
   * after `expiresAt` (ms), if given. Infinity when the store has no room for a new counter.
   */
  add(key: string, amount: number, expiresAt?: number): number | Promise<number>;
  /** The counter's value; 0 when it does not exist or has expired. */
  get(key: string): number | Promise<number>;
  /** Adds one answered request to the usage ledger. */
  recordUsage(entry: LedgerEntry): void | Promise<void>;
  /** False for a store that keeps no ledger (memory): no entry is made for it, per request, to be dropped. */
  readonly keepsLedger: boolean;
  /** The ledger's rows for the UTC days `since` to `until` (`YYYY-MM-DD`, both included). */
  readUsage(since: string, until: string): LedgerRow[] | Promise<LedgerRow[]>;
  /** "degraded" while a shared store cannot be reached and this process counts alone. */
  readonly state?: "ok" | "degraded";
  /** True when every method answers at once (never a promise): a check and its count then run as one step. */
  readonly synchronous?: boolean;
  /** Runs the calls `work` makes as one transaction (SQLite: one commit instead of one each); all or none count. */
  batch?<T>(work: () => T): T;
  /**
   * `startCheck` in one call (Redis: one script). A store that is not `synchronous` must have it; `startCheck`
   * composes it from the calls above for one that is.
   */
  startCheck?(key: string, rule: BucketRule, expiresAt: number): CheckStart | Promise<CheckStart>;
  /** Closes files and connections. */
  close?(): void | Promise<void>;
  /** A store made of two (FallbackCounterStore): runs `call` on the one that counts now and says which. */
  hold?<T>(
    call: (store: CounterStore) => T,
    undo?: (store: CounterStore, value: Awaited<T>) => unknown,
  ): Promise<Held<Awaited<T>>>;
  /** A store made of two: gives back to `store`, one of its two, what `hold` took there. */
  giveBack?(store: CounterStore, call: (store: CounterStore) => unknown): Promise<void>;
}

/**
 * Takes something that must be given back later (a place, a reservation, a sign-in check): `call` runs on the
 * store that counts now, and the answer says which, for `giveBack`. `undo` gives it back should a shared store carry
 * out a call the relay had given up on. A plain store answers with itself, at once when it is synchronous.
 */
export function hold<T>(
  counters: CounterStore,
  call: (store: CounterStore) => T,
  undo?: (store: CounterStore, value: Awaited<T>) => unknown,
): Held<Awaited<T>> | Promise<Held<Awaited<T>>> {
  if (counters.hold) return counters.hold(call, undo);
  const value = call(counters);
  if (value instanceof Promise) return value.then((answer) => ({ value: answer, store: counters }));
  return { value: value as Awaited<T>, store: counters };
}

/** Gives back to `store`, the one `hold` named, what was taken there: never to the other store of a pair. */
export function giveBack<T>(counters: CounterStore, store: CounterStore, call: (store: CounterStore) => T): unknown {
  return counters.giveBack ? counters.giveBack(store, call) : call(store);
}

/** What `startCheck` found: a check started, a lockout (with the seconds it lasts), or checks that fill the allowance. */
export type CheckStart = { started: true } | { lockedFor: number } | { busy: true };

/**
 * Starts a check that may use one of `key`'s guesses: while the bucket is empty, the lockout's seconds; while the
 * guesses left do not outnumber the checks already running (counted in `<key>:checking`, forgotten after `expiresAt`),
 * busy; else the check is counted as running (the caller ends it with `add(<key>:checking, -1)`). Atomic in every
 * store: one transaction in SQLite, one script in Redis, one step in memory.
 */
export function startCheck(
  counters: CounterStore,
  key: string,
  rule: BucketRule,
  expiresAt: number,
): CheckStart | Promise<CheckStart> {
  if (counters.startCheck) return counters.startCheck(key, rule, expiresAt);
  if (!counters.synchronous) throw new Error("a counter store that is not synchronous needs its own startCheck");
  const checkingKey = `${key}:checking`;
  // Every call answers at once: the steps run without a gap, in one transaction where the store has them.
  const run = (): CheckStart => {
    const lockedFor = counters.wait(key, rule) as number;
    if (lockedFor > 0) return { lockedFor };
    const checking = counters.add(checkingKey, 1, expiresAt) as number;
    if (rule.capacity === 0 || checking <= (counters.remaining(key, rule) as number)) return { started: true };
    counters.add(checkingKey, -1);
    return { busy: true };
  };
  return counters.batch ? counters.batch(run) : run();
}

/** One answered request for the usage ledger. */
export interface LedgerEntry {
  /** The UTC day, `YYYY-MM-DD`. */
  day: string;
  /** `user:<name>`, or `address:<address>` for anonymous requests. */
  who: string;
  /** The model the client asked for (an alias stays the alias). */
  model: string;
  /** The upstream that answered. */
  upstream: string;
  /** Prompt tokens. */
  prompt: number;
  /** Completion tokens. */
  completion: number;
  /** All tokens. */
  total: number;
  /** True when the relay estimated the figures because the upstream reported none. */
  estimated: boolean;
}

/** The ledger's sums for one UTC day, caller, model and upstream. */
export interface LedgerRow {
  /** The UTC day, `YYYY-MM-DD`. */
  day: string;
  /** `user:<name>` or `address:<address>`. */
  who: string;
  /** The model the clients asked for. */
  model: string;
  /** The upstream that answered. */
  upstream: string;
  /** Requests answered. */
  requests: number;
  /** Prompt tokens in all. */
  prompt_tokens: number;
  /** Completion tokens in all. */
  completion_tokens: number;
  /** All tokens. */
  total_tokens: number;
  /** Requests whose usage the relay estimated. */
  estimated_requests: number;
}

/** Tokens in a bucket that held `tokens` at `updatedAt`, refilled up to `now`. */
export function refilled(tokens: number, updatedAt: number, now: number, rule: BucketRule): number {
  return Math.min(rule.capacity, tokens + ((now - updatedAt) * rule.capacity) / rule.periodMs);
}

/** Whole seconds until a bucket holding `tokens` has one whole token again; 0 when it has. */
export function secondsToWait(tokens: number, rule: BucketRule): number {
  return tokens >= 1 ? 0 : Math.ceil(((1 - tokens) * rule.periodMs) / 1000 / rule.capacity);
}

/** The UTC day (`YYYY-MM-DD`) `days` days before `day`. */
export function daysBefore(day: string, days: number): string {
  return new Date(Date.parse(`${day}T00:00:00Z`) - days * 86_400_000).toISOString().slice(0, 10);
}

/** What a count answered, and the store that now holds what it took: the one to give it back to. */
export interface Held<T> {
  value: T;
  store: CounterStore;
}
