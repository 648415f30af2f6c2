/**
 * Circuit breakers of the model aliases' targets (FAILOVER_BREAKER_FAILURES, FAILOVER_BREAKER_SECONDS). Built once
 * per relay (src/handler.ts) and used by the forward stage.
 *
 * @module
 */

import { RelayAbort } from "./http.ts";

/**
 * Circuit breakers, one per alias target, in this process: FAILOVER_BREAKER_FAILURES failures in a row open a
 * target's breaker, and for FAILOVER_BREAKER_SECONDS requests skip it; then one request may try it (half-open): a
 * success closes the breaker, a failure opens it again. When a breaker opens, the attempts still waiting on that
 * target are aborted, so they move on instead of waiting for its timeout.
 *
 * A timeout (no response headers within the attempt's share, or a 504 from a gateway in front of the target) counts
 * only together with timeouts of other callers: among the failures in a row, timeouts open the breaker only once at
 * least two callers (users, or addresses for anonymous requests) had them, and a probe that times out for one caller
 * alone neither opens nor closes it (the next request probes again). The reason: how long an answer takes is the
 * caller's to decide (a huge prompt, a long answer that is not streamed), so one caller's timeouts say nothing about
 * the target, and one caller could otherwise open every breaker of an alias and turn everybody away. A target that
 * hangs for everyone still opens as soon as a second caller times out on it. Refused connections, DNS and TLS
 * failures, and 429/500/502/503 answers count whoever sent the request. The cost: on a relay with a single caller, a
 * target that hangs is not skipped; each request waits its share on it, then moves on.
 */
export class CircuitBreakers {
  #targets = new Map<
    string,
    { failures: number; openUntil: number; probing: boolean; hard: boolean; timedOutFor: Set<string> }
  >();
  #waiting = new Map<string, Set<AbortController>>();

  constructor(
    readonly failuresToOpen: number,
    readonly openMs: number,
    readonly now: () => number,
    /** Hears a breaker open or close; a reload that keeps the breakers gives them its own (with its log). */
    public onChange: (label: string, open: boolean) => void,
  ) {}

  #state(label: string) {
    let state = this.#targets.get(label);
    if (state === undefined) {
      state = { failures: 0, openUntil: 0, probing: false, hard: false, timedOutFor: new Set() };
      this.#targets.set(label, state);
    }
    return state;
  }

  /** Whether a request may try `label` now (a half-open breaker lets one probe through). */
  admit(label: string): boolean {
    const state = this.#state(label);
    if (state.openUntil === 0) return true;
    if (this.now() < state.openUntil || state.probing) return false;
    state.probing = true;
    return true;
  }

  /** Seconds until the first open breaker of `labels` lets a probe through. */
  secondsToRetry(labels: string[]): number {
    const soonest = Math.min(...labels.map((label) => this.#state(label).openUntil));
    return Math.max(1, Math.ceil((soonest - this.now()) / 1000));
  }

  /** Watches an attempt on `label`: it is aborted if the breaker opens meanwhile. Returns the end of the watch. */
  watch(label: string, attempt: AbortController): () => void {
    let waiting = this.#waiting.get(label);
    if (waiting === undefined) this.#waiting.set(label, waiting = new Set());
    waiting.add(attempt);
    return () => waiting.delete(attempt);
  }

  /** Records an answer from `label`: closes its breaker. */
  succeeded(label: string): void {
    const state = this.#state(label);
    const wasOpen = state.openUntil !== 0;
    Object.assign(state, { failures: 0, openUntil: 0, probing: false, hard: false });
    state.timedOutFor.clear();
    if (wasOpen) this.onChange(label, false);
  }

  /**
   * Records a failure of `label` for `caller`, a timeout or not: may open its breaker, and then aborts the attempts
   * waiting on it.
   */
  failed(label: string, caller: string, timeout: boolean): void {
    const state = this.#state(label);
    state.failures++;
    // Two callers are all it takes: the set never holds more (a flood of addresses cannot grow it).
    if (timeout && state.timedOutFor.size < 2) state.timedOutFor.add(caller);
    else state.hard = true;
    // Only after failures that are not all one caller's timeouts: see the class's comment.
    const telling = state.hard || state.timedOutFor.size >= 2;
    if (!telling) {
      state.probing = false;
      return;
    }
    if (!state.probing && state.failures < this.failuresToOpen) return;
    const wasOpen = state.openUntil !== 0;
    // A probe's failure is judged on its own: evidence that opened the breaker once does not reopen it.
    Object.assign(state, { openUntil: this.now() + this.openMs, probing: false, hard: false });
    state.timedOutFor.clear();
    if (!wasOpen) this.onChange(label, true);
    for (const attempt of this.#waiting.get(label) ?? []) attempt.abort(new RelayAbort("breaker_open"));
  }

  /** The targets whose breakers are open now (half-open ones included). */
  open(): string[] {
    return [...this.#targets].filter(([, state]) => state.openUntil !== 0).map(([label]) => label);
  }
}
