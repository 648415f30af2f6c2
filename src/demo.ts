/**
 * `mc-relay demo`: the relay in front of a built-in echo model (`createDemoUpstream`), with generated credentials;
 * nothing to configure, nothing leaves the machine.
 *
 * @module
 */

import { exitWithErrors } from "./exit.ts";
import { parseConfig } from "./config/parse.ts";
import { METACONFIGURATOR_ORIGINS, type RelayEnv } from "./config/variables.ts";
import { mcEndpoint } from "./endpoint.ts";
import { mcSettingsLink } from "./page.ts";
import { serve } from "./server.ts";

/**
 * A tiny OpenAI-compatible upstream that echoes the last user message back, on every route the common SDKs call:
 * chat completions, completions, the Responses API (streamed word by word when asked) and embeddings. Only
 * `deno task demo` uses it; it is never used when UPSTREAM_BASE_URL is set. It checks the key so the demo shows
 * the relay adding it.
 */
export function createDemoUpstream(apiKey: string): (request: Request) => Promise<Response> {
  const demoError = (status: number, message: string, code: string) =>
    Response.json({ error: { message: `demo upstream: ${message}`, type: "invalid_request_error", code } }, { status });
  return async (request) => {
    const path = new URL(request.url).pathname;
    if (request.headers.get("authorization") !== `Bearer ${apiKey}`) {
      return demoError(401, "wrong key", "invalid_api_key");
    }
    if (path === "/models" && request.method === "GET") {
      return Response.json({
        object: "list",
        data: [{ id: DEMO_MODEL, object: "model", created: 0, owned_by: "mc-relay-demo" }],
      });
    }
    const answer = request.method === "POST" ? DEMO_ROUTES[path] : undefined;
    if (answer === undefined) return demoError(404, "not found", "unknown_url");
    let payload: DemoRequest;
    try {
      payload = await request.json();
    } catch {
      return demoError(400, "body is not JSON", "invalid_json");
    }
    return answer(payload);
  };
}

/** The demo's one model. */
const DEMO_MODEL = "echo";

/** What the demo reads from a request body, whichever route it came to. */
interface DemoRequest {
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  messages?: { role?: string; content?: unknown }[];
  prompt?: unknown;
  input?: unknown;
}

/** The text of a message's content: a string, or the text parts of a list. */
function demoText(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content.map((part) => typeof part === "string" ? part : part?.text ?? "").join(" ");
}

/** The last user message of a chat, a completion prompt, or a Responses API input. */
function demoPrompt(payload: DemoRequest): string {
  if (Array.isArray(payload.messages)) {
    return demoText([...payload.messages].reverse().find((message) => message.role === "user")?.content);
  }
  if (payload.prompt !== undefined) return demoText(payload.prompt);
  if (typeof payload.input === "string") return payload.input;
  if (Array.isArray(payload.input)) {
    const users = payload.input.filter((item) => item?.role === "user" || typeof item === "string");
    const last = users.at(-1);
    return typeof last === "string" ? last : demoText(last?.content);
  }
  return "";
}

/** The echo, and its token counts (a word a token). */
function demoReply(payload: DemoRequest) {
  const prompt = demoPrompt(payload);
  const text = `Echo: ${prompt || "(no user message)"}`;
  const promptTokens = prompt.split(/\s+/).filter(Boolean).length;
  const completionTokens = text.split(/\s+/).length;
  return { text, words: text.split(/(?<= )/), promptTokens, completionTokens, created: Math.floor(Date.now() / 1000) };
}

/** A stream of server-sent events, `pause` ms apart, from a list of events to send (`event:` name optional). */
function demoStream(events: { event?: string; data: unknown }[], pause = 60): Response {
  const encoder = new TextEncoder();
  let index = 0;
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (index >= events.length) {
        controller.close();
        return;
      }
      if (index > 0) await new Promise((resolve) => setTimeout(resolve, pause));
      const { event, data } = events[index++];
      const text = typeof data === "string" ? data : JSON.stringify(data);
      controller.enqueue(encoder.encode(`${event ? `event: ${event}\n` : ""}data: ${text}\n\n`));
    },
  });
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
}

