/**
 * Unit tests of src/stores/counter.ts: the token-bucket and day arithmetic (`refilled`, `secondsToWait`,
 * `daysBefore`), `hold`/`giveBack` with fake stores, and the `CounterStore` contract every synchronous store keeps,
 * run against the memory store and the SQLite store under a clock the test controls. What only one store does
 * (eviction, restarts, the ledger) is tested beside it: memory_test.ts, sqlite_test.ts.
 */
import assert from "node:assert/strict";
import {
  type BucketRule,
  type CounterStore,
  daysBefore,
  giveBack,
  hold,
  refilled,
  secondsToWait,
  startCheck,
} from "./counter.ts";
import { MemoryCounterStore } from "./memory.ts";
import { SqliteCounterStore } from "./sqlite.ts";

/** Three events a minute: one comes back every 20 s. */
const THREE_A_MINUTE: BucketRule = { capacity: 3, periodMs: 60_000 };
const OFF: BucketRule = { capacity: 0, periodMs: 60_000 };

Deno.test("refilled and secondsToWait: token-bucket arithmetic", async (t) => {
  await t.step("a bucket refills evenly over its period, never past its capacity", () => {
    assert.equal(refilled(0, 1000, 1000, THREE_A_MINUTE), 0);
    assert.equal(refilled(0, 0, 20_000, THREE_A_MINUTE), 1);
    assert.equal(refilled(0.5, 0, 10_000, THREE_A_MINUTE), 1);
    assert.equal(refilled(0, 0, 60_000, THREE_A_MINUTE), 3);
    assert.equal(refilled(2, 0, 3_600_000, THREE_A_MINUTE), 3);
  });

  await t.step("the wait is the whole seconds until one whole token, rounded up", () => {
    assert.equal(secondsToWait(1, THREE_A_MINUTE), 0);
    assert.equal(secondsToWait(2.5, THREE_A_MINUTE), 0);
    assert.equal(secondsToWait(0, THREE_A_MINUTE), 20);
    assert.equal(secondsToWait(0.5, THREE_A_MINUTE), 10);
    assert.equal(secondsToWait(0.99, THREE_A_MINUTE), 1, "a fraction of a second is one second, never 0");
    assert.equal(secondsToWait(0, { capacity: 1, periodMs: 86_400_000 }), 86_400);
  });
});

Deno.test("daysBefore: UTC days back across months, leap years and years", () => {
  assert.equal(daysBefore("2024-03-15", 0), "2024-03-15");
  assert.equal(daysBefore("2024-03-01", 1), "2024-02-29");
  assert.equal(daysBefore("2023-03-01", 1), "2023-02-28");
  assert.equal(daysBefore("2025-01-01", 1), "2024-12-31");
  assert.equal(daysBefore("2025-02-04", 400), "2024-01-01");
  assert.equal(daysBefore("2024-10-27", 1), "2024-10-26", "a daylight-saving change elsewhere is no UTC day");
});

Deno.test("hold and giveBack: what was taken goes back to the store that took it", async (t) => {
  const plain = new MemoryCounterStore(() => 0);

  await t.step("a plain synchronous store answers at once, with itself", () => {
    const held = hold(plain, (store) => store.add("places", 1));
    assert.ok(!(held instanceof Promise));
    assert.deepEqual(held, { value: 1, store: plain });
    giveBack(plain, held.store, (store) => store.add("places", -1));
    assert.equal(plain.get("places"), 0);
  });

  await t.step("a call that answers with a promise is held as a promise", async () => {
    const held = hold(plain, (store) => Promise.resolve(store.add("later", 2)));
    assert.ok(held instanceof Promise);
    assert.deepEqual(await held, { value: 2, store: plain });
  });

  await t.step("a store made of two decides where the call runs, and where it goes back", async () => {
    const other = new MemoryCounterStore(() => 0);
    const calls: string[] = [];
    const pair: CounterStore = Object.assign(new MemoryCounterStore(() => 0), {
      hold<T>(call: (store: CounterStore) => T) {
        calls.push("hold");
        return Promise.resolve({ value: call(other) as Awaited<T>, store: other as CounterStore });
      },
      async giveBack(store: CounterStore, call: (store: CounterStore) => unknown) {
        calls.push(store === other ? "giveBack to other" : "giveBack elsewhere");
        await call(store);
      },
    });
    const held = await hold(pair, (store) => store.add("places", 1));
    assert.equal(held.store, other);
    assert.equal(other.get("places"), 1);
    await giveBack(pair, held.store, (store) => store.add("places", -1));
    assert.deepEqual(calls, ["hold", "giveBack to other"]);
    assert.equal(other.get("places"), 0);
    assert.equal(pair.get("places"), 0, "never given back to the store that did not take it");
  });
});

