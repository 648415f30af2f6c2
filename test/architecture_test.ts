/**
 * The shape docs/architecture.md describes: imports flow one way (no module imports one that imports it back, however
 * far round), no module of the relay over 1,000 lines, and main.ts the entry, imported by none.
 */
import assert from "node:assert/strict";

const root = new URL("../", import.meta.url);

/** Every module of the relay (not its tests) by path from the root, with the relative modules it imports. */
async function modules(): Promise<Map<string, { lines: number; imports: string[] }>> {
  const found = new Map<string, { lines: number; imports: string[] }>();
  const visit = async (folder: string) => {
    for await (const entry of Deno.readDir(new URL(folder, root))) {
      const path = `${folder}${entry.name}`;
      if (entry.isDirectory) await visit(`${path}/`);
      else if (entry.name.endsWith(".ts") && !entry.name.endsWith("_test.ts")) found.set(path, await read(path));
    }
  };
  const read = async (path: string) => {
    const text = await Deno.readTextFile(new URL(path, root));
    const imports = [...text.matchAll(/^(?:import|export)\b[^;]*?\bfrom\s+"(\.{1,2}\/[^"]+)";/gms)]
      .map(([, specifier]) => new URL(specifier, new URL(path, root)).pathname.slice(root.pathname.length));
    return { lines: text.split("\n").length, imports };
  };
  found.set("main.ts", await read("main.ts"));
  await visit("src/");
  return found;
}

Deno.test("architecture: imports flow one way, and every room is small enough to read", async (t) => {
  const graph = await modules();

  await t.step("no import circle, type-only imports included", () => {
    const circles: string[] = [];
    const state = new Map<string, "open" | "done">();
    const walk = (path: string, trail: string[]) => {
      if (state.get(path) === "done") return;
      if (state.get(path) === "open") {
        circles.push([...trail.slice(trail.indexOf(path)), path].join(" -> "));
        return;
      }
      state.set(path, "open");
      for (const next of graph.get(path)?.imports ?? []) walk(next, [...trail, path]);
      state.set(path, "done");
    };
    for (const path of graph.keys()) walk(path, []);
    assert.deepEqual(circles, []);
  });

  await t.step("every import names a module that exists", () => {
    for (const [path, { imports }] of graph) {
      for (const target of imports) assert.ok(graph.has(target), `${path} imports ${target}`);
    }
  });

  await t.step("main.ts is the entry: no module imports it (the worker threads start it by URL)", () => {
    for (const [path, { imports }] of graph) assert.ok(!imports.includes("main.ts"), `${path} imports main.ts`);
  });

  await t.step("no module of the relay is over 1,000 lines", () => {
    const over = [...graph].filter(([, { lines }]) => lines > 1000).map(([path, { lines }]) => `${path}: ${lines}`);
    assert.deepEqual(over, []);
  });

  await t.step("config imports nothing above it, the stores nothing of the stages", () => {
    for (const [path, { imports }] of graph) {
      if (path.startsWith("src/config/")) {
        assert.deepEqual(imports.filter((target) => !target.startsWith("src/config/")), [], path);
      }
      if (path.startsWith("src/stores/")) {
        assert.deepEqual(imports.filter((target) => target.startsWith("src/stages/")), [], path);
      }
    }
  });
});
