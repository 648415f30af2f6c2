/**
 * Token usage read from upstream answers: from a whole JSON body or from the server-sent events of a stream, as they
 * pass (`usageReader`); and the ledger's figures summed and shown (`summariseUsage`, `formatUsage`), for
 * `mc-relay usage` and /admin/usage alike.
 *
 * @module
 */

import type { LedgerRow } from "./stores/counter.ts";
import { parseJsonText, textEncoder } from "./text.ts";

/** What the relay watches for in a chat or completion answer to log its token usage. */
export interface UsageWatch {
  /** The relay asked for the usage event, so the client does not get it. */
  stripUsageEvent: boolean;
}

/** Tokens one answer used, as the upstream reported them. */
export interface TokenUsage {
  /** Tokens of the prompt. */
  prompt_tokens?: number;
  /** Tokens of the answer. */
  completion_tokens?: number;
  /** Both. */
  total_tokens?: number;
  /** True when the relay estimated these figures because the upstream reported none. */
  estimated?: boolean;
}

/** A `"usage": {` in an event's text. */
const USAGE_OBJECT = /"usage"\s*:\s*\{/;

/** Largest non-streamed answer whose usage the relay reads (larger ones pass on, uncounted). */
const MAX_USAGE_BODY_BYTES = 4 * 1024 * 1024;

/**
 * The most tokens one answer's usage may report, per figure: a hundred times the largest context windows, so an
 * honest report never comes near it, and far below where sums of such figures stop being exact integers.
 */
export const MAX_REPORTED_TOKENS = 1_000_000_000;

/**
 * The token usage in an answer or event: `usage` at the top (chat, completions, embeddings) or in `response`
 * (the Responses API's final event), with the Responses API's `input_tokens`/`output_tokens` names too. Undefined
 * when a figure is not a whole number from 0 to MAX_REPORTED_TOKENS (a buggy or hostile upstream): then the answer
 * is charged an estimate, as one without usage is.
 */
export function pickUsage(value: unknown): TokenUsage | undefined {
  const container = value as { usage?: unknown; response?: { usage?: unknown } } | undefined;
  const usage = (container?.usage ?? container?.response?.usage) as Record<string, unknown> | undefined | null;
  if (typeof usage !== "object" || usage === null) return undefined;
  let believable = true;
  const count = (...names: string[]) => {
    for (const name of names) {
      const value = usage[name];
      if (value === undefined || value === null) continue;
      // Added to budget counters and the ledger: a count no answer can have (1e300, negative, a fraction, a text)
      // would break them or give tokens back, so the whole report is set aside and the answer is estimated instead.
      if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > MAX_REPORTED_TOKENS) {
        believable = false;
      }
      return value as number;
    }
    return undefined;
  };
  const prompt = count("prompt_tokens", "input_tokens");
  const completion = count("completion_tokens", "output_tokens");
  const total = count("total_tokens");
  if (!believable) return undefined;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: total ?? (prompt ?? 0) + (completion ?? 0),
  };
}

/**
 * Reads token usage from an answer while it passes. A streamed answer is split into whole server-sent events
 * (an incomplete event waits for its end, as any SSE client does), and the usage event the relay asked for is
 * dropped; a JSON answer is copied aside (up to MAX_USAGE_BODY_BYTES) and read when it ends. Bytes pass on as
 * they came, apart from a dropped event.
 */
