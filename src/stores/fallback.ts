/**
 * The store in front of Redis: each copy counts alone in memory while Redis is unreachable, and shares counts again
 * when it answers.
 *
 * @module
 */

import { type Deadline, DEADLINE_TICK_MS, deadlines } from "../deadlines.ts";
import { type BucketRule, type CounterStore, type Held, type LedgerEntry, startCheck } from "./counter.ts";
import { orAfter, REDIS_START_WAIT_MS, type RedisCounterStore } from "./redis.ts";
import { errorText } from "../text.ts";

/**
 * How long Redis may stay silent (no answer to any call of this copy) while a call waits, before the relay counts
 * in memory instead. Silence, not a call's own wait: under a flood of requests calls queue on the one connection
 * and each waits longer, but Redis keeps answering, and a copy that went over to memory for that would split its
 * counts between two stores for no outage at all.
 */
const SHARED_STORE_TIMEOUT_MS = 250;

/**
 * How many give-backs (places, reservations' settlements) a copy keeps for Redis while it does not answer, to send
 * when it does. Beyond that the oldest are dropped: the counters they would correct expire by themselves (a place
 * after a day, a budget when its day or month ends).
 */
const MAX_OWED_TO_SHARED = 10_000;

/**
 * A shared store with a way out: while Redis answers, every count goes there; when a call fails, or Redis stays
 * silent for SHARED_STORE_TIMEOUT_MS while a call waits, the relay logs it once, reports `degraded` (in /health and
 * the metrics) and counts in this process's memory, so every copy enforces the limits alone rather than answer 5xx
 * or wait. Every two seconds it asks Redis again, and goes back to it (logged once) when it answers. It starts
 * degraded when Redis is not connected yet.
 *
 * What a request takes (a place, a budget reservation, a sign-in check) is given back to the store it was taken
 * from, whatever the state is by then (`hold` says where, `giveBack` goes there): a reservation made in memory during
 * an outage is settled in memory, never against a budget in Redis it was not added to; a place taken in Redis is
 * freed in Redis, at once or, while Redis does not answer, as soon as it does (`#owed`). A call given up on that Redis
 * carries out later anyway is undone there.
 */
export class FallbackCounterStore implements CounterStore {
  #degraded = false;
  #probe?: ReturnType<typeof setInterval>;
  /** When Redis last answered a call (performance.now()). */
  #lastAnswer = 0;
  /** Give-backs for Redis that wait for it to answer again. */
  #owed: ((store: CounterStore) => unknown)[] = [];

  /** `onChange` hears every change of state ("ok" or "degraded"), the degraded start too. */
  constructor(
    readonly shared: RedisCounterStore,
    readonly local: CounterStore,
    readonly onChange: (state: "ok" | "degraded", error?: string) => void,
  ) {
    if (!shared.ready) this.#degrade(`not connected ${REDIS_START_WAIT_MS / 1000} s after the start`);
  }

  /** "degraded" while counts stay in this process. */
  get state(): "ok" | "degraded" {
    return this.#degraded ? "degraded" : "ok";
  }

  /** Give-backs waiting for Redis to answer again. */
  get owed(): number {
    return this.#owed.length;
  }

  /**
   * `call` on Redis, settled with its answer, or rejected when it fails or Redis stays silent for
   * SHARED_STORE_TIMEOUT_MS meanwhile. `abandoned` hears the answer of a call given up on that Redis carried out later.
   */
  #onShared<T>(call: (store: CounterStore) => T, abandoned?: (value: Awaited<T>) => void): Promise<Awaited<T>> {
    const started = performance.now();
    let deadline: Deadline | undefined;
    let gaveUp = false;
    const answer = Promise.resolve(call(this.shared)).then((value) => {
      this.#lastAnswer = performance.now();
      if (gaveUp) abandoned?.(value);
      return value;
    });
    const silence = new Promise<never>((_, reject) => {
      // Silence is judged twice, a timer tick apart: a process too busy to run its timers on time (a flood of
      // requests on a loaded machine) has not read the answers waiting in its socket either, so the first sight of
      // silence may be its own. The loop turn between the two looks reads them; only a Redis that is still silent
      // after it is given up on.
      let seenSilent = false;
      const check = () => {
        const quietFor = performance.now() - Math.max(started, this.#lastAnswer);
        if (quietFor < SHARED_STORE_TIMEOUT_MS) {
          seenSilent = false;
          deadline = deadlines.add(SHARED_STORE_TIMEOUT_MS - quietFor, check);
          return;
        }
        if (!seenSilent) {
          seenSilent = true;
          deadline = deadlines.add(DEADLINE_TICK_MS, check);
          return;
        }
        gaveUp = true;
        reject(new Error(`no answer for ${SHARED_STORE_TIMEOUT_MS} ms`));
      };
      deadline = deadlines.add(SHARED_STORE_TIMEOUT_MS, check);
    });
    answer.catch(() => {}); // a failure after the silence is nobody's to hear
    return Promise.race([answer, silence]).finally(() => deadlines.cancel(deadline));
  }

