/**
 * The stages that decide what is asked of whom: the request body (read once, one JSON object), the upstream and its
 * attempts (model aliases), the model (ALLOWED_MODELS), and the merged model list of several upstreams.
 *
 * @module
 */

import { addressKey } from "../auth.ts";
import {
  type Attempt,
  refuse,
  type Relay,
  type RequestContext,
  type StageAnswer,
  type UpstreamTarget,
} from "../context.ts";
import { deadlines } from "../deadlines.ts";
import { endpointPicks, mcEndpoint } from "../endpoint.ts";
import { describeNetworkError, jsonResponse } from "../http.ts";
import { type JsonObject, parseJson, readBody } from "../streams.ts";
import { errorText } from "../text.ts";

/**
 * ALLOWED_MODELS: whether `model` may be used on `upstreamName`. An entry whose part before the first `/` names
 * an upstream (`openai/gpt-4o`) allows that model on that upstream only; any other entry (`gpt-4o`,
 * `meta-llama/Llama-3`) allows that model on every upstream.
 */
export function modelAllowed(relay: Relay, upstreamName: string, model: string): boolean {
  if (relay.allowedModels.size === 0) return true;
  if (relay.allowedModels.has(`${upstreamName}/${model}`)) return true;
  const slash = model.indexOf("/");
  const namesUpstream = slash > 0 && relay.upstreamsByName.has(model.slice(0, slash));
  return !namesUpstream && relay.allowedModels.has(model);
}

/**
 * Stage: body checks. A POST body is read whole (413 past MAX_REQUEST_BYTES, 408 when it stalls for 10 s or does
 * not arrive in time, 503 past MAX_BUFFERED_BYTES or the caller's share of it: see `readBody`, `ByteBudget`) and
 * must be one JSON object (400 otherwise): every POST
 * route of the OpenAI API takes one. It is parsed once, and forwarded as the relay serialises it again, so
 * the upstream receives exactly what the relay checked and logs.
 */
export function readRequestBody(relay: Relay, context: RequestContext): StageAnswer {
  if (context.request.method !== "POST") return undefined;
  return readJsonBody(relay, context);
}

/** The body stage's reading and checking of a POST body. */
async function readJsonBody(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const read = await readBody(context.request, relay.bodyLimits, reserveBodyBytes(relay, context));
  if ("status" in read) {
    return refuse(context, read.outcome, read.status, read.message, read.code, read.headers);
  }
  context.log.bytesIn = read.body.byteLength;
  const payload = parseJson(read.body);
  const problem = payload === undefined ? "the body must be one JSON object" : jsonBodyProblem(payload);
  if (problem !== undefined) {
    return refuse(context, "invalid_body", 400, problem, "invalid_request_body");
  }
  context.body.payload = payload;
  context.body.changed = true;
  if (typeof payload!.model === "string") context.body.model = payload!.model;
  context.log.usageWatch = { stripUsageEvent: false };
  return undefined;
}

/**
 * What is wrong with a parsed JSON body, if anything: two top-level keys that differ only in case (Go's JSON
 * decoder, behind many upstreams, would read one where the relay read the other), a non-string `model`, or a
 * `stream` that is not true or false.
 */
function jsonBodyProblem(payload: JsonObject): string | undefined {
  const seen = new Set<string>();
  for (const key of Object.keys(payload)) {
    // Go folds case the Unicode way: besides ASCII, "ſ" matches "s" and the Kelvin sign "K" matches "k".
    const folded = key.toLowerCase().replaceAll("ſ", "s");
    if (seen.has(folded)) {
      return `the body has two keys that differ only in case (${
        JSON.stringify(folded.slice(0, 40))
      }); send each key once`;
    }
    seen.add(folded);
  }
  if (payload.model !== undefined && typeof payload.model !== "string") return '"model" must be a string';
  if (payload.stream !== undefined && typeof payload.stream !== "boolean") return '"stream" must be true or false';
  return undefined;
}

/**
 * Stage: upstream choice. A model prefix naming an upstream ("openai/gpt-4o") picks it and is stripped; else
 * MC's X-Relay-Endpoint picks the upstream it names (`upstream:<name>`) or whose base URL it starts with (400 when
 * none does); else the first.
 * A model list with several upstreams and no choice merges every upstream's list. With a single upstream the
 * operator's configuration decides: X-Relay-Endpoint is ignored.
 */
