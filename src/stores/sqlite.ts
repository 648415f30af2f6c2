/**
 * The counter store in a SQLite file (STATE_PATH) on one machine, shared by the WORKERS threads through one lock in
 * shared memory (`ThreadLock`).
 *
 * @module
 */

// Types only: Deno's Node layer (node:sqlite, node:util) loads when STATE_PATH or --env-file asks for it, which keeps
// the start of a relay without them fast.
import type { DatabaseSync, StatementSync } from "node:sqlite";
import {
  type BucketRule,
  type CounterStore,
  daysBefore,
  type LedgerEntry,
  type LedgerRow,
  refilled,
  secondsToWait,
} from "./counter.ts";

/**
 * A lock the WORKERS threads of one process share (an Int32Array on shared memory: 0 free, 1 held): a thread that
 * finds the SQLite file's write lock taken by a sibling would otherwise sleep in SQLite's busy handler, a millisecond
 * and more each time, while the sibling needs it for some 20 µs. Waiting here wakes the moment it is free. It only
 * orders the threads: SQLite's own lock still guards the file, so a wait that times out simply goes on to it.
 */
export class ThreadLock {
  readonly #cell: Int32Array;

  /** Shares `memory` (4 bytes of a SharedArrayBuffer, the same one in every thread). */
  constructor(readonly memory: SharedArrayBuffer = new SharedArrayBuffer(4)) {
    this.#cell = new Int32Array(memory, 0, 1);
  }

