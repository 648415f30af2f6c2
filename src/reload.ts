/**
 * SIGHUP's reload: the env files read again, the new configuration validated as at start-up, and what a running
 * relay can take from it. Pure: src/server.ts reads the files and swaps the handler.
 *
 * @module
 */

import { parseConfig } from "./config/parse.ts";
import { ENV_VARS, type EnvVar, type RelayConfig, type RelayEnv } from "./config/variables.ts";

/**
 * Variables a reload cannot change: the listening socket (PORT, HOST, the TLS files), the counter store and what it
 * was opened with (STATE_PATH, REDIS_URL, USAGE_RETENTION_DAYS, MEMORY_STORE_KEYS), the threads (WORKERS) and the metrics port
 * (METRICS_PORT, METRICS_HOST). The running values stay until a restart.
 */
export const RESTART_ONLY: readonly EnvVar[] = [
  "PORT",
  "HOST",
  "TLS_CERT_FILE",
  "TLS_KEY_FILE",
  "STATE_PATH",
  "REDIS_URL",
  "USAGE_RETENTION_DAYS",
  "MEMORY_STORE_KEYS",
  "WORKERS",
  "METRICS_PORT",
  "METRICS_HOST",
];

/** What the running relay was configured from: the variables, and the config they made. */
export interface Running {
  env: RelayEnv;
  config: RelayConfig;
}

/** A reload's plan: the config to run and what changed, or the problems that keep the running one. */
export type ReloadPlan =
  | {
    ok: true;
    /** The new config, with the running values of `RESTART_ONLY` kept. */
    config: RelayConfig;
    /** What the relay runs from now on; `RESTART_ONLY` variables keep their running values here too. */
    running: Running;
    /** The variables whose values changed and take effect now (names only: a value may be a secret). */
    changed: EnvVar[];
    /** The variables whose values changed but need a restart. */
    needRestart: EnvVar[];
    warnings: string[];
  }
  | { ok: false; errors: string[] };

/**
 * Validates `env` as start-up does and plans the swap: invalid, the running config stays (the problems are
 * returned); valid, the new config keeps the running listener, store, threads and metrics port (`RESTART_ONLY`).
 */
export function planReload(running: Running, env: RelayEnv): ReloadPlan {
  const result = parseConfig(env);
  if (!result.ok) return { ok: false, errors: result.errors };
  const differs = (name: EnvVar) => (running.env[name] ?? "") !== (env[name] ?? "");
  const changed = ENV_VARS.filter((name) => differs(name) && !RESTART_ONLY.includes(name));
  const needRestart = RESTART_ONLY.filter(differs);
  const old = running.config;
  const config: RelayConfig = {
    ...result.config,
    port: old.port,
    host: old.host,
    tlsCertFile: old.tlsCertFile,
    tlsKeyFile: old.tlsKeyFile,
    statePath: old.statePath,
    redisUrl: old.redisUrl,
    usageRetentionDays: old.usageRetentionDays,
    memoryStoreKeys: old.memoryStoreKeys,
    workers: old.workers,
    metricsPort: old.metricsPort,
    metricsHost: old.metricsHost,
  };
  const kept: RelayEnv = { ...env };
  for (const name of RESTART_ONLY) {
    if (running.env[name] === undefined) delete kept[name];
    else kept[name] = running.env[name];
  }
  return { ok: true, config, running: { env: kept, config }, changed, needRestart, warnings: result.warnings };
}
