/**
 * The start-up check: once the relay listens, it asks its upstreams for their model lists (`upstreamProbe`, whose
 * answers the page and /health then reuse) and warns about what would fail later: no model MC could be told to use.
 * It never delays listening and never stops the relay.
 *
 * @module
 */

import type { RelayConfig } from "./config/variables.ts";
import type { Logger } from "./observe.ts";
import { mcModel } from "./page.ts";
import { upstreamProbe } from "./probe.ts";

/** What the start-up check learned, for the banner. */
export interface StartupFacts {
  /** The model MC is told to use, if one is known. */
  model: string | undefined;
}

/** Runs the start-up check and logs its warnings. */
export async function checkAtStart(config: RelayConfig, log: Logger): Promise<StartupFacts> {
  await upstreamProbe(config).check();
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
