/**
 * `deno task variables`: writes what is made from the one table of variables (src/config/variables.ts):
 * `examples/.env.example` and the table in docs/configuration.md. test/config_test.ts fails while either is stale.
 *
 * @module
 */
import { configurationTable, envExample, withTable } from "../src/config/render.ts";

const root = new URL("..", import.meta.url);
await Deno.writeTextFile(new URL("examples/.env.example", root), envExample());
const docsUrl = new URL("docs/configuration.md", root);
const document = withTable(await Deno.readTextFile(docsUrl), configurationTable());
if (document === undefined) {
  console.error("docs/configuration.md has lost its variables markers; put them back around the table");
  Deno.exit(1);
}
await Deno.writeTextFile(docsUrl, document);
console.log("wrote examples/.env.example and the table in docs/configuration.md");
