/**
 * The Vercel AI SDK, pointed at the relay, with its default model factory: `openai(model)` calls the Responses API
 * (`/v1/responses`), which the relay serves like every other route.
 * Run: RELAY=http://localhost:8080 KEY=user:password MODEL=echo deno run --allow-net --allow-env --allow-read examples/vercel-ai-sdk.ts
 */
import { createOpenAI } from "npm:@ai-sdk/openai@4.0.118";
import { generateText, streamText } from "npm:ai@7.0.173";

const relay = Deno.env.get("RELAY") ?? "http://localhost:8080";
const openai = createOpenAI({
  baseURL: `${relay}/v1`, // the relay's /v1, not the provider's
  apiKey: Deno.env.get("KEY")!, // "username:password" for the relay; the provider key stays on the server
});
const model = openai(Deno.env.get("MODEL") ?? "gpt-4o-mini");

const { text } = await generateText({ model, prompt: "Say hello in three words" });
console.log("generateText:", text);

const stream = streamText({ model, prompt: "Count to five" });
let streamed = "";
for await (const part of stream.textStream) streamed += part;
console.log("streamText:", streamed);
