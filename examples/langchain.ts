/**
 * LangChain's ChatOpenAI, pointed at the relay (chat completions, streamed and not).
 * Run: RELAY=http://localhost:8080 KEY=user:password MODEL=echo deno run --allow-net --allow-env --allow-read examples/langchain.ts
 * (LangChain resolves its own `openai` dependency best with a local node_modules: add --node-modules-dir=auto.)
 */
import { ChatOpenAI } from "npm:@langchain/openai@1.6.0";

const relay = Deno.env.get("RELAY") ?? "http://localhost:8080";
const chat = new ChatOpenAI({
  model: Deno.env.get("MODEL") ?? "gpt-4o-mini",
  apiKey: Deno.env.get("KEY")!, // "username:password" for the relay
  configuration: { baseURL: `${relay}/v1` },
});

const answer = await chat.invoke("Say hello in three words");
console.log("invoke:", answer.content);

let streamed = "";
for await (const chunk of await chat.stream("Count to five")) streamed += chunk.content;
console.log("stream:", streamed);