  /**
   * Runs `call` where counts go now and says which store answered: what it took must be given back there. `undo`
   * gives it back in Redis should a call given up on be carried out there after all.
   */
  async hold<T>(
    call: (store: CounterStore) => T,
    undo?: (store: CounterStore, value: Awaited<T>) => unknown,
  ): Promise<Held<Awaited<T>>> {
    if (!this.#degraded) {
      try {
        return {
          value: await this.#onShared(call, undo && ((value) => this.giveBack(this.shared, (s) => undo(s, value)))),
          store: this.shared,
        };
      } catch (error) {
        this.#degrade(errorText(error));
      }
    }
    return { value: await call(this.local), store: this.local };
  }

  /**
   * Gives back to `store` (Redis or memory) what was taken there. For Redis while it does not answer: kept, and sent
   * when it answers again; never counted in memory, where nothing was taken.
   */
  async giveBack(store: CounterStore, call: (store: CounterStore) => unknown): Promise<void> {
    if (store !== this.shared) return void await call(store);
    if (this.#degraded) return this.#owe(call);
    try {
      // Silence is no failure here: the call is on its way and Redis will carry it out or reject it.
      await this.#onShared(call).catch((error) => {
        if (!errorText(error).startsWith("no answer for")) throw error;
      });
    } catch (error) {
      this.#owe(call);
      this.#degrade(errorText(error));
    }
  }

  #owe(call: (store: CounterStore) => unknown): void {
    if (this.#owed.push(call) > MAX_OWED_TO_SHARED) this.#owed.shift();
  }

  /**
   * Sends the give-backs kept for Redis; those that fail stay kept. True when none is left. A counter Redis no longer
   * has (it restarted without its data, or the counter expired) took nothing to give back: it is left alone, else a
   * place or a reservation freed twice would let a caller past its limit.
   */
  async #payOwed(): Promise<boolean> {
    const owed = this.#owed.splice(0);
    const shared = this.shared;
    const add = async (key: string, amount: number, expiresAt?: number) =>
      await shared.client.exists(`mc-relay:${key}`) ? await shared.add(key, amount, expiresAt) : 0;
    const stillThere = new Proxy(shared, {
      get: (target, name) => name === "add" ? add : Reflect.get(target, name, target)?.bind?.(target),
    });
    const results = await Promise.allSettled(owed.map((call) => call(stillThere)));
    results.forEach((result, index) => result.status === "rejected" && this.#owed.push(owed[index]));
    return this.#owed.length === 0;
  }

  async #run<T>(operation: (store: CounterStore) => T | Promise<T>): Promise<T> {
    return (await this.hold(operation)).value as T;
  }

  #degrade(error: string): void {
    if (this.#degraded) return;
    this.#degraded = true;
    this.onChange("degraded", error);
    this.#probe = setInterval(async () => {
      const back = await orAfter(this.shared.ping().catch(() => false), 1000, false);
      // What Redis is owed goes first: a count taken there and freed meanwhile must not hold a place any longer.
      if (back && this.#degraded && await this.#payOwed()) {
        this.#degraded = false;
        clearInterval(this.#probe);
        this.onChange("ok");
      }
    }, 2000);
  }

  /** A batch of the shared store while Redis answers; in memory, the calls one after another. */
  batch<T>(work: () => T): T {
    return this.#degraded ? work() : this.shared.batch(work);
  }

  wait = (key: string, rule: BucketRule) => this.#run((store) => store.wait(key, rule));
  take = (key: string, rule: BucketRule) => this.#run((store) => store.take(key, rule));
  give = (key: string, rule: BucketRule) => this.#run((store) => store.give(key, rule));
  remaining = (key: string, rule: BucketRule) => this.#run((store) => store.remaining(key, rule));
  add = (key: string, amount: number, expiresAt?: number) => this.#run((store) => store.add(key, amount, expiresAt));
  get = (key: string) => this.#run((store) => store.get(key));
  // The shared store's ledger; rows while Redis is silent go to the local store, which keeps none.
  readonly keepsLedger = true;
  recordUsage = (entry: LedgerEntry) => this.#run((store) => store.recordUsage(entry));
  startCheck = (key: string, rule: BucketRule, expiresAt: number) =>
    this.#run((store) => startCheck(store, key, rule, expiresAt));
  readUsage = (since: string, until: string) => this.#run((store) => store.readUsage(since, until));

  /** Stops probing and closes the connection. */
  async close(): Promise<void> {
    clearInterval(this.#probe);
    await this.shared.close();
  }
}
