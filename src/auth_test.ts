/**
 * Unit tests of the pure parts of src/auth.ts: `Authorization` credentials, constant-time comparison, PBKDF2 hashes
 * (a low iteration count keeps them fast), the address a client is counted under, and X-Forwarded-For under each
 * TRUST_PROXY setting.
 */
import assert from "node:assert/strict";
import {
  addressKey,
  clientAddress,
  constantTimeEqual,
  hashPassword,
  readCredentials,
  verifyPasswordHash,
  withoutPort,
} from "./auth.ts";
import { parseTrustProxy } from "./config/parse.ts";
import { inRanges, parseAddressRange, parsePasswordHash } from "./config/values.ts";
import type { TrustedProxies } from "./config/variables.ts";

/** TRUST_PROXY as the config reads it. */
function trustProxy(raw: string): TrustedProxies {
  const errors: string[] = [];
  const trust = parseTrustProxy(raw, errors);
  assert.deepEqual(errors, []);
  return trust;
}

/** The client address of a request from `peer` carrying `forwarded` as X-Forwarded-For. */
function addressOf(peer: string, forwarded: string | undefined, trust: string): string {
  const headers = forwarded === undefined ? undefined : { "x-forwarded-for": forwarded };
  const info = { remoteAddr: { transport: "tcp", hostname: peer, port: 50000 } } as Deno.ServeHandlerInfo;
  return clientAddress(new Request("http://relay.invalid/", { headers }), info, trustProxy(trust));
}

Deno.test("readCredentials: username:password from Authorization", async (t) => {
  await t.step("Bearer carries them as the API key", () => {
    assert.deepEqual(readCredentials("Bearer team:pass:with:colons"), { credentials: "team:pass:with:colons" });
    assert.deepEqual(readCredentials("bearer  team:pw  "), { credentials: "team:pw" }, "any case, extra spaces");
  });

  await t.step("Basic carries them in base64 of UTF-8", () => {
    const utf8 = btoa(String.fromCharCode(...new TextEncoder().encode("jürgen:pässword")));
    assert.deepEqual(readCredentials(`Basic ${utf8}`), { credentials: "jürgen:pässword" });
    assert.deepEqual(readCredentials(`BASIC ${btoa("a:b")}`), { credentials: "a:b" });
  });

  await t.step("a missing header names what to send", () => {
    for (const header of [null, ""]) {
      const read = readCredentials(header);
      assert.ok("problem" in read && read.problem.startsWith("missing credentials: send 'Authorization: Bearer"));
    }
  });

  await t.step("malformed Basic (not base64, not UTF-8) is a problem, never an exception", () => {
    for (const value of ["%%%", btoa("\xff\xfe:x")]) {
      assert.deepEqual(readCredentials(`Basic ${value}`), {
        problem: "malformed Basic credentials: expected base64 of <username>:<password>",
      });
    }
  });

  await t.step("other schemes, and values with spaces or missing parts, are refused", () => {
    for (const header of ["Digest x:y", "team:pw", "Bearer a:b c", "Bearer\ta:b extra"]) {
      const read = readCredentials(header);
      assert.ok("problem" in read && read.problem.startsWith("unsupported Authorization scheme"), header);
    }
  });

  await t.step("a bare 'Bearer' (MC with an empty API key field) is missing credentials, naming MC's field", () => {
    for (const header of ["Bearer", "Bearer   ", "bearer"]) {
      const read = readCredentials(header);
      assert.ok("problem" in read && read.problem.startsWith("missing credentials"), header);
      assert.match((read as { problem: string }).problem, /in MC: the API key field/);
    }
  });

  await t.step("a key without a colon is refused: both parts are needed", () => {
    for (const header of ["Bearer sk-provider-key", `Basic ${btoa("nocolon")}`]) {
      assert.deepEqual(readCredentials(header), {
        problem: "the API key must be <username>:<password> (both parts, joined by a colon)",
      });
    }
  });
});

