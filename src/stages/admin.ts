/**
 * The operator's view: GET /admin (a page) and GET /admin/usage (the ledger as JSON or CSV, as `mc-relay usage`
 * prints it), for the users ADMINS names. Both routes exist only when ADMINS is set.
 *
 * @module
 */

import { adminPageResponse, type AdminView } from "../admin_page.ts";
import { refuse, type Relay, type RequestContext } from "../context.ts";
import { errorResponse } from "../http.ts";
import { upstreamHealth } from "../probe.ts";
import type { LedgerRow } from "../stores/counter.ts";
import { textEncoder } from "../text.ts";
import { formatUsage, parseUsageArgs, summariseUsage, type UsageQuery } from "../usage.ts";
import { tokenBudgets } from "./limits.ts";

/** The longest period one request may sum: two years of days, far past the default retention (400 days). */
const MAX_PERIOD_DAYS = 731;

/** At most this many callers are listed on the page (largest first); /admin/usage lists every one. */
const MAX_CALLERS_SHOWN = 100;

/**
 * Stage: GET /admin and GET /admin/usage, for signed-in users ADMINS names: anonymous callers get 401 (with a Basic
 * challenge for a browser's address bar), other users 403. Like /usage and /metrics, reading them counts against no
 * request limit. The errors name no figure.
 */
export function answerAdmin(relay: Relay, context: RequestContext): Response | undefined | Promise<Response> {
  if (context.routePath !== "/admin" && context.routePath !== "/admin/usage") return undefined;
  if (context.caller.user === undefined) {
    const challenge: Record<string, string> = context.origin === null
      ? { "www-authenticate": 'Basic realm="mc-relay", charset="UTF-8"' }
      : {};
    return errorResponse(401, "sign in as a user ADMINS names to open /admin", "invalid_api_key", challenge);
  }
  if (!relay.config.admins.includes(context.caller.user)) {
    return refuse(
      context,
      "admin_not_allowed",
      403,
      "this user may not open /admin; ADMINS names who may",
      "admin_not_allowed",
    );
  }
  const query = readQuery(relay, context);
  if ("problem" in query) return errorResponse(400, query.problem, "invalid_query");
  return context.routePath === "/admin" ? answerPage(relay, query) : answerUsageExport(relay, query);
}

/** `since`, `until`, `by` and `format` from the query string, checked as `mc-relay usage` checks its options. */
function readQuery(relay: Relay, context: RequestContext): UsageQuery | { problem: string } {
  const args: string[] = [];
  for (const [name, value] of context.url.searchParams) {
    // An empty field (a date input left blank) means the default, as an absent one does.
    if (value !== "") args.push(`--${name}=${value}`);
  }
  const today = new Date(relay.now()).toISOString().slice(0, 10);
  const query = parseUsageArgs(args, today);
  if ("problem" in query) {
    return {
      problem: `${query.problem.replaceAll("--", "").replace("option", "query parameter")}, e.g. ?since=${today}`,
    };
  }
  if (context.url.searchParams.get("format") === "table") return { problem: 'format takes json or csv, got "table"' };
  const real = (day: string) => new Date(Date.parse(day) || 0).toISOString().slice(0, 10) === day;
  const days = (Date.parse(query.until) - Date.parse(query.since)) / 86_400_000;
  if (!real(query.since) || !real(query.until) || !(days >= 0)) {
    return { problem: `since (${query.since}) and until (${query.until}) must be days of the calendar, since first` };
  }
  if (days >= MAX_PERIOD_DAYS) return { problem: `a period spans at most ${MAX_PERIOD_DAYS} days` };
  return query;
}

/** Where the ledger is, and whether it can be read now: a memory store keeps none; Redis out of reach cannot. */
function ledgerState(relay: Relay): AdminView["ledger"] {
  if (relay.config.statePath === undefined && relay.config.redisUrl === undefined) return "none";
  return relay.counters.state === "degraded" ? "unreadable" : "ok";
}

