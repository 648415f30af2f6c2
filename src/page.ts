/**
 * The relay's own page at / and MC's one-link settings (/mc-settings.json): what a person opening the relay's URL
 * sees, and the link that configures MetaConfigurator.
 *
 * @module
 */

import { BARE_PASSWORD_USER, LOOPBACK_AUTHORITY } from "./config/parse.ts";
import { METACONFIGURATOR_ORIGINS, type RelayConfig, VERSION } from "./config/variables.ts";
import type { Relay, RequestContext } from "./context.ts";
import { mcEndpoint } from "./endpoint.ts";
import { errorResponse, jsonResponse } from "./http.ts";
import { upstreamProbe, type UpstreamState } from "./probe.ts";
import { textEncoder } from "./text.ts";

/**
 * The address users reach the relay at, BASE_PATH included: PUBLIC_URL when set. Without it, only a relay that
 * listens on loopback derives it, from a loopback Host header (a browser or proxy on this machine); a Host header
 * from anywhere else is never trusted for it, since an answer built from it could be cached for others.
 */
function publicBase(relay: Relay, context: RequestContext): string | undefined {
  const { config } = relay;
  if (config.publicUrl) return config.publicUrl;
  const host = context.request.headers.get("host") ?? "";
  if (!LOOPBACK_AUTHORITY.test(config.host) || !LOOPBACK_AUTHORITY.test(host)) return undefined;
  return `${config.tlsCertFile ? "https" : "http"}://${host}${config.basePath}`;
}

/**
 * The model MC is told to use: DEFAULT_MODEL, else the first of ALLOWED_MODELS, else the first model the (first)
 * upstream lists (`upstreamProbe`: cached, never a long wait), else none, and MC keeps its own default; the start-up
 * check warns then (src/startup.ts).
 */
export async function mcModel(config: RelayConfig): Promise<string | undefined> {
  const configured = config.defaultModel ?? config.allowedModels[0];
  if (configured !== undefined) return configured;
  const states = await upstreamProbe(config).read();
  return states.find((state) => state.name === config.upstreams[0].name)?.firstModel;
}

/** MC's settings document that selects this relay: the relay, the endpoint it serves, and the model if one is known. */
function mcSettings(relay: Relay, base: string, model: string | undefined) {
  const endpoint = mcEndpoint(relay.config, relay.upstreams[0]);
  return { aiIntegration: { ...(model && { model }), backend: { relay: base, endpoint } } };
}

/** The link that configures MetaConfigurator for this relay in one click. */
export function mcSettingsLink(base: string): string {
  return `${METACONFIGURATOR_ORIGINS[0]}/?settings=${encodeURIComponent(`${base}/mc-settings.json`)}`;
}

/**
 * Stage: GET /mc-settings.json, without credentials and with CORS for allowed origins: the MC settings document
 * that selects this relay, for `https://www.metaconfigurator.org/?settings=<relay>/mc-settings.json`. Nothing secret
 * is in it. 404 when the relay does not know the address users reach it at (set PUBLIC_URL).
 */
export async function answerMcSettings(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const base = publicBase(relay, context);
  if (base === undefined) {
    return errorResponse(
      404,
      "this relay does not know the address its users reach it at; its operator sets PUBLIC_URL, e.g. https://relay.example.com",
      "public_url_unknown",
    );
  }
  return jsonResponse(mcSettings(relay, base, await mcModel(relay.config)), {
    headers: { "cache-control": "no-cache" },
  });
}

/** Stage: GET / (under BASE_PATH; PAGE=false turns it off): the relay's own page, without credentials. */
export async function answerPage(relay: Relay, context: RequestContext): Promise<Response | undefined> {
  const hashes = await pageHashes;
  const [model, states] = await Promise.all([mcModel(relay.config), upstreamProbe(relay.config).read()]);
  const body = textEncoder.encode(pageHtml(relay, context, model, providerState(states)));
  return new Response(body, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-length": String(body.byteLength),
      "content-security-policy":
        `default-src 'none'; script-src '${hashes.script}'; style-src '${hashes.style}'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'`,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-store",
    },
  });
}

/** What the page says of the AI provider (the first upstream), from the cached check: nothing when it is unknown. */
function providerState(states: UpstreamState[]): string {
  const answers = states[0]?.answers;
  if (answers === true) return "; its AI provider answers";
  if (answers === false) return "; <strong>its AI provider does not answer right now</strong>";
  return "";
}

/** Text for HTML, with `&`, `<`, `>`, `"` and `'` escaped. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

/**
 * How callers sign in: with the bare relay password (MC_RELAY_PASSWORD alone, as a relay migrated from MC's Flask
 * relay takes it), as named users, both, or neither (BYOK upstreams only). The page and the banner word their key by it.
 */
export function signIns(config: RelayConfig): { bare: boolean; named: boolean } {
  const bare = config.users.some((user) => user.name === BARE_PASSWORD_USER);
  return { bare, named: config.users.length > (bare ? 1 : 0) };
}