Deno.test("constantTimeEqual: equality of a given secret and the expected one", async (t) => {
  await t.step("equal strings are equal, any difference is not", () => {
    assert.ok(constantTimeEqual("s3cret-password", "s3cret-password"));
    assert.ok(constantTimeEqual("", ""));
    for (const given of ["s3cret-passworD", "s3cret-passwor", "s3cret-password!", "", "t3cret-password"]) {
      assert.ok(!constantTimeEqual(given, "s3cret-password"), given);
    }
  });

  await t.step("a longer given string that starts with the expected one is not equal", () => {
    assert.ok(!constantTimeEqual("abc\u0000", "abc"));
    assert.ok(!constantTimeEqual("abc", "abc\u0000"), "a missing NUL is not read as equal");
  });

  await t.step("lone surrogates stay distinct (no encoding turns them into one replacement character)", () => {
    assert.ok(!constantTimeEqual("\ud800", "\udc00"));
    assert.ok(!constantTimeEqual("\ud800", "\ufffd"));
  });
});

Deno.test("hashPassword and verifyPasswordHash", async (t) => {
  await t.step("a hash verifies its password and no other", async () => {
    const text = await hashPassword("correct horse", 1000);
    assert.match(text, /^pbkdf2-sha256:1000:[A-Za-z0-9_-]{22}:[A-Za-z0-9_-]{43}$/);
    const hash = parsePasswordHash(text);
    assert.ok(hash !== undefined, "what hash-password prints, MC_RELAY_USERS accepts");
    assert.ok(await verifyPasswordHash("correct horse", hash));
    for (const wrong of ["correct horsE", "correct hors", "", "correct horse "]) {
      assert.ok(!(await verifyPasswordHash(wrong, hash)), wrong);
    }
  });

  await t.step("each hash has its own salt", async () => {
    const [first, second] = [await hashPassword("same", 1000), await hashPassword("same", 1000)];
    assert.notEqual(first, second);
  });

  await t.step(
    "the iteration count is part of the hash: the same salt with fewer iterations does not verify",
    async () => {
      const hash = parsePasswordHash(await hashPassword("pw", 2000))!;
      assert.ok(!(await verifyPasswordHash("pw", { ...hash, iterations: 1000 })));
    },
  );

  await t.step("a stored hash of another length never verifies", async () => {
    const hash = parsePasswordHash(await hashPassword("pw", 1000))!;
    assert.ok(!(await verifyPasswordHash("pw", { ...hash, hash: hash.hash.slice(0, 16) })));
  });
});

Deno.test("withoutPort: an X-Forwarded-For entry without the port a proxy appended", () => {
  const cases: [string, string][] = [
    ["203.0.113.8:50001", "203.0.113.8"],
    ["203.0.113.8:", "203.0.113.8"],
    ["203.0.113.8", "203.0.113.8"],
    ["[2001:db8::1]:443", "2001:db8::1"],
    ["[2001:db8::1]", "2001:db8::1"],
    ["2001:db8::1", "2001:db8::1"],
    ["2001:db8::1:443", "2001:db8::1:443"],
    ["unknown", "unknown"],
    ["host:80", "host:80"],
    ["[x]:80:80", "[x]:80:80"],
  ];
  for (const [entry, address] of cases) assert.equal(withoutPort(entry), address, entry);
});

