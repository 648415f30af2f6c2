/**
 * What the relay learns from its upstreams without a caller asking: whether each one answers, and the first model
 * it lists. One `GET <baseUrl>/models` per upstream gives both. The answers are cached per config (so the start-up
 * check, the page, /mc-settings.json and /health of one server share them) and renewed in the background.
 *
 * @module
 */

import { type RelayConfig, type Upstream, VERSION } from "./config/variables.ts";
import { describeNetworkError } from "./http.ts";
import { errorText } from "./text.ts";

/** What the last check of one upstream found. */
export interface UpstreamState {
  /** The upstream's name. */
  name: string;
  /**
   * Whether it answers: an HTTP answer below 500 to its model list. `null`: not checked, since a BYOK upstream is
   * asked only with a caller's key, or the first check has not finished.
   */
  answers: boolean | null;
  /** The HTTP status of its answer, if it gave one. */
  status?: number;
  /** Why it did not answer (a network error's kind, e.g. "connection refused"), if it did not. */
  problem?: string;
  /** The first model of its list, when the list had one. */
  firstModel?: string;
}

/**
 * A check is renewed when a reader asks and the last one is at least this old: at most one probe per upstream per
 * 30 s, and none at all while nobody asks (no timer keeps the process busy).
 */
export const PROBE_FRESH_MS = 30_000;

/** The longest one probe may take. */
const PROBE_TIMEOUT_MS = 5_000;

/** The longest a reader waits for the very first check; later readers never wait, they get the cached answer. */
const FIRST_WAIT_MS = 1_000;

/** The cached checks of one config's upstreams. */
export class UpstreamProbe {
  #states: UpstreamState[];
  #checkedAt = -Infinity;
  #running: Promise<UpstreamState[]> | undefined;

  constructor(private readonly upstreams: Upstream[], private readonly now: () => number = Date.now) {
    this.#states = upstreams.map((upstream) => ({ name: upstream.name, answers: null }));
  }

  /**
   * The cached states, renewed in the background when they are older than `PROBE_FRESH_MS`. Only the first read
   * waits, and at most `FIRST_WAIT_MS`, for the first check.
   */
  async read(): Promise<UpstreamState[]> {
    const first = this.#checkedAt === -Infinity;
    const running = this.#running ?? (this.now() - this.#checkedAt >= PROBE_FRESH_MS ? this.check() : undefined);
    if (first && running) await waitAtMost(running, FIRST_WAIT_MS);
    return this.#states;
  }

  /** Checks every upstream now (one check at a time: a running one is shared) and caches the result. */
  check(): Promise<UpstreamState[]> {
    this.#running ??= Promise.all(this.upstreams.map(probeUpstream)).then((states) => {
      this.#states = states;
      this.#checkedAt = this.now();
      return states;
    }).finally(() => this.#running = undefined);
    return this.#running;
  }
}

/** One probe per config object: the start-up check and the handler of the same server share it. */
const probes = new WeakMap<RelayConfig, UpstreamProbe>();

/** The probe of a config's upstreams. */
export function upstreamProbe(config: RelayConfig): UpstreamProbe {
  let probe = probes.get(config);
  if (probe === undefined) {
    probe = new UpstreamProbe(config.upstreams);
    probes.set(config, probe);
  }
  return probe;
}

/**
 * What /health says of each upstream: its name, whether it answers (`null`: not checked, a BYOK upstream or a first
 * check still running), and its HTTP status or why it gave none. No address, no model, nothing secret.
 */
export async function upstreamHealth(config: RelayConfig) {
  const states = await upstreamProbe(config).read();
  return states.map(({ name, answers, status, problem }) => ({
    name,
    answers,
    ...(status !== undefined && { status }),
    ...(problem !== undefined && { problem }),
  }));
}

/** Resolves when `promise` does, or after `ms`, whichever comes first; the timer never outlives it. */
async function waitAtMost(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([promise, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `GET path` on an upstream with its key and extra headers, as the relay's own requests carry them; redirects are
 * not followed (the key goes to the configured host only). Never throws: a failure is a state.
 */
export async function askUpstream(
  upstream: Upstream,
  url: string,
): Promise<{ status: number; body: unknown } | { problem: string }> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), PROBE_TIMEOUT_MS);
  try {
    const headers: Record<string, string> = { ...upstream.extraHeaders, "user-agent": `mc-relay/${VERSION}` };
    if (!upstream.byok) {
      headers[upstream.authHeader] = upstream.authPrefix
        ? `${upstream.authPrefix} ${upstream.apiKey}`
        : upstream.apiKey;
    }
    const response = await fetch(url, { headers, redirect: "manual", signal: controller.signal });
    let body: unknown;
    try {
      body = response.ok ? await response.json() : await response.body?.cancel();
    } catch {
      body = undefined;
    }
    return { status: response.status, body };
  } catch (error) {
    return { problem: controller.signal.aborted ? "no answer in 5 s" : describeNetworkError(errorText(error)) };
  } finally {
    clearTimeout(timer);
  }
}

/** One upstream's state: its model list asked for (a BYOK upstream is not asked: it has no key of its own). */
async function probeUpstream(upstream: Upstream): Promise<UpstreamState> {
  if (upstream.byok) return { name: upstream.name, answers: null };
  const answer = await askUpstream(upstream, `${upstream.baseUrl}/models`);
  if ("problem" in answer) return { name: upstream.name, answers: false, problem: answer.problem };
  const list = (answer.body as { data?: { id?: unknown }[] } | undefined)?.data;
  const id = Array.isArray(list) ? list[0]?.id : undefined;
  return {
    name: upstream.name,
    answers: answer.status < 500,
    status: answer.status,
    ...(typeof id === "string" && id !== "" && { firstModel: id }),
  };
}
