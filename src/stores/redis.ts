/**
 * The counter store in Redis or Valkey (REDIS_URL), shared by every copy of the relay: Lua scripts, batched calls,
 * the client loaded only when REDIS_URL asks for it.
 *
 * @module
 */

import {
  type BucketRule,
  type CheckStart,
  type CounterStore,
  daysBefore,
  type LedgerEntry,
  type LedgerRow,
  secondsToWait,
} from "./counter.ts";
import { errorText, textEncoder } from "../text.ts";

/** The Redis client's calls the store uses (the official `redis` package). */
export interface RedisClient {
  /** Connects, and keeps reconnecting. */
  connect(): Promise<unknown>;
  /** Listens to the client's events ("error"). */
  on(event: string, listener: (...args: unknown[]) => void): unknown;
  /** Runs a Lua script atomically. */
  eval(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  /** Runs a Lua script Redis already has, named by its SHA-1 (NOSCRIPT when it has not). */
  evalSha(sha: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  /** A string value. */
  get(key: string): Promise<string | null>;
  /** How many of the keys exist (1 or 0 for one). */
  exists(key: string): Promise<number>;
  /** A hash's fields. */
  hGetAll(key: string): Promise<Record<string, string>>;
  /** PONG when Redis answers. */
  ping(): Promise<string>;
  /** Whether the connection is up and commands are accepted. */
  readonly isReady: boolean;
  /** Closes the connection (node-redis 5). */
  close?(): Promise<void>;
  /** Closes the connection (older clients). */
  quit?(): Promise<unknown>;
}

/**
 * The level of the token bucket in the hash KEYS[1] (`t` tokens at `u`), refilled evenly up to `capacity` over
 * `period` until `now`: the part of REDIS_BUCKET_SCRIPT and REDIS_START_CHECK_SCRIPT that looks at a bucket.
 */
const REDIS_REFILLED_LEVEL = `
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local level = capacity
if state[1] then level = math.min(capacity, tonumber(state[1]) + (now - tonumber(state[2])) * capacity / period) end`;

/** A token bucket in one hash: refill, then take, give or look; returns the level before and whether it took. */
const REDIS_BUCKET_SCRIPT = `
local capacity, period, now, op = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]${REDIS_REFILLED_LEVEL}
local taken = 0
local tokens = nil
if op == 'take' and level >= 1 then taken = 1; tokens = level - 1 end
if op == 'give' and state[1] then tokens = math.min(capacity, level + 1) end
if tokens then
  redis.call('HSET', KEYS[1], 't', tostring(tokens), 'u', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(period) + 1000)
end
return {tostring(level), taken}`;

/** A counter: add, set the expiry when one is given, return the new value. */
const REDIS_ADD_SCRIPT = `
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return value`;

/**
 * `startCheck`: refill the bucket (KEYS[1]) to look at its level; when a guess is left, count one more running check
 * (KEYS[2]) and keep it only while the running checks do not outnumber the guesses left.
 */
const REDIS_START_CHECK_SCRIPT = `
local capacity, period, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])${REDIS_REFILLED_LEVEL}
if capacity > 0 and level < 1 then return {'locked', tostring(level)} end
local checking = tonumber(redis.call('INCRBYFLOAT', KEYS[2], 1))
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIREAT', KEYS[2], ARGV[4]) end
if capacity == 0 or checking <= math.floor(level) then return {'started', tostring(level)} end
redis.call('INCRBYFLOAT', KEYS[2], -1)
return {'busy', tostring(level)}`;

/** One ledger row: add each figure to its field of the day's hash, and keep the day for the retention. */
const REDIS_USAGE_SCRIPT = `
for index = 1, #ARGV - 1, 2 do redis.call('HINCRBY', KEYS[1], ARGV[index], ARGV[index + 1]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[#ARGV])
return 1`;

/** The scripts a batch may hold, by the name the batch script knows them by. */
const REDIS_BATCHED_SCRIPTS: Record<string, string> = {
  bucket: REDIS_BUCKET_SCRIPT,
  add: REDIS_ADD_SCRIPT,
  usage: REDIS_USAGE_SCRIPT,
};

/**
 * A `batch`: several of the scripts above as one, atomic like each of them. ARGV holds, per call, the script's
 * name, its number of keys and of arguments, then the arguments; KEYS holds every call's keys in order. Each
 * script's text runs unchanged as the body of a function whose KEYS and ARGV are its own call's.
 */
const REDIS_BATCH_SCRIPT = `
local scripts = {
${
  Object.entries(REDIS_BATCHED_SCRIPTS).map(([name, script]) => `${name} = function(KEYS, ARGV)${script}\nend,`).join(
    "\n",
  )
}
}
local results, k, a = {}, 1, 1
while a <= #ARGV do
  local script, keys, arguments = scripts[ARGV[a]], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  results[#results + 1] = script({unpack(KEYS, k, k + keys - 1)}, {unpack(ARGV, a + 3, a + 2 + arguments)})
  k, a = k + keys, a + 3 + arguments
end
return results`;

/** One script call a `batch` holds until it ends. */
interface QueuedScript {
  name: string;
  options: { keys: string[]; arguments: string[] };
  resolve(value: unknown): void;
  reject(error: unknown): void;
}

/**
 * Counters and the ledger in Redis or Valkey (REDIS_URL), shared by every copy of the relay. Every update is one
 * Lua script, so N copies together never let more through than a limit. Keys start with `mc-relay:`; buckets and
 * counters expire by themselves, ledger days after USAGE_RETENTION_DAYS.
 */
export class RedisCounterStore implements CounterStore {
  /**
   * Connects to `url`, waiting up to REDIS_START_WAIT_MS for the first connection (then it keeps trying in the
   * background, and `ready` says false); commands fail at once while it is not connected.
   */
  static async connect(url: string, now: () => number = Date.now, retentionDays = 400): Promise<RedisCounterStore> {
    const { createClient } = await import("npm:redis@5.12.1");
    const client = createClient({
      url,
      disableOfflineQueue: true,
      socket: { connectTimeout: 1000, reconnectStrategy: (retries: number) => Math.min(100 * 2 ** retries, 2000) },
    }) as unknown as RedisClient;
    const store = new RedisCounterStore(client, now, retentionDays);
    for (
      const script of [
        REDIS_BUCKET_SCRIPT,
        REDIS_ADD_SCRIPT,
        REDIS_START_CHECK_SCRIPT,
        REDIS_USAGE_SCRIPT,
        REDIS_BATCH_SCRIPT,
      ]
    ) {
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-1", textEncoder.encode(script)));
      store.#scriptShas.set(script, Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join(""));
    }
    client.on("error", () => {}); // the fallback store reports the state; the client reconnects by itself
    await orAfter(client.connect().catch(() => {}), REDIS_START_WAIT_MS, undefined);
    return store;
  }

  /** Whether Redis is connected now. */
  get ready(): boolean {
    return this.client.isReady;
  }

  /** Each script's SHA-1: a call sends the 40 characters, not the script, once Redis has it. */
  #scriptShas = new Map<string, string>();

  private constructor(readonly client: RedisClient, readonly now: () => number, readonly retentionDays: number) {}

  /** The calls of the `batch` being made, while one is. */
  #queued?: QueuedScript[];

  /**
   * The store calls `work` makes go to Redis as one script (REDIS_BATCH_SCRIPT): one command and one round trip
   * for a stage's calls, atomic together. Each call's promise settles with its own answer, or all fail together.
   */
  batch<T>(work: () => T): T {
    if (this.#queued !== undefined) return work();
    const queued: QueuedScript[] = this.#queued = [];
    try {
      return work();
    } finally {
      this.#queued = undefined;
      this.#sendQueued(queued);
    }
  }

  #sendQueued(queued: QueuedScript[]): void {
    if (queued.length === 0) return;
    if (queued.length === 1) {
      const [call] = queued;
      this.#script(REDIS_BATCHED_SCRIPTS[call.name], call.options).then(call.resolve, call.reject);
      return;
    }
    const keys: string[] = [];
    const args: string[] = [];
    for (const { name, options } of queued) {
      keys.push(...options.keys);
      args.push(name, String(options.keys.length), String(options.arguments.length), ...options.arguments);
    }
    this.#script(REDIS_BATCH_SCRIPT, { keys, arguments: args }).then(
      (answers) => queued.forEach((call, index) => call.resolve((answers as unknown[])[index])),
      (error) => queued.forEach((call) => call.reject(error)),
    );
  }

  /** Runs a script a batch may hold: inside a `batch`, held for it; else at once. */
  #batchable(name: string, options: { keys: string[]; arguments: string[] }): Promise<unknown> {
    const queued = this.#queued;
    if (queued === undefined) return this.#script(REDIS_BATCHED_SCRIPTS[name], options);
    return new Promise((resolve, reject) => queued.push({ name, options, resolve, reject }));
  }

