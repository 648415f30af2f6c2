/**
 * Unit tests of src/stores/sqlite.ts beyond the contract every store keeps (src/stores/counter_test.ts): state that
 * survives a restart, the usage ledger and its USAGE_RETENTION_DAYS trimming, transactions, and the lock WORKERS
 * threads share. Each test uses its own file in a temporary directory.
 */
import assert from "node:assert/strict";
import type { BucketRule, LedgerEntry } from "./counter.ts";
import { SqliteCounterStore, ThreadLock } from "./sqlite.ts";

const ONE_A_MINUTE: BucketRule = { capacity: 1, periodMs: 60_000 };
const HOUR = 3_600_000;

/** A temporary directory, removed when the test ends, and a clock at a fixed UTC noon that the test moves. */
async function setup() {
  const directory = await Deno.makeTempDir({ prefix: "mc-relay-sqlite-test-" });
  const time = { now: Date.parse("2025-06-15T12:00:00Z") };
  return {
    time,
    path: `${directory}/state.db`,
    open: (path = `${directory}/state.db`, retentionDays = 400) =>
      SqliteCounterStore.open(path, () => time.now, retentionDays),
    [Symbol.asyncDispose]: () => Deno.remove(directory, { recursive: true }),
  };
}

const entry = (day: string, total: number, more: Partial<LedgerEntry> = {}): LedgerEntry => ({
  day,
  who: "user:alice",
  model: "gpt-4o",
  upstream: "default",
  prompt: total - 1,
  completion: 1,
  total,
  estimated: false,
  ...more,
});

Deno.test("SqliteCounterStore: a restart keeps every count", async (t) => {
  await t.step("buckets, counters and their expiry are as they were after a reopen", async () => {
    await using env = await setup();
    const first = await env.open();
    first.take("sign-in:203.0.113.7", ONE_A_MINUTE);
    first.add("budget:day:user:alice", 1234);
    first.add("places:alice", 2, env.time.now + 1000);
    first.close();

    const second = await env.open();
    assert.equal(second.take("sign-in:203.0.113.7", ONE_A_MINUTE), 60, "the lockout outlived the restart");
    assert.equal(second.get("budget:day:user:alice"), 1234);
    assert.equal(second.get("places:alice"), 2);
    env.time.now += 1000;
    assert.equal(second.get("places:alice"), 0, "the expiry outlived it too");
    second.close();
  });

  await t.step("two stores on one file (two processes, or WORKERS) count together", async () => {
    await using env = await setup();
    const [a, b] = [await env.open(), await env.open()];
    assert.equal(a.add("shared", 1), 1);
    assert.equal(b.add("shared", 1), 2);
    assert.equal(a.take("bucket", ONE_A_MINUTE), 0);
    assert.equal(b.take("bucket", ONE_A_MINUTE), 60);
    a.close();
    b.close();
  });

  await t.step("a path that cannot be written fails at open, not at the first request", async () => {
    await using env = await setup();
    await assert.rejects(() => env.open(`${env.path}.missing-directory/state.db`));
  });
});

Deno.test("SqliteCounterStore: the usage ledger", async (t) => {
  await t.step("answers of one day, caller, model and upstream are summed into one row", async () => {
    await using env = await setup();
    const store = await env.open();
    store.recordUsage(entry("2025-06-15", 10));
    store.recordUsage(entry("2025-06-15", 5, { estimated: true }));
    store.recordUsage(entry("2025-06-15", 7, { model: "other" }));
    store.recordUsage(entry("2025-06-15", 3, { who: "address:203.0.113.7" }));
    assert.deepEqual(store.readUsage("2025-06-15", "2025-06-15"), [
      {
        day: "2025-06-15",
        who: "address:203.0.113.7",
        model: "gpt-4o",
        upstream: "default",
        requests: 1,
        prompt_tokens: 2,
        completion_tokens: 1,
        total_tokens: 3,
        estimated_requests: 0,
      },
      {
        day: "2025-06-15",
        who: "user:alice",
        model: "gpt-4o",
        upstream: "default",
        requests: 2,
        prompt_tokens: 13,
        completion_tokens: 2,
        total_tokens: 15,
        estimated_requests: 1,
      },
      {
        day: "2025-06-15",
        who: "user:alice",
        model: "other",
        upstream: "default",
        requests: 1,
        prompt_tokens: 6,
        completion_tokens: 1,
        total_tokens: 7,
        estimated_requests: 0,
      },
    ]);
    store.close();
  });

  await t.step("readUsage gives the days from since to until, both included, in order", async () => {
    await using env = await setup();
    const store = await env.open();
    for (const day of ["2025-06-13", "2025-06-11", "2025-06-12", "2025-06-14", "2025-06-10"]) {
      store.recordUsage(entry(day, 2));
    }
    assert.deepEqual(store.readUsage("2025-06-11", "2025-06-13").map((row) => row.day), [
      "2025-06-11",
      "2025-06-12",
      "2025-06-13",
    ]);
    assert.deepEqual(store.readUsage("2025-06-14", "2025-06-11"), []);
    store.close();
  });

  await t.step("the ledger survives a restart", async () => {
    await using env = await setup();
    const first = await env.open();
    first.recordUsage(entry("2025-06-15", 10));
    first.close();
    const second = await env.open();
    assert.equal(second.readUsage("2025-06-15", "2025-06-15")[0].total_tokens, 10);
    second.close();
  });
});

