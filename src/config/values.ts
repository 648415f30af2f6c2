/**
 * The values a config holds, parsed: password hashes (`pbkdf2-sha256:...`), addresses and address ranges (TRUST_PROXY,
 * the private ranges), and base64url. Parsing needs them, and so do the sign-in checks and client addresses above.
 *
 * @module
 */

import type { AddressRange, PasswordHash } from "./variables.ts";

export const base64url = (bytes: Uint8Array) =>
  btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");

export const fromBase64url = (text: string) =>
  Uint8Array.from(atob(text.replaceAll("-", "+").replaceAll("_", "/")), (char) => char.charCodeAt(0));

/** Whether `address` lies in one of `ranges`. */
export function inRanges(address: string, ranges: AddressRange[]): boolean {
  const bytes = addressBytes(address);
  if (!bytes) return false;
  return ranges.some((range) => {
    for (let bit = 0; bit < range.bits; bit += 8) {
      const mask = range.bits - bit >= 8 ? 0xff : (0xff << (8 - (range.bits - bit))) & 0xff;
      if ((bytes[bit / 8] & mask) !== (range.bytes[bit / 8] & mask)) return false;
    }
    return true;
  });
}

/** Parses a `pbkdf2-sha256:...` string; undefined when it is malformed. */
export function parsePasswordHash(text: string): PasswordHash | undefined {
  const match = /^pbkdf2-sha256:(\d{1,9}):([A-Za-z0-9_-]{16,}):([A-Za-z0-9_-]{43})$/.exec(text);
  if (!match || Number(match[1]) < 1000) return undefined;
  try {
    return { iterations: Number(match[1]), salt: fromBase64url(match[2]), hash: fromBase64url(match[3]) };
  } catch {
    return undefined;
  }
}

/** Loopback and private ranges: what TRUST_PROXY=true (or a number) trusts, a proxy on this host or network. */
export const PRIVATE_RANGES = [
  "127.0.0.0/8",
  "10.0.0.0/8",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "169.254.0.0/16",
  "::1/128",
  "fc00::/7",
  "fe80::/10",
];

/** An IPv4 or IPv6 address as 16 bytes (IPv4 as ::ffff:a.b.c.d); undefined when it is not an address. */
export function addressBytes(text: string): Uint8Array | undefined {
  const address = text.replace(/^\[|\]$/g, "").replace(/%.*$/, "");
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(address);
  if (v4) {
    const parts = v4.slice(1).map(Number);
    if (parts.some((part) => part > 255)) return undefined;
    return Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, ...parts]);
  }
  if (!/^[0-9a-fA-F:.]+$/.test(address) || !address.includes(":")) return undefined;
  let text6 = address;
  const tail: number[] = [];
  const embedded = /:(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})$/.exec(text6);
  if (embedded) {
    const four = addressBytes(embedded[1]);
    if (!four) return undefined;
    tail.push(...four.subarray(12));
    text6 = `${text6.slice(0, embedded.index)}:0:0`;
  }
  const halves = text6.split("::");
  if (halves.length > 2) return undefined;
  const groups = (half: string) => half === "" ? [] : half.split(":");
  const head = groups(halves[0]);
  const rest = halves.length === 2 ? groups(halves[1]) : [];
  const missing = 8 - head.length - rest.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) return undefined;
  const all = [...head, ...Array(halves.length === 2 ? missing : 0).fill("0"), ...rest];
  if (all.some((group) => !/^[0-9a-fA-F]{1,4}$/.test(group))) return undefined;
  const bytes = new Uint8Array(16);
  all.forEach((group, index) => {
    const value = parseInt(group, 16);
    bytes[index * 2] = value >> 8;
    bytes[index * 2 + 1] = value & 255;
  });
  if (tail.length === 4) bytes.set(tail, 12);
  return bytes;
}

/** Parses `address` or `address/bits` (IPv4 bits count from the IPv4 part); undefined when malformed. */
export function parseAddressRange(text: string): AddressRange | undefined {
  const [address, bitsText, extra] = text.trim().split("/");
  const bytes = addressBytes(address);
  if (!bytes || extra !== undefined) return undefined;
  const isV4 = address.includes(".") && !address.includes(":");
  const max = isV4 ? 32 : 128;
  const bits = bitsText === undefined ? max : /^\d{1,3}$/.test(bitsText) ? Number(bitsText) : NaN;
  if (!(bits >= 0 && bits <= max)) return undefined;
  return { bytes, bits: isV4 ? bits + 96 : bits };
}
