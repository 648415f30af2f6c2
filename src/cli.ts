/**
 * The command line besides serving: `--help`, the environment and --env-file, how start-up errors are printed, and
 * the commands `healthcheck`, `hash-password`, `seal` and `usage`.
 *
 * @module
 */

import { hashPassword } from "./auth.ts";
import { callerKeyProblem, KeySealer } from "./byok.ts";
import { parseSealing, parseUpstreams } from "./config/parse.ts";
import { variablesHelp } from "./config/render.ts";
import { errorName } from "./exit.ts";
import { DEFAULTS, ENV_VARS, type RelayEnv, VERSION } from "./config/variables.ts";
import type { LedgerRow } from "./stores/counter.ts";
import { RedisCounterStore } from "./stores/redis.ts";
import { SqliteCounterStore } from "./stores/sqlite.ts";
import { errorText, textEncoder } from "./text.ts";
import { formatUsage, parseUsageArgs, summariseUsage } from "./usage.ts";

// The ledger's arithmetic moved to usage.ts (the /admin stage shares it); re-exported for the public API.
export { parseUsageArgs, summariseUsage, type UsageQuery } from "./usage.ts";

/** `--help` text: what the relay is, every variable with its default, where the docs are. */
export const HELP = `mc-relay ${VERSION}: a self-hosted relay from browser apps (MetaConfigurator) to an
OpenAI-compatible LLM endpoint. Keeps the provider key on the server, answers CORS
for the configured origins only, and streams responses through.

Usage:
  mc-relay                 run the relay (configured by environment variables)
  mc-relay demo            run the relay in front of a built-in echo model, nothing to configure
  mc-relay healthcheck     request this relay's /health; exit 0 if it answers, 1 if not
  mc-relay hash-password   read a password on stdin, print its hash for MC_RELAY_USERS
  mc-relay seal --upstream NAME [--days 90]
                           seal a key (asked for on a terminal, else read from stdin) for a BYOK upstream
  mc-relay migrate FILE    print the .env for MC's Flask relay's config.yaml (what differs on stderr),
                           e.g. mc-relay migrate config.yaml > .env
  mc-relay usage           the usage ledger (STATE_PATH or REDIS_URL): [--since YYYY-MM-DD]
                           [--until YYYY-MM-DD] [--by user|model|upstream|day] [--format table|csv|json]
  mc-relay --version       print the version
  mc-relay --help          print this help

Required: an upstream (UPSTREAM_BASE_URL and UPSTREAM_API_KEY, or UPSTREAMS_JSON) and who may use it
(MC_RELAY_USERNAME and MC_RELAY_PASSWORD, or MC_RELAY_USERS, or PUBLIC_ACCESS=true, or BYOK upstreams only).
Every variable, by group (default in brackets):

${variablesHelp()}Docs: https://github.com/metaconfigurator/mc-relay#readme
Every variable in full: https://github.com/metaconfigurator/mc-relay/blob/main/docs/configuration.md
`;

/**
 * The environment names of MC's Flask relay (its .env.example and app.py), each with what mc-relay has instead: an
 * operator who switches keeps their old .env or compose file, and a name the relay would ignore gets a warning that
 * says what to set. deno.json lets the relay read them for that alone.
 */
export const FLASK_RELAY_VARS: Readonly<Record<string, string>> = {
  ENABLE_MODELS_PROXY: "mc-relay serves /v1/models; to turn it off set DISABLED_PATHS=/v1/models",
  ENABLE_STREAMING: "mc-relay always streams what a client asks to have streamed; nothing to set",
  UPSTREAM_PATH_PREFIX: "put the whole path in UPSTREAM_BASE_URL, e.g. https://gateway.example.com/prefix/v1",
  CONFIG_PATH: "mc-relay reads no config.yaml: run 'mc-relay migrate config.yaml > .env' once and start with that .env",
  RELAY_PORT: "mc-relay listens on PORT (with the compose file: the relay is reached through Caddy)",
  RELAY_HOSTNAME: "set PUBLIC_URL=https://<that host> (and MC_RELAY_DOMAIN for examples/docker-compose.yml)",
};

/** What the relay says about a name of MC's Flask relay, set in `where`. */
function flaskNote(where: string, name: string): string {
  return `${where} sets ${name}, a variable of MC's Flask relay that mc-relay does not read: ${FLASK_RELAY_VARS[name]}`;
}

/**
 * Environment variables the YAML package (`npm:yaml`, loaded by `mc-relay migrate` only) looks at while it parses:
 * debug switches of its own. deno.json lets it read them, or the parse would stop at a permission error.
 */
