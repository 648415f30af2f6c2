/**
 * mc-relay: a small, self-hosted relay between a browser app (first of all MetaConfigurator) and any
 * OpenAI-compatible LLM endpoint. The browser sends `username:password` (or nothing, on a public relay, or its own
 * provider key, for a BYOK upstream); the relay checks it, adds the provider key (which never leaves this process),
 * sets CORS headers for the configured origins only, and streams the upstream's answer straight back.
 *
 * This file is the entry: `deno run main.ts` and `deno compile main.ts` start here, the command line is dispatched
 * here, and the WORKERS threads run this same module. It re-exports the public API. The relay itself lives in src/:
 * src/handler.ts lists a request's stages in order (`STAGES`); src/config/ holds every variable and its parsing;
 * src/server.ts serves; src/cli.ts holds the other commands.
 *
 * @module
 */

import {
  envFileHint,
  hashPasswordCommand,
  healthcheck,
  HELP,
  migrateCommand,
  readEnv,
  sealCommand,
  takeEnvFileOptions,
  usageCommand,
} from "./src/cli.ts";
import { parseConfig } from "./src/config/parse.ts";
import { VERSION } from "./src/config/variables.ts";
import { demo } from "./src/demo.ts";
import { exitWithErrors } from "./src/exit.ts";
import { runWorker, serve, WORKER_NAME } from "./src/server.ts";

// The public API (the tests, testing.ts and bench.ts import it from here), from the modules that own it.
export {
  addressKey,
  clientAddress,
  constantTimeEqual,
  hashPassword,
  PBKDF2_ITERATIONS,
  readCredentials,
  verifyPasswordHash,
} from "./src/auth.ts";
export { KeySealer } from "./src/byok.ts";
export {
  FLASK_RELAY_VARS,
  HELP,
  parseUsageArgs,
  readEnv,
  summariseUsage,
  takeEnvFileOptions,
  YAML_PACKAGE_VARS,
} from "./src/cli.ts";
export { envValue, migrateFlaskConfig } from "./src/migrate.ts";
export type { Migration } from "./src/migrate.ts";
export type { EnvFileOptions, UsageQuery } from "./src/cli.ts";
export { parseConfig } from "./src/config/parse.ts";
export { addressBytes, inRanges, parseAddressRange, parsePasswordHash, PRIVATE_RANGES } from "./src/config/values.ts";
export type { ConfigResult } from "./src/config/parse.ts";
export { OPTIONAL_ROUTES } from "./src/config/routes.ts";
export { DEFAULTS, ENV_VARS, LOG_LEVELS, METACONFIGURATOR_ORIGINS, VERSION } from "./src/config/variables.ts";
export type {
  AddressRange,
  EnvVar,
  LogLevel,
  PasswordHash,
  RelayConfig,
  RelayEnv,
  RelayUser,
  TrustedProxies,
  Upstream,
} from "./src/config/variables.ts";
export { createDemoUpstream } from "./src/demo.ts";
export { createHandler } from "./src/handler.ts";
export type { HandlerOptions, RelayHandler } from "./src/handler.ts";
export { corsHeaders, errorResponse, jsonResponse, preflightHeaders } from "./src/http.ts";
export { createLogger, metricsResponse, RelayMetrics } from "./src/observe.ts";
export type { Logger } from "./src/observe.ts";
export { serve, serverErrorHandler } from "./src/server.ts";
export { giveBack, hold, startCheck } from "./src/stores/counter.ts";
export type { BucketRule, CheckStart, CounterStore, Held, LedgerEntry, LedgerRow } from "./src/stores/counter.ts";
export { FallbackCounterStore } from "./src/stores/fallback.ts";
export { MemoryCounterStore } from "./src/stores/memory.ts";
export { openCounterStore } from "./src/stores/open.ts";
export { RedisCounterStore } from "./src/stores/redis.ts";
export type { RedisClient } from "./src/stores/redis.ts";
export { SqliteCounterStore, ThreadLock } from "./src/stores/sqlite.ts";
export type { TokenUsage } from "./src/usage.ts";

/** Runs the command line: the relay, `demo`, `healthcheck`, `migrate`, `--help` or `--version`. */
export async function main(argv: string[]): Promise<number> {
  const options = takeEnvFileOptions(argv);
  if ("problem" in options) {
    console.error(`mc-relay: ${options.problem}`);
    return 2;
  }
  const args = options.rest;
  const command = args[0];
  if (command === "--help" || command === "-h" || command === "help") {
    console.log(HELP);
    return 0;
  }
  if (command === "--version" || command === "-V" || command === "version") {
    console.log(`mc-relay ${VERSION}`);
    return 0;
  }
  if (command === "hash-password") return await hashPasswordCommand();
  if (command === "migrate") return await migrateCommand(args.slice(1));
  const { env, notes, problems } = await readEnv(options.files);
  if (problems.length > 0) exitWithErrors(problems);
  if (command === "healthcheck") return await healthcheck(env);
  if (command === "usage") return await usageCommand(args.slice(1), env);
  if (command === "seal") return await sealCommand(args.slice(1), env);
  if (command === "demo") {
    await demo(env);
    return 0;
  }
  if (command !== undefined) {
    console.error(`mc-relay: unknown command "${command}"; see 'mc-relay --help'`);
    return 2;
  }
  const result = parseConfig(env);
  if (!result.ok) exitWithErrors(result.errors, envFileHint(options.files));
  await serve(result.config, [...notes, ...result.warnings], undefined, { env, read: () => readEnv(options.files) });
  return 0;
}

if ((globalThis as { name?: string }).name === WORKER_NAME) {
  runWorker(); // a WORKERS thread (Deno sets import.meta.main in workers too)
} else if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