  /** Runs one of the store's scripts by its SHA-1; the script itself only when Redis lacks it (yet, or since a restart). */
  async #script(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown> {
    const sha = this.#scriptShas.get(script);
    if (sha !== undefined) {
      try {
        return await this.client.evalSha(sha, options);
      } catch (error) {
        if (!errorText(error).includes("NOSCRIPT")) throw error;
      }
    }
    return await this.client.eval(script, options); // which also keeps the script in Redis for the next call
  }

  async #bucketOp(key: string, rule: BucketRule, op: "take" | "give" | "look") {
    const [level, taken] = await this.#batchable("bucket", {
      keys: [`mc-relay:${key}`],
      arguments: [String(rule.capacity), String(rule.periodMs), String(this.now()), op],
    }) as [string, number];
    return { level: Number(level), taken: taken === 1 };
  }

  async wait(key: string, rule: BucketRule): Promise<number> {
    return rule.capacity === 0 ? 0 : secondsToWait((await this.#bucketOp(key, rule, "look")).level, rule);
  }

  async take(key: string, rule: BucketRule): Promise<number> {
    if (rule.capacity === 0) return 0;
    const { level, taken } = await this.#bucketOp(key, rule, "take");
    return taken ? 0 : secondsToWait(level, rule);
  }

  async give(key: string, rule: BucketRule): Promise<void> {
    if (rule.capacity > 0) await this.#bucketOp(key, rule, "give");
  }

  async remaining(key: string, rule: BucketRule): Promise<number> {
    return Math.floor((await this.#bucketOp(key, rule, "look")).level);
  }

  async add(key: string, amount: number, expiresAt = Infinity): Promise<number> {
    const value = await this.#batchable("add", {
      keys: [`mc-relay:${key}`],
      arguments: [String(amount), Number.isFinite(expiresAt) ? String(Math.ceil(expiresAt)) : ""],
    });
    return Number(value);
  }

  async get(key: string): Promise<number> {
    return Number(await this.client.get(`mc-relay:${key}`) ?? 0);
  }

  async startCheck(key: string, rule: BucketRule, expiresAt: number): Promise<CheckStart> {
    const [outcome, level] = await this.#script(REDIS_START_CHECK_SCRIPT, {
      keys: [`mc-relay:${key}`, `mc-relay:${key}:checking`],
      arguments: [String(rule.capacity), String(rule.periodMs), String(this.now()), String(Math.ceil(expiresAt))],
    }) as [string, string];
    if (outcome === "started") return { started: true };
    return outcome === "locked" ? { lockedFor: secondsToWait(Number(level), rule) } : { busy: true };
  }

  readonly keepsLedger = true;

  async recordUsage(entry: LedgerEntry): Promise<void> {
    const field = JSON.stringify([entry.who, entry.model, entry.upstream]);
    const figures = {
      requests: 1,
      prompt_tokens: entry.prompt,
      completion_tokens: entry.completion,
      total_tokens: entry.total,
      estimated_requests: entry.estimated ? 1 : 0,
    };
    const expiresAt = Date.parse(`${entry.day}T00:00:00Z`) + (this.retentionDays + 1) * 86_400_000;
    await this.#batchable("usage", {
      keys: [`mc-relay:usage:${entry.day}`],
      arguments: [
        ...Object.entries(figures).flatMap(([name, value]) => [`${field}\n${name}`, String(value)]),
        String(expiresAt),
      ],
    });
  }

  async readUsage(since: string, until: string): Promise<LedgerRow[]> {
    const rows = new Map<string, LedgerRow>();
    for (let day = since; day <= until; day = daysBefore(day, -1)) {
      for (const [field, value] of Object.entries(await this.client.hGetAll(`mc-relay:usage:${day}`))) {
        const [labels, name] = field.split("\n");
        const [who, model, upstream] = JSON.parse(labels) as string[];
        const key = `${day}\n${labels}`;
        const row = rows.get(key) ??
          {
            day,
            who,
            model,
            upstream,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            estimated_requests: 0,
          };
        row[name as "requests"] = Number(value);
        rows.set(key, row);
      }
    }
    return [...rows.values()].sort((a, b) => `${a.day}${a.who}${a.model}`.localeCompare(`${b.day}${b.who}${b.model}`));
  }

  /** Whether Redis answers now. */
  async ping(): Promise<boolean> {
    return (await this.client.ping()) === "PONG";
  }

  /** Closes the connection. */
  async close(): Promise<void> {
    await (this.client.close?.() ?? this.client.quit?.())?.catch?.(() => {});
  }
}

/**
 * How long the start waits for the first Redis connection before it listens: a copy must not answer its first
 * requests counting alone only because it listened a moment before its connection was up. Redis still down by then:
 * the copy starts degraded (logged) and goes over to Redis when it answers.
 */
export const REDIS_START_WAIT_MS = 3000;

/** What `work` resolves with, or `value` once `ms` have passed first; the timer goes when either is there. */
export async function orAfter<T, U>(work: Promise<T>, ms: number, value: U): Promise<T | U> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([work, new Promise<U>((resolve) => timer = setTimeout(() => resolve(value), ms))]);
  } finally {
    clearTimeout(timer);
  }
}