export const YAML_PACKAGE_VARS = ["LOG_STREAM", "LOG_TOKENS"] as const;

/**
 * `mc-relay migrate <config.yaml>`: prints the .env for MC's Flask relay's config.yaml (standard output: it holds
 * the file's secrets) and what differs (standard error: no secret). The YAML package is loaded by this command only,
 * as npm:redis is by REDIS_URL, so the relay itself never needs it. The file is read as YAML 1.1, as the Flask
 * relay's PyYAML reads it (`enabled: yes` is true there).
 */
export async function migrateCommand(args: string[]): Promise<number> {
  if (args.length !== 1 || args[0].startsWith("-")) {
    console.error("mc-relay migrate: name MC's Flask relay config file, e.g. 'mc-relay migrate config.yaml > .env'");
    return 2;
  }
  const [path] = args;
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    console.error(`mc-relay migrate: "${path}" cannot be read (${errorName(error)})`);
    return 1;
  }
  const { parse } = await import("npm:yaml@2.9.1");
  let config: unknown;
  try {
    config = parse(text, { version: "1.1" });
  } catch (error) {
    // The parser's message names the place (line and column), never the value there.
    const place = /at line \d+, column \d+/.exec(errorText(error))?.[0] ?? "somewhere";
    console.error(`mc-relay migrate: "${path}" is not valid YAML (${place})`);
    return 1;
  }
  const { migrateFlaskConfig } = await import("./migrate.ts");
  const { lines, notes, problems } = migrateFlaskConfig(config);
  if (problems.length > 0) {
    for (const problem of problems) console.error(`mc-relay migrate: ${problem}`);
    return 1;
  }
  console.log(
    [
      `# mc-relay ${VERSION}: the environment of MC's Flask relay ${path.split(/[\\/]/).pop()} ('mc-relay migrate')`,
      "# Holds the file's secrets: keep it private (chmod 600). Start: mc-relay --env-file .env (or deno task start).",
      "# Values are quoted for mc-relay's --env-file; 'docker run --env-file' takes quotes literally: remove them there.",
      ...lines,
    ].join("\n"),
  );
  for (const note of notes) console.error(`mc-relay migrate: ${note}`);
  return 0;
}

/** The env files named on the command line, and the arguments left once they are taken out. */
export interface EnvFileOptions {
  /** Files to read, in order; `optional` ones may be missing (`--env-file-if-exists`). */
  files: { path: string; optional: boolean }[];
  /** The other arguments, in order. */
  rest: string[];
}

/** Takes `--env-file <path>` and `--env-file-if-exists <path>` (or `=<path>`) out of the arguments. */
export function takeEnvFileOptions(args: string[]): EnvFileOptions | { problem: string } {
  const files: EnvFileOptions["files"] = [];
  const rest: string[] = [];
  for (let index = 0; index < args.length; index++) {
    const match = /^--env-file(-if-exists)?(?:=(.*))?$/.exec(args[index]);
    if (!match) {
      rest.push(args[index]);
      continue;
    }
    const path = match[2] ?? args[++index];
    if (!path) return { problem: `${args[index - 1] ?? args[index]} needs a file, e.g. --env-file .env` };
    files.push({ path, optional: match[1] !== undefined });
  }
  return { files, rest };
}

/**
 * The relay's variables: from the process environment, else from the env files (the first file that sets a
 * variable wins; the real environment always wins). Files are parsed by Deno's Node layer (`node:util` parseEnv).
 * Returns notes for keys a file sets that the relay does not read (a typo shows), and problems for unreadable files.
 */
export async function readEnv(
  files: EnvFileOptions["files"] = [],
): Promise<{ env: RelayEnv; notes: string[]; problems: string[] }> {
  const { parseEnv } = files.length > 0 ? await import("node:util") : { parseEnv: () => ({}) };
  const fromFiles: Record<string, string> = {};
  const notes: string[] = [];
  const problems: string[] = [];
  for (const { path, optional } of files) {
    let text: string;
    try {
      text = Deno.readTextFileSync(path);
    } catch (error) {
      if (!(optional && error instanceof Deno.errors.NotFound)) {
        problems.push(`--env-file names "${path}", which cannot be read (${errorName(error)})`);
      }
      continue;
    }
    const parsed = parseEnv(text) as Record<string, string>;
    for (const [name, value] of Object.entries(parsed)) {
      if (Object.hasOwn(FLASK_RELAY_VARS, name)) {
        notes.push(flaskNote(path, name));
      } else if (!(ENV_VARS as readonly string[]).includes(name)) {
        notes.push(`${path} sets ${name}, which the relay does not read (see 'mc-relay --help')`);
      } else fromFiles[name] ??= value;
    }
  }
  for (const name of Object.keys(FLASK_RELAY_VARS)) {
    let value: string | undefined;
    try {
      value = Deno.env.get(name);
    } catch {
      // not readable under the permissions this build was given: nothing to warn about
    }
    if (value !== undefined) notes.push(flaskNote("the environment", name));
  }
  const env: RelayEnv = {};
  for (const name of ENV_VARS) {
    const value = Deno.env.get(name) ?? fromFiles[name];
    if (value !== undefined) env[name] = value;
  }
  return { env, notes, problems };
}