export function chooseUpstream(relay: Relay, context: RequestContext): StageAnswer {
  const { upstreams } = relay;
  if (context.body.model !== undefined && Object.hasOwn(relay.config.modelAliases, context.body.model)) {
    // An alias: `forwardRequest` tries its targets in order; the first one stands for the checks until then.
    context.upstream.alias = context.body.model;
    context.upstream.attempts = [];
    const [first] = attemptPlan(relay, context);
    context.upstream.target = first.target;
    return undefined;
  }
  const endpoint = context.request.headers.get("x-relay-endpoint")?.trim().replace(/\/+$/, "");
  const serves = (upstream: UpstreamTarget) => endpointPicks(endpoint!, upstream);
  if (upstreams.length === 1) {
    if (!endpoint || serves(upstreams[0])) return undefined;
    return refuse(
      context,
      "unknown_upstream",
      400,
      `X-Relay-Endpoint ${JSON.stringify(endpoint.slice(0, 200))} is not the endpoint this relay serves (${
        mcEndpoint(relay.config, upstreams[0])
      }); set MC's endpoint to it, or use a relay for that provider`,
      "unknown_upstream",
    );
  }
  const model = context.body.model;
  const slash = model?.indexOf("/") ?? -1;
  const byModel = slash > 0 ? relay.upstreamsByName.get(model!.slice(0, slash)) : undefined;
  if (byModel) {
    context.upstream.target = byModel;
    context.body.model = model!.slice(slash + 1);
    if (context.body.payload !== undefined) context.body.payload.model = context.body.model;
    context.body.changed = true;
  } else if (endpoint) {
    const byEndpoint = upstreams.find(serves);
    if (!byEndpoint) {
      return refuse(
        context,
        "unknown_upstream",
        400,
        `X-Relay-Endpoint ${JSON.stringify(endpoint.slice(0, 200))} matches none of this relay's upstreams (${
          upstreams.map((upstream) => upstream.name).join(", ")
        }); set MC's endpoint to one of their base URLs, or upstream:<name>`,
        "unknown_upstream",
      );
    }
    context.upstream.target = byEndpoint;
  } else if (context.route?.upstreamPath === "/models") {
    return mergedModels(relay, context);
  }
  context.upstream.label = context.upstream.target.name;
  return undefined;
}

/**
 * Stage: model allow-list. With ALLOWED_MODELS, a body without an allowed model gets 400 before the upstream, and so
 * does one whose OpenRouter `models` (the fallbacks OpenRouter tries when `model` fails) names a model that is not
 * allowed on every upstream the request may go to. `route` only says how OpenRouter uses `models`: it passes.
 */
export function checkModel(relay: Relay, context: RequestContext): Response | undefined {
  const { payload } = context.body;
  if (payload === undefined || relay.allowedModels.size === 0) return undefined;
  const fallbacks = fallbackModelsProblem(relay, context, payload);
  if (fallbacks !== undefined) {
    return refuse(context, "model_not_allowed", 400, fallbacks, "model_not_allowed");
  }
  const model = context.body.model;
  if (context.upstream.alias !== undefined && (relay.allowedModels.has(context.upstream.alias))) return undefined;
  if (
    context.upstream.alias === undefined && model !== undefined &&
    modelAllowed(relay, context.upstream.target.name, model)
  ) {
    return undefined;
  }
  return refuse(
    context,
    "model_not_allowed",
    400,
    model === undefined
      ? 'this relay needs a JSON body with a "model" (ALLOWED_MODELS is set)'
      : `model ${JSON.stringify(model.slice(0, 100))} is not allowed here; allowed: ${
        relay.config.allowedModels.join(", ")
      }`,
    "model_not_allowed",
  );
}

/**
 * What is wrong with the body's OpenRouter `models` under ALLOWED_MODELS, if anything: it must be a list of names,
 * each allowed on every upstream the request may be sent to (each target of an alias), since OpenRouter may answer
 * with any of them instead of `model`.
 */
function fallbackModelsProblem(relay: Relay, context: RequestContext, payload: JsonObject): string | undefined {
  const models = payload.models;
  if (models === undefined || models === null) return undefined;
  const allowed = relay.config.allowedModels.join(", ");
  if (!Array.isArray(models)) {
    return `"models" must be a list of model names (ALLOWED_MODELS is set; allowed: ${allowed})`;
  }
  const targets = attemptPlan(relay, context).map((attempt) => attempt.target.name);
  const refused = models.find((model) =>
    typeof model !== "string" || !targets.every((target) => modelAllowed(relay, target, model))
  );
  if (refused === undefined) return undefined;
  return `"models" names ${
    JSON.stringify(String(refused).slice(0, 100))
  }, which is not allowed here; allowed: ${allowed}`;
}

/**
 * The headers every request to `target` carries: its extra headers, its key (the caller's own for a BYOK upstream,
 * `auth`), and the relay's own.
 */
export function upstreamHeaders(target: UpstreamTarget, auth?: string): Record<string, string> {
  return { ...target.baseHeaders, [target.authHeader]: auth ?? target.authValue };
}

