// The official OpenAI SDK on Node.js, pointed at the relay: chat completions, which every OpenAI-compatible server
// (vLLM, Ollama) serves; RESPONSES=1 adds the Responses API, EMBEDDINGS=1 embeddings, for upstreams that serve them.
// openai@7 declares Node.js 22 or newer.
//   npm install openai@7
//   RELAY=http://localhost:8080 KEY=user:password MODEL=echo node examples/openai-node.mjs
import OpenAI from "openai";

const relay = process.env.RELAY ?? "http://localhost:8080";
const client = new OpenAI({
  baseURL: `${relay}/v1`, // the relay's /v1, not the provider's
  apiKey: process.env.KEY, // "username:password" for the relay; the provider key stays on the server
});
const model = process.env.MODEL ?? "gpt-4o-mini";

const completion = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Say hello in three words" }],
});
console.log("chat:", completion.choices[0].message.content);

if (process.env.RESPONSES === "1") {
  const response = await client.responses.create({ model, input: "Say hello from the Responses API" });
  console.log("responses:", response.output_text);
}

if (process.env.EMBEDDINGS === "1") {
  const embedding = await client.embeddings.create({ model, input: "embed me" });
  console.log("embeddings:", embedding.data[0].embedding.length, "numbers");
}
