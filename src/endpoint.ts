/**
 * MC's "Endpoint" setting for this relay. MC sends it with every request as `X-Relay-Endpoint` and the relay picks
 * the upstream it names. The page and /mc-settings.json show it to anyone, so an upstream on an internal address
 * is named (`upstream:<name>`) rather than shown: its address stays unpublished, and the relay accepts the name
 * besides the URL.
 *
 * @module
 */

import { inRanges, parseAddressRange, PRIVATE_RANGES } from "./config/values.ts";
import type { RelayConfig, Upstream } from "./config/variables.ts";

/** The ranges whose addresses are internal: loopback, private, link-local, and the unspecified addresses. */
const INTERNAL_RANGES = [...PRIVATE_RANGES, "0.0.0.0/8", "100.64.0.0/10", "::/128"].map((range) =>
  parseAddressRange(range)!
);

/**
 * Whether a host name names an internal machine: a loopback or private address, `localhost`, a name without a dot
 * (a compose or Kubernetes service, e.g. `vllm`), or a name under a suffix that only a local network resolves.
 */
export function isInternalHost(hostname: string): boolean {
  const host = hostname.toLowerCase().replace(/^\[|\]$/g, "").replace(/\.$/, "");
  if (host.includes(":") || /^[\d.]+$/.test(host)) return inRanges(host, INTERNAL_RANGES);
  return !host.includes(".") || /\.(localhost|local|internal|lan|home\.arpa)$/.test(host);
}

/**
 * How messages to clients name an upstream: its host when its URL is published, else `upstream:<name>`, so an error
 * (unreachable, timed out, rate-limited) never tells a public relay's callers an internal address. The log keeps the
 * host.
 */
export function shownHost(config: RelayConfig, upstream: Upstream): string {
  return mcEndpoint(config, upstream) === endpointName(upstream)
    ? endpointName(upstream)
    : new URL(upstream.baseUrl).host;
}

/** The value an upstream is named by instead of its URL. */
export function endpointName(upstream: Upstream): string {
  return `upstream:${upstream.name}`;
}

/**
 * What MC is given as the endpoint of an upstream: its base URL as configured (a trailing slash kept), unless
 * PUBLISH_UPSTREAM_URL says otherwise or, by default, its host is internal: then `upstream:<name>`.
 */
export function mcEndpoint(config: RelayConfig, upstream: Upstream): string {
  const publish = config.publishUpstreamUrl ?? !isInternalHost(new URL(upstream.baseUrl).hostname);
  return publish ? upstream.shownUrl ?? upstream.baseUrl : endpointName(upstream);
}

/**
 * Whether an X-Relay-Endpoint value (trimmed, trailing slashes removed) picks an upstream: its name as
 * `upstream:<name>`, its base URL, or a URL under it.
 */
export function endpointPicks(endpoint: string, upstream: Upstream): boolean {
  return endpoint === endpointName(upstream) || endpoint === upstream.baseUrl ||
    endpoint.startsWith(`${upstream.baseUrl}/`);
}
