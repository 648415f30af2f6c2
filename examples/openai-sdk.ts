/**
 * The official OpenAI SDK, pointed at the relay: models and chat completions (streamed and not), which every
 * OpenAI-compatible server (vLLM, Ollama) serves. RESPONSES=1 adds the Responses API, EMBEDDINGS=1 embeddings (with
 * an embedding model in MODEL), for upstreams that serve them.
 * Run: RELAY=http://localhost:8080 KEY=user:password MODEL=echo deno run --allow-net --allow-env examples/openai-sdk.ts
 */
import OpenAI from "npm:openai@7";

const relay = Deno.env.get("RELAY") ?? "http://localhost:8080";
const client = new OpenAI({
  baseURL: `${relay}/v1`, // the relay's /v1, not the provider's
  apiKey: Deno.env.get("KEY")!, // "username:password" for the relay; the provider key stays on the server
});
const model = Deno.env.get("MODEL") ?? "gpt-4o-mini";

const models = await client.models.list();
console.log("models:", models.data.map((entry) => entry.id).join(", "));

const completion = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Say hello in three words" }],
});
console.log("answer:", completion.choices[0].message.content);

const stream = await client.chat.completions.create({
  model,
  stream: true,
  messages: [{ role: "user", content: "Count to five" }],
});
for await (const chunk of stream) {
  await Deno.stdout.write(new TextEncoder().encode(chunk.choices[0]?.delta?.content ?? ""));
}
console.log();

// The Responses API (the default of newer SDKs) and embeddings pass through the relay the same way, where the
// upstream serves them (OpenAI does; vLLM and Ollama serve embeddings for embedding models only).
if (Deno.env.get("RESPONSES") === "1") {
  const response = await client.responses.create({ model, input: "Say hello from the Responses API" });
  console.log("responses:", response.output_text);
}
if (Deno.env.get("EMBEDDINGS") === "1") {
  const embedding = await client.embeddings.create({ model, input: "embed me" });
  console.log("embeddings:", embedding.data[0].embedding.length, "numbers");
}
