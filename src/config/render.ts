/**
 * What is made from the one table of variables (`VARIABLES`): the variables part of `--help`, `examples/.env.example`
 * and the table in docs/configuration.md. Pure text functions; `deno task variables` writes the two files and a test
 * checks that the committed ones are current.
 *
 * @module
 */

import { VARIABLE_GROUPS, VARIABLES } from "./variables.ts";

/** Markdown's inline code marks, dropped where the text is read in a terminal or a `.env` comment. */
function plain(markdown: string): string {
  return markdown.replaceAll("`", "");
}

/** Words of `text` in lines of at most `width` characters. */
function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    if (line !== "" && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line === "" ? word : `${line} ${word}`;
    }
  }
  if (line !== "") lines.push(line);
  return lines;
}

/** The variables of `--help`, by group: a name, what it does and its default in brackets. */
export function variablesHelp(): string {
  const column = 30;
  const out: string[] = [];
  for (const group of VARIABLE_GROUPS) {
    out.push(`${group}:`);
    for (const variable of VARIABLES.filter((entry) => entry.group === group)) {
      const lines = wrap(`${plain(variable.summary)} [${plain(variable.default)}]`, 118 - column);
      out.push(`  ${variable.name.padEnd(column - 3)} ${lines[0]}`);
      for (const more of lines.slice(1)) out.push(`${" ".repeat(column)}${more}`);
    }
    out.push("");
  }
  return out.join("\n");
}

/** `examples/.env.example`: every variable, by group, the starters set and the rest commented out. */
export function envExample(): string {
  const out = [
    "# mc-relay configuration: every variable, made from the table in src/config/variables.ts",
    "# (`deno task variables` writes this file). Copy it to .env (never commit that) and fill in the values that are",
    "# set; uncomment what you need. `deno task start`, `mc-relay --env-file .env`, `docker run --env-file .env` and",
    "# systemd's EnvironmentFile= read it. Every variable: docs/configuration.md.",
  ];
  for (const group of VARIABLE_GROUPS) {
    out.push("", `# --- ${group} ${"-".repeat(Math.max(3, 72 - group.length))}`);
    for (const variable of VARIABLES.filter((entry) => entry.group === group)) {
      const fallback = plain(variable.default);
      const bracket = fallback.startsWith("required") ? fallback : `default: ${fallback}`;
      for (const line of wrap(`${plain(variable.summary)} [${bracket}]`, 116)) out.push(`# ${line}`);
      out.push(`${"starter" in variable ? "" : "# "}${variable.name}=${variable.example}`);
    }
  }
  return out.join("\n") + "\n";
}

/** A Markdown table cell: no line breaks, pipes escaped. */
function cell(text: string): string {
  return text.replaceAll("|", "\\|").replaceAll("\n", " ");
}

/** The table of docs/configuration.md: variable, default, example, what it does. */
export function configurationTable(): string {
  const rows = [
    "| Variable | Default | Example | What it does |",
    "| --- | --- | --- | --- |",
  ];
  for (const variable of VARIABLES) {
    const example = variable.example === "" ? "empty" : `\`${variable.example}\``;
    rows.push(`| \`${variable.name}\` | ${cell(variable.default)} | ${cell(example)} | ${cell(variable.details)} |`);
  }
  return rows.join("\n") + "\n";
}

/** The markers around the generated table in docs/configuration.md. */
export const TABLE_MARKERS = ["<!-- variables: start (deno task variables) -->", "<!-- variables: end -->"] as const;

/** `document` with the text between the markers replaced by `table`; undefined when a marker is missing. */
export function withTable(document: string, table: string): string | undefined {
  const [start, end] = TABLE_MARKERS;
  const from = document.indexOf(start);
  const to = document.indexOf(end);
  if (from < 0 || to < from) return undefined;
  return `${document.slice(0, from + start.length)}\n\n${table}\n${document.slice(to)}`;
}