Deno.test("addressKey: what limits count a client under", async (t) => {
  await t.step("[security] IPv6 addresses of one /64 share a key, however they are written", () => {
    const key = addressKey("2001:db8:1:2:aaaa::1");
    assert.equal(key, "2001:db8:1:2::/64");
    for (const address of ["2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:0DB8:0001:0002::", "[2001:db8:1:2::9]"]) {
      assert.equal(addressKey(address), key, address);
    }
    assert.notEqual(addressKey("2001:db8:1:3::1"), key, "the next /64 is another client");
  });

  await t.step("IPv4, and IPv4-mapped IPv6, count as the IPv4 address", () => {
    assert.equal(addressKey("203.0.113.7"), "203.0.113.7");
    assert.equal(addressKey("::ffff:203.0.113.7"), "203.0.113.7");
    assert.equal(addressKey("::ffff:cb00:7107"), "203.0.113.7");
    assert.notEqual(addressKey("203.0.113.8"), "203.0.113.7");
  });

  await t.step("what is not an address is its own key", () => {
    assert.equal(addressKey("unix"), "unix");
    assert.equal(addressKey("not-an-address"), "not-an-address");
  });

  await t.step("answers stay right after the cache of recent answers fills and starts again", () => {
    for (let index = 0; index < 5000; index++) addressKey(`10.0.${index >> 8}.${index & 255}`);
    assert.equal(addressKey("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
    assert.equal(addressKey("10.0.19.135"), "10.0.19.135");
  });
});

Deno.test("inRanges: an address in address ranges", () => {
  const ranges = ["10.0.0.0/8", "192.0.2.128/25", "2001:db8::/33"].map((range) => parseAddressRange(range)!);
  for (const address of ["10.255.0.1", "192.0.2.128", "192.0.2.255", "2001:db8:7fff::1", "::ffff:10.0.0.1"]) {
    assert.ok(inRanges(address, ranges), address);
  }
  for (const address of ["11.0.0.1", "192.0.2.127", "2001:db8:8000::1", "2001:db9::", "unix", ""]) {
    assert.ok(!inRanges(address, ranges), address);
  }
  assert.ok(inRanges("8.8.8.8", [parseAddressRange("0.0.0.0/0")!]), "a /0 holds every IPv4 address");
  assert.ok(!inRanges("2001:db8::1", [parseAddressRange("0.0.0.0/0")!]), "but no IPv6 one");
});

Deno.test("clientAddress: the peer, or X-Forwarded-For from a trusted proxy", async (t) => {
  await t.step("[security] without TRUST_PROXY, X-Forwarded-For is ignored", () => {
    assert.equal(addressOf("127.0.0.1", "203.0.113.9", "false"), "127.0.0.1");
  });

  await t.step("[security] a peer outside the trusted ranges is the client, whatever it forwards", () => {
    assert.equal(addressOf("198.51.100.1", "203.0.113.9", "true"), "198.51.100.1");
    assert.equal(addressOf("198.51.100.1", "203.0.113.9", "10.0.0.0/8"), "198.51.100.1");
  });

  await t.step(
    "TRUST_PROXY=true: the last entry, the one the proxy added; forged entries to its left are not used",
    () => {
      assert.equal(addressOf("127.0.0.1", "6.6.6.6, 203.0.113.9", "true"), "203.0.113.9");
      assert.equal(addressOf("10.1.1.1", "203.0.113.9:50123", "true"), "203.0.113.9", "a port is dropped");
    },
  );

  await t.step("TRUST_PROXY=2: the entry two proxies back", () => {
    assert.equal(addressOf("10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.1", "2"), "203.0.113.9");
    assert.equal(addressOf("10.0.0.2", "203.0.113.9", "2"), "203.0.113.9", "fewer entries: the first");
  });

  await t.step("[security] with addresses, every trusted entry from the right is walked past, no further", () => {
    const trust = "127.0.0.1,10.0.0.0/8";
    assert.equal(addressOf("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.7, 10.0.0.8", trust), "203.0.113.9");
    assert.equal(addressOf("127.0.0.1", "10.0.0.1, 10.0.0.2", trust), "10.0.0.1", "all trusted: the first");
    assert.equal(addressOf("127.0.0.1", "[2001:db8::1]:443, 10.0.0.2:8080", trust), "2001:db8::1");
  });

  await t.step("a trusted peer that forwards nothing (or only commas) is the client", () => {
    assert.equal(addressOf("127.0.0.1", undefined, "true"), "127.0.0.1");
    assert.equal(addressOf("127.0.0.1", " , ,", "true"), "127.0.0.1");
  });

  await t.step("[security] a forwarded entry is cut to 64 characters: a long one cannot blow up keys", () => {
    const long = "x".repeat(1000);
    assert.equal(addressOf("127.0.0.1", long, "true"), "x".repeat(64));
    assert.equal(addressOf("127.0.0.1", long, "127.0.0.1"), "x".repeat(64));
  });

  await t.step("a Unix socket peer is 'unix'", () => {
    const info = { remoteAddr: { transport: "unix", path: "/tmp/s" } } as unknown as Deno.ServeHandlerInfo;
    assert.equal(clientAddress(new Request("http://relay.invalid/"), info, trustProxy("true")), "unix");
  });
});
