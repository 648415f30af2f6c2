/**
 * How a start that cannot go on says why and stops: every problem on one line each, then exit code 1. The command
 * line, the server and the demo all stop this way.
 *
 * @module
 */

/** An error's class name, for one-line messages (`NotFound`, `PermissionDenied`). */
export function errorName(error: unknown): string {
  return error instanceof Error ? error.name : "error";
}

/** Prints every start-up problem, one a line (and a hint where one helps), and exits with code 1. */
export function exitWithErrors(errors: string[], hint = ""): never {
  console.error(`mc-relay: cannot start, ${errors.length} configuration problem(s):`);
  for (const error of errors) console.error(`  ${error}`);
  if (hint) console.error(hint);
  console.error("See 'mc-relay --help' or docs/configuration.md for every variable.");
  Deno.exit(1);
}
