/**
 * The HTML of /admin: the usage chart (an SVG the relay draws), the tables, health and refusals. No script at all:
 * it reads the same without JavaScript, and its CSP allows its own style only. Every value a client could have chosen
 * (a model, an address, a user name) is shown escaped: controls as `escapeControls` shows them, then HTML-escaped.
 *
 * @module
 */

import { VERSION } from "./config/variables.ts";
import { escapeHtml } from "./page.ts";
import { textEncoder } from "./text.ts";
import { escapeControls, type summariseUsage } from "./usage.ts";

/** One summed row of the ledger: a caller, model, upstream or day. */
type Sum = ReturnType<typeof summariseUsage>[number];

/** What the page shows; made by the /admin stage (src/stages/admin.ts). */
export interface AdminView {
  since: string;
  until: string;
  basePath: string;
  /** "none": a memory store keeps no ledger; "unreadable": Redis is out of reach. */
  ledger: "ok" | "none" | "unreadable";
  store: { kind: "memory" | "SQLite" | "Redis"; degraded: boolean };
  /** Every day of the period, days without requests included. */
  days: Sum[];
  /** The callers with the most tokens first, each with its token budgets now. */
  callers: (Sum & { budgets: { window: "day" | "month"; budget: number; used: number }[] })[];
  /** Callers not listed (past the page's limit). */
  callersLeft: number;
  models: Sum[];
  upstreamSums: Sum[];
  upstreams: {
    name: string;
    host: string;
    byok: boolean;
    answered: number;
    failed: number;
    /** The last check of its `/models` (the one /health reports): null when not checked (BYOK, or not yet). */
    check: { answers: boolean | null; status?: number; problem?: string };
    /** Alias targets on this upstream (`upstream/model`), and those whose breaker is open. */
    targets: string[];
    openTargets: string[];
  }[];
  refusals: { status: number; reason: string; count: number }[];
  startedAt: number;
  workers: number;
}

/** A name a client chose, for HTML: controls shown as escapes (as `mc-relay usage` shows them), then escaped. */
const shown = (text: string) => escapeHtml(escapeControls(text));

/** A whole number with thousands separators. */
const count = (value: number) => value.toLocaleString("en-US");

/** What each refusal reason (the log's outcome) means, with the variable to look at. */
const REASONS: Record<string, string> = {
  "401 ": "no credentials, or wrong ones",
  "401 auth_required": "no key for a BYOK upstream",
  "401 caller_key_refused": "a caller's own key refused",
  "401 sealed_key_refused": "a sealed key that does not open",
  "403 ": "origin not in ALLOWED_ORIGIN, or a user not allowed there",
  "403 admin_not_allowed": "a user not in ADMINS opened /admin",
  "429 relay_rate_limited": "request limit (RATE_LIMIT_PER_MINUTE, _HOUR, _DAY)",
  "429 relay_concurrency_limited": "requests in flight (CONCURRENT_REQUESTS)",
  "429 token_budget_exceeded": "token budget (TOKEN_BUDGET_PER_DAY, _MONTH)",
  "429 auth_locked_out": "failed sign-ins (AUTH_FAILURES_PER_MINUTE)",
  "429 sign_in_address_busy": "too many sign-ins from one address at once",
  "429 seal_rate_limited": "too many /seal requests",
  "502 upstream_unreachable": "upstream unreachable",
  "502 upstream_redirect": "upstream answered with a redirect",
  "503 upstreams_unavailable": "every target of an alias failed or has its breaker open",
  "503 sign_in_busy": "password checks saturated",
  "504 upstream_timeout": "upstream did not answer in REQUEST_TIMEOUT_SECONDS",
};

/** The statuses the page always lists, at 0 when none happened. */
const LISTED_STATUSES = [401, 403, 429, 502, 504];

