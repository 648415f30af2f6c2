/**
 * Small text helpers every layer uses: the process's one `TextEncoder`, an error as one line of text, JSON that may
 * not parse.
 *
 * @module
 */

export const textEncoder = new TextEncoder();

export function parseJsonText(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** An error's message followed by those of its causes (fetch puts the useful part in `cause`). */
export function errorText(error: unknown): string {
  const parts: string[] = [];
  for (let current = error, depth = 0; current !== undefined && depth < 5; depth++) {
    parts.push(current instanceof Error ? current.message : String(current));
    current = current instanceof Error ? current.cause : undefined;
  }
  return parts.join(": ");
}
