/**
 * Who is calling: `Authorization` credentials, constant-time comparison, PBKDF2 password hashes, the authenticator
 * (a bounded queue of hash checks, a cache of successes), and client addresses (TRUST_PROXY, the keys limits count
 * by).
 *
 * @module
 */

import { BARE_PASSWORD_USER } from "./config/parse.ts";
import { addressBytes, base64url, inRanges } from "./config/values.ts";
import type { PasswordHash, RelayUser, TrustedProxies } from "./config/variables.ts";
import type { RelayMetrics } from "./observe.ts";
import { textEncoder } from "./text.ts";

/** PBKDF2 iterations for new hashes (OWASP's 2023 figure for PBKDF2-HMAC-SHA256). */
export const PBKDF2_ITERATIONS = 600_000;

async function pbkdf2(password: string, salt: Uint8Array<ArrayBuffer>, iterations: number) {
  const key = await crypto.subtle.importKey("raw", textEncoder.encode(password), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits({ name: "PBKDF2", hash: "SHA-256", salt, iterations }, key, 256);
  return new Uint8Array(bits);
}

/** Hashes a password as `pbkdf2-sha256:<iterations>:<salt>:<hash>` (what `mc-relay hash-password` prints). */
export async function hashPassword(password: string, iterations = PBKDF2_ITERATIONS): Promise<string> {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  return `pbkdf2-sha256:${iterations}:${base64url(salt)}:${base64url(await pbkdf2(password, salt, iterations))}`;
}

/** Checks a password against a PBKDF2 hash, comparing in constant time. */
export async function verifyPasswordHash(password: string, stored: PasswordHash): Promise<boolean> {
  return constantTimeBytesEqual(await pbkdf2(password, stored.salt, stored.iterations), stored.hash);
}

/**
 * Reads `username:password` from an Authorization header:
 * `Basic base64(username:password)` or `Bearer username:password` (what MC
 * and every OpenAI SDK send when the user types `username:password` as the
 * API key). With `barePassword` (a bare MC_RELAY_PASSWORD is configured), `Bearer <token>` without a colon is
 * that password, as `BARE_PASSWORD_USER`'s credentials. Returns a reason instead when the header is missing or
 * malformed.
 */
export function readCredentials(
  authorization: string | null,
  barePassword = false,
): { credentials: string } | { problem: string } {
  const key = barePassword ? "<password>" : "<username>:<password>";
  // MC always sends "Bearer <API key field>": with the field empty that is a bare "Bearer" (the browser trims the
  // space), which is missing credentials, not an unknown scheme.
  if (!authorization || /^bearer\s*$/i.test(authorization)) {
    return { problem: `missing credentials: send 'Authorization: Bearer ${key}' (in MC: the API key field)` };
  }
  const match = /^(\S+)\s+(\S+)\s*$/.exec(authorization);
  const scheme = match?.[1].toLowerCase();
  let credentials: string | undefined;
  if (scheme === "bearer") {
    credentials = match![2];
  } else if (scheme === "basic") {
    try {
      credentials = new TextDecoder("utf-8", { fatal: true }).decode(
        Uint8Array.from(atob(match![2]), (char) => char.charCodeAt(0)),
      );
    } catch {
      return { problem: "malformed Basic credentials: expected base64 of <username>:<password>" };
    }
  } else {
    return { problem: "unsupported Authorization scheme: use 'Bearer <username>:<password>' or Basic" };
  }
  if (barePassword && scheme === "bearer" && !credentials.includes(":")) {
    return { credentials: `${BARE_PASSWORD_USER}:${credentials}` };
  }
  if (!credentials.includes(":")) {
    return { problem: "the API key must be <username>:<password> (both parts, joined by a colon)" };
  }
  return { credentials };
}

/**
 * Compares a client-supplied secret with the expected one in time that
 * depends only on the expected value's length, never on where they differ.
 */
export function constantTimeEqual(given: string, expected: string): boolean {
  // UTF-16 code units, compared where they are: no copy of the secret per request, and no two strings that
  // differ compare equal (encoding would turn every lone surrogate into the same replacement character).
  let difference = given.length ^ expected.length;
  for (let i = 0; i < expected.length; i++) difference |= (given.charCodeAt(i) || 0) ^ expected.charCodeAt(i);
  return difference === 0;
}

/** The byte-level comparison behind `verifyPasswordHash`. */
function constantTimeBytesEqual(given: Uint8Array, expected: Uint8Array): boolean {
  let difference = given.length ^ expected.length;
  for (let i = 0; i < expected.length; i++) difference |= (given[i] ?? 0) ^ expected[i];
  return difference === 0;
}

/**
 * The client's address: the connection's peer, unless the peer is a trusted proxy (TRUST_PROXY). Then
 * X-Forwarded-For is read from the right: with a hop count, the entry that many proxies back; otherwise the
 * first entry that is not itself a trusted proxy. Entries further left can be forged and are never used.
 */
export function clientAddress(request: Request, info: Deno.ServeHandlerInfo, trust: TrustedProxies): string {
  const peer = "hostname" in info.remoteAddr ? info.remoteAddr.hostname : "unix";
  if (trust.ranges.length === 0 || !inRanges(peer, trust.ranges)) return peer;
  const forwarded = (request.headers.get("x-forwarded-for") ?? "").split(",").map((entry) => entry.trim())
    .filter(Boolean);
  if (forwarded.length === 0) return peer;
  if (trust.hops > 0) return withoutPort(forwarded[Math.max(0, forwarded.length - trust.hops)]).slice(0, 64);
  let index = forwarded.length - 1;
  while (index > 0 && inRanges(withoutPort(forwarded[index]), trust.ranges)) index--;
  return withoutPort(forwarded[index]).slice(0, 64);
}

/**
 * An X-Forwarded-For entry without the port some proxies append (Azure, IIS ARR: `203.0.113.8:50001`,
 * `[2001:db8::1]:443`): counted with it, every connection of one client would get limits and budgets of its own.
 */
export function withoutPort(entry: string): string {
  const bracketed = /^\[([^\]]*)\](?::\d*)?$/.exec(entry);
  if (bracketed !== null) return bracketed[1];
  const v4 = /^(\d{1,3}(?:\.\d{1,3}){3}):\d*$/.exec(entry);
  return v4 !== null ? v4[1] : entry;
}

