/**
 * The route table: every path the relay serves (the only paths that ever reach an upstream), and the ones
 * DISABLED_PATHS may turn off. Configuration checks paths against it, the handler serves it.
 *
 * @module
 */

/** Routes that had to be switched on with ALLOWED_PATHS before 0.2; all are on now (DISABLED_PATHS turns any off). */
export const OPTIONAL_ROUTES = ["/v1/embeddings", "/v1/completions", "/v1/responses"];

/** One route the relay serves: the only paths that ever reach the upstream are these. */
export interface Route {
  method: "GET" | "POST";
  /** Path appended to UPSTREAM_BASE_URL; absent for routes the relay answers itself. */
  upstreamPath?: string;
}

/** The routes, matched exactly against the normalised path. */
export const ROUTES: Record<string, Route> = {
  "/": { method: "GET" },
  "/mc-settings.json": { method: "GET" },
  "/health": { method: "GET" },
  "/usage": { method: "GET" },
  "/seal": { method: "POST" },
  "/v1/models": { method: "GET", upstreamPath: "/models" },
  "/v1/chat/completions": { method: "POST", upstreamPath: "/chat/completions" },
  "/v1/completions": { method: "POST", upstreamPath: "/completions" },
  "/v1/embeddings": { method: "POST", upstreamPath: "/embeddings" },
  "/v1/responses": { method: "POST", upstreamPath: "/responses" },
};
