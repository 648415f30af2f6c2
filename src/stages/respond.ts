/**
 * The last stage: the upstream's answer relayed to the client (streamed, or read whole where the relay rewrites or
 * measures it), its headers filtered, its errors explained.
 *
 * @module
 */

import { refuse, type Relay, type RequestContext } from "../context.ts";
import { type Deadline, deadlines } from "../deadlines.ts";
import { addRelayHeaders, explainProviderRateLimit, isDroppedResponseHeader, NO_TOKENS, RelayAbort } from "../http.ts";
import { finish } from "./finish.ts";
import { aliasModels, modelAllowed } from "./choose.ts";
import { abortReason, upstreamFailure } from "./forward.ts";
import { filterModelList, parseJson, relayBody, rewriteBody } from "../streams.ts";
import { errorText } from "../text.ts";
import { pickUsage, usageReader } from "../usage.ts";

/**
 * Stage: relay. Passes the upstream's status, headers and body back with the relay's own headers. A body of
 * known length that needs no inspection goes to the client inside Deno; a small non-streamed answer whose usage
 * is read is read whole first (`relayWholeAnswer`); any other body passes chunk by chunk through `relayBody`
 * (idle timeout, usage reading), and a small error body or filtered model list is rewritten.
 */
export function relayResponse(relay: Relay, context: RequestContext): Response | Promise<Response> {
  const { response, call } = context.upstream;
  // `forwardRequest` answers every request it has no upstream response for: this stage always has one.
  if (response === undefined || call === undefined) throw new Error("relayResponse needs forwardRequest's answer");
  const headers = responseHeaders(relay, context, response);
  context.upstream.relayed = true;
  context.log.status = response.status;
  const eventStream = headers["content-type"]?.toLowerCase().startsWith("text/event-stream") ?? false;
  if (eventStream) {
    // Tell reverse proxies and CDNs not to buffer or compress the stream.
    headers["cache-control"] = "no-cache, no-transform";
    headers["x-accel-buffering"] = "no";
  }
  if (response.status >= 300) return relayErrorResponse(relay, context, call, response, headers);
  const filterModels = (relay.allowedModels.size > 0 || Object.keys(relay.config.modelAliases).length > 0) &&
    context.route?.upstreamPath === "/models" && response.ok;
  const usageWatch = response.ok ? context.log.usageWatch : undefined;
  const inspectUsage = usageWatch !== undefined;
  const contentLength = response.headers.get("content-length");
  const init = { status: response.status, statusText: response.statusText, headers };
  const knownLength = response.body !== null && !eventStream && contentLength !== null;
  if (knownLength && !filterModels && !inspectUsage) {
    return new Response(passWithinDeno(relay, context, call, response.body, Number(contentLength)), init);
  }
  if (knownLength && inspectUsage && Number(contentLength) <= WHOLE_ANSWER_MAX_BYTES) {
    return relayWholeAnswer(relay, context, call, response, init);
  }
  const usage = inspectUsage ? usageReader(usageWatch, eventStream) : undefined;
  context.log.events = usage?.events;
  // Taking the usage event out shortens a stream: its length, if the upstream gave one, no longer holds.
  if (usage && eventStream && usageWatch?.stripUsageEvent) delete headers["content-length"];
  if (response.body === null) return new Response(null, init);
  const body = relayedBody(relay, context, call, response.body, eventStream, usage);
  if (filterModels && !response.headers.has("content-encoding")) {
    delete headers["content-length"];
    return filteredModelList(relay, context, body, init);
  }
  return new Response(body, init);
}

/** The upstream's model list with only the allowed models and the aliases (see `filterModelList`). */
async function filteredModelList(
  relay: Relay,
  context: RequestContext,
  body: ReadableStream<Uint8Array>,
  init: ResponseInit,
): Promise<Response> {
  const allowed = (model: string) => modelAllowed(relay, context.upstream.target.name, model);
  return new Response(
    (await rewriteBody(body, (text) => filterModelList(text, allowed, aliasModels(relay)))).body,
    init,
  );
}