/** What the page asks for as the API key, in MC and in an SDK, as HTML. */
function keyWords(relay: Relay): { what: string; keyText: string; sdkKeyText: string } {
  const { config } = relay;
  const { bare, named } = signIns(config);
  const what = bare
    ? named ? "the relay password, or your <code>username:password</code>" : "the relay password"
    : "your <code>username:password</code>";
  const keyText = config.publicAccess
    ? "nothing: this relay is public (leave MC's key field empty), or your <code>username:password</code> if you have one"
    : `${what}, from whoever runs this relay`;
  // The OpenAI SDKs refuse an empty key; a public relay takes any key that names no user as no key at all.
  const sdkKeyText = config.publicAccess
    ? `<code data-copy="apiKey">public</code> (any non-empty value: the SDKs refuse an empty key), or your <code>username:password</code> if you have one`
    : keyText;
  return { what, keyText, sdkKeyText };
}

/**
 * The page: what this relay is and whether it runs, the values to type into MC and into an SDK (each with a copy
 * button), the one-link setup, and a sign-in that lists the models, runs a streamed test chat and shows the caller's
 * limits and budgets. The information is in the HTML itself; only copying, sign-in and the chat need JavaScript. The
 * models (and so the upstreams) show only after sign-in; the key typed stays in the page's memory.
 */
function pageHtml(relay: Relay, context: RequestContext, model: string | undefined, provider: string): string {
  const { config } = relay;
  const base = publicBase(relay, context);
  const shown = (value: string | undefined, placeholder: string) =>
    value === undefined
      ? `<span data-fill="${escapeHtml(placeholder)}">${escapeHtml(placeholder)}</span>`
      : escapeHtml(value);
  const relayUrl = shown(base, "{base}");
  const sdkUrl = shown(base && `${base}/v1`, "{base}/v1");
  const { what, keyText, sdkKeyText } = keyWords(relay);
  const state = relay.counters.state === "degraded"
    ? "running, counting limits in this copy alone (store unreachable)"
    : "running";
  const link = base === undefined
    ? `<p>The one-click setup needs the relay's public address: its operator sets <code>PUBLIC_URL</code>.</p>`
    : `<p><a href="${
      escapeHtml(mcSettingsLink(base))
    }">Set up MetaConfigurator for this relay in one click</a> (it loads <code>${
      escapeHtml(`${base}/mc-settings.json`)
    }</code>).</p>`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mc-relay</title>
<link rel="icon" href="data:,">
<style>${PAGE_STYLE}</style>
</head>
<body data-base-path="${escapeHtml(config.basePath)}" data-public="${config.publicAccess}" data-model="${
    escapeHtml(model ?? "")
  }">
<main>
<h1>mc-relay</h1>
<p>A relay between web apps such as <a href="https://www.metaconfigurator.org">MetaConfigurator</a> and an OpenAI-compatible AI provider. It keeps the provider's key on the server and answers browsers from the allowed origins only.</p>
<p id="status">Status: <strong>${escapeHtml(state)}</strong>${provider}. Version ${VERSION}.</p>
<h2>Use it from MetaConfigurator</h2>
${link}
<p>Or type these into MetaConfigurator's AI settings (the relay option):</p>
<dl>
<dt>Relay URL (without <code>/v1</code>)</dt><dd><code data-copy="Relay URL">${relayUrl}</code></dd>
<dt>Endpoint</dt><dd><code data-copy="Endpoint">${
    escapeHtml(mcEndpoint(config, relay.upstreams[0]))
  }</code><br><span class="note">Which AI provider behind this relay answers MC: MC sends this name with each request.</span></dd>
<dt>Model</dt><dd>${
    model === undefined
      ? "the name of a model this relay serves (sign in below to list them)"
      : `<code data-copy="Model">${escapeHtml(model)}</code>`
  }</dd>
<dt>API key</dt><dd>${keyText}</dd>
</dl>
<h2>Use it from an OpenAI SDK</h2>
<dl>
<dt><code>baseURL</code></dt><dd><code data-copy="baseURL">${sdkUrl}</code></dd>
<dt><code>apiKey</code></dt><dd>${sdkKeyText}</dd>
</dl>
<h2>Try it</h2>
<noscript><p>Signing in and the test chat need JavaScript.</p></noscript>
<form id="sign-in" hidden>
${
    config.publicAccess
      ? `<p>This relay is public: nothing is needed to try it. If you have a <code>username:password</code>, type it for your own limits.</p>
<label for="key">API key (optional)</label>
<input id="key" type="password" autocomplete="current-password" spellcheck="false">
<button type="submit">Show models and limits</button>`
      : `<label for="key">API key (${what.replace("your ", "")})</label>
<input id="key" type="password" autocomplete="current-password" spellcheck="false">
<button type="submit">Sign in</button>`
  }
