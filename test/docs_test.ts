/**
 * The docs say what the code does: the README a newcomer's five minutes, every relative link resolving, the routes of
 * docs/http.md those the relay serves, every variable the docs name one the relay reads, one Deno version everywhere.
 */
import assert from "node:assert/strict";
import { ENV_VARS, VERSION } from "../main.ts";
import { ROUTES } from "../src/config/routes.ts";

const root = new URL("../", import.meta.url);
const read = (path: string) => Deno.readTextFile(new URL(path, root));

/** README.md and every page under docs/, by path. */
async function documents(): Promise<Map<string, string>> {
  const pages = new Map([["README.md", await read("README.md")]]);
  for await (const entry of Deno.readDir(new URL("docs/", root))) {
    if (entry.isFile && entry.name.endsWith(".md")) pages.set(`docs/${entry.name}`, await read(`docs/${entry.name}`));
  }
  return pages;
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens. */
function anchor(heading: string): string {
  return heading.trim().toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, "").replaceAll(" ", "-");
}

/**
 * Names that look like variables but are someone else's: MC's Flask relay, Deno, the shell, the compose files, the
 * relay's own constants.
 */
const NOT_OURS = new Set([
  "ENABLE_MODELS_PROXY",
  "ENABLE_STREAMING",
  "UPSTREAM_PATH_PREFIX",
  "DENO_DIR",
  "NO_COLOR",
  "NPM_CONFIG_REGISTRY",
  "DEBIAN_FRONTEND",
  "GITHUB_TOKEN",
  "SHARED_STORE_TIMEOUT_MS",
  "REDIS_START_WAIT_MS",
  "BODY_IDLE_MS",
  "MAX_ANSWER_TOKENS",
  "MAX_REPORTED_TOKENS",
  "MC_RELAY_DOMAIN", // the compose files' own variable, for Caddy's site address and PUBLIC_URL
  "BUFFER_CHANNEL_SIZE", // a Deno internal the performance notes measure
  "DENO_V8_FLAGS",
  "TCP_NODELAY", // a socket option the performance notes measure
  "BENCH_PORTKEY_VERSION", // the bench's own settings
  "WARM_UP_SECONDS",
]);

Deno.test("docs: what the README and docs/ say is true of the code", async (t) => {
  const pages = await documents();

  await t.step("the README is a five-minute read that names the test command CI runs", async () => {
    const readme = pages.get("README.md")!;
    assert.ok(new TextEncoder().encode(readme).length <= 20_000, "README.md is at most 20 kB");
    assert.match(readme, /deno task test/);
    assert.match(await read(".ci/run"), /^deno task test$/m, ".ci/run runs the README's test command");
  });

  await t.step("every relative link and anchor between the README and docs/ resolves", async () => {
    for (const [path, text] of pages) {
      const folder = path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : "";
      for (const [, target] of text.matchAll(/\]\(([^)\s]+)\)/g)) {
        if (/^[a-z]+:/.test(target)) continue;
        const [file, hash] = target.split("#");
        const resolved = file === "" ? path : new URL(file, new URL(folder, root)).pathname.slice(root.pathname.length);
        const exists = await Deno.stat(new URL(resolved, root)).then(() => true, () => false);
        assert.ok(exists, `${path}: the link ${target} points at nothing`);
        if (hash !== undefined && resolved.endsWith(".md")) {
          const headings = (pages.get(resolved) ?? await read(resolved)).match(/^#+ .*$/gm) ?? [];
          const anchors = headings.map((heading) => anchor(heading.replace(/^#+ /, "")));
          assert.ok(anchors.includes(hash), `${path}: the anchor #${hash} is no heading of ${resolved}`);
        }
      }
    }
  });

  await t.step("docs/http.md's route table is the relay's route table", () => {
    const documented = new Map<string, string>();
    for (const [, method, path] of pages.get("docs/http.md")!.matchAll(/^\| (GET|POST) +\| `([^`]+)` +\|/gm)) {
      documented.set(path, method);
    }
    const served = new Map(Object.entries(ROUTES).map(([path, route]) => [path, route.method as string]));
    served.set("/metrics", "GET"); // added when METRICS names users
    served.set("/admin", "GET").set("/admin/usage", "GET"); // added when ADMINS names users
    assert.deepEqual([...documented].sort(), [...served].sort());
  });

  await t.step("every variable the docs name is one the relay reads", () => {
    const known = new Set<string>(ENV_VARS);
    const unknown: string[] = [];
    for (const [path, text] of pages) {
      for (const [, name] of text.matchAll(/`([A-Z][A-Z0-9]*_[A-Z0-9_]+)(?:=[^`]*)?`/g)) {
        if (!known.has(name) && !NOT_OURS.has(name)) unknown.push(`${path}: ${name}`);
      }
    }
    assert.deepEqual(unknown, [], "names the relay does not read");
  });

  await t.step("one Deno version everywhere: CI, the image, the workflows and the docs", async () => {
    const version = /deno@(\d+\.\d+\.\d+)/.exec(await read(".ci/run"))![1];
    assert.match(await read("Dockerfile"), new RegExp(`denoland/deno:${version.replaceAll(".", "\\.")}\\b`));
    for (const workflow of [".github/workflows/release.yml", ".github/workflows/test.yml"]) {
      for (const [, named] of (await read(workflow)).matchAll(/deno-version: v(\S+)/g)) assert.equal(named, version);
    }
    for (const [path, text] of pages) {
      for (const [, named] of text.matchAll(/Deno (\d+\.\d+\.\d+)/g)) assert.equal(named, version, path);
    }
  });

  await t.step("the CHANGELOG's released versions end at the one --version prints", async () => {
    const released = [...(await read("CHANGELOG.md")).matchAll(/^## \[(\d+\.\d+\.\d+)\]/gm)].map((match) => match[1]);
    assert.equal(released[0], VERSION);
  });
});

Deno.test("docs: no page carries a secret: no real-looking provider key, none of the tests' canaries", async () => {
  for (const [path, text] of await documents()) {
    assert.doesNotMatch(text, /\bsk-(proj-)?[A-Za-z0-9_-]{24,}/, `${path}: a real-looking provider key`);
    assert.doesNotMatch(text, /CANARY/, `${path}: a test canary`);
  }
});