/** A body of known length must arrive in full within REQUEST_TIMEOUT_SECONDS of its headers, or the call is aborted. */
function wholeBodyDeadline(relay: Relay, call: AbortController): Deadline {
  return deadlines.add(relay.config.requestTimeoutMs, () => call.abort(new RelayAbort("upstream_timeout")));
}

/** The largest non-streamed answer of known length that `relayWholeAnswer` reads whole; a larger one is relayed. */
const WHOLE_ANSWER_MAX_BYTES = 256 * 1024;

/**
 * A non-streamed answer of known length (up to WHOLE_ANSWER_MAX_BYTES) whose usage the relay reads: read whole in
 * one step inside Deno, its usage taken, and sent on as the same bytes, without a JavaScript step per chunk or a
 * stream to the client. It must arrive within REQUEST_TIMEOUT_SECONDS of its headers. Its status and headers go out
 * only with it, so an answer that breaks off gets 502 (or 504 after the timeout), never a cut body with a 200.
 */
async function relayWholeAnswer(
  relay: Relay,
  context: RequestContext,
  call: AbortController,
  response: Response,
  init: ResponseInit,
): Promise<Response> {
  const bodyDeadline = wholeBodyDeadline(relay, call);
  let bytes: Uint8Array<ArrayBuffer>;
  try {
    bytes = await response.bytes();
  } catch (error) {
    // Not sent yet: the relay's own answer gets the relay's headers instead.
    context.upstream.relayed = false;
    return answerCutOff(relay, context, error);
  } finally {
    deadlines.cancel(bodyDeadline);
  }
  context.log.usage = pickUsage(parseJson(bytes));
  context.log.bytesOut = bytes.byteLength;
  context.log.outcome = "completed";
  return new Response(bytes, init);
}

/** The relay's answer when an upstream's answer broke off, timed out or lost its client before its end. */
function answerCutOff(relay: Relay, context: RequestContext, error: unknown): Response {
  const reason = abortReason(context);
  if (reason instanceof RelayAbort && reason.kind === "client_gone") return upstreamFailure(relay, context, error);
  const host = context.upstream.target.shown;
  if (reason instanceof RelayAbort && reason.kind === "upstream_timeout") {
    return refuse(
      context,
      "upstream_timeout",
      504,
      `the upstream ${host} did not finish its answer within ${
        relay.config.requestTimeoutMs / 1000
      } s (REQUEST_TIMEOUT_SECONDS)`,
      "upstream_timeout",
    );
  }
  context.log.error = errorText(error);
  return refuse(
    context,
    "upstream_stream_error",
    502,
    `the upstream ${host} broke off its answer before its end`,
    "upstream_stream_error",
  );
}

/** The upstream body passed on through `relayBody`: the request finishes when it ends (`finish`). */
function relayedBody(
  relay: Relay,
  context: RequestContext,
  call: AbortController,
  source: ReadableStream<Uint8Array>,
  eventStream: boolean,
  usage?: ReturnType<typeof usageReader>,
): ReadableStream<Uint8Array> {
  if (eventStream) relay.metrics.openStreams++;
  context.releases.waitForBody();
  return relayBody(source, call, relay.config.requestTimeoutMs, {
    transform: usage?.transform,
    flush: usage?.flush,
    onChunk(bytes) {
      context.log.bytesOut += bytes;
    },
    onEnd(outcome, error) {
      if (eventStream) relay.metrics.openStreams--;
      context.log.outcome ??= outcome;
      if (error) context.log.error = error;
      context.log.usage = usage?.result();
      finish(relay, context);
    },
  });
}

/**
 * An upstream's error answer (status 300 and up; a redirect with Location never gets here). Its body is read
 * (up to MAX_REWRITTEN_BODY_BYTES) and every configured secret in it is masked; a provider's 429 says whose
 * quota it is. A body the relay cannot inspect (compressed, too large, or showing a secret in a form that
 * cannot be masked) is replaced by the relay's own error with the same status, never passed on.
 */