export function usageReader(watch: UsageWatch, eventStream: boolean) {
  let usage: TokenUsage | undefined;
  if (!eventStream) {
    const copies: Uint8Array[] = [];
    let size = 0;
    return {
      transform(chunk: Uint8Array) {
        const copy = chunk.slice();
        size += copy.byteLength;
        if (size <= MAX_USAGE_BODY_BYTES) copies.push(copy);
        return copy;
      },
      flush() {
        if (size <= MAX_USAGE_BODY_BYTES) {
          const decoder = new TextDecoder();
          const text = copies.map((copy) => decoder.decode(copy, { stream: true })).join("") + decoder.decode();
          usage = pickUsage(parseJsonText(text));
        }
        return new Uint8Array(0);
      },
      result: () => usage,
      events: undefined,
    };
  }
  // Linear in the stream's length: each chunk is scanned once (with the last three characters before it, where
  // a boundary may start), and an event's text is joined only when it is complete.
  const decoder = new TextDecoder();
  let parts: string[] = [];
  let carry = "";
  let events = 0;
  const passEvents = (text: string, final: boolean) => {
    const scan = carry + text;
    carry = "";
    let out = "";
    let start = 0;
    EVENT_BOUNDARY.lastIndex = 0;
    for (let match; (match = EVENT_BOUNDARY.exec(scan)) !== null;) {
      const end = match.index + match[0].length;
      // A "\r" at the very end may be the first half of a "\r\n" still on its way.
      if (!final && end === scan.length && match[0].endsWith("\r")) break;
      const event = parts.join("") + scan.slice(start, match.index);
      parts = [];
      start = end;
      if (event.includes("data:")) events++;
      if (!isDroppedUsageEvent(event)) out += event + match[0];
    }
    const rest = scan.slice(start);
    if (final) {
      out += parts.join("") + rest;
      parts = [];
    } else {
      const keep = Math.min(3, rest.length);
      // Only a real part is held: an empty one would keep every later chunk off the common path above.
      if (rest.length > keep) parts.push(rest.slice(0, rest.length - keep));
      carry = rest.slice(rest.length - keep);
    }
    return textEncoder.encode(out);
  };
  /** Reads usage from an event; true when it is the usage event the relay asked for, to be taken out. */
  const isDroppedUsageEvent = (event: string) => {
    // Only an event with a usage object is parsed (OpenAI also sends "usage":null on every other chunk).
    if (!USAGE_OBJECT.test(event)) return false;
    const data = parseJsonText(
      event.split(/\r\n|\r|\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5)).join("\n"),
    );
    const found = pickUsage(data);
    if (found) usage = found;
    const choices = (data as { choices?: unknown[] } | undefined)?.choices;
    return found !== undefined && watch.stripUsageEvent && Array.isArray(choices) && choices.length === 0;
  };
  return {
    transform(chunk: Uint8Array) {
      const text = decoder.decode(chunk, { stream: true });
      // The common chunk: whole events, nothing held back, no usage in it. It goes on as it came, only counted.
      if (parts.length === 0 && carry === "" && endsAtEventBoundary(chunk) && !USAGE_OBJECT.test(text)) {
        for (let at = text.indexOf("data:"); at !== -1; at = text.indexOf("data:", at + 5)) events++;
        return chunk.slice();
      }
      return passEvents(text, false);
    },
    flush: () => passEvents(decoder.decode(), true),
    result: () => usage,
    events: () => events,
  };
}

/** Whether bytes end with a blank line (`\n\n` or `\r\n\r\n`): no event and no character is left incomplete. */
export function endsAtEventBoundary(bytes: Uint8Array): boolean {
  const n = bytes.length;
  return n >= 2 && bytes[n - 1] === 10 &&
    (bytes[n - 2] === 10 || (n >= 4 && bytes[n - 2] === 13 && bytes[n - 3] === 10));
}

/** The end of a server-sent event: two line endings, each CRLF, LF or a lone CR. */
const EVENT_BOUNDARY = /(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))/g;

/** What `mc-relay usage` was asked for. */
export interface UsageQuery {
  /** First UTC day, `YYYY-MM-DD`. */
  since: string;
  /** Last UTC day, `YYYY-MM-DD`. */
  until: string;
  /** The column the rows are summed by. */
  by: "user" | "model" | "upstream" | "day";
  /** The output format. */
  format: "table" | "csv" | "json";
}

/** Reads `--since`, `--until`, `--by` and `--format` (each `--name value` or `--name=value`); a problem as text. */
export function parseUsageArgs(args: string[], today: string): UsageQuery | { problem: string } {
  const query: UsageQuery = { since: `${today.slice(0, 7)}-01`, until: today, by: "user", format: "table" };
  const allowed: Record<string, RegExp> = {
    since: /^\d{4}-\d{2}-\d{2}$/,
    until: /^\d{4}-\d{2}-\d{2}$/,
    by: /^(user|model|upstream|day)$/,
    format: /^(table|csv|json)$/,
  };
  for (let index = 0; index < args.length; index++) {
    const [flag, inline] = args[index].split(/=(.*)/s);
    const name = flag.replace(/^--/, "");
    const value = inline ?? args[++index];
    if (!flag.startsWith("--") || !(name in allowed)) return { problem: `unknown option "${flag}"` };
    if (value === undefined || !allowed[name].test(value)) {
      return { problem: `--${name} takes ${String(allowed[name]).replace(/^\/\^|\$\/$/g, "")}, got "${value ?? ""}"` };
    }
    (query as unknown as Record<string, string>)[name] = value;
  }
  return query;
}

