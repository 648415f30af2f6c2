/**
 * The start-up check: once the relay listens, it asks its upstreams for their model lists (`upstreamProbe`, whose
 * answers the page and /health then reuse) and warns about what would fail later: an upstream that does not answer,
 * a base URL without its `/v1`, no model MC could be told to use.
 * It never delays listening and never stops the relay.
 *
 * @module
 */

import type { RelayConfig, Upstream } from "./config/variables.ts";
import type { Logger } from "./observe.ts";
import { LOOPBACK_AUTHORITY } from "./config/parse.ts";
import { VERSION } from "./config/variables.ts";
import { mcEndpoint } from "./endpoint.ts";
import { mcModel, mcSettingsLink, signIns } from "./page.ts";
import { askUpstream, upstreamProbe, type UpstreamState } from "./probe.ts";

/** What the start-up check learned, for the banner. */
export interface StartupFacts {
  /** The model MC is told to use, if one is known. */
  model: string | undefined;
}

/** Runs the start-up check and logs its warnings. */
export async function checkAtStart(config: RelayConfig, log: Logger): Promise<StartupFacts> {
  const states = await upstreamProbe(config).check();
  await Promise.all(config.upstreams.map((upstream, index) => checkUpstream(upstream, states[index], log)));
  const model = await mcModel(config);
  if (model === undefined) {
    const first = config.upstreams[0];
    const why = first.byok
      ? `the first upstream ("${first.name}") takes its callers' own keys, so the relay cannot ask it for its models`
      : `the first upstream ("${first.name}") listed no model at start`;
    log.warn(
      `no model for MetaConfigurator: ${why}; /mc-settings.json names none and MC keeps its own default (alias-fast); set DEFAULT_MODEL, e.g. DEFAULT_MODEL=llama3.1:8b`,
    );
  }
  return { model };
}

/**
 * Warns when an upstream does not answer, or when its base URL looks one `/v1` short: `<base>/models` is 404 while
 * `<base>/v1/models` answers (vLLM and Ollama serve the OpenAI API under /v1).
 */
async function checkUpstream(upstream: Upstream, state: UpstreamState, log: Logger): Promise<void> {
  const where = upstream.name === "default"
    ? "UPSTREAM_BASE_URL"
    : `the baseUrl of UPSTREAMS_JSON entry "${upstream.name}"`;
  const host = new URL(upstream.baseUrl).host;
  if (state.answers === false) {
    const why = state.problem ?? `HTTP ${state.status}`;
    log.warn(
      `upstream "${upstream.name}" (${host}) does not answer (${why}); the relay serves anyway, and /health shows when it answers; check ${where}`,
    );
    return;
  }
  if (state.status !== 404) return;
  const withV1 = await askUpstream(upstream, `${upstream.baseUrl}/v1/models`);
  if ("status" in withV1 && withV1.status >= 200 && withV1.status < 300) {
    log.warn(
      `upstream "${upstream.name}" (${host}) answers 404 at ${upstream.baseUrl}/models but serves ${upstream.baseUrl}/v1/models: add /v1 to ${where}, e.g. ${upstream.baseUrl}/v1`,
    );
  }
}

/**
 * The start-up banner for people, like the demo's: the page, MC's one link, the values for MC and for an SDK. It goes
 * to stderr, and by default only when stderr is a terminal (BANNER), so stdout stays one JSON log line per event for
 * machines. Nothing secret: no key, no password, no internal upstream address (`mcEndpoint`).
 */
export function startupBanner(config: RelayConfig, port: number, facts: StartupFacts): string {
  const everywhere = ["0.0.0.0", "::", ""].includes(config.host);
  const host = everywhere || LOOPBACK_AUTHORITY.test(config.host)
    ? "localhost"
    : config.host.includes(":")
    ? `[${config.host}]`
    : config.host;
  const base = config.publicUrl ?? `${config.tlsCertFile ? "https" : "http"}://${host}:${port}${config.basePath}`;
  // /mc-settings.json answers only where the relay knows its address: PUBLIC_URL, or a loopback HOST.
  const link = config.publicUrl || LOOPBACK_AUTHORITY.test(config.host)
    ? mcSettingsLink(base)
    : "set PUBLIC_URL (the address users reach the relay at) for the one link";
  const { bare, named } = signIns(config);
  const key = config.publicAccess
    ? "none needed (public relay); an SDK needs any non-empty value, e.g. public"
    : bare
    ? named
      ? "the relay password (MC_RELAY_PASSWORD), or username:password of a relay user"
      : "the relay password (MC_RELAY_PASSWORD)"
    : named
    ? "username:password of a relay user"
    : "the caller's own provider key (bring your own key)";
  return `
mc-relay ${VERSION} is running.

  This relay's page:          ${base}/
  MetaConfigurator, one link: ${link}
  MetaConfigurator, by hand:  Relay URL ${base}  (without /v1)
                              Endpoint  ${mcEndpoint(config, config.upstreams[0])}
                              Model     ${facts.model ?? "none known: set DEFAULT_MODEL"}
  An OpenAI SDK's baseURL:    ${base}/v1
  API key:                    ${key}

The log lines (JSON) go to stdout; BANNER=false turns this banner off.
`;
}

/** Prints the banner on stderr when BANNER says so (by default: when stderr is a terminal). */
export function printBanner(config: RelayConfig, port: number, facts: StartupFacts): void {
  if (config.banner ?? Deno.stderr.isTerminal()) console.error(startupBanner(config, port, facts));
}