/** The demo's answer for each POST route. */
const DEMO_ROUTES: Record<string, (payload: DemoRequest) => Response> = {
  "/chat/completions"(payload) {
    const reply = demoReply(payload);
    const id = `chatcmpl-demo-${crypto.randomUUID()}`;
    const usage = {
      prompt_tokens: reply.promptTokens,
      completion_tokens: reply.completionTokens,
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    const base = { id, created: reply.created, model: DEMO_MODEL };
    if (!payload.stream) {
      return Response.json({
        ...base,
        object: "chat.completion",
        choices: [{ index: 0, message: { role: "assistant", content: reply.text }, finish_reason: "stop" }],
        usage,
      });
    }
    const chunk = (delta: Record<string, string>, finish: string | null) => ({
      ...base,
      object: "chat.completion.chunk",
      choices: [{ index: 0, delta, finish_reason: finish }],
    });
    return demoStream([
      { data: chunk({ role: "assistant", content: "" }, null) },
      ...reply.words.map((word) => ({ data: chunk({ content: word }, null) })),
      { data: chunk({}, "stop") },
      ...(payload.stream_options?.include_usage === true
        ? [{ data: { ...base, object: "chat.completion.chunk", choices: [], usage } }]
        : []),
      { data: "[DONE]" },
    ]);
  },
  "/completions"(payload) {
    const reply = demoReply(payload);
    const base = {
      id: `cmpl-demo-${crypto.randomUUID()}`,
      object: "text_completion",
      created: reply.created,
      model: DEMO_MODEL,
    };
    const usage = {
      prompt_tokens: reply.promptTokens,
      completion_tokens: reply.completionTokens,
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    if (!payload.stream) {
      return Response.json({ ...base, choices: [{ index: 0, text: reply.text, finish_reason: "stop" }], usage });
    }
    return demoStream([
      ...reply.words.map((word) => ({ data: { ...base, choices: [{ index: 0, text: word, finish_reason: null }] } })),
      {
        data: {
          ...base,
          choices: [{ index: 0, text: "", finish_reason: "stop" }],
          ...(payload.stream_options?.include_usage === true && { usage }),
        },
      },
      { data: "[DONE]" },
    ]);
  },
  "/embeddings"(payload) {
    const inputs = Array.isArray(payload.input) ? payload.input : [payload.input];
    const vector = (text: unknown) =>
      Array.from(
        { length: 8 },
        (_, index) => ((String(text).charCodeAt(index % Math.max(1, String(text).length)) || 0) % 17) / 16,
      );
    const tokens = inputs.map((input) => String(input).split(/\s+/).filter(Boolean).length).reduce((a, b) => a + b, 0);
    return Response.json({
      object: "list",
      data: inputs.map((input, index) => ({ object: "embedding", index, embedding: vector(input) })),
      model: DEMO_MODEL,
      usage: { prompt_tokens: tokens, total_tokens: tokens },
    });
  },
  "/responses"(payload) {
    const reply = demoReply(payload);
    const id = `resp_demo${crypto.randomUUID().replaceAll("-", "")}`;
    const messageId = `msg_demo${crypto.randomUUID().replaceAll("-", "")}`;
    const usage = {
      input_tokens: reply.promptTokens,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: reply.completionTokens,
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: reply.promptTokens + reply.completionTokens,
    };
    const part = { type: "output_text", text: reply.text, annotations: [] };
    const message = { type: "message", id: messageId, status: "completed", role: "assistant", content: [part] };
    const response = (status: string, extra: Record<string, unknown>) => ({
      id,
      object: "response",
      created_at: reply.created,
      status,
      model: DEMO_MODEL,
      output: [],
      incomplete_details: null,
      error: null,
      ...extra,
    });
    if (!payload.stream) {
      return Response.json(response("completed", { output: [message], output_text: reply.text, usage }));
    }
    let sequence = 0;
    const event = (type: string, data: Record<string, unknown>) => ({
      event: type,
      data: { type, sequence_number: sequence++, ...data },
    });
    const at = { item_id: messageId, output_index: 0, content_index: 0 };
    return demoStream([
      event("response.created", { response: response("in_progress", {}) }),
      event("response.output_item.added", {
        output_index: 0,
        item: { ...message, status: "in_progress", content: [] },
      }),
      event("response.content_part.added", { ...at, part: { ...part, text: "" } }),
      ...reply.words.map((delta) => event("response.output_text.delta", { ...at, delta, logprobs: [] })),
      event("response.output_text.done", { ...at, text: reply.text, logprobs: [] }),
      event("response.content_part.done", { ...at, part }),
      event("response.output_item.done", { output_index: 0, item: message }),
      event("response.completed", { response: response("completed", { output: [message], usage }) }),
    ]);
  },
};

/** `mc-relay demo`: the relay in front of the built-in echo model, with generated credentials. */
export async function demo(env: RelayEnv): Promise<void> {
  if (env.UPSTREAM_BASE_URL) {
    exitWithErrors([
      "UPSTREAM_BASE_URL is set, so the demo will not start (it never stands in for a real upstream); unset it for the demo, or run 'deno task start'",
    ]);
  }
  const random = (bytes: number) =>
    btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(bytes))))
      .replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
  const apiKey = `demo-${random(12)}`;
  const upstream = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, createDemoUpstream(apiKey));
  const result = parseConfig({
    ALLOWED_ORIGIN: METACONFIGURATOR_ORIGINS.join(","),
    HOST: "127.0.0.1",
    ...env,
    UPSTREAM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}`,
    UPSTREAM_API_KEY: apiKey,
    MC_RELAY_USERNAME: "demo",
    MC_RELAY_PASSWORD: random(18),
    DEFAULT_MODEL: env.DEFAULT_MODEL ?? DEMO_MODEL,
  });
  if (!result.ok) exitWithErrors(result.errors);
  const { config } = result;
  const shownHost = config.host === "0.0.0.0" || config.host === "127.0.0.1" ? "localhost" : config.host;
  const apiKeyForClients = `${config.users[0].name}:${config.users[0].password}`;
  // Printed once the port is known (PORT=0 picks a free one).
  const banner = (port: number) => {
    const base = `http://${shownHost}:${port}${config.basePath}`;
    console.log(`
mc-relay demo: the relay runs in front of a built-in echo model; nothing leaves this machine.

  This relay's page:          ${base}/
  MetaConfigurator, one link: ${mcSettingsLink(base)}
  MetaConfigurator, by hand:  Relay URL ${base}  (without /v1)
                              Endpoint  ${mcEndpoint(config, config.upstreams[0])}
  An OpenAI SDK's baseURL:    ${base}/v1
  API key (username:password): ${apiKeyForClients}
  Model:                      ${DEMO_MODEL}
  Allowed browser origins:    ${config.allowedOrigins.join(", ") || "none"}

Try it:
  curl -N ${base}/v1/chat/completions -H "Authorization: Bearer ${apiKeyForClients}" -H "Content-Type: application/json" -d '{"model":"${DEMO_MODEL}","stream":true,"messages":[{"role":"user","content":"Hello relay"}]}'

Stop with Ctrl+C. For a real provider, set the variables in README.md and run 'deno task start'.
`);
  };
  await serve(config, [], banner);
}