/** Sums ledger rows by one column: one row per user (or address), model, upstream or day, sorted. */
export function summariseUsage(
  rows: LedgerRow[],
  by: UsageQuery["by"],
): (Omit<LedgerRow, "day" | "who" | "model" | "upstream"> & { key: string })[] {
  const sums = new Map<string, Omit<LedgerRow, "day" | "who" | "model" | "upstream"> & { key: string }>();
  for (const row of rows) {
    const key = by === "user" ? row.who : row[by];
    const sum = sums.get(key) ??
      { key, requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, estimated_requests: 0 };
    sum.requests += row.requests;
    sum.prompt_tokens += row.prompt_tokens;
    sum.completion_tokens += row.completion_tokens;
    sum.total_tokens += row.total_tokens;
    sum.estimated_requests += row.estimated_requests;
    sums.set(key, sum);
  }
  return [...sums.values()].sort((a, b) => a.key.localeCompare(b.key));
}

/**
 * Characters a terminal or an editor acts on rather than shows: C0 and C1 controls (ESC starts the escapes that
 * move the cursor, retitle the window or make links), DEL, the line and paragraph separators and the bidirectional
 * overrides (which reorder what is shown), and the backslash that starts an escape.
 */
// deno-lint-ignore no-control-regex -- matching control characters is the point
const UNSHOWABLE = /[\x00-\x1f\x7f-\x9f\\\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/**
 * A name a client chose (a model, an address) as text that shows as it is: every `UNSHOWABLE` character as an
 * escape, `\x1b` or `\u202e` (`\\` for the backslash), so names stay readable and different names stay different.
 */
export function escapeControls(text: string): string {
  return text.replace(UNSHOWABLE, (char) => {
    if (char === "\\") return "\\\\";
    const code = char.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

/**
 * A CSV cell (RFC 4180) that a spreadsheet shows and never runs: controls escaped as in the table (the CSV is
 * printed to a terminal too), a cell that would start a formula (=, +, -, @, tab, carriage return, or those after
 * spaces, or their full-width forms) prefixed with a single quote as OWASP's CSV-injection guidance says, and such a
 * cell, or one with a quote or comma, quoted.
 */
export function csvCell(text: string): string {
  const shown = escapeControls(text);
  const formula = /^[\s\u3000]*[=+\-@\t\r\uff1d\uff0b\uff0d\uff20]/.test(shown);
  const cell = formula ? `'${shown}` : shown;
  return formula || /[",]/.test(cell) ? `"${cell.replaceAll('"', '""')}"` : cell;
}

/** The summed ledger as a table (with a total line), CSV or JSON; client-chosen names are shown safely. */
export function formatUsage(sums: ReturnType<typeof summariseUsage>, query: UsageQuery): string {
  const columns = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_requests"] as const;
  if (query.format === "json") {
    return JSON.stringify(
      {
        since: query.since,
        until: query.until,
        by: query.by,
        rows: sums.map(({ key, ...sum }) => ({ [query.by]: key, ...sum })),
      },
      null,
      2,
    );
  }
  if (query.format === "csv") {
    return [
      [query.by, ...columns].join(","),
      ...sums.map((sum) => [csvCell(sum.key), ...columns.map((name) => sum[name])].join(",")),
    ].join("\n");
  }
  const total = {
    key: "total",
    requests: 0,
    prompt_tokens: 0,
    completion_tokens: 0,
    total_tokens: 0,
    estimated_requests: 0,
  };
  for (const sum of sums) for (const name of columns) total[name] += sum[name];
  const lines = [
    [query.by, ...columns],
    ...[...sums, total].map((sum) => [escapeControls(sum.key), ...columns.map((name) => String(sum[name]))]),
  ];
  const widths = lines[0].map((_, column) => Math.max(...lines.map((line) => line[column].length)));
  const render = (line: string[]) =>
    line.map((cell, column) => column === 0 ? cell.padEnd(widths[column]) : cell.padStart(widths[column])).join("  ");
  return [`usage ${query.since} to ${query.until} (UTC days), by ${query.by}`, ...lines.map(render)].join("\n");
}
