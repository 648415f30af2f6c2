/**
 * Bodies: reading a request's body within its limits (`readBody`, `ByteBudget` for MAX_BUFFERED_BYTES), relaying an
 * answer's body as it comes (`relayBody`), and rewriting the bodies the relay changes (model lists).
 *
 * @module
 */

import { deadlines } from "./deadlines.ts";
import { BodyCut, RelayAbort } from "./http.ts";
import { errorText, parseJsonText } from "./text.ts";

/** A parsed JSON object body. */
export type JsonObject = Record<string, unknown> & { stream_options?: { include_usage?: unknown } };

/** A JSON object body, or undefined when the body is not a JSON object. */
export function parseJson(body: Uint8Array): JsonObject | undefined {
  const value = parseJsonText(new TextDecoder().decode(body));
  return typeof value === "object" && value !== null && !Array.isArray(value)
    ? value as Record<string, unknown>
    : undefined;
}

/** What reading a client's request body produced: the bytes, or an error to send. */
type BodyRead =
  | { body: Uint8Array<ArrayBuffer> }
  | { status: number; message: string; code: string; outcome: string; headers?: Record<string, string> };

/** What bounds the reading of one request body. */
export interface BodyLimits {
  /** MAX_REQUEST_BYTES. */
  maxRequestBytes: number;
  /** REQUEST_TIMEOUT_SECONDS, in milliseconds: the longest a whole body may take. */
  requestTimeoutMs: number;
  /** The longest a body may go without a byte arriving (BODY_IDLE_MS, or REQUEST_TIMEOUT_SECONDS when shorter). */
  idleMs: number;
}

/**
 * The longest an upload may go without sending a byte, 10 s: a client that is still sending gets TCP segments
 * through in that time on any working network, while a connection that stalls on purpose would otherwise keep its
 * bytes counted against MAX_BUFFERED_BYTES for the whole REQUEST_TIMEOUT_SECONDS (180 s by default).
 */
export const BODY_IDLE_MS = 10_000;

/**
 * Reads a request body into memory, refusing it as soon as it grows past MAX_REQUEST_BYTES (whatever
 * Content-Length claims), when `reserve` refuses the bytes (MAX_BUFFERED_BYTES, all requests together or one
 * caller's share: 503), when no byte arrives for `idleMs` or the whole body takes longer than
 * REQUEST_TIMEOUT_SECONDS (408), so a slow or oversized upload never reaches the upstream and the bodies held at
 * once stay bounded. Bytes are counted as they arrive, never as declared: a Content-Length alone holds nothing,
 * so uploads that declare a large body and stall cannot turn other requests away.
 */
export async function readBody(
  request: Request,
  limits: BodyLimits,
  reserve: (bytes: number) => boolean,
): Promise<BodyRead> {
  const { maxRequestBytes: maxBytes, requestTimeoutMs: timeoutMs, idleMs } = limits;
  const declared = Number(request.headers.get("content-length") ?? "0");
  if (declared > maxBytes) return bodyTooLarge(maxBytes);
  if (request.body === null) return { body: new Uint8Array(0) };

  const reader = request.body.getReader();
  let cut: "idle" | "total" | undefined;
  const end = performance.now() + timeoutMs;
  // One deadline, moved on before each read: the idle limit, or the end of the whole body's time if that is sooner.
  const deadline = deadlines.add(Math.min(idleMs, timeoutMs), () => {
    cut = deadline.at >= end ? "total" : "idle";
    reader.cancel().catch(() => {});
  });
  const chunks: Uint8Array<ArrayBuffer>[] = [];
  let size = 0;
  try {
    while (true) {
      deadline.at = Math.min(end, performance.now() + idleMs);
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > maxBytes || !reserve(value.byteLength)) {
        await reader.cancel().catch(() => {});
        return size > maxBytes ? bodyTooLarge(maxBytes) : BODY_BUSY;
      }
      chunks.push(value);
    }
  } catch {
    if (cut === undefined) {
      return {
        status: 400,
        message: "the request body could not be read",
        code: "bad_request_body",
        outcome: "client_gone",
      };
    }
  } finally {
    deadlines.cancel(deadline);
  }
  if (cut !== undefined) return bodyTimeout(cut, cut === "idle" ? idleMs : timeoutMs);
  if (chunks.length === 1) return { body: chunks[0] };
  const body = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return { body };
}

/** The answer to a body past MAX_REQUEST_BYTES: 413. */
function bodyTooLarge(maxBytes: number): BodyRead {
  return {
    status: 413,
    message: `request body is larger than ${maxBytes} bytes (MAX_REQUEST_BYTES)`,
    code: "request_too_large",
    outcome: "body_too_large",
  };
}

