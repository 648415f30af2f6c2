/**
 * The one table of variables and what is made from it: `--help`, `examples/.env.example`, the table in
 * docs/configuration.md. The files must be what `deno task variables` writes from the table today.
 */
import assert from "node:assert/strict";
import { parseEnv } from "node:util";
import { configurationTable, envExample, TABLE_MARKERS, variablesHelp, withTable } from "./render.ts";
import { ENV_VARS, VARIABLE_GROUPS, VARIABLES } from "./variables.ts";
import { parseConfig } from "./parse.ts";

const root = new URL("../../", import.meta.url);

/** The cells of a Markdown table's rows, trimmed, separator rows left out: deno fmt's padding does not count. */
function tableCells(markdown: string): string[][] {
  return markdown.split("\n")
    .filter((line) => line.startsWith("|") && !/^\|[\s|:-]+\|$/.test(line))
    .map((line) => line.slice(1, -1).split(/(?<!\\)\|/).map((cell) => cell.trim()));
}

Deno.test("variables: one table describes every variable once", async (t) => {
  await t.step("each name appears once, in a known group, with a default, an example and what it does", () => {
    assert.equal(new Set(ENV_VARS).size, VARIABLES.length);
    for (const variable of VARIABLES) {
      assert.match(variable.name, /^[A-Z][A-Z0-9_]*$/);
      assert.ok((VARIABLE_GROUPS as readonly string[]).includes(variable.group), variable.name);
      assert.ok(variable.default.length > 0 && variable.summary.length > 0 && variable.details.length > 0);
      assert.ok(variable.summary.length <= 200, `${variable.name}: a summary is one line`);
    }
  });

  await t.step("--help lists every variable with its default", () => {
    const help = variablesHelp();
    for (const variable of VARIABLES) assert.match(help, new RegExp(`^  ${variable.name} +\\S`, "m"), variable.name);
    for (const line of help.split("\n")) assert.ok(line.length <= 120, `a terminal line: ${line}`);
  });

  await t.step("examples/.env.example is the one deno task variables writes, and a relay starts from it", async () => {
    const committed = await Deno.readTextFile(new URL("examples/.env.example", root));
    assert.equal(committed, envExample(), "run `deno task variables`");
    for (const variable of VARIABLES) {
      assert.match(committed, new RegExp(`^(# )?${variable.name}=`, "m"), `${variable.name} is in .env.example`);
    }
    const starter = parseEnv(committed) as Record<string, string>;
    assert.deepEqual(
      Object.keys(starter).sort(),
      VARIABLES.filter((variable) => "starter" in variable).map((variable) => variable.name).sort(),
    );
    const result = parseConfig(starter);
    assert.ok(result.ok, result.ok ? "" : result.errors.join("\n"));
  });

  await t.step("the table in docs/configuration.md is the one deno task variables writes", async () => {
    const document = await Deno.readTextFile(new URL("docs/configuration.md", root));
    const [start, end] = TABLE_MARKERS;
    const inDocs = document.slice(document.indexOf(start), document.indexOf(end));
    assert.ok(inDocs.length > 0, "the markers are there");
    assert.deepEqual(tableCells(inDocs), tableCells(configurationTable()), "run `deno task variables`");
  });

  await t.step("withTable replaces only what stands between the markers, and needs both", () => {
    const [start, end] = TABLE_MARKERS;
    assert.equal(withTable(`a\n${start}\nold\n${end}\nb`, "new\n"), `a\n${start}\n\nnew\n\n${end}\nb`);
    assert.equal(withTable("no markers", "new"), undefined);
    assert.equal(withTable(`${end}\n${start}`, "new"), undefined, "markers in the wrong order");
  });
});