/** GET /admin/usage: the ledger summed by `by`, as JSON (default) or CSV, byte for byte what `mc-relay usage` prints. */
async function answerUsageExport(relay: Relay, query: UsageQuery): Promise<Response> {
  const ledger = ledgerState(relay);
  if (ledger === "none") {
    return errorResponse(
      404,
      "this relay keeps no usage ledger (it counts in memory); set STATE_PATH or REDIS_URL",
      "no_usage_ledger",
    );
  }
  if (ledger === "unreadable") {
    return errorResponse(503, "the usage ledger (REDIS_URL) cannot be read now; try again later", "ledger_unreadable", {
      "retry-after": "30",
    });
  }
  const format = query.format === "csv" ? "csv" : "json";
  const rows = await relay.counters.readUsage(query.since, query.until);
  const body = textEncoder.encode(`${formatUsage(summariseUsage(rows, query.by), { ...query, format })}\n`);
  return new Response(body, {
    headers: {
      "content-type": format === "csv" ? "text/csv; charset=utf-8" : "application/json",
      "content-length": String(body.byteLength),
      "cache-control": "no-store",
      "x-content-type-options": "nosniff",
      ...(format === "csv" &&
        { "content-disposition": `attachment; filename="mc-relay-usage-${query.since}-${query.until}.csv"` }),
    },
  });
}

/** GET /admin: the page, from the ledger (when there is one) and this process's counts. */
async function answerPage(relay: Relay, query: UsageQuery): Promise<Response> {
  const ledger = ledgerState(relay);
  const rows: LedgerRow[] = ledger === "ok" ? await relay.counters.readUsage(query.since, query.until) : [];
  const byDay = new Map(summariseUsage(rows, "day").map((sum) => [sum.key, sum]));
  const days: AdminView["days"] = [];
  for (let time = Date.parse(query.since); time <= Date.parse(query.until); time += 86_400_000) {
    const day = new Date(time).toISOString().slice(0, 10);
    days.push(byDay.get(day) ?? emptySum(day));
  }
  const callers = summariseUsage(rows, "user").sort((a, b) =>
    b.total_tokens - a.total_tokens || b.requests - a.requests
  );
  const shown = await Promise.all(
    callers.slice(0, MAX_CALLERS_SHOWN).map(async (caller) => ({
      ...caller,
      budgets: await budgetsUsed(relay, caller.key),
    })),
  );
  const openTargets = relay.breakers.open();
  const aliasTargets = Object.values(relay.config.modelAliases).flat();
  // The cached check /health reports (src/probe.ts): at most one every 30 s per upstream, whoever asks.
  const checks = await upstreamHealth(relay.config);
  const view: AdminView = {
    since: query.since,
    until: query.until,
    basePath: relay.config.basePath,
    ledger,
    store: {
      kind: relay.config.statePath !== undefined ? "SQLite" : relay.config.redisUrl !== undefined ? "Redis" : "memory",
      degraded: relay.counters.state === "degraded",
    },
    days,
    callers: shown,
    callersLeft: callers.length - shown.length,
    models: summariseUsage(rows, "model").sort((a, b) => b.total_tokens - a.total_tokens),
    upstreamSums: summariseUsage(rows, "upstream").sort((a, b) => b.total_tokens - a.total_tokens),
    upstreams: relay.upstreams.map((upstream) => {
      const targets = aliasTargets.filter((label) => label.split("/")[0] === upstream.name);
      return {
        name: upstream.name,
        host: upstream.host,
        byok: upstream.byok,
        check: checks.find((check) => check.name === upstream.name) ?? { answers: null },
        ...relay.metrics.upstreamAnswers(upstream.name),
        targets: [...new Set(targets)],
        openTargets: openTargets.filter((label) => label.split("/")[0] === upstream.name),
      };
    }),
    refusals: relay.metrics.refusals(),
    startedAt: relay.metrics.startedAt,
    workers: relay.config.workers,
  };
  return await adminPageResponse(view);
}

/** A day without requests. */
function emptySum(day: string): AdminView["days"][number] {
  return { key: day, requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, estimated_requests: 0 };
}

/** The token budgets a ledger caller (`user:<name>` or `address:<address>`) has this UTC day and month, and its use. */
async function budgetsUsed(relay: Relay, who: string): Promise<AdminView["callers"][number]["budgets"]> {
  const user = who.startsWith("user:") ? who.slice(5) : undefined;
  // A user since removed from the configuration has no budget any more.
  if (user !== undefined && !relay.usersByName.has(user)) return [];
  return await Promise.all(
    tokenBudgets(relay, { user, subject: who }).map(async ({ window, budget, key }) => ({
      window,
      budget,
      used: await relay.counters.get(key),
    })),
  );
}