/** The answer when the bytes of a body do not fit MAX_BUFFERED_BYTES or the caller's share of it: 503. */
const BODY_BUSY: BodyRead = {
  status: 503,
  message:
    "the relay holds as many request bodies as it may (MAX_BUFFERED_BYTES), or as many as one caller may; try again in a second",
  code: "relay_busy",
  outcome: "body_memory_full",
  // The rest of the body is not read: the connection cannot carry another request.
  headers: { "retry-after": "1", connection: "close" },
};

/** The answer to a body that stalled (`idle`) or took too long as a whole (`total`): 408, the connection closed. */
function bodyTimeout(cut: "idle" | "total", ms: number): BodyRead {
  return {
    status: 408,
    message: cut === "idle"
      ? `no byte of the request body arrived for ${ms / 1000} s; send the body without pauses`
      : `the request body did not arrive within ${ms / 1000} s (REQUEST_TIMEOUT_SECONDS)`,
    code: "request_timeout",
    outcome: cut === "idle" ? "body_idle" : "body_timeout",
    headers: { connection: "close" },
  };
}

/**
 * Bytes of request bodies held in memory by all requests together, bounded by MAX_BUFFERED_BYTES, and by each
 * holder (a user, or an address for anonymous callers) within `share`: one caller, however many connections it
 * opens, cannot take the whole allowance from everybody else.
 */
export class ByteBudget {
  #held = 0;
  #byHolder = new Map<string, number>();
  /** Each holder's share: a quarter of the limit, but always one whole MAX_REQUEST_BYTES body. */
  readonly share: number;

  constructor(readonly limit: number, maxRequestBytes: number) {
    this.share = Math.min(limit, Math.max(maxRequestBytes, Math.floor(limit / 4)));
  }

