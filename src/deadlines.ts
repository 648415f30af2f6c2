/**
 * One coarse timer for every request's timeouts (`DeadlineSweeper`, and the process's one `deadlines`).
 *
 * @module
 */

/** How late a deadline may fire: the sweeper's tick, in milliseconds. */
export const DEADLINE_TICK_MS = 25;

/** A deadline the sweeper keeps: `fire` runs once, when `at` (a `performance.now()` time) has passed. */
export interface Deadline {
  /** When it fires; a stream moves it on while it waits for a chunk, and sets Infinity between waits. */
  at: number;
  /** What it does; dropped once it has fired or been cancelled. */
  fire: () => void;
}

/** The `fire` of a deadline that has fired or been cancelled. */
const SPENT = () => {};

/**
 * Every timeout a request sets (its first byte, its body, a stream's silence, a shared-store call) on one interval
 * timer instead of a timer each: setting and clearing a Deno timer costs microseconds, and a request set up to
 * four. A deadline fires up to DEADLINE_TICK_MS late, which is nothing against REQUEST_TIMEOUT_SECONDS.
 *
 * The interval outlives the request that started it: `cancel` leaves it running and only a tick that finds nothing
 * pending stops it, so an idle relay holds no timer one tick after its last deadline, while requests one at a time
 * (MC's way) no longer pay for a `setInterval` and a `clearInterval` each (70,000 instructions a chat under callgrind,
 * docs/performance.md).
 */
export class DeadlineSweeper {
  #pending = new Set<Deadline>();
  #interval: ReturnType<typeof setInterval> | undefined;

  /** Calls `fire` in `ms` milliseconds, unless `cancel` comes first. */
  add(ms: number, fire: () => void): Deadline {
    const deadline = { at: performance.now() + ms, fire };
    this.#pending.add(deadline);
    this.#interval ??= setInterval(() => this.#sweep(), DEADLINE_TICK_MS);
    return deadline;
  }

  /** Drops a deadline that has not fired; nothing happens for one that has. */
  cancel(deadline: Deadline | undefined): void {
    if (deadline === undefined || !this.#pending.delete(deadline)) return;
    // A deadline object can outlive its request (V8 moves long-lived kinds of objects to the old generation, where
    // a dead one still holds what it points to until the next full collection): let go of the request at once.
    deadline.fire = SPENT;
  }

  /** Whether the interval runs (for tests: an idle sweeper must let it go within two ticks). */
  get ticking(): boolean {
    return this.#interval !== undefined;
  }

  #sweep(): void {
    const now = performance.now();
    for (const deadline of this.#pending) {
      if (deadline.at > now) continue;
      this.#pending.delete(deadline);
      const fire = deadline.fire;
      deadline.fire = SPENT;
      fire();
    }
    if (this.#pending.size === 0) this.#stop();
  }

  #stop(): void {
    clearInterval(this.#interval);
    this.#interval = undefined;
  }
}

/** The process's one sweeper: every relay, store and stream in it shares the tick. */
export const deadlines = new DeadlineSweeper();
