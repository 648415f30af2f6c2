/**
 * The Vercel AI SDK, pointed at the relay: `openai.chat(model)` calls chat completions, which every OpenAI-compatible
 * server (vLLM, Ollama) serves. RESPONSES=1 uses the SDK's default factory, `openai(model)`, which calls the Responses
 * API (`/v1/responses`): the relay passes it on to upstreams that serve it (OpenAI).
 * Run: RELAY=http://localhost:8080 KEY=user:password MODEL=echo deno run --allow-net --allow-env --allow-read --allow-sys examples/vercel-ai-sdk.ts
 */
import { createOpenAI } from "npm:@ai-sdk/openai@4.0.118";
import { generateText, streamText } from "npm:ai@7.0.173";

const relay = Deno.env.get("RELAY") ?? "http://localhost:8080";
const openai = createOpenAI({
  baseURL: `${relay}/v1`, // the relay's /v1, not the provider's
  apiKey: Deno.env.get("KEY")!, // "username:password" for the relay; the provider key stays on the server
});
const name = Deno.env.get("MODEL") ?? "gpt-4o-mini";
const model = Deno.env.get("RESPONSES") === "1" ? openai(name) : openai.chat(name);

const { text } = await generateText({ model, prompt: "Say hello in three words" });
console.log("generateText:", text);

const stream = streamText({ model, prompt: "Count to five" });
let streamed = "";
for await (const part of stream.textStream) streamed += part;
console.log("streamText:", streamed);
