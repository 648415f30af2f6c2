/**
 * The counter store in process memory: the default, and the stand-in while Redis is down.
 *
 * @module
 */

import {
  type BucketRule,
  type CounterStore,
  type LedgerEntry,
  type LedgerRow,
  refilled,
  secondsToWait,
} from "./counter.ts";

/**
 * Counters in this process's memory: lost on restart, one count per process. Memory stays bounded (`maxKeys`
 * buckets, and as many counters) without ever turning a newcomer away: when the buckets are full, those that have
 * refilled are forgotten first (they hold nothing), then the fullest tenth of the rest, the ones whose callers
 * have used the least, oldest first. So a flood of callers that each made one request (100,000 IPv6 /64s with one
 * invalid request each) is forgotten before anybody who has spent an allowance: a locked-out client or a spent
 * budget outlives the flood unless nine in ten buckets are emptier than its own. Counters (places in flight,
 * token budgets) are never evicted while they hold anything: a new one past `maxKeys` is refused (Infinity).
 * It keeps no usage ledger: nothing could read one (`mc-relay usage` reads STATE_PATH or REDIS_URL, and a restart
 * would lose it), and kept it would grow by a row per day, caller and model for as long as the process runs.
 */
export class MemoryCounterStore implements CounterStore {
  readonly synchronous = true;
  #buckets = new Map<string, { tokens: number; updatedAt: number; rule: BucketRule }>();
  #counters = new Map<string, { value: number; expiresAt: number }>();

  /** `now` returns milliseconds; tests pass a clock they control. */
  constructor(readonly now: () => number = Date.now, readonly maxKeys = 100_000) {}

  /** The bucket of `key`, refilled up to now; a new one for a new key, room made for it when the store is full. */
  #bucket(key: string, rule: BucketRule) {
    const now = this.now();
    let bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      if (this.#buckets.size >= this.maxKeys) this.#evict(now);
      bucket = { tokens: rule.capacity, updatedAt: now, rule };
      this.#buckets.set(key, bucket);
    }
    bucket.tokens = refilled(bucket.tokens, bucket.updatedAt, now, rule);
    bucket.updatedAt = now;
    return bucket;
  }

  wait(key: string, rule: BucketRule): number {
    if (rule.capacity === 0 || !this.#buckets.has(key)) return 0;
    return secondsToWait(this.#bucket(key, rule).tokens, rule);
  }

  take(key: string, rule: BucketRule): number {
    if (rule.capacity === 0) return 0;
    const bucket = this.#bucket(key, rule);
    if (bucket.tokens < 1) return secondsToWait(bucket.tokens, rule);
    bucket.tokens -= 1;
    return 0;
  }

  give(key: string, rule: BucketRule): void {
    const bucket = rule.capacity === 0 ? undefined : this.#buckets.get(key);
    if (bucket) bucket.tokens = Math.min(rule.capacity, bucket.tokens + 1);
  }

  remaining(key: string, rule: BucketRule): number {
    if (!this.#buckets.has(key)) return rule.capacity;
    return Math.floor(this.#bucket(key, rule).tokens);
  }

  add(key: string, amount: number, expiresAt = Infinity): number {
    const now = this.now();
    let counter = this.#counters.get(key);
    if (counter !== undefined && counter.expiresAt <= now) {
      this.#counters.delete(key);
      counter = undefined;
    }
    if (counter === undefined) {
      if (this.#counters.size >= this.maxKeys && !this.#sweepCounters(now)) return Infinity;
      counter = { value: 0, expiresAt };
      this.#counters.set(key, counter);
    }
    counter.value += amount;
    return counter.value;
  }

  get(key: string): number {
    const counter = this.#counters.get(key);
    return counter === undefined || counter.expiresAt <= this.now() ? 0 : counter.value;
  }

  readonly keepsLedger = false;

  /** Keeps nothing (see the class): usage while Redis is unreachable is not in the ledger either. */
  recordUsage(_entry: LedgerEntry): void {}

  readUsage(_since: string, _until: string): LedgerRow[] {
    return [];
  }

  /** Forgets expired counters and those back at zero. True when there is room for a new one. */
  #sweepCounters(now: number): boolean {
    for (const [key, { value, expiresAt }] of this.#counters) {
      if (expiresAt <= now || value === 0) this.#counters.delete(key);
    }
    return this.#counters.size < this.maxKeys;
  }

  /**
   * Makes room for new buckets: forgets those that have refilled, then, while more than nine in ten of `maxKeys`
   * are left, the fullest of the rest (a caller who used least loses least), the longest untouched first. Sorting
   * once for a tenth of the store keeps a flood of new keys at a few microseconds each.
   */
  #evict(now: number): void {
    const scored: { key: string; left: number; updatedAt: number }[] = [];
    for (const [key, { tokens, updatedAt, rule }] of this.#buckets) {
      const left = refilled(tokens, updatedAt, now, rule) / rule.capacity;
      if (left >= 1) this.#buckets.delete(key);
      else scored.push({ key, left, updatedAt });
    }
    const excess = this.#buckets.size - Math.floor(this.maxKeys * 0.9);
    if (excess <= 0) return;
    scored.sort((a, b) => b.left - a.left || a.updatedAt - b.updatedAt);
    for (let index = 0; index < excess; index++) this.#buckets.delete(scored[index].key);
  }
}