Deno.test("startCheck: a sign-in check within the guesses left", async (t) => {
  await t.step("a store that is not synchronous and has no startCheck of its own is a programming error", () => {
    const asynchronous = { ...new MemoryCounterStore(), synchronous: false } as unknown as CounterStore;
    assert.throws(() => startCheck(asynchronous, "k", THREE_A_MINUTE, 1), /needs its own startCheck/);
  });

  await t.step("a store with its own startCheck is asked", () => {
    const own = Object.assign(new MemoryCounterStore(), { startCheck: () => ({ busy: true as const }) });
    assert.deepEqual(startCheck(own, "k", THREE_A_MINUTE, 1), { busy: true });
  });
});

/** A clock the test moves: milliseconds from a fixed UTC noon, so day boundaries are far. */
function clock() {
  const time = { now: Date.parse("2025-06-15T12:00:00Z") };
  return { time, now: () => time.now };
}

/** The contract every synchronous `CounterStore` keeps, under a clock the test controls. */
async function counterStoreContract(
  t: Deno.TestContext,
  open: (now: () => number) => Promise<CounterStore> | CounterStore,
) {
  const fresh = async () => {
    const { time, now } = clock();
    return { time, store: await open(now) };
  };

  await t.step("a bucket allows `capacity` events at once, then says how many seconds to wait", async () => {
    const { store } = await fresh();
    for (let event = 0; event < 3; event++) assert.equal(await store.take("k", THREE_A_MINUTE), 0);
    assert.equal(await store.take("k", THREE_A_MINUTE), 20);
    assert.equal(await store.wait("k", THREE_A_MINUTE), 20);
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 0);
    await store.close?.();
  });

  await t.step("events come back evenly over the period: one after 20 s, the wait counting down", async () => {
    const { time, store } = await fresh();
    for (let event = 0; event < 3; event++) await store.take("k", THREE_A_MINUTE);
    time.now += 10_000;
    assert.equal(await store.wait("k", THREE_A_MINUTE), 10);
    assert.equal(await store.take("k", THREE_A_MINUTE), 10, "a refused take uses nothing");
    time.now += 9_999;
    assert.equal(await store.wait("k", THREE_A_MINUTE), 1, "never 0 before a whole event is back");
    time.now += 1;
    assert.equal(await store.wait("k", THREE_A_MINUTE), 0);
    assert.equal(await store.take("k", THREE_A_MINUTE), 0);
    assert.equal(await store.take("k", THREE_A_MINUTE), 20);
    time.now += 3_600_000;
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 3, "a bucket never refills past its capacity");
    await store.close?.();
  });

  await t.step("wait and remaining look without using: a new key has its whole allowance", async () => {
    const { store } = await fresh();
    for (let look = 0; look < 5; look++) {
      assert.equal(await store.wait("k", THREE_A_MINUTE), 0);
      assert.equal(await store.remaining("k", THREE_A_MINUTE), 3);
    }
    await store.take("k", THREE_A_MINUTE);
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 2);
    await store.close?.();
  });

  await t.step("give returns one event, never past the capacity, and creates nothing", async () => {
    const { store } = await fresh();
    for (let event = 0; event < 3; event++) await store.take("k", THREE_A_MINUTE);
    await store.give("k", THREE_A_MINUTE);
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 1);
    for (let gift = 0; gift < 5; gift++) await store.give("k", THREE_A_MINUTE);
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 3);
    await store.take("k", THREE_A_MINUTE);
    assert.equal(await store.remaining("k", THREE_A_MINUTE), 2);
    await store.give("other", THREE_A_MINUTE);
    assert.equal(await store.remaining("other", THREE_A_MINUTE), 3);
    await store.close?.();
  });

  await t.step("keys are counted apart", async () => {
    const { store } = await fresh();
    for (let event = 0; event < 3; event++) await store.take("a", THREE_A_MINUTE);
    assert.equal(await store.take("b", THREE_A_MINUTE), 0);
    assert.equal(await store.take("a", THREE_A_MINUTE), 20);
    await store.close?.();
  });

  await t.step("a capacity of 0 means no limit", async () => {
    const { store } = await fresh();
    for (let event = 0; event < 10; event++) assert.equal(await store.take("k", OFF), 0);
    assert.equal(await store.wait("k", OFF), 0);
    await store.close?.();
  });

  await t.step("counters add and subtract, and read 0 when they do not exist", async () => {
    const { store } = await fresh();
    assert.equal(await store.get("c"), 0);
    assert.equal(await store.add("c", 5), 5);
    assert.equal(await store.add("c", -2), 3);
    assert.equal(await store.get("c"), 3);
    assert.equal(await store.add("c", 0.5), 3.5);
    await store.close?.();
  });

  await t.step("a counter is forgotten at its expiry, which a later add does not move", async () => {
    const { time, store } = await fresh();
    const expiresAt = time.now + 1000;
    assert.equal(await store.add("c", 4, expiresAt), 4);
    assert.equal(await store.add("c", 1, expiresAt + 60_000), 5, "a live counter keeps its expiry");
    time.now += 999;
    assert.equal(await store.get("c"), 5);
    time.now += 1;
    assert.equal(await store.get("c"), 0, "at expiresAt it is gone");
    assert.equal(await store.add("c", 2, time.now + 1000), 2, "a new counter starts from 0");
    time.now += 1000;
    assert.equal(await store.get("c"), 0, "with the new expiry");
    await store.close?.();
  });

  await t.step(
    "startCheck: started while guesses outnumber running checks, busy past that, locked when spent",
    async () => {
      const { time, store } = await fresh();
      const expiresAt = time.now + 60_000;
      const rule: BucketRule = { capacity: 2, periodMs: 60_000 };
      assert.deepEqual(await startCheck(store, "sign-in", rule, expiresAt), { started: true });
      assert.deepEqual(await startCheck(store, "sign-in", rule, expiresAt), { started: true });
      assert.deepEqual(await startCheck(store, "sign-in", rule, expiresAt), { busy: true });
      assert.equal(await store.get("sign-in:checking"), 2, "a busy answer counts no check");
      await store.add("sign-in:checking", -2);
      await store.take("sign-in", rule);
      await store.take("sign-in", rule);
      assert.deepEqual(await startCheck(store, "sign-in", rule, expiresAt), { lockedFor: 30 });
      await store.close?.();
    },
  );
}

Deno.test("CounterStore contract: MemoryCounterStore", (t) =>
  counterStoreContract(t, (now) => new MemoryCounterStore(now)));

Deno.test("CounterStore contract: SqliteCounterStore", async (t) => {
  const directory = await Deno.makeTempDir({ prefix: "mc-relay-counter-test-" });
  let files = 0;
  try {
    await counterStoreContract(t, (now) => SqliteCounterStore.open(`${directory}/state-${files++}.db`, now));
  } finally {
    await Deno.remove(directory, { recursive: true });
  }
});
