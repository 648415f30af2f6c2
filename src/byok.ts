/**
 * Bring your own key: the checks a caller's own provider key passes, and sealed keys (`KeySealer`, SEAL_SECRET). The
 * stages that use them are in src/stages/byok.ts.
 *
 * @module
 */

import { base64url, fromBase64url } from "./config/values.ts";
import type { Upstream } from "./config/variables.ts";
import { textEncoder } from "./text.ts";

/** The longest key a caller may bring: Azure AD access tokens run to a few kilobytes. */
const MAX_CALLER_KEY_LENGTH = 8192;

/** Sealed keys start with this, so the relay tells them from raw provider keys. */
export const SEALED_PREFIX = "mcrs1.";

/** The token a caller sent as `Authorization: Bearer <token>`, if any. */
export function bearerToken(authorization: string | null): string | undefined {
  return /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "")?.[1];
}

/** What is wrong with a key a caller brings for `target`, if anything; checked before the key leaves. */
export function callerKeyProblem(key: string | undefined, target: Upstream): string | undefined {
  if (!key) {
    return `send your own key for the upstream "${target.name}" as the API key (Authorization: Bearer <key>, or X-Api-Key)`;
  }
  if (key.length > MAX_CALLER_KEY_LENGTH) return `the key is longer than ${MAX_CALLER_KEY_LENGTH} characters`;
  if (!/^[\x21-\x7e]+$/.test(key)) {
    return "the key contains spaces, control or non-ASCII characters; paste the key alone";
  }
  if (target.keyPattern && !target.keyPattern.test(key)) {
    return `this is not a key for the upstream "${target.name}" (its keys match ${target.keyPattern.source}); check that the endpoint and the key belong to the same provider`;
  }
  return undefined;
}

/** What a sealed key holds: the key, the upstream it is for, and its expiry (seconds since the epoch). */
interface SealedContent {
  k: string;
  u: string;
  e: number;
}

/**
 * Seals callers' keys for BYOK upstreams, so that a browser can hold a string that only this relay can open, for one
 * upstream and until a date. AES-256-GCM (WebCrypto) under a key derived from SEAL_SECRET with HKDF-SHA-256; the
 * upstream and the expiry are inside the authenticated plaintext, so neither can be changed. Former secrets
 * (SEAL_SECRETS_PREVIOUS) still open what they sealed; dropping a secret revokes every key sealed under it. Only
 * the derived CryptoKeys are cached; an opened key lives as long as its request.
 */
export class KeySealer {
  #keys: Promise<CryptoKey[]>;

  /** `secrets`: the current one first, then former ones; `now` in milliseconds. */
  constructor(secrets: string[], readonly now: () => number = Date.now) {
    this.#keys = Promise.all(secrets.map(deriveSealKey));
  }

  /** Seals `key` for `upstream` until `expiresAt` (milliseconds). */
  async seal(key: string, upstream: string, expiresAt: number): Promise<string> {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const content: SealedContent = { k: key, u: upstream, e: Math.floor(expiresAt / 1000) };
    const [current] = await this.#keys;
    const sealed = await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: SEAL_CONTEXT },
      current,
      textEncoder.encode(JSON.stringify(content)),
    );
    const bytes = new Uint8Array(12 + sealed.byteLength);
    bytes.set(iv);
    bytes.set(new Uint8Array(sealed), 12);
    return `${SEALED_PREFIX}${base64url(bytes)}`;
  }

  /** The key inside `sealed`, when it is intact, sealed under a known secret, for `upstream`, and not expired. */
  async open(sealed: string, upstream: string): Promise<{ key: string } | { problem: string }> {
    let bytes: Uint8Array<ArrayBuffer>;
    try {
      bytes = fromBase64url(sealed.slice(SEALED_PREFIX.length));
    } catch {
      return { problem: "the sealed key is damaged; seal your key again" };
    }
    let content: SealedContent | undefined;
    for (const key of await this.#keys) {
      try {
        const plain = await crypto.subtle.decrypt(
          { name: "AES-GCM", iv: bytes.subarray(0, 12), additionalData: SEAL_CONTEXT },
          key,
          bytes.subarray(12),
        );
        content = JSON.parse(new TextDecoder().decode(plain));
        break;
      } catch {
        // another secret, or damaged
      }
    }
    if (content === undefined) {
      return {
        problem:
          "the sealed key is damaged, or was sealed under a secret this relay no longer has; seal your key again",
      };
    }
    if (content.u !== upstream) {
      return { problem: `the sealed key is for the upstream "${content.u}", not "${upstream}"` };
    }
    if (content.e * 1000 <= this.now()) return { problem: "the sealed key has expired; seal your key again" };
    return { key: content.k };
  }
}

/** Bound into every sealed key, so that a sealed key is never taken for anything else. */
const SEAL_CONTEXT = textEncoder.encode("mc-relay sealed key v1");

/** The AES-256-GCM key HKDF derives from a seal secret. */
async function deriveSealKey(secret: string): Promise<CryptoKey> {
  const material = await crypto.subtle.importKey("raw", textEncoder.encode(secret), "HKDF", false, ["deriveKey"]);
  return await crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: textEncoder.encode("mc-relay seal"), info: SEAL_CONTEXT },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    ["encrypt", "decrypt"],
  );
}