/** Where a start without env file can look for one: a `.env` beside it that was not read. */
export function envFileHint(files: EnvFileOptions["files"]): string {
  if (files.length > 0) return "";
  try {
    Deno.statSync(".env");
    return "A .env file is in this folder but was not read: run 'mc-relay --env-file .env' (deno task start reads it).";
  } catch {
    return "Set the variables in the environment, or put them in a .env file (from examples/.env.example) and run 'mc-relay --env-file .env' or 'deno task start'.";
  }
}

/**
 * `mc-relay healthcheck`: asks the running relay's /health over loopback; 0 when it answers ok.
 * It speaks HTTP/1.1 over a plain or TLS socket itself: with TLS the certificate chain is checked
 * (the relay's own certificate is trusted too, so self-signed ones pass) but not the host name,
 * since a certificate for relay.example.com is fine even though the check connects to 127.0.0.1.
 */
export async function healthcheck(env: RelayEnv): Promise<number> {
  const port = Number(env.PORT?.trim() || DEFAULTS.port);
  const host = env.HOST?.trim() || "127.0.0.1";
  const hostname = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
  let connection: Deno.Conn | undefined;
  const deadline = setTimeout(() => connection?.close(), 5000);
  try {
    const certFile = env.TLS_CERT_FILE?.trim();
    connection = certFile
      ? await Deno.connectTls({
        hostname,
        port,
        caCerts: [await Deno.readTextFile(certFile)],
        unsafelyDisableHostnameVerification: true,
      })
      : await Deno.connect({ hostname, port });
    const basePath = (env.BASE_PATH?.trim() ?? "").replace(/\/+$/, "");
    await connection.write(
      textEncoder.encode(`GET ${basePath}/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`),
    );
    const response = await new Response(connection.readable).text();
    connection = undefined; // the readable closed it
    const healthy = /^HTTP\/1\.[01] 200 /.test(response) && response.includes('{"status":"ok"');
    console.log(healthy ? "healthy" : `unhealthy: ${response.split("\r\n")[0] || "no answer"}`);
    return healthy ? 0 : 1;
  } catch (error) {
    console.log(`unhealthy: ${errorText(error)}`);
    return 1;
  } finally {
    clearTimeout(deadline);
    try {
      connection?.close();
    } catch {
      // already closed
    }
  }
}

/**
 * `mc-relay hash-password`: prints the PBKDF2 hash of a password for MC_RELAY_USERS. On a terminal it asks twice,
 * without echo; otherwise it reads one line from standard input (`printf '%s' 'the password' | ...`).
 */
export async function hashPasswordCommand(): Promise<number> {
  let password: string;
  if (Deno.stdin.isTerminal()) {
    const first = await readHidden("Password for MC_RELAY_USERS: ");
    const second = first === undefined ? undefined : await readHidden("The same password again: ");
    if (first === undefined || second === undefined) return 130;
    if (first !== second) {
      console.error("mc-relay: the two passwords differ; nothing was printed");
      return 1;
    }
    password = first;
  } else {
    password = (await new Response(Deno.stdin.readable).text()).replace(/\r?\n$/, "");
  }
  if (password.length === 0 || password.includes("\n") || password.includes(",")) {
    console.error("mc-relay: give one password on standard input (no line breaks or commas), e.g.");
    console.error("  printf '%s' 'the password' | mc-relay hash-password");
    return 1;
  }
  if (password.length < 12) console.error("mc-relay: warning: the password is shorter than 12 characters");
  console.log(await hashPassword(password));
  return 0;
}

