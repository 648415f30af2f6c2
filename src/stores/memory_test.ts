/**
 * Unit tests of src/stores/memory.ts beyond the contract every store keeps (src/stores/counter_test.ts): memory
 * stays bounded, and a flood of new callers is forgotten before anybody who has spent an allowance.
 */
import assert from "node:assert/strict";
import type { BucketRule } from "./counter.ts";
import { MemoryCounterStore } from "./memory.ts";
import { openCounterStore } from "./open.ts";
import { parseConfig } from "../config/parse.ts";

const TEN_A_MINUTE: BucketRule = { capacity: 10, periodMs: 60_000 };

/** A store of `maxKeys` buckets under a clock the test moves. */
function store(maxKeys: number) {
  const time = { now: 1_750_000_000_000 };
  return { time, counters: new MemoryCounterStore(() => time.now, maxKeys) };
}

Deno.test("MemoryCounterStore: buckets when the store is full", async (t) => {
  await t.step("[security] a locked-out caller stays locked out through a flood of one-request callers", () => {
    // The clock stands still: what is tested is eviction, not the bucket refilling meanwhile.
    const { counters } = store(100);
    for (let event = 0; event < 10; event++) counters.take("spent", TEN_A_MINUTE);
    assert.ok(counters.take("spent", TEN_A_MINUTE) > 0);
    for (let caller = 0; caller < 10_000; caller++) {
      assert.equal(counters.take(`flood-${caller}`, TEN_A_MINUTE), 0, "a newcomer is never turned away");
    }
    assert.ok(counters.take("spent", TEN_A_MINUTE) > 0, "the spent bucket was not forgotten");
  });

  await t.step("when no bucket has refilled, the fullest go first: whoever used least loses least", () => {
    const { time, counters } = store(10);
    for (let caller = 0; caller < 10; caller++) {
      time.now += 1;
      // Caller n used n + 1 events: caller 0 used least, caller 9 most.
      for (let event = 0; event <= caller; event++) counters.take(`caller-${caller}`, TEN_A_MINUTE);
    }
    counters.take("newcomer", TEN_A_MINUTE);
    assert.equal(counters.remaining("caller-0", TEN_A_MINUTE), 10, "the one who used least was forgotten");
    for (let caller = 1; caller < 10; caller++) {
      assert.ok(counters.remaining(`caller-${caller}`, TEN_A_MINUTE) < 10, `caller-${caller} is remembered`);
    }
    assert.equal(counters.remaining("caller-9", TEN_A_MINUTE), 0);
  });

  await t.step("wait and remaining on an unknown key store nothing, so looking cannot fill the store", () => {
    const { counters } = store(2);
    counters.take("a", TEN_A_MINUTE);
    counters.take("b", TEN_A_MINUTE);
    for (let caller = 0; caller < 100; caller++) {
      assert.equal(counters.wait(`look-${caller}`, TEN_A_MINUTE), 0);
      assert.equal(counters.remaining(`look-${caller}`, TEN_A_MINUTE), 10);
    }
    assert.equal(counters.remaining("a", TEN_A_MINUTE), 9);
    assert.equal(counters.remaining("b", TEN_A_MINUTE), 9);
  });
});

Deno.test("MemoryCounterStore: counters when the store is full", async (t) => {
  await t.step("[security] a counter that holds something is never evicted: a new one is refused (Infinity)", () => {
    const { counters } = store(3);
    for (const key of ["a", "b", "c"]) counters.add(key, 1);
    assert.equal(counters.add("d", 1), Infinity);
    assert.equal(counters.get("d"), 0, "the refused counter was not kept");
    for (const key of ["a", "b", "c"]) assert.equal(counters.get(key), 1);
    assert.equal(counters.add("a", 1), 2, "an existing counter still counts");
  });

  await t.step("expired counters and those back at zero make room", () => {
    const { time, counters } = store(3);
    counters.add("expiring", 1, time.now + 1000);
    counters.add("zero", 1);
    counters.add("kept", 1);
    counters.add("zero", -1);
    assert.equal(counters.add("new-1", 1), 1, "the one at zero made room");
    assert.equal(counters.add("new-2", 1), Infinity);
    time.now += 1000;
    assert.equal(counters.add("new-2", 1), 1, "the expired one made room");
    assert.equal(counters.get("kept"), 1);
  });
});

Deno.test("MemoryCounterStore keeps no usage ledger", () => {
  const { counters } = store(10);
  counters.recordUsage({
    day: "2025-06-15",
    who: "user:a",
    model: "m",
    upstream: "u",
    prompt: 1,
    completion: 1,
    total: 2,
    estimated: false,
  });
  assert.deepEqual(counters.readUsage("2000-01-01", "2100-01-01"), []);
});

Deno.test("openCounterStore: the in-memory store holds MEMORY_STORE_KEYS buckets", async () => {
  const result = parseConfig({
    UPSTREAM_BASE_URL: "https://api.example.com/v1",
    UPSTREAM_API_KEY: "sk-unit-key",
    MC_RELAY_USERNAME: "team",
    MC_RELAY_PASSWORD: "unit-password-12345",
    MEMORY_STORE_KEYS: "2500",
  });
  assert.ok(result.ok);
  const store = await openCounterStore(result.config);
  assert.ok(store instanceof MemoryCounterStore);
  assert.equal(store.maxKeys, 2500);
});
