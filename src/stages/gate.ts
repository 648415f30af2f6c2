/**
 * The first stages: the Host header, the Origin, CORS preflights, the route, and /health.
 *
 * @module
 */

import type { RelayConfig } from "../config/variables.ts";
import { refuse, type Relay, type RequestContext } from "../context.ts";
import { errorResponse, jsonResponse, preflightHeaders } from "../http.ts";
import { upstreamHealth } from "../probe.ts";

/** Stage: request target. A Host header that is not a host name (it could move the path or query) gets 400. */
export function checkHost(_relay: Relay, context: RequestContext): Response | undefined {
  if (context.validHost) return undefined;
  return refuse(
    context,
    "invalid_host",
    400,
    "the Host header must be a host name or address with an optional port",
    "invalid_host",
  );
}

/** Host names no resolver is asked about: an IPv4 address as browsers write it, or an IPv6 one in brackets. */
const ADDRESS_LITERAL = /^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\])$/;

/**
 * The host names the relay knows it serves, lowercased as a URL has them: the loopback names, PUBLIC_URL's host,
 * and HOST unless it listens everywhere (0.0.0.0, ::), where it names nothing. A DNS name outside these may point
 * at the relay for a moment only (DNS rebinding), so it is never taken for the relay's own.
 */
export function servedHostNames(config: RelayConfig): Set<string> {
  const names = new Set(["localhost", "127.0.0.1", "[::1]"]);
  if (config.publicUrl) names.add(new URL(config.publicUrl).hostname);
  const host = config.host.toLowerCase().replace(/^([0-9a-f:]*:[0-9a-f:.]*)$/, "[$1]");
  if (host !== "" && host !== "0.0.0.0" && host !== "[::]") names.add(host);
  return names;
}

/**
 * Whether the request comes from a page of the relay's own origin (its page at /). A browser never lets another page
 * send that Origin, but the Host it sends is whatever name the page was loaded from: a page of an attacker's name
 * that resolves to the relay a moment later (DNS rebinding) sends an Origin matching its Host too. So the Origin
 * is the relay's own when it is PUBLIC_URL's, or when it matches the Host and that Host is a name the relay knows
 * it serves (`servedHostNames`) or an address literal, which no DNS answer can rebind.
 */
function isSameOrigin(relay: Relay, context: RequestContext): boolean {
  if (context.origin === null) return false;
  if (context.origin === relay.publicOrigin) return true;
  let url: URL;
  try {
    url = new URL(context.origin);
  } catch {
    return false;
  }
  if (url.host !== context.request.headers.get("host")?.toLowerCase()) return false;
  return relay.servedHosts.has(url.hostname) || ADDRESS_LITERAL.test(url.hostname);
}

/**
 * Stage: origin. A browser origin that is not in ALLOWED_ORIGIN (nor the relay's own page, `isSameOrigin`) gets 403 without CORS
 * headers, so the page cannot read it, and nothing reaches the upstream. Requests without Origin (servers, curl)
 * pass on.
 */
export function checkOrigin(relay: Relay, context: RequestContext): Response | undefined {
  if (context.origin === null || relay.allowedOrigins.has(context.origin) || isSameOrigin(relay, context)) {
    return undefined;
  }
  return errorResponse(
    403,
    `origin ${context.origin} is not allowed; add it to ALLOWED_ORIGIN`,
    "origin_not_allowed",
  );
}

/** Stage: preflight. An OPTIONS request on any path is answered here, before credentials are asked for. */
export function answerPreflight(_relay: Relay, context: RequestContext): Response | undefined {
  if (context.request.method !== "OPTIONS") return undefined;
  const headers = context.origin ? preflightHeaders(context.origin, context.request) : { allow: "GET, POST, OPTIONS" };
  return new Response(null, { status: 204, headers });
}

/** Stage: route. Only the paths in the route table exist (404 otherwise), each with one method (405 otherwise). */
export function matchRoute(relay: Relay, context: RequestContext): Response | undefined {
  const { basePath } = relay.config;
  const full = context.url.pathname;
  const inside = basePath === "" || full === basePath || full.startsWith(`${basePath}/`);
  const pathname = inside ? full.slice(basePath.length) || "/" : "";
  const route = Object.hasOwn(relay.routes, pathname) ? relay.routes[pathname] : undefined;
  if (!route && pathname.startsWith("/v1/v1/")) {
    return errorResponse(
      404,
      "the path has /v1 twice: remove the extra /v1 from the client's base URL (an SDK's base URL ends in one /v1; MC's relay URL has none)",
      "unknown_url",
    );
  }
  if (!route) {
    // The path is not repeated: an answer must not tell whether a guessed path matched a secret.
    const served = Object.keys(relay.routes).map((path) => `${basePath}${path}`).join(", ");
    return errorResponse(404, `unknown path; the relay serves ${served}`, "unknown_url");
  }
  if (context.request.method !== route.method) {
    return errorResponse(
      405,
      `${context.request.method} is not allowed on ${pathname}; use ${route.method}`,
      "method_not_allowed",
      { allow: `${route.method}, OPTIONS` },
    );
  }
  context.route = route;
  context.routePath = pathname;
  return undefined;
}

/**
 * Stage: GET /health answers without credentials: `ok`, how many upstreams there are (as MC's relay does), and
 * the counter store's `state` (`degraded` while Redis is unreachable: still 200, the relay still serves). It is the
 * relay's liveness, so it stays 200 while an upstream is down; `upstreams` says whether each answers, from the cached
 * check of src/probe.ts (never one probe per health check).
 */
export async function answerHealth(relay: Relay, _context: RequestContext): Promise<Response | undefined> {
  const upstreams = await upstreamHealth(relay.config);
  return jsonResponse({
    status: "ok",
    ok: true,
    endpoints: relay.upstreams.length,
    state: relay.counters.state ?? "ok",
    ...(Object.keys(relay.config.modelAliases).length > 0 && { breakers_open: relay.breakers.open() }),
    upstreams,
  });
}