<p class="note">A key typed here stays in this page's memory; it is sent to this relay only.</p>
</form>
<div id="signed-in" hidden>
<h3>Models</h3>
<ul id="models"></ul>
<h3>Your limits</h3>
<ul id="usage"></ul>
<h3>Test chat</h3>
<form id="chat">
<label for="model">Model</label>
<select id="model"></select>
<label for="message">Message</label>
<input id="message" value="Say hello in three words">
<button type="submit">Send</button>
</form>
<pre id="answer" aria-live="polite"></pre>
</div>
<p id="problem" role="alert"></p>
</main>
<script>${PAGE_SCRIPT}</script>
</body>
</html>
`;
}

/** The page's style: readable, high contrast, visible focus, light and dark. */
const PAGE_STYLE = `
body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fff}
main{max-width:46rem;margin:0 auto;padding:1rem 1.25rem 3rem}
a{color:#0b57d0}code{font:0.95em ui-monospace,monospace;background:#f0f0f0;padding:0 .2em;border-radius:3px}
dt{font-weight:600;margin-top:.5rem}dd{margin:0 0 0 1rem}
label{display:block;font-weight:600;margin-top:.75rem}
input,select{font:inherit;padding:.35rem;width:100%;max-width:30rem;box-sizing:border-box;border:1px solid #555;border-radius:4px}
button{font:inherit;margin:.5rem .5rem 0 0;padding:.35rem .9rem;border:1px solid #0b57d0;border-radius:4px;background:#0b57d0;color:#fff;cursor:pointer}
dd button{margin:0 0 0 .5rem;padding:0 .5rem;background:#fff;color:#0b57d0}
:focus-visible{outline:3px solid #e37400;outline-offset:2px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.75rem;border-radius:4px;min-height:1.5rem}
.note{font-size:.9rem;color:#444}#problem{color:#b3261e;font-weight:600}
@media (prefers-color-scheme:dark){body{color:#eee;background:#121212}a{color:#8ab4f8}code,pre{background:#2a2a2a}
input,select{background:#1e1e1e;color:#eee;border-color:#aaa}.note{color:#bbb}#problem{color:#f28b82}
dd button{background:#121212;color:#8ab4f8;border-color:#8ab4f8}}
`;

/** The page's script: copy buttons, sign-in, models, limits and a streamed test chat. It holds no server data. */
const PAGE_SCRIPT = `
"use strict";
const data = document.body.dataset;
const api = (path) => data.basePath + path;
const $ = (id) => document.getElementById(id);
let key = "";
const problem = (text) => { $("problem").textContent = text; };
for (const node of document.querySelectorAll("[data-fill]")) {
  const base = location.origin + data.basePath;
  node.textContent = node.dataset.fill.replace("{base}", base);
}
for (const code of document.querySelectorAll("[data-copy]")) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy the " + code.dataset.copy);
  button.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(code.textContent); button.textContent = "Copied"; }
    catch { button.textContent = "Select and copy"; }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  code.after(button);
}
async function call(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (key) headers.authorization = "Bearer " + key;
  const response = await fetch(api(path), { ...init, headers });
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try { message = (await response.json()).error.message; } catch {}
    throw new Error(message);
  }
  return response;
}
$("sign-in").hidden = false;
$("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  problem("");
  try {
    const models = (await (await call("/v1/models")).json()).data.map((model) => model.id);
    $("models").replaceChildren(...models.map((id) => Object.assign(document.createElement("li"), { textContent: id })));
    $("model").replaceChildren(...models.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id, selected: id === data.model })));
    const usage = await (await call("/usage")).json();
    const lines = [
      ...usage.budgets.map((b) => b.remaining.toLocaleString("en-US") + " of " + b.budget.toLocaleString("en-US") + " tokens left this UTC " + b.window + " (renews " + new Date(b.resets_at).toLocaleString("en-GB", { timeZone: "UTC", dateStyle: "medium", timeStyle: "short" }) + " UTC)"),
      ...usage.limits.map((l) => l.remaining + " of " + l.limit + " requests left per " + l.window),
      ...(usage.max_tokens_per_request ? ["answers up to " + usage.max_tokens_per_request + " tokens"] : []),
    ];
    $("usage").replaceChildren(...(lines.length ? lines : ["no limits or budgets"]).map((text) => Object.assign(document.createElement("li"), { textContent: text })));
    $("signed-in").hidden = false;
    $("message").focus();
  } catch (error) {
    problem(error.message);
  }
});
$("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  problem("");
  $("answer").textContent = "";
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: $("model").value, stream: true, messages: [{ role: "user", content: $("message").value }] }),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      pending += value;
      const events = pending.split(/\\r?\\n\\r?\\n/);
      pending = events.pop();
      for (const event of events) {
        const text = event.split(/\\r?\\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
        if (!text || text === "[DONE]") continue;
        const delta = JSON.parse(text).choices?.[0]?.delta?.content;
        if (delta) $("answer").textContent += delta;
      }
    }
  } catch (error) {
    problem(error.message);
  }
});
`;

/** The CSP hashes of the page's script and style, computed once. */
const pageHashes = (async () => {
  const hash = async (text: string) =>
    `sha256-${
      btoa(String.fromCharCode(...new Uint8Array(await crypto.subtle.digest("SHA-256", textEncoder.encode(text)))))
    }`;
  return { script: await hash(PAGE_SCRIPT), style: await hash(PAGE_STYLE) };
})();