/**
 * Counts a request's body bytes against MAX_BUFFERED_BYTES as they arrive, and against its caller's share of it:
 * whom the limits count for (`caller.subject`: the signed-in user, or the address for anonymous callers and holders
 * of the bare password), else the address (by /64 for IPv6, as the limits count it). They are given back once the body
 * has been sent (`context.body.release`), or when the request is over, whichever comes first.
 */
export function reserveBodyBytes(relay: Relay, context: RequestContext): (bytes: number) => boolean {
  // Whom the limits count for (a bare password's holders by address, each their own share), else the address.
  const holder = context.caller.subject ?? `address:${addressKey(context.caller.address)}`;
  context.body.release = context.releases.add(() => {
    relay.bodyBudget.release(holder, context.body.held);
    context.body.held = 0;
    context.body.bytes = undefined;
    context.body.payload = undefined;
  });
  return (bytes) => {
    if (!relay.bodyBudget.reserve(holder, bytes)) return false;
    context.body.held += bytes;
    return true;
  };
}

/** GET /v1/models with several upstreams: every upstream's list, ids prefixed with the upstream's name. */
async function mergedModels(relay: Relay, context: RequestContext): Promise<Response> {
  // A caller's own key goes to the one upstream it chose, never to several: BYOK upstreams list their models
  // only when X-Relay-Endpoint names them.
  const keyed = relay.upstreams.filter((upstream) => !upstream.byok);
  if (keyed.length === 0) {
    return refuse(
      context,
      "unknown_upstream",
      400,
      `name the provider whose models to list with X-Relay-Endpoint (MC's endpoint setting): one of ${
        relay.upstreams.map((upstream) => mcEndpoint(relay.config, upstream)).join(", ")
      }`,
      "unknown_upstream",
    );
  }
  const lists = await Promise.all(keyed.map((target) => fetchModelList(relay, target)));
  const data = [
    ...lists.flatMap(({ name, models }) =>
      models.filter((entry) => typeof entry?.id === "string" && modelAllowed(relay, name, entry.id as string))
        .map((entry) => ({ ...entry, id: `${name}/${entry.id}` }))
    ),
    ...aliasModels(relay),
  ];
  const failed = lists.filter((list) => list.error).map((list) => `${list.name} (${list.error})`);
  if (failed.length > 0) context.log.error = `model lists missing: ${failed.join(", ")}`;
  if (failed.length === lists.length) {
    return refuse(
      context,
      "upstream_unreachable",
      502,
      `no upstream answered for its model list: ${failed.join(", ")}`,
      "upstream_unreachable",
    );
  }
  context.log.outcome = failed.length > 0 ? "partial" : "completed";
  context.upstream.status = 200;
  return jsonResponse({ object: "list", data });
}

/** One upstream's model list for `mergedModels`, or the reason it has none. */
async function fetchModelList(
  relay: Relay,
  target: UpstreamTarget,
): Promise<{ name: string; models: { id?: unknown }[]; error?: string }> {
  const abort = new AbortController();
  const deadline = deadlines.add(relay.config.requestTimeoutMs, () => abort.abort());
  try {
    const response = await fetch(`${target.baseUrl}/models`, {
      headers: upstreamHeaders(target),
      signal: abort.signal,
      redirect: "manual",
    });
    if (!response.ok) {
      await response.body?.cancel();
      return { name: target.name, error: `HTTP ${response.status}`, models: [] };
    }
    const list = await response.json();
    return { name: target.name, models: Array.isArray(list?.data) ? list.data : [] };
  } catch (error) {
    return { name: target.name, error: describeNetworkError(errorText(error)), models: [] };
  } finally {
    deadlines.cancel(deadline);
  }
}

/** The attempts a request may make: every target of its alias, in order, or its one upstream. */
export function attemptPlan(relay: Relay, context: RequestContext): Attempt[] {
  const targets = context.upstream.alias === undefined ? undefined : relay.config.modelAliases[context.upstream.alias];
  if (targets === undefined) return context.upstream.target.plan;
  return targets.map((label) => {
    const slash = label.indexOf("/");
    return { target: relay.upstreamsByName.get(label.slice(0, slash))!, model: label.slice(slash + 1), label };
  });
}

/** The model aliases a client may use, as entries of an OpenAI model list (`owned_by: "mc-relay"`). */
export function aliasModels(relay: Relay): object[] {
  return Object.keys(relay.config.modelAliases)
    .filter((alias) => relay.allowedModels.size === 0 || relay.allowedModels.has(alias))
    .map((alias) => ({ id: alias, object: "model", created: 0, owned_by: "mc-relay" }));
}
