/**
 * HTTP answers the relay makes itself: OpenAI-shaped errors and JSON responses, CORS and preflight headers, the
 * response headers it drops (hop-by-hop, cookies, CORS), the errors that end an upstream call or cut a body, and the
 * phrases for upstream failures.
 *
 * @module
 */

import { HOP_BY_HOP } from "./config/parse.ts";
import { parseJsonText, textEncoder } from "./text.ts";

/** Request headers a browser may send cross-origin, besides the `x-stainless-*` and `openai-*` families. */
const ALLOWED_REQUEST_HEADERS = new Set([
  "authorization",
  "x-api-key",
  "content-type",
  "accept",
  "x-relay-endpoint",
  "idempotency-key",
]);

/** Header name prefixes OpenAI's JS SDK sends from browsers. */
const ALLOWED_REQUEST_HEADER_PREFIXES = ["x-stainless-", "openai-"];

/** Response headers a page may read: ours, rate limits and the provider's request id. */
const EXPOSED_RESPONSE_HEADERS = [
  "x-relay-request-id",
  "x-relay-upstream",
  "x-request-id",
  "retry-after",
  "openai-processing-ms",
  "x-ratelimit-limit-requests",
  "x-ratelimit-limit-tokens",
  "x-ratelimit-remaining-requests",
  "x-ratelimit-remaining-tokens",
  "x-ratelimit-reset-requests",
  "x-ratelimit-reset-tokens",
].join(", ");

/** How long a browser may cache a preflight (Chromium caps this at two hours). */
const PREFLIGHT_MAX_AGE_SECONDS = 7200;

/** The CORS headers for a response to an allowed origin (never `*`). */
export function corsHeaders(origin: string): Record<string, string> {
  return {
    "access-control-allow-origin": origin,
    "access-control-expose-headers": EXPOSED_RESPONSE_HEADERS,
  };
}

/**
 * Adds the headers the relay adds to every response to `headers` (by lower-case name): CORS for an allowed origin,
 * `Origin` in `Vary` (after what the upstream's `Vary` names), the request id.
 */
export function addRelayHeaders(
  headers: Record<string, string>,
  requestId: string,
  cors: Record<string, string>,
): Record<string, string> {
  for (const name in cors) headers[name] = cors[name];
  headers["vary"] = headers["vary"] ? `${headers["vary"]}, Origin` : "Origin";
  headers["x-relay-request-id"] = requestId;
  return headers;
}

/** Answers a preflight from an allowed origin, allowing only the request headers the relay accepts. */
export function preflightHeaders(origin: string, request: Request): Record<string, string> {
  const requested = (request.headers.get("access-control-request-headers") ?? "")
    .split(",")
    .map((name) => name.trim().toLowerCase())
    .filter((name) =>
      ALLOWED_REQUEST_HEADERS.has(name) || ALLOWED_REQUEST_HEADER_PREFIXES.some((prefix) => name.startsWith(prefix))
    );
  const headers: Record<string, string> = {
    "access-control-allow-origin": origin,
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": [...new Set([...ALLOWED_REQUEST_HEADERS, ...requested])].join(", "),
    "access-control-max-age": String(PREFLIGHT_MAX_AGE_SECONDS),
  };
  // Chromium asks before a public page may call a relay on the user's own machine or network.
  if (request.headers.get("access-control-request-private-network") === "true") {
    headers["access-control-allow-private-network"] = "true";
  }
  return headers;
}

/** No Connection tokens. */
export const NO_TOKENS: ReadonlySet<string> = new Set();

/** Response headers from the upstream that the relay drops: they describe the upstream's connection, cookies or CORS, not the answer. */
export function isDroppedResponseHeader(name: string, connectionTokens: ReadonlySet<string>): boolean {
  return HOP_BY_HOP.has(name) || connectionTokens.has(name) || name.startsWith("access-control-") ||
    name === "set-cookie" || name === "set-cookie2" || name === "alt-svc" || name === "date";
}

/** Builds an OpenAI-style error response: `{"error":{"message","type","code"}}`. */
export function errorResponse(
  status: number,
  message: string,
  code: string,
  headers: Record<string, string> = {},
): Response {
  const type = status >= 500 ? "server_error" : status === 429 ? "rate_limit_error" : "invalid_request_error";
  return jsonResponse({ error: { message: `mc-relay: ${message}`, type, code } }, { status, headers });
}

/** A JSON response the relay makes itself, with its Content-Length, so its log line has the true `bytes_out`. */
export function jsonResponse(
  body: unknown,
  init: { status?: number; headers?: Record<string, string> } = {},
): Response {
  const bytes = textEncoder.encode(JSON.stringify(body));
  return new Response(bytes, {
    status: init.status ?? 200,
    headers: { "content-type": "application/json", "content-length": String(bytes.byteLength), ...init.headers },
  });
}

/**
 * The error a relayed body ends with when the relay cuts it (upstream silent or broken): it makes Deno drop the
 * connection so the client sees the cut. Deno hands it to the server's `onError`, which knows it is deliberate.
 */
export class BodyCut extends Error {
  constructor(outcome: string) {
    super(`mc-relay: response body cut short (${outcome})`);
    this.stack = this.message;
  }
}

/** Why an upstream call ended early. */
export class RelayAbort extends Error {
  readonly #kind: "client_gone" | "upstream_timeout" | "breaker_open";
  constructor(kind: "client_gone" | "upstream_timeout" | "breaker_open") {
    super(`mc-relay: upstream request ended (${kind})`);
    this.#kind = kind;
    // Deno prints the reason when it ends a response body with it: one line, no stack, no fields.
    this.stack = this.message;
  }
  /** Which side ended it. */
  get kind() {
    return this.#kind;
  }
}

/** Prefixes a provider's 429 message so users can tell the provider's quota from the relay's own limit. */
export function explainProviderRateLimit(text: string, upstreamHost: string): string {
  const body = parseJsonText(text) as { error?: { message?: unknown } } | undefined;
  if (typeof body?.error?.message !== "string") return text; // not OpenAI's error shape: pass it on as it is
  body.error.message =
    `The provider ${upstreamHost} is rate-limiting the relay (the provider's quota or rate, not your relay user's limit): ${body.error.message}`;
  return JSON.stringify(body);
}

/** Turns a fetch error into a short, secret-free phrase for clients. */
export function describeNetworkError(message: string): string {
  if (/connection refused/i.test(message)) return "connection refused";
  if (/dns|lookup address|name or service not known|no such host/i.test(message)) return "DNS lookup failed";
  if (/certificate|tls|ssl|handshake/i.test(message)) return "TLS handshake failed";
  if (/reset/i.test(message)) return "connection reset";
  if (/timed out|timeout/i.test(message)) return "connection timed out";
  return "network error";
}