/**
 * The key a client address is counted under: an IPv6 address by its /64 (one customer's network hands out
 * any number of addresses in it), an IPv4 address (or IPv4-mapped IPv6) as it is.
 */
export function addressKey(address: string): string {
  let key = addressKeys.get(address);
  if (key !== undefined) return key;
  const bytes = addressBytes(address);
  if (!bytes) {
    key = address;
  } else if (bytes.subarray(0, 12).every((byte, index) => byte === (index < 10 ? 0 : 255))) {
    key = bytes.subarray(12).join(".");
  } else {
    const groups = [0, 2, 4, 6].map((index) => ((bytes[index] << 8) | bytes[index + 1]).toString(16));
    key = `${groups.join(":")}::/64`;
  }
  // Every request asks for its client's key, often twice: the recent answers are kept, at most 4,096 of them.
  if (addressKeys.size >= 4096) addressKeys.clear();
  addressKeys.set(address, key);
  return key;
}

/** `addressKey`'s recent answers by address. */
const addressKeys = new Map<string, string>();

/** What `authenticate` answers when the password hashing queue is full. */
export const HASHING_BUSY = Symbol("hashing busy");

/** What `authenticate` answers when the caller's address already has its share of the hashing queue. */
export const ADDRESS_BUSY = Symbol("address busy");

/** PBKDF2 checks that run at once (one per core here) and that may wait for a turn; past that, 503. */
const HASH_CHECKS_AT_ONCE = 2;

const HASH_CHECKS_WAITING = 32;

/**
 * One address's share of the hashing queue: at most this many of its checks in the queue (running or waiting), and
 * this many more waiting behind them for the address's own turn; past that, 429. So one address takes at most a
 * sixteenth of the queue, and its own burst (a team's first sign-ins behind one NAT) is checked in turn, not refused.
 */
const HASH_CHECKS_PER_ADDRESS = 2;

const HASH_CHECKS_WAITING_PER_ADDRESS = 16;

/**
 * Checks `name:password` credentials, from a client address, against the users. A hashed password costs a PBKDF2
 * run (about 80 ms of CPU): a success is remembered for this process under a salted SHA-256 of the credentials, so
 * a signed-in user pays it once and never queues behind a flood of guesses. Failures are never remembered. At most
 * HASH_CHECKS_AT_ONCE checks run at once, and one address holds at most HASH_CHECKS_PER_ADDRESS places of the
 * queue, so a flood of guesses from one address cannot turn away other addresses' sign-ins. When hashed users
 * exist, every failure costs one PBKDF2 run (an unknown name, a wrong plain password: against a decoy hash), so
 * the time of an answer does not tell which names exist nor which have plain passwords.
 */
