/**
 * The secret masker: configured secrets (provider keys, extra header values) found and masked in what an upstream
 * sends back, in every form a server may echo them.
 *
 * @module
 */

import { parseJsonText, textEncoder } from "./text.ts";

/**
 * Masks configured secrets (provider keys, extra header values of 8 characters or more) in what an upstream
 * sends back. It knows the forms a server may echo a key in: as it is, JSON-escaped (`\\/`, `\\u002d`: a JSON
 * body is parsed and every string masked), URL-encoded, and in base64 at any alignment. Text that still
 * reveals a secret once unescaped gets `undefined`: the caller replaces it rather than pass it on.
 */
export function createSecretMasker(rawSecrets: string[]) {
  const secrets = [...new Set(rawSecrets.filter((secret) => secret.length >= 8))];
  const forms = [...new Set(secrets.flatMap(secretForms))].sort((a, b) => b.length - a.length);
  const anyForm = forms.length === 0
    ? undefined
    : new RegExp(forms.map((form) => form.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|"));
  const replaceForms = (text: string) => maskRanges(text, forms);
  const maskValue = (value: unknown): unknown => {
    if (typeof value === "string") return replaceForms(value);
    if (Array.isArray(value)) return value.map(maskValue);
    if (typeof value === "object" && value !== null) {
      return Object.fromEntries(Object.entries(value).map(([key, inner]) => [replaceForms(key), maskValue(inner)]));
    }
    return value;
  };
  const reveals = (text: string) => {
    const unescaped = text.replace(/\\u([0-9a-fA-F]{4})/g, (_, hex) => String.fromCharCode(parseInt(hex, 16)))
      .replaceAll("\\/", "/");
    let decoded = text;
    try {
      decoded = decodeURIComponent(text.replaceAll("+", " "));
    } catch {
      // not URL-encoded text
    }
    return secrets.some((secret) => unescaped.includes(secret) || decoded.includes(secret));
  };
  return {
    mask(text: string): string | undefined {
      if (secrets.length === 0) return text;
      let masked = text;
      const parsed = parseJsonText(text);
      if (typeof parsed === "object" && parsed !== null) {
        const deep = JSON.stringify(maskValue(parsed));
        if (deep !== JSON.stringify(parsed)) masked = deep;
      }
      masked = replaceForms(masked);
      return reveals(masked) ? undefined : masked;
    },
    maskHeaderValue(value: string): string {
      if (anyForm === undefined) return value;
      // One regex test per header; the unescaping check only where escapes could hide a secret.
      const hidden = (value.includes("%") || value.includes("\\")) && reveals(value);
      return hidden || anyForm.test(value) ? "[REDACTED]" : value;
    },
  };
}

/**
 * `text` with every place any of `forms` stands replaced by `[REDACTED]`. The places are found first and overlapping
 * ones joined, so where two secrets overlap (the end of one is the start of another) no part of either is left, as
 * one replacement after another would leave it.
 */
function maskRanges(text: string, forms: string[]): string {
  const ranges: [number, number][] = [];
  for (const form of forms) {
    for (let at = text.indexOf(form); at >= 0; at = text.indexOf(form, at + 1)) ranges.push([at, at + form.length]);
  }
  if (ranges.length === 0) return text;
  ranges.sort((a, b) => a[0] - b[0]);
  let out = "";
  let done = 0;
  let [start, end] = ranges[0];
  for (const [from, to] of ranges.slice(1)) {
    if (from < end) {
      end = Math.max(end, to);
      continue;
    }
    out += `${text.slice(done, start)}[REDACTED]`;
    done = end;
    [start, end] = [from, to];
  }
  return `${out}${text.slice(done, start)}[REDACTED]${text.slice(end)}`;
}

/** The forms a secret may take in text: as it is, JSON- and URL-escaped, and base64 (standard and URL-safe). */
export function secretForms(secret: string): string[] {
  const forms = [secret, JSON.stringify(secret).slice(1, -1), secret.replaceAll("/", "\\/")];
  const encoded = encodeURIComponent(secret);
  forms.push(encoded, encoded.replace(/%[0-9A-F]{2}/g, (escape) => escape.toLowerCase()));
  const bytes = textEncoder.encode(secret);
  for (let shift = 0; shift < 3; shift++) {
    // Base64 of the secret after `shift` other bytes: drop the groups that the bytes around it change.
    const padded = new Uint8Array(shift + bytes.length);
    padded.set(bytes, shift);
    const base64 = btoa(String.fromCharCode(...padded)).replace(/=+$/, "");
    const core = base64.slice(shift === 0 ? 0 : 4, base64.length - 4);
    if (core.length >= 8) forms.push(core, core.replaceAll("+", "-").replaceAll("/", "_"));
  }
  return forms;
}
