/**
 * Unit tests of the deadline sweeper (`DeadlineSweeper`): deadlines fire, cancelled ones do not, and the one interval
 * is kept across requests but never outlives the last deadline by more than two ticks.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DEADLINE_TICK_MS, DeadlineSweeper } from "./deadlines.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// The op sanitizer on: it would report an interval left running when the test ends (off by default in Deno 2.9).
Deno.test({
  name: "deadline sweeper: one interval kept across requests, gone within two ticks of the last deadline",
  sanitizeOps: true,
}, async (t) => {
  await t.step(
    "a deadline fires once its time has passed, and the idle sweeper then lets its interval go",
    async () => {
      const sweeper = new DeadlineSweeper();
      let fired = 0;
      sweeper.add(1, () => fired++);
      await sleep(2 * DEADLINE_TICK_MS + 10);
      assert.equal(fired, 1);
      assert.equal(sweeper.ticking, false);
    },
  );

  await t.step("a cancelled deadline never fires", async () => {
    const sweeper = new DeadlineSweeper();
    let fired = 0;
    const deadline = sweeper.add(1, () => fired++);
    sweeper.cancel(deadline);
    await sleep(2 * DEADLINE_TICK_MS + 10);
    assert.equal(fired, 0);
  });

  await t.step("a cancel keeps the interval for the next request, which sets no timer of its own", () => {
    const sweeper = new DeadlineSweeper();
    sweeper.cancel(sweeper.add(10_000, () => {}));
    assert.equal(sweeper.ticking, true);
    sweeper.cancel(sweeper.add(10_000, () => {}));
    assert.equal(sweeper.ticking, true);
    // Left running on purpose: the next step proves it stops by itself, and the sanitizers would see it if not.
  });

  await t.step(
    "after the last cancel, no interval remains within two ticks (an idle relay holds no timer)",
    async () => {
      const sweeper = new DeadlineSweeper();
      sweeper.cancel(sweeper.add(10_000, () => {}));
      assert.equal(sweeper.ticking, true);
      // Timers fire in the order they are due, so the interval's next tick (due within one tick) runs before this.
      await sleep(2 * DEADLINE_TICK_MS);
      assert.equal(sweeper.ticking, false);
    },
  );
});