/** Reads one line from the terminal without echoing it; undefined on Ctrl+C or Ctrl+D. */
async function readHidden(prompt: string): Promise<string | undefined> {
  await Deno.stderr.write(textEncoder.encode(prompt));
  Deno.stdin.setRaw(true);
  const bytes: number[] = [];
  const buffer = new Uint8Array(64);
  try {
    while (true) {
      const read = await Deno.stdin.read(buffer);
      if (read === null) return undefined;
      for (const byte of buffer.subarray(0, read)) {
        if (byte === 3 || (byte === 4 && bytes.length === 0)) return undefined; // Ctrl+C, Ctrl+D
        if (byte === 13 || byte === 10) return new TextDecoder().decode(new Uint8Array(bytes));
        if (byte === 127 || byte === 8) bytes.pop();
        else bytes.push(byte);
      }
    }
  } finally {
    Deno.stdin.setRaw(false);
    await Deno.stderr.write(textEncoder.encode("\n"));
  }
}

/**
 * `mc-relay seal --upstream NAME [--days 90]`: seals a key for a BYOK upstream, as POST /seal does, with the relay's
 * own SEAL_SECRET and UPSTREAMS_JSON. The key is asked for without echo on a terminal, else read from stdin.
 */
export async function sealCommand(args: string[], env: RelayEnv): Promise<number> {
  const upstreamIndex = args.indexOf("--upstream");
  const daysIndex = args.indexOf("--days");
  const name = upstreamIndex === -1 ? undefined : args[upstreamIndex + 1];
  const days = daysIndex === -1 ? 90 : Number(args[daysIndex + 1]);
  const errors: string[] = [];
  const upstreams = parseUpstreams(env, []);
  const sealing = parseSealing(env, upstreams, errors);
  const target = upstreams.find((upstream) => upstream.name === name && upstream.byok);
  if (sealing.sealSecret === undefined) errors.push("SEAL_SECRET is not set: set it as the relay has it");
  if (target === undefined) {
    errors.push(
      `--upstream must name a BYOK upstream of UPSTREAMS_JSON: ${
        upstreams.filter((u) => u.byok).map((u) => u.name).join(", ") || "none"
      }`,
    );
  }
  if (!Number.isInteger(days) || days < 1 || days > 3650) errors.push("--days takes a whole number from 1 to 3650");
  if (errors.length > 0) {
    for (const error of errors) console.error(`mc-relay seal: ${error}`);
    return 2;
  }
  const key = Deno.stdin.isTerminal()
    ? await readHidden(`Your key for "${target!.name}": `)
    : (await new Response(Deno.stdin.readable).text()).trim();
  if (key === undefined) return 130;
  const problem = callerKeyProblem(key, target!);
  if (problem !== undefined) {
    console.error(`mc-relay seal: ${problem}`);
    return 1;
  }
  const sealer = new KeySealer([sealing.sealSecret!]);
  console.log(await sealer.seal(key, target!.name, Date.now() + days * 86_400_000));
  return 0;
}

/**
 * `mc-relay usage`: the usage ledger from STATE_PATH or REDIS_URL (the relay's own settings), summed by user,
 * model, upstream or day, as a table, CSV or JSON, so an operator can bill or audit without a log pipeline.
 */
export async function usageCommand(args: string[], env: RelayEnv): Promise<number> {
  const query = parseUsageArgs(args, new Date().toISOString().slice(0, 10));
  if ("problem" in query) {
    console.error(`mc-relay usage: ${query.problem}`);
    console.error(
      "  mc-relay usage [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--by user|model|upstream|day] [--format table|csv|json]",
    );
    return 2;
  }
  const statePath = env.STATE_PATH?.trim();
  const redisUrl = env.REDIS_URL?.trim();
  if (!statePath && !redisUrl) {
    console.error(
      "mc-relay usage: set STATE_PATH or REDIS_URL as the relay has it; a relay without either keeps no ledger",
    );
    return 1;
  }
  let rows: LedgerRow[];
  if (statePath) {
    try {
      Deno.statSync(statePath);
    } catch {
      console.error(`mc-relay usage: STATE_PATH names "${statePath}", which does not exist`);
      return 1;
    }
    const store = await SqliteCounterStore.open(statePath);
    rows = store.readUsage(query.since, query.until);
    store.close();
  } else {
    const store = await RedisCounterStore.connect(redisUrl!);
    if (!store.ready) {
      console.error("mc-relay usage: Redis at REDIS_URL does not answer");
      await store.close();
      return 1;
    }
    rows = await store.readUsage(query.since, query.until);
    await store.close();
  }
  console.log(formatUsage(summariseUsage(rows, query.by), query));
  return 0;
}