  /** Takes the lock, waiting for it at most `timeoutMs`; false when it was not taken (nothing to release). */
  acquire(timeoutMs = 2000): boolean {
    const deadline = performance.now() + timeoutMs;
    while (Atomics.compareExchange(this.#cell, 0, 0, 1) !== 0) {
      const left = deadline - performance.now();
      if (left <= 0) return false;
      Atomics.wait(this.#cell, 0, 1, left);
    }
    return true;
  }

  /** Gives the lock up and wakes one waiting thread. */
  release(): void {
    Atomics.store(this.#cell, 0, 0);
    Atomics.notify(this.#cell, 0, 1);
  }
}

/**
 * Counters and the usage ledger in a SQLite file (STATE_PATH), through Deno's built-in `node:sqlite`: they survive
 * restarts. WAL mode with `synchronous=NORMAL`: safe when the relay crashes; an operating-system crash may lose the
 * last second or so of counts. Each read-modify-write runs in an IMMEDIATE transaction, so several processes on one
 * machine may share the file. Refilled buckets and expired counters are swept once a minute, ledger days older than
 * USAGE_RETENTION_DAYS once an hour.
 */
export class SqliteCounterStore implements CounterStore {
  readonly synchronous = true;
  #db: DatabaseSync;
  #statements: Record<string, StatementSync>;
  #lastSweep = 0;
  #lastRetention = 0;
  /** True inside a transaction: the calls of a `batch` join it. */
  #inTransaction = false;

  /**
   * Opens (or creates) the file; throws when it cannot be opened or written. WORKERS threads of one process pass
   * one `ThreadLock` made from the same shared memory, so they take turns at the file without SQLite's sleeps.
   */
  static async open(
    path: string,
    now: () => number = Date.now,
    retentionDays = 400,
    lock?: ThreadLock,
  ): Promise<SqliteCounterStore> {
    const { DatabaseSync } = await import("node:sqlite");
    return new SqliteCounterStore(new DatabaseSync(path), now, retentionDays, lock);
  }

  private constructor(
    database: DatabaseSync,
    readonly now: () => number,
    readonly retentionDays: number,
    readonly lock?: ThreadLock,
  ) {
    this.#db = database;
    this.#db.exec(`
      PRAGMA journal_mode = WAL;
      PRAGMA synchronous = NORMAL;
      PRAGMA busy_timeout = 2000;
      CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL, updated_at INTEGER, capacity REAL, period_ms REAL);
      CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value REAL, expires_at REAL);
      CREATE TABLE IF NOT EXISTS usage (
        day TEXT, who TEXT, model TEXT, upstream TEXT,
        requests INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, estimated_requests INTEGER,
        PRIMARY KEY (day, who, model, upstream));
    `);
    const prepare = (sql: string) => this.#db.prepare(sql);
    this.#statements = {
      bucket: prepare("SELECT tokens, updated_at FROM buckets WHERE key = ?"),
      saveBucket: prepare(
        "INSERT INTO buckets (key, tokens, updated_at, capacity, period_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
      ),
      counter: prepare("SELECT value, expires_at FROM counters WHERE key = ?"),
      saveCounter: prepare(
        "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
      ),
      addUsage: prepare(
        "INSERT INTO usage VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (day, who, model, upstream) DO UPDATE SET requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens, total_tokens = total_tokens + excluded.total_tokens, estimated_requests = estimated_requests + excluded.estimated_requests",
      ),
      readUsage: prepare("SELECT * FROM usage WHERE day >= ? AND day <= ? ORDER BY day, who, model, upstream"),
      // Prepared once: parsing them per call cost as much as the work inside.
      begin: prepare("BEGIN IMMEDIATE"),
      commit: prepare("COMMIT"),
      rollback: prepare("ROLLBACK"),
    };
    // A file that cannot be written fails here, at start-up, not at the first request.
    this.#transaction(() => this.#sweep(this.now()));
  }

  /** Runs `work` in one IMMEDIATE transaction (a write lock across processes); inside a `batch`, in the batch's. */
  #transaction<T>(work: () => T): T {
    if (this.#inTransaction) return work();
    const locked = this.lock?.acquire() ?? false;
    try {
      this.#statements.begin.run();
      this.#inTransaction = true;
      try {
        const result = work();
        this.#statements.commit.run();
        return result;
      } catch (error) {
        this.#statements.rollback.run();
        throw error;
      } finally {
        this.#inTransaction = false;
      }
    } finally {
      if (locked) this.lock!.release();
    }
  }

  batch<T>(work: () => T): T {
    return this.#transaction(work);
  }

  /** Runs one operation on `key`'s bucket: the level before it, and whether a `take` took one. */
  #bucketOp(key: string, rule: BucketRule, op: "take" | "give" | "look"): { level: number; taken: boolean } {
    if (op === "look") {
      // A look writes nothing: one SELECT, no write lock, no commit.
      const row = this.#statements.bucket.get(key) as { tokens: number; updated_at: number } | undefined;
      return {
        level: row === undefined ? rule.capacity : refilled(row.tokens, row.updated_at, this.now(), rule),
        taken: false,
      };
    }
    return this.#transaction(() => {
      const now = this.now();
      const row = this.#statements.bucket.get(key) as { tokens: number; updated_at: number } | undefined;
      const level = row === undefined ? rule.capacity : refilled(row.tokens, row.updated_at, now, rule);
      const taken = op === "take" && level >= 1;
      if (taken || (op === "give" && row !== undefined)) {
        const tokens = taken ? level - 1 : Math.min(rule.capacity, level + 1);
        this.#statements.saveBucket.run(key, tokens, now, rule.capacity, rule.periodMs);
      }
      if (now - this.#lastSweep > 60_000) this.#sweep(now);
      return { level, taken };
    });
  }

  wait(key: string, rule: BucketRule): number {
    return rule.capacity === 0 ? 0 : secondsToWait(this.#bucketOp(key, rule, "look").level, rule);
  }

  take(key: string, rule: BucketRule): number {
    if (rule.capacity === 0) return 0;
    const { level, taken } = this.#bucketOp(key, rule, "take");
    return taken ? 0 : secondsToWait(level, rule);
  }

  give(key: string, rule: BucketRule): void {
    if (rule.capacity > 0) this.#bucketOp(key, rule, "give");
  }

  remaining(key: string, rule: BucketRule): number {
    return Math.floor(this.#bucketOp(key, rule, "look").level);
  }

  add(key: string, amount: number, expiresAt = Infinity): number {
    return this.#transaction(() => {
      const row = this.#statements.counter.get(key) as { value: number; expires_at: number | null } | undefined;
      const live = row !== undefined && (row.expires_at ?? Infinity) > this.now();
      const value = (live ? row!.value : 0) + amount;
      const expiry = live ? row!.expires_at : expiresAt;
      this.#statements.saveCounter.run(key, value, expiry === Infinity ? null : expiry);
      return value;
    });
  }

  get(key: string): number {
    const row = this.#statements.counter.get(key) as { value: number; expires_at: number | null } | undefined;
    return row === undefined || (row.expires_at ?? Infinity) <= this.now() ? 0 : row.value;
  }

  readonly keepsLedger = true;

  recordUsage(entry: LedgerEntry): void {
    // Every write goes through #transaction, so WORKERS threads take turns at it through the ThreadLock.
    this.#transaction(() =>
      this.#statements.addUsage.run(
        entry.day,
        entry.who,
        entry.model,
        entry.upstream,
        entry.prompt,
        entry.completion,
        entry.total,
        entry.estimated ? 1 : 0,
      )
    );
  }

  readUsage(since: string, until: string): LedgerRow[] {
    return (this.#statements.readUsage.all(since, until) as unknown as LedgerRow[]).map((row) => ({ ...row }));
  }

  /** Forgets refilled buckets and expired counters; once an hour, ledger days past the retention. */
  #sweep(now: number): void {
    this.#lastSweep = now;
    this.#db.exec(
      `DELETE FROM buckets WHERE tokens + (${now} - updated_at) * capacity / period_ms >= capacity;
       DELETE FROM counters WHERE expires_at IS NOT NULL AND expires_at <= ${now};`,
    );
    if (now - this.#lastRetention > 3_600_000) {
      this.#lastRetention = now;
      const oldest = daysBefore(new Date(now).toISOString().slice(0, 10), this.retentionDays);
      this.#db.prepare("DELETE FROM usage WHERE day < ?").run(oldest);
    }
  }

  /** Closes the file. */
  close(): void {
    this.#db.close();
  }
}