Deno.test("SqliteCounterStore: USAGE_RETENTION_DAYS", async (t) => {
  const days = ["2025-06-04", "2025-06-05", "2025-06-15"];

  await t.step("on open, days older than the retention are deleted, the retention's last day kept", async () => {
    await using env = await setup();
    const first = await env.open(undefined, 400);
    for (const day of days) first.recordUsage(entry(day, 1));
    first.close();
    const second = await env.open(undefined, 10);
    assert.deepEqual(second.readUsage("2000-01-01", "2100-01-01").map((row) => row.day), ["2025-06-05", "2025-06-15"]);
    second.close();
  });

  await t.step("a running store trims once an hour, as days pass", async () => {
    await using env = await setup();
    const store = await env.open(undefined, 10);
    for (const day of days) store.recordUsage(entry(day, 1));
    env.time.now += HOUR - 60_000;
    store.take("any", ONE_A_MINUTE);
    assert.equal(store.readUsage("2000-01-01", "2100-01-01").length, 3, "not before the hour is up");
    env.time.now += 60_001;
    store.take("any", ONE_A_MINUTE);
    assert.deepEqual(store.readUsage("2000-01-01", "2100-01-01").map((row) => row.day), ["2025-06-05", "2025-06-15"]);
    env.time.now += 24 * HOUR;
    store.take("any", ONE_A_MINUTE);
    assert.deepEqual(store.readUsage("2000-01-01", "2100-01-01").map((row) => row.day), ["2025-06-15"]);
    store.close();
  });
});

Deno.test("SqliteCounterStore: transactions", async (t) => {
  await t.step("a batch counts all its calls or, when it throws, none", async () => {
    await using env = await setup();
    const store = await env.open();
    store.batch(() => {
      store.add("a", 1);
      store.add("b", 1);
    });
    assert.throws(() =>
      store.batch(() => {
        store.add("a", 1);
        store.take("bucket", ONE_A_MINUTE);
        throw new Error("given up");
      }), /given up/);
    assert.equal(store.get("a"), 1);
    assert.equal(store.get("b"), 1);
    assert.equal(store.remaining("bucket", ONE_A_MINUTE), 1, "the take inside the failed batch was rolled back");
    assert.equal(store.add("a", 1), 2, "the store still works after a rollback");
    store.close();
  });
});

Deno.test("ThreadLock: one holder at a time", async (t) => {
  await t.step("a held lock is not taken again until released; a wait times out with false", () => {
    const memory = new SharedArrayBuffer(4);
    const [mine, theirs] = [new ThreadLock(memory), new ThreadLock(memory)];
    assert.ok(mine.acquire());
    const started = performance.now();
    assert.ok(!theirs.acquire(20), "the other holder waits, then gives up");
    assert.ok(performance.now() - started >= 19, "it waited its time out");
    mine.release();
    assert.ok(theirs.acquire(0));
    theirs.release();
  });

  await t.step("locks on separate memory do not share", () => {
    const [a, b] = [new ThreadLock(), new ThreadLock()];
    assert.ok(a.acquire(0));
    assert.ok(b.acquire(0));
    a.release();
    b.release();
  });
});