async function relayErrorResponse(
  relay: Relay,
  context: RequestContext,
  call: AbortController,
  response: Response,
  headers: Record<string, string>,
): Promise<Response> {
  const init = { status: response.status, statusText: response.statusText, headers };
  if (response.body === null) return new Response(null, init);
  delete headers["content-length"];
  const encoding = response.headers.get("content-encoding");
  const replace = (reason: string) => {
    context.log.outcome = "upstream_error_body_replaced";
    context.log.error = `error body replaced: ${reason}`;
    for (const name of ["content-encoding", "cache-control", "x-accel-buffering"]) delete headers[name];
    headers["content-type"] = "application/json";
    return JSON.stringify({
      error: {
        message:
          `mc-relay: the upstream ${context.upstream.target.shown} answered ${response.status} with a body the relay does not pass on (${reason}); see the relay's log (request id ${context.id})`,
        type: response.status >= 500 ? "server_error" : "invalid_request_error",
        code: "upstream_error",
      },
    });
  };
  const body = relayedBody(relay, context, call, response.body, false);
  if (encoding !== null && encoding.toLowerCase() !== "identity") {
    const replaced = replace(`${encoding.slice(0, 20)}-encoded`);
    await body.cancel();
    return new Response(replaced, init);
  }
  const rewritten = await rewriteBody(body, (text) => {
    const masked = context.upstream.masker ? context.upstream.masker.mask(text) : relay.maskSecrets(text);
    if (masked === undefined) return undefined;
    return response.status === 429 ? explainProviderRateLimit(masked, context.upstream.target.shown) : masked;
  }, replace);
  return new Response(rewritten.body, init);
}

/**
 * The upstream's response headers without hop-by-hop, cookie and CORS headers, plus the relay's own, by lower-case
 * name (as Deno lists them: one entry a name). A plain record, which Deno takes into the response without the
 * iterator a list of pairs costs per header.
 */
function responseHeaders(relay: Relay, context: RequestContext, response: Response): Record<string, string> {
  const connection = response.headers.get("connection");
  const connectionTokens = connection === null
    ? NO_TOKENS
    : new Set(connection.split(",").map((token) => token.trim().toLowerCase()));
  // No prototype: a header the upstream names `__proto__` is a header like any other.
  const headers: Record<string, string> = Object.create(null);
  const mask = context.upstream.masker ? context.upstream.masker.maskHeaderValue : relay.maskHeaderValue;
  // forEach, not an iterator: no object per header.
  response.headers.forEach((value, name) => {
    if (!isDroppedResponseHeader(name, connectionTokens)) headers[name] = mask(value);
  });
  addRelayHeaders(headers, context.id, context.cors);
  // Which upstream (for an alias: which target) answered.
  headers["x-relay-upstream"] = context.upstream.label ?? context.upstream.target.name;
  return headers;
}

/**
 * A body of known length (a model list, a non-streamed answer) goes to the client inside Deno, without a
 * JavaScript step per chunk. It must arrive within REQUEST_TIMEOUT_SECONDS of its headers; the request finishes
 * (`finish`) when Deno has sent it.
 */
function passWithinDeno(
  relay: Relay,
  context: RequestContext,
  call: AbortController,
  body: ReadableStream<Uint8Array>,
  length: number,
): ReadableStream<Uint8Array> {
  const bodyDeadline = wholeBodyDeadline(relay, call);
  context.releases.waitForBody();
  const delivered = () => {
    deadlines.cancel(bodyDeadline);
    const reason = call.signal.reason;
    context.log.outcome = reason instanceof RelayAbort ? reason.kind : "completed";
    if (context.log.outcome === "completed") context.log.bytesOut = length;
    finish(relay, context);
  };
  // Deno resolves `completed` however the response ended; should it ever reject, the line is still written.
  context.completed.then(delivered, delivered);
  return body;
}