  /** Counts `bytes` as held by `holder`; false (and nothing counted) when that would pass the limit or the share. */
  reserve(holder: string, bytes: number): boolean {
    const mine = this.#byHolder.get(holder) ?? 0;
    if (this.#held + bytes > this.limit || mine + bytes > this.share) return false;
    this.#held += bytes;
    this.#byHolder.set(holder, mine + bytes);
    return true;
  }

  /** Counts `bytes` of `holder` as no longer held. */
  release(holder: string, bytes: number): void {
    if (bytes === 0) return;
    this.#held = Math.max(0, this.#held - bytes);
    // Only holders with bytes held are kept: the map stays as small as the requests reading bodies.
    const mine = (this.#byHolder.get(holder) ?? 0) - bytes;
    if (mine > 0) this.#byHolder.set(holder, mine);
    else this.#byHolder.delete(holder);
  }
}

/**
 * Passes an upstream body through chunk by chunk (never buffered), counting
 * bytes, cutting it when the upstream stays silent longer than `idleMs`
 * while the relay waits for the next chunk, and cancelling the upstream when
 * the client goes away. A cut stream ends with an error, not a clean end, so
 * the client can tell that it is incomplete.
 */
export function relayBody(
  source: ReadableStream<Uint8Array>,
  upstream: AbortController,
  idleMs: number,
  events: {
    onChunk(bytes: number): void;
    onEnd(outcome: string, error?: string): void;
    /** Rewrites each chunk before it is passed on (may hold back an incomplete part). */
    transform?: (chunk: Uint8Array) => Uint8Array;
    /** What is left when the upstream body ends. */
    flush?: () => Uint8Array;
  },
): ReadableStream<Uint8Array> {
  // Reading into one small buffer per stream (and passing on a right-sized copy) keeps memory per open stream
  // low: the default reader hands out a view on a fresh 64 KiB buffer per chunk, kept alive until collected.
  const reader = source.getReader({ mode: "byob" });
  let buffer = new Uint8Array(RELAY_BUFFER_MIN_BYTES);
  let ended = false;
  // The stream's silence deadline: moved on when a read starts, set aside (Infinity) while the client reads.
  const silence = deadlines.add(Infinity, () => upstream.abort(new RelayAbort("upstream_timeout")));

  const end = (outcome: string, error?: string) => {
    if (ended) return;
    ended = true;
    deadlines.cancel(silence);
    events.onEnd(outcome, error);
  };

  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      silence.at = performance.now() + idleMs;
      try {
        let chunk: Uint8Array | undefined;
        while (chunk === undefined || chunk.byteLength === 0) {
          const { done, value } = await reader.read(buffer);
          if (done) {
            silence.at = Infinity;
            const rest = events.flush?.();
            if (rest && rest.byteLength > 0) {
              events.onChunk(rest.byteLength);
              controller.enqueue(rest);
            }
            end("completed");
            controller.close();
            return;
          }
          chunk = events.transform ? events.transform(value) : value.slice();
          // A read that fills the buffer asks for a larger one (up to RELAY_BUFFER_MAX_BYTES): a stream of small
          // events keeps 2 KiB per stream, a large body is read in large pieces.
          buffer = value.byteLength === value.buffer.byteLength && value.byteLength < RELAY_BUFFER_MAX_BYTES
            ? new Uint8Array(value.byteLength * 4)
            : new Uint8Array(value.buffer);
          // The upstream spoke, even if only part of an event: the silence starts again.
          if (chunk.byteLength === 0) silence.at = performance.now() + idleMs;
        }
        silence.at = Infinity;
        events.onChunk(chunk.byteLength);
        controller.enqueue(chunk);
      } catch (error) {
        silence.at = Infinity;
        // Cancelled by the client (`cancel` aborted the read): the stream has no reader left to tell.
        if (ended) return;
        const reason = upstream.signal.reason;
        const outcome = reason instanceof RelayAbort ? reason.kind : "upstream_stream_error";
        end(outcome, outcome === "upstream_stream_error" ? errorText(error) : undefined);
        // Erroring the body makes Deno drop the connection, so the client sees the cut. Deno prints the
        // error to stderr: keep that to one line without a stack (the request's log line has the details).
        controller.error(new BodyCut(outcome));
      }
    },
    cancel(reason) {
      end("client_gone");
      upstream.abort(CLIENT_GONE);
      return reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
}

/**
 * The reason every relayed stream whose client left aborts its upstream call with: one instance, made once. Making
 * an error costs Deno 2.9.6 about 10 µs, 25 µs at the depth of a stream's cancel (`Error.stackTraceLimit = 0` does
 * not help), and a client leaving is a common end of a stream; the reason carries nothing of the request.
 */
const CLIENT_GONE = new RelayAbort("client_gone");

/** The read buffer each relayed stream starts with: a server-sent event of an LLM answer is far smaller. */
const RELAY_BUFFER_MIN_BYTES = 2 * 1024;

/** The largest read buffer a relayed body grows to; a larger chunk simply takes more than one read. */
const RELAY_BUFFER_MAX_BYTES = 64 * 1024;

/** The largest upstream body the relay reads to rewrite; a larger one passes through untouched. */
const MAX_REWRITTEN_BODY_BYTES = 1024 * 1024;

/** Keeps only the allowed models in an OpenAI model list and adds `extra` (the aliases); else passes it on unchanged. */
export function filterModelList(text: string, allowed: (model: string) => boolean, extra: object[] = []): string {
  const list = parseJsonText(text) as { data?: { id?: unknown }[] } | undefined;
  if (!Array.isArray(list?.data)) return text;
  list.data = [...list.data.filter((model) => typeof model?.id === "string" && allowed(model.id)), ...extra];
  return JSON.stringify(list);
}

/**
 * Reads a small body and returns it rewritten by `rewrite`. When the body is larger than
 * MAX_REWRITTEN_BODY_BYTES, or `rewrite` returns undefined (it cannot make the text safe), `replace` gives the
 * body instead; without `replace` a large body passes on unchanged. A body that fails while being read ends
 * with the same error for the client.
 */
export async function rewriteBody(
  body: ReadableStream<Uint8Array>,
  rewrite: (text: string) => string | undefined,
  replace?: (reason: string) => string,
): Promise<{ body: ReadableStream<Uint8Array> }> {
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    while (size <= MAX_REWRITTEN_BODY_BYTES) {
      const { done, value } = await reader.read();
      if (done) {
        const text = new TextDecoder().decode(await new Blob(chunks as BlobPart[]).arrayBuffer());
        const rewritten = rewrite(text) ?? replace?.("it shows a secret in a form the relay cannot mask") ?? "";
        return { body: new Blob([rewritten]).stream() };
      }
      chunks.push(value);
      size += value.byteLength;
    }
  } catch (error) {
    return { body: new ReadableStream({ start: (controller) => controller.error(error) }) };
  }
  if (replace) {
    const replaced = replace(`larger than ${MAX_REWRITTEN_BODY_BYTES} bytes`);
    await reader.cancel().catch(() => {});
    return { body: new Blob([replaced]).stream() };
  }
  return {
    body: new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(chunk);
      },
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      },
      cancel: (reason) => reader.cancel(reason),
    }),
  };
}