export function createAuthenticator(
  users: RelayUser[],
  metrics: RelayMetrics,
): (credentials: string, address: string) => Promise<string | undefined | typeof HASHING_BUSY | typeof ADDRESS_BUSY> {
  const usersByName = new Map(users.map((user) => [user.name, user]));
  const verifiedHashes = new Map<string, true>();
  const cachePepper = crypto.getRandomValues(new Uint8Array(16)).join(",");
  const hashed = users.flatMap((user) => user.hash ? [user.hash] : []);
  const decoy: PasswordHash | undefined = hashed.length === 0 ? undefined : {
    iterations: Math.max(...hashed.map((hash) => hash.iterations)),
    salt: crypto.getRandomValues(new Uint8Array(16)),
    hash: crypto.getRandomValues(new Uint8Array(32)),
  };
  const hashChecks = new Semaphore(HASH_CHECKS_AT_ONCE, HASH_CHECKS_WAITING);
  const shares = new KeyedSemaphore(HASH_CHECKS_PER_ADDRESS, HASH_CHECKS_WAITING_PER_ADDRESS);
  const checkHash = async (secret: string, hash: PasswordHash, address: string) => {
    if (!shares.tryAcquire(address)) return ADDRESS_BUSY;
    try {
      await shares.turn(address);
      if (!hashChecks.tryAcquire()) return HASHING_BUSY;
      await hashChecks.turn();
      metrics.hashChecks++;
      try {
        return await verifyPasswordHash(secret, hash);
      } finally {
        hashChecks.release();
      }
    } finally {
      shares.release(address);
    }
  };
  /** A failed sign-in: with hashed users, one decoy check first (its answer is a failure whatever it finds). */
  const failure = async (secret: string, address: string) => {
    if (decoy === undefined) return undefined;
    const checked = await checkHash(secret, decoy, address);
    return typeof checked === "symbol" ? checked : undefined;
  };
  return async (credentials, address) => {
    const colon = credentials.indexOf(":");
    const name = credentials.slice(0, colon);
    const secret = credentials.slice(colon + 1);
    const user = usersByName.get(name);
    if (user === undefined) {
      if (decoy === undefined) void constantTimeEqual(secret, cachePepper); // the cost of comparing a plain password
      return await failure(secret, address);
    }
    if (user.password !== undefined) {
      return constantTimeEqual(secret, user.password) ? name : await failure(secret, address);
    }
    const digest = new Uint8Array(
      await crypto.subtle.digest("SHA-256", textEncoder.encode(`${cachePepper}:${credentials}`)),
    ).join(",");
    if (verifiedHashes.has(digest)) return name;
    const checked = await checkHash(secret, user.hash!, address);
    if (checked !== true) return typeof checked === "symbol" ? checked : undefined;
    if (verifiedHashes.size >= 10_000) verifiedHashes.delete(verifiedHashes.keys().next().value!);
    verifiedHashes.set(digest, true);
    return name;
  };
}

/** A counting semaphore with a bounded queue: `tryAcquire` reserves a place, `turn` waits for it, `release` ends it. */
class Semaphore {
  #running = 0;
  #waiting: (() => void)[] = [];
  #reserved = 0;

  constructor(readonly atOnce: number, readonly maxWaiting: number) {}

  /** Reserves a place; false when as many are running and waiting as allowed. */
  tryAcquire(): boolean {
    if (this.#reserved >= this.atOnce + this.maxWaiting) return false;
    this.#reserved++;
    return true;
  }

  /** Resolves when the reserved place may run. */
  turn(): Promise<void> {
    if (this.#running < this.atOnce) {
      this.#running++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /** True when no place is reserved. */
  get idle(): boolean {
    return this.#reserved === 0;
  }

  /** Ends a running place and lets the next waiting one run. */
  release(): void {
    this.#reserved--;
    const next = this.#waiting.shift();
    if (next) next();
    else this.#running--;
  }
}

/**
 * One `Semaphore` per key (a client address), made on first use and forgotten once it holds nothing: memory
 * follows the checks in progress, not the addresses ever seen.
 */
class KeyedSemaphore {
  #semaphores = new Map<string, Semaphore>();

  constructor(readonly atOnce: number, readonly maxWaiting: number) {}

  /** Reserves a place for `key`; false when its places are all taken. A true must be ended with `release`. */
  tryAcquire(key: string): boolean {
    let semaphore = this.#semaphores.get(key);
    if (semaphore === undefined) {
      semaphore = new Semaphore(this.atOnce, this.maxWaiting);
      this.#semaphores.set(key, semaphore);
    }
    return semaphore.tryAcquire();
  }

  /** Resolves when `key`'s reserved place may run. */
  turn(key: string): Promise<void> {
    return this.#semaphores.get(key)!.turn();
  }

  /** Ends `key`'s place once its turn has come. */
  release(key: string): void {
    const semaphore = this.#semaphores.get(key)!;
    semaphore.release();
    if (semaphore.idle) this.#semaphores.delete(key);
  }
}