/** The page as a response: no script, its style allowed by hash, never cached, never framed. */
export async function adminPageResponse(view: AdminView): Promise<Response> {
  const body = textEncoder.encode(adminHtml(view));
  return new Response(body, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-length": String(body.byteLength),
      "content-security-policy":
        `default-src 'none'; style-src '${await styleHash}'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'`,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-store",
    },
  });
}

/** The whole page. */
function adminHtml(view: AdminView): string {
  const base = escapeHtml(`${view.basePath}/admin`);
  const period = `since=${view.since}&amp;until=${view.until}`;
  const totals = view.days.reduce(
    (sum, day) => ({
      requests: sum.requests + day.requests,
      tokens: sum.tokens + day.total_tokens,
      prompt: sum.prompt + day.prompt_tokens,
      completion: sum.completion + day.completion_tokens,
    }),
    { requests: 0, tokens: 0, prompt: 0, completion: 0 },
  );
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>mc-relay: usage ${view.since} to ${view.until}</title>
<link rel="icon" href="data:,">
<style>${ADMIN_STYLE}</style>
</head>
<body>
<a class="skip" href="#callers-caption">Skip to the callers</a>
<main>
<h1>mc-relay: the operator's view</h1>
<form method="get" action="${base}" class="period" aria-label="Period">
<div><label for="since">From (UTC day)</label><input id="since" name="since" type="date" value="${view.since}" required></div>
<div><label for="until">To (UTC day)</label><input id="until" name="until" type="date" value="${view.until}" required></div>
<button type="submit">Show</button>
<a href="${base}">This month</a>
</form>
${notice(view)}
<h2>Usage <span class="budget">${view.since}</span> to <span class="budget">${view.until}</span></h2>
<p class="totals">${count(totals.requests)} requests, ${count(totals.tokens)} tokens (${count(totals.prompt)} prompt, ${
    count(totals.completion)
  } completion). As JSON: <a href="${base}/usage?${period}">by caller</a>, <a href="${base}/usage?${period}&amp;by=day">by day</a>; as CSV: <a href="${base}/usage?${period}&amp;format=csv">by caller</a>, <a href="${base}/usage?${period}&amp;by=model&amp;format=csv">by model</a>.</p>
${charts(view)}
<h2 id="callers-heading">Top callers</h2>
${
    table(
      "callers",
      `Callers ${view.since} to ${view.until}, most tokens first${
        view.callersLeft > 0 ? ` (${count(view.callersLeft)} more in /admin/usage)` : ""
      }`,
      ["Caller", "Requests", "Prompt tokens", "Completion tokens", "Total tokens", "Budget used now"],
      view.callers.map((caller) => [shown(caller.key), ...figures(caller), budgetText(caller.budgets)]),
      [5],
    )
  }
<h2>Per model and upstream</h2>
${
    table(
      "models",
      "Models the callers asked for",
      ["Model", "Requests", "Prompt tokens", "Completion tokens", "Total tokens"],
      view.models.map((sum) => [sum.key === "" ? "<i>none named</i>" : shown(sum.key), ...figures(sum)]),
    )
  }
${
    table(
      "upstream-usage",
      "Upstreams that answered",
      ["Upstream", "Requests", "Prompt tokens", "Completion tokens", "Total tokens"],
      view.upstreamSums.map((sum) => [shown(sum.key), ...figures(sum)]),
    )
  }
<h2>Health now</h2>
${health(view)}
<h2>Refusals since ${new Date(view.startedAt).toISOString().slice(0, 16).replace("T", " ")} UTC</h2>
${
    table(
      "refusals",
      `Requests the relay refused or could not serve since it started${
        view.workers > 1 ? ` (this thread's; WORKERS=${view.workers})` : ""
      }`,
      ["Status", "Reason", "Requests"],
      refusalRows(view.refusals),
      [1],
    )
  }
<p class="note">mc-relay ${VERSION}. Figures per UTC day from the usage ledger; health and refusals from this process's memory.</p>
</main>
</body>
</html>
`;
}

/** The line above the figures when the ledger cannot show them. */
function notice(view: AdminView): string {
  if (view.ledger === "none") {
    return `<p class="notice" role="status">This relay counts in memory and keeps no usage ledger, so there are no usage figures: set <code>STATE_PATH</code> (a SQLite file) or <code>REDIS_URL</code> to keep them. Health and refusals below still show.</p>`;
  }
  if (view.ledger === "unreadable") {
    return `<p class="notice" role="status">Redis (<code>REDIS_URL</code>) cannot be reached: the usage ledger cannot be read now, and this copy counts limits and budgets alone.</p>`;
  }
  return "";
}

/** Requests, prompt, completion and total tokens, formatted; estimated requests noted. */
function figures(sum: Sum): string[] {
  const estimated = sum.estimated_requests > 0
    ? ` <span class="note">(${count(sum.estimated_requests)} estimated)</span>`
    : "";
  return [
    `${count(sum.requests)}${estimated}`,
    count(sum.prompt_tokens),
    count(sum.completion_tokens),
    count(sum.total_tokens),
  ];
}

/** A caller's budgets now, e.g. "1,200 of 100,000 this month (1%)". */
function budgetText(budgets: AdminView["callers"][number]["budgets"]): string {
  if (budgets.length === 0) return `<span class="note">no budget</span>`;
  return budgets.map(({ window, budget, used }) => {
    const percent = Math.floor((used / budget) * 100);
    const text = `${count(used)} of ${count(budget)} this ${window} (${percent}%)`;
    return used >= budget
      ? `<strong class="spent budget">${text}, spent</strong>`
      : `<span class="budget">${text}</span>`;
  }).join("<br>");
}

/** A data table in a scrollable, focusable region (wide tables scroll sideways on a phone). */
function table(id: string, caption: string, headers: string[], rows: string[][], text: number[] = []): string {
  const align = (index: number) => index > 0 && !text.includes(index) ? ' class="num"' : "";
  const head = headers.map((header, index) => `<th scope="col"${align(index)}>${header}</th>`);
  const body = rows.length === 0
    ? `<tr><td colspan="${headers.length}">none in this period</td></tr>`
    : rows.map((cells) =>
      `<tr><th scope="row">${cells[0]}</th>${
        cells.slice(1).map((cell, at) => `<td${align(at + 1)}>${cell}</td>`).join("")
      }</tr>`
    ).join("\n");
  return `<div class="scroll" role="region" aria-labelledby="${id}-caption" tabindex="0">
<table id="${id}"><caption id="${id}-caption">${caption}</caption>
<thead><tr>${head.join("")}</tr></thead>
<tbody>
${body}
</tbody></table></div>`;
}

/** The refusals, the usual statuses always listed. */
function refusalRows(refusals: AdminView["refusals"]): string[][] {
  const rows = refusals.map(({ status, reason, count: requests }) => [
    String(status),
    REASONS[`${status} ${reason}`] ?? (reason === "" ? "" : `<code>${shown(reason)}</code>`),
    count(requests),
  ]);
  for (const status of LISTED_STATUSES) {
    if (!refusals.some((refusal) => refusal.status === status)) rows.push([String(status), "none", "0"]);
  }
  return rows.sort((a, b) => Number(a[0]) - Number(b[0]));
}

/** The store, the upstreams and their breakers. */
function health(view: AdminView): string {
  const where = { memory: "memory (no ledger)", SQLite: "SQLite (STATE_PATH)", Redis: "Redis (REDIS_URL)" }[
    view.store.kind
  ];
  const state = view.store.degraded
    ? `<strong class="spent">degraded</strong>: Redis unreachable, this copy counts alone`
    : "ok";
  const rows = view.upstreams.map((upstream) => {
    const status = upstream.openTargets.length > 0
      ? `<strong class="spent">breaker open: ${upstream.openTargets.map(shown).join(", ")}</strong>`
      : upstream.check.answers === false
      ? `<strong class="spent">not answering its check</strong> (${
        shown(upstream.check.problem ?? `status ${upstream.check.status}`)
      })`
      : upstream.failed > 0 && upstream.answered === 0
      ? `<strong class="spent">failing</strong>`
      : upstream.answered + upstream.failed === 0
      ? upstream.check.answers ? "answers its check; no calls yet" : "no calls yet"
      : "answering";
    return [
      `${shown(upstream.name)}${upstream.byok ? ' <span class="note">(BYOK)</span>' : ""}`,
      shown(upstream.host),
      status,
      count(upstream.answered),
      count(upstream.failed),
    ];
  });
  return `<dl class="facts"><dt>Counter store</dt><dd>${where}, ${state}</dd></dl>
${
    table(
      "upstreams",
      "Upstreams since start: calls answered, and failed (no answer, or 5xx)",
      [
        "Upstream",
        "Host",
        "State",
        "Answered",
        "Failed",
      ],
      rows,
      [1, 2],
    )
  }`;
}

/** The two charts (tokens, requests per day) and the table they stand for. */
function charts(view: AdminView): string {
  const tokens = barChart(
    "tokens",
    "Tokens per day",
    view.days,
    (day) => [day.prompt_tokens, day.completion_tokens],
    ["prompt", "completion"],
  );
  const requests = barChart("requests", "Requests per day", view.days, (day) => [day.requests], ["requests"]);
  const rows = view.days.map((day) => [day.key, ...figures(day)]);
  return `<div class="charts">${tokens}${requests}</div>
<details><summary>The figures per day, as a table</summary>
${
    table("days", "Requests and tokens per UTC day", [
      "Day",
      "Requests",
      "Prompt tokens",
      "Completion tokens",
      "Total tokens",
    ], rows)
  }
</details>`;
}

/**
 * One bar chart: a bar per day, stacked from `parts`. The SVG carries no text (it stretches to any width); the
 * scale and the days are HTML around it, and its title and description say what it shows for a screen reader.
 */
function barChart(id: string, title: string, days: Sum[], parts: (day: Sum) => number[], names: string[]): string {
  const values = days.map(parts);
  const totals = values.map((part) => part.reduce((a, b) => a + b, 0));
  const peak = Math.max(0, ...totals);
  const peakDay = days[totals.indexOf(peak)]?.key;
  const sum = totals.reduce((a, b) => a + b, 0);
  const width = days.length * 10;
  const bars = values.map((part, index) => {
    let y = 100;
    const label = `${days[index].key}: ${part.map((value, at) => `${count(value)} ${names[at]}`).join(", ")}`;
    const rects = part.map((value, at) => {
      const height = peak === 0 ? 0 : (value / peak) * 96;
      y -= height;
      return `<rect class="bar-${at}" x="${index * 10 + 1.5}" y="${y.toFixed(2)}" width="7" height="${
        height.toFixed(2)
      }"/>`;
    }).join("");
    return `<g><title>${label}</title>${rects}</g>`;
  }).join("");
  const description = sum === 0
    ? `No ${names.join(" or ")} from ${days[0].key} to ${days.at(-1)!.key}.`
    : `${count(sum)} in all from ${days[0].key} to ${days.at(-1)!.key}; the most, ${count(peak)}, on ${peakDay}.`;
  const legend = names.length > 1
    ? `<p class="legend" aria-hidden="true">${
      names.map((name, at) => `<span class="key key-${at}"></span>${name}`).join(" ")
    }</p>`
    : "";
  return `<figure class="chart">
<figcaption id="${id}-title">${title}</figcaption>
${legend}<div class="plot"><span class="peak" aria-hidden="true">${count(peak)}</span>
<svg viewBox="0 0 ${width} 100" preserveAspectRatio="none" role="img" aria-labelledby="${id}-title ${id}-desc">
<desc id="${id}-desc">${description}</desc>
<line class="axis" x1="0" y1="100" x2="${width}" y2="100" vector-effect="non-scaling-stroke"/>
<line class="grid" x1="0" y1="4" x2="${width}" y2="4" vector-effect="non-scaling-stroke"/>${bars}</svg></div>
<p class="days" aria-hidden="true"><span>${days[0].key}</span><span>${days.at(-1)!.key}</span></p>
</figure>`;
}

/** The page's style: the relay page's look, tables that scroll on a phone, chart colours for light and dark. */
const ADMIN_STYLE = `
body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fff}
main{max-width:64rem;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 1rem}h2{font-size:1.25rem;margin:2rem 0 .5rem}
a{color:#0b57d0}code{font:0.95em ui-monospace,monospace;background:#f0f0f0;padding:0 .2em;border-radius:3px}
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:.5rem;background:#fff;padding:.25rem .5rem}
.period{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:flex-end}
.period label{display:block;font-weight:600;font-size:.9rem}
input{font:inherit;padding:.3rem;border:1px solid #555;border-radius:4px;background:#fff;color:inherit}
button{font:inherit;padding:.35rem .9rem;border:1px solid #0b57d0;border-radius:4px;background:#0b57d0;color:#fff;cursor:pointer}
:focus-visible{outline:3px solid #e37400;outline-offset:2px}
.notice{border-left:4px solid #b3261e;background:#fdecea;padding:.5rem .75rem}
.note{font-size:.9rem;color:#444}.spent{color:#b3261e}
.scroll{overflow-x:auto;margin:.5rem 0 1.25rem}
table{border-collapse:collapse;min-width:100%;font-size:.95rem}
caption{text-align:left;font-weight:600;padding:.25rem 0}
th,td{padding:.3rem .6rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #888;white-space:nowrap}
tbody th{font-weight:normal;word-break:break-all;min-width:8rem}
.budget{white-space:nowrap}.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr));gap:1rem 2rem}
.chart{margin:0}.chart figcaption{font-weight:600}
.plot{position:relative;border-left:1px solid #888;padding-left:2px}
.plot svg{display:block;width:100%;height:9rem}
.peak{position:absolute;top:-.2rem;left:.3rem;font-size:.8rem;color:#444;background:#fff;padding:0 .2rem}
.axis{stroke:#888;stroke-width:1}.grid{stroke:#ccc;stroke-width:1;stroke-dasharray:4 4}
.bar-0{fill:#0b57d0}.bar-1{fill:#7aa7f0}
.days{display:flex;justify-content:space-between;font-size:.8rem;color:#444;margin:.2rem 0 0}
.legend{margin:0;font-size:.85rem}.key{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 .6rem;vertical-align:-.1rem}
.key-0{background:#0b57d0}.key-1{background:#7aa7f0}
details{margin:.75rem 0}summary{cursor:pointer;color:#0b57d0}
.facts dt{font-weight:600}.facts dd{margin:0 0 .5rem 1rem}
@media (prefers-color-scheme:dark){body{color:#eee;background:#121212}a,summary{color:#8ab4f8}code{background:#2a2a2a}
input{background:#1e1e1e;border-color:#aaa}.note,.days,.peak{color:#bbb}.peak{background:#121212}
.skip:focus{background:#121212}.notice{background:#3b1a17;border-color:#f28b82}.spent{color:#f28b82}
th,td{border-color:#444}thead th{border-color:#999}.grid{stroke:#555}
.bar-0,.key-0{fill:#8ab4f8;background:#8ab4f8}.bar-1,.key-1{fill:#3d6bb3;background:#3d6bb3}}
@media (max-width:40rem){main{padding:.75rem .75rem 2rem}h1{font-size:1.3rem}table{font-size:.85rem}
th,td{padding:.25rem .4rem}tbody th{min-width:6.5rem}}
`;

/** The CSP hash of the style, computed once. */
const styleHash = (async () => {
  const digest = await crypto.subtle.digest("SHA-256", textEncoder.encode(ADMIN_STYLE));
  return `sha256-${btoa(String.fromCharCode(...new Uint8Array(digest)))}`;
})();
