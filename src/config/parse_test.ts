/**
 * Unit tests of src/config/parse.ts (and the value parsers of src/config/values.ts) beyond test/config_test.ts: numbers at and past their bounds, every problem at
 * once across groups, errors that name their variable and never repeat a secret, URLs, header names and values,
 * TRUST_PROXY, address ranges and password hashes.
 */
import assert from "node:assert/strict";
import { type ConfigResult, parseConfig, parseTrustProxy } from "./parse.ts";
import { addressBytes, base64url, parseAddressRange, parsePasswordHash, PRIVATE_RANGES } from "./values.ts";
import type { RelayConfig, RelayEnv } from "./variables.ts";

const KEY = "sk-CANARY-unit-provider-key";
const PASSWORD = "CANARY-unit-password";
const base: RelayEnv = {
  UPSTREAM_BASE_URL: "https://api.example.com/v1",
  UPSTREAM_API_KEY: KEY,
  MC_RELAY_USERNAME: "team",
  MC_RELAY_PASSWORD: PASSWORD,
};

/** The config of `env` over `base`; fails the test when it is refused. */
function accepted(env: RelayEnv): RelayConfig {
  const result = parseConfig({ ...base, ...env });
  assert.ok(result.ok, result.ok ? "" : result.errors.join("\n"));
  return result.config;
}

/** The errors of `env` over `base`; fails the test when it is accepted. */
function refused(env: RelayEnv): string[] {
  const result: ConfigResult = parseConfig({ ...base, ...env });
  assert.ok(!result.ok, `${JSON.stringify(env)} should be refused`);
  return result.errors;
}

Deno.test("parseConfig: numbers", async (t) => {
  /** Each numeric variable with its last valid value and its first invalid one on each side. */
  const bounds: [keyof RelayEnv & string, string, string[]][] = [
    ["PORT", "65535", ["65536", "-1", "80.5"]],
    ["REQUEST_TIMEOUT_SECONDS", "86400", ["86401", "0", "0.0001"]],
    ["MAX_REQUEST_BYTES", "2147483648", ["2147483649", "0", "1.5"]],
    ["SHUTDOWN_TIMEOUT_SECONDS", "3600", ["3601", "-1"]],
    ["AUTH_FAILURES_PER_MINUTE", "0", ["-1", "2.5", "1000000000000001"]],
    ["RATE_LIMIT_PER_MINUTE", "1000000000000000", ["1e3", "-5"]],
    ["TOKEN_BUDGET_PER_DAY", "100000", ["100k", "1,000"]],
    ["USAGE_RETENTION_DAYS", "36500", ["0", "36501"]],
    ["MEMORY_STORE_KEYS", "10000000", ["999", "10000001", "1.5"]],
    ["FAILOVER_BREAKER_FAILURES", "1000", ["0", "1001"]],
    ["FAILOVER_BREAKER_SECONDS", "0.001", ["0", "86401"]],
    ["METRICS_PORT", "9464", ["70000", "port"]],
  ];

  await t.step("each number is accepted up to its bound and refused past it, naming the variable and the value", () => {
    for (const [name, valid, invalid] of bounds) {
      accepted({ [name]: valid });
      for (const value of [...invalid, "0x10", "Infinity", "NaN", "ten"]) {
        const errors = refused({ [name]: value });
        assert.equal(errors.length, 1, `${name}=${value}: ${errors.join("\n")}`);
        assert.ok(errors[0].startsWith(`${name} must be `), errors[0]);
        assert.match(errors[0], /e\.g\. \S/, "a valid example");
        assert.ok(errors[0].endsWith(`got "${value}"`), errors[0]);
      }
    }
  });

  await t.step("spaces around a number are ignored, and an empty value means the default", () => {
    assert.equal(accepted({ PORT: " 9090 " }).port, 9090);
    assert.equal(accepted({ PORT: "" }).port, 8080);
    assert.equal(accepted({ REQUEST_TIMEOUT_SECONDS: "0.5" }).requestTimeoutMs, 500);
  });

  await t.step("MAX_BUFFERED_BYTES follows a larger MAX_REQUEST_BYTES, and may not be set below it", () => {
    assert.equal(accepted({ MAX_REQUEST_BYTES: "100000000" }).maxBufferedBytes, 100000000);
    const errors = refused({ MAX_REQUEST_BYTES: "1000", MAX_BUFFERED_BYTES: "999" });
    assert.deepEqual(errors, ["MAX_BUFFERED_BYTES must be at least MAX_REQUEST_BYTES (1000), e.g. 2000"]);
  });

  await t.step("WORKERS is 1 to 256 or auto, and more than one needs a shared store", () => {
    assert.equal(accepted({ WORKERS: "auto", STATE_PATH: "/tmp/x.db" }).workers >= 1, true);
    assert.equal(accepted({ WORKERS: "4", STATE_PATH: "/tmp/x.db" }).workers, 4);
    for (const value of ["0", "257", "two", "1.5"]) assert.match(refused({ WORKERS: value })[0], /^WORKERS must be/);
    assert.match(refused({ WORKERS: "2" })[0], /^WORKERS=2 needs STATE_PATH or REDIS_URL/);
  });
});

Deno.test("parseConfig: every problem at once", async (t) => {
  await t.step("problems of every group are reported together, one line each, each naming its variable", () => {
    const result = parseConfig({
      UPSTREAM_BASE_URL: "https://user:pw@api.example.com/v1",
      UPSTREAM_API_KEY: KEY,
      MC_RELAY_USERS: "nocolon",
      ALLOWED_ORIGIN: "https://x.example/",
      HOST: "a b",
      PORT: "99999",
      LOG_LEVEL: "verbose",
      TRUST_PROXY: "maybe",
      DISABLED_PATHS: "/v1/nothing",
      BASE_PATH: "relay",
      REDIS_URL: "http://x",
      PUBLIC_URL: "relay.example.com",
      MODEL_ALIASES_JSON: "[]",
      WORKERS: "many",
      METRICS: "nobody",
      PUBLIC_ACCESS: "yes",
    });
    assert.ok(!result.ok);
    const variables = [
      "UPSTREAM_BASE_URL",
      "MC_RELAY_USERS",
      "ALLOWED_ORIGIN",
      "HOST",
      "PORT",
      "LOG_LEVEL",
      "TRUST_PROXY",
      "DISABLED_PATHS",
      "BASE_PATH",
      "REDIS_URL",
      "PUBLIC_URL",
      "MODEL_ALIASES_JSON",
      "WORKERS",
      "METRICS",
      "PUBLIC_ACCESS",
    ];
    for (const name of variables) {
      assert.ok(result.errors.some((line) => line.startsWith(name)), `${name} in:\n${result.errors.join("\n")}`);
    }
    assert.equal(result.errors.length, variables.length, result.errors.join("\n"));
    for (const line of result.errors) assert.ok(!line.includes("\n"), line);
  });

  await t.step("the public-access guard rails are refused together, after the values themselves are valid", () => {
    const errors = refused({ PUBLIC_ACCESS: "true" });
    assert.equal(errors.length, 3);
    for (const line of errors) assert.match(line, /^PUBLIC_ACCESS=true needs .*, e\.g\. \S/);
  });
});

Deno.test("parseConfig: [security] errors never repeat a secret", async (t) => {
  const SECRET = "CANARY-secret-value-0123456789";
  const cases: [string, RelayEnv][] = [
    ["a key with a line break", { UPSTREAM_API_KEY: `${SECRET}\nX-Other: 1` }],
    ["a key with a NUL", { UPSTREAM_API_KEY: `${SECRET}\u0000` }],
    ["a base URL with credentials", { UPSTREAM_BASE_URL: `https://user:${SECRET}@api.example.com/v1` }],
    ["a base URL with a key in the query", { UPSTREAM_BASE_URL: `https://api.example.com/v1?key=${SECRET}` }],
    ["a base URL with a key in the fragment", { UPSTREAM_BASE_URL: `https://api.example.com/v1#${SECRET}` }],
    ["an extra header value with a line break", { UPSTREAM_EXTRA_HEADERS_JSON: `{"X-Token":"${SECRET}\\r\\n"}` }],
    ["extra headers that are not JSON", { UPSTREAM_EXTRA_HEADERS_JSON: `{"X-Token":${SECRET}}` }],
    ["extra headers that are an array", { UPSTREAM_EXTRA_HEADERS_JSON: `["${SECRET}"]` }],
    ["a short SEAL_SECRET", { SEAL_SECRET: SECRET.slice(0, 20) }],
    ["a short previous seal secret", { SEAL_SECRET: SECRET + SECRET, SEAL_SECRETS_PREVIOUS: SECRET.slice(0, 20) }],
    ["a REDIS_URL that is not redis://", { REDIS_URL: `https://:${SECRET}@valkey:6379` }],
    ["a REDIS_URL with a space", { REDIS_URL: `redis://:${SECRET} @valkey:6379` }],
    ["a bare password with a colon", { MC_RELAY_USERNAME: "", MC_RELAY_PASSWORD: `a:${SECRET}` }],
    ["a bare password with a space", { MC_RELAY_USERNAME: "", MC_RELAY_PASSWORD: `a ${SECRET}` }],
    ["a bare password beside PUBLIC_ACCESS", {
      MC_RELAY_USERNAME: "",
      MC_RELAY_PASSWORD: SECRET,
      PUBLIC_ACCESS: "true",
    }],
    ["a user name with a colon", { MC_RELAY_USERNAME: `team:${SECRET}` }],
    ["a malformed hash", { MC_RELAY_USERS: `alice:pbkdf2-sha256:600000:${SECRET}:x` }],
    ["an entry without a name", { MC_RELAY_USERS: `:${SECRET}` }],
    ["UPSTREAMS_JSON that is not JSON", { UPSTREAMS_JSON: `[{"apiKey":${SECRET}}]` }],
    ["an UPSTREAMS_JSON key with a control character", {
      UPSTREAMS_JSON: JSON.stringify([{ name: "a", baseUrl: "https://a.example", apiKey: `${SECRET}\u0001` }]),
    }],
    ["an UPSTREAMS_JSON extra header value that is not text", {
      UPSTREAMS_JSON: JSON.stringify([{
        name: "a",
        baseUrl: "https://a.example",
        apiKey: "k",
        extraHeaders: { "X-Token": [SECRET] },
      }]),
    }],
  ];

  for (const [what, env] of cases) {
    await t.step(`${what}: refused, naming the variable, without the secret`, () => {
      const errors = refused(env);
      const named = Object.keys(env);
      assert.ok(errors.some((line) => named.some((name) => line.includes(name))), errors.join("\n"));
      for (const line of errors) {
        assert.ok(!line.includes(SECRET.slice(0, 12)), `${line} repeats the secret`);
        assert.ok(!line.includes(SECRET.slice(-12)), `${line} repeats the secret`);
      }
    });
  }
});

Deno.test("[security] parseConfig: the bare password's holders cannot be made admins or metrics readers", () => {
  for (const name of ["ADMINS", "METRICS"]) {
    const result = parseConfig({ ...base, MC_RELAY_USERNAME: "", [name]: "relay;password" });
    assert.ok(!result.ok && result.errors.some((line) => line.startsWith(name)), name);
  }
});

Deno.test({
  // ';' and ':' share a key: an entry typed `bob;password` used to be read as the name `bob` with the option
  // "password" (less its last character), which the error quoted.
  name: "[security] parseConfig: an MC_RELAY_USERS entry with ';' for ':' is refused without repeating the password",
  fn() {
    for (const entry of ["bob;CANARY-secret-value-0123456789", "bob;day=5;CANARY-secret-value:rest-of-it"]) {
      const errors = refused({ MC_RELAY_USERS: entry });
      assert.ok(errors.some((line) => line.includes("MC_RELAY_USERS entry 1")), errors.join("\n"));
      for (const line of errors) assert.ok(!line.includes("CANARY-secret"), line);
    }
  },
});

Deno.test("parseConfig: URLs", async (t) => {
  await t.step("a base URL loses its trailing slashes and keeps its path", () => {
    assert.equal(
      accepted({ UPSTREAM_BASE_URL: "https://api.example.com/v1///" }).upstreams[0].baseUrl,
      "https://api.example.com/v1",
    );
    assert.equal(
      accepted({ UPSTREAM_BASE_URL: "http://127.0.0.1:11434/v1" }).upstreams[0].baseUrl,
      "http://127.0.0.1:11434/v1",
    );
  });

  await t.step("a base URL that is relative, not http(s), or has credentials, a query or a fragment is refused", () => {
    const cases: [string, RegExp][] = [
      ["api.example.com/v1", /must be an absolute http\(s\) URL/],
      ["/v1", /must be an absolute http\(s\) URL/],
      ["ftp://api.example.com/v1", /must start with http:\/\/ or https:\/\//],
      ["file:///etc/passwd", /must start with http:\/\/ or https:\/\//],
      ["https://user@api.example.com/v1", /must not contain credentials/],
      ["https://:pw@api.example.com/v1", /must not contain credentials/],
      ["https://api.example.com/v1?api-version=1", /must not have a query or fragment/],
      ["https://api.example.com/v1#x", /must not have a query or fragment/],
    ];
    for (const [url, message] of cases) {
      const errors = refused({ UPSTREAM_BASE_URL: url });
      assert.equal(errors.length, 1, url);
      assert.match(errors[0], new RegExp(`^UPSTREAM_BASE_URL ${message.source}`), url);
    }
  });

  await t.step("PUBLIC_URL is an http(s) address without query or fragment, trailing slash dropped", () => {
    assert.equal(accepted({ PUBLIC_URL: "https://relay.example.com/mc/" }).publicUrl, "https://relay.example.com/mc");
    for (
      const url of ["relay.example.com", "ftp://relay.example.com", "https://r.example?x=1", "https://u@r.example"]
    ) {
      assert.match(refused({ PUBLIC_URL: url })[0], /^PUBLIC_URL must be .* e\.g\. https:\/\/relay\.example\.com/);
    }
  });

  await t.step("BASE_PATH is a path of plain segments; a trailing slash is dropped", () => {
    assert.equal(accepted({ BASE_PATH: "/relay/v2/" }).basePath, "/relay/v2");
    assert.equal(accepted({ BASE_PATH: "/" }).basePath, "");
    for (const path of ["relay", "/relay?x=1", "/re lay", "//relay", "/relay/../x/%2e"]) {
      assert.match(refused({ BASE_PATH: path })[0], /^BASE_PATH must be a path such as \/relay/, path);
    }
  });
});

Deno.test("parseConfig: header names and values", async (t) => {
  await t.step("UPSTREAM_AUTH_HEADER must be a token the relay does not own", () => {
    assert.equal(accepted({ UPSTREAM_AUTH_HEADER: "x-api-key" }).upstreams[0].authHeader, "x-api-key");
    for (const name of ["bad header", "x:y", "x\u00e9", "Host", "content-length", "Transfer-Encoding", "Connection"]) {
      const errors = refused({ UPSTREAM_AUTH_HEADER: name });
      assert.match(errors[0], /^UPSTREAM_AUTH_HEADER must be a header name such as Authorization/, name);
    }
  });

  await t.step("UPSTREAM_AUTH_PREFIX is one word, or empty for a raw key", () => {
    assert.equal(accepted({ UPSTREAM_AUTH_PREFIX: " Token " }).upstreams[0].authPrefix, "Token");
    for (const prefix of ["Bearer token", "Bear\ter", "x\u0000"]) {
      assert.match(refused({ UPSTREAM_AUTH_PREFIX: prefix })[0], /^UPSTREAM_AUTH_PREFIX must be one word/);
    }
  });

  await t.step("extra headers: valid names and one-line text values pass, tabs and Latin-1 included", () => {
    const headers = { "HTTP-Referer": "https://example.com", "X-Title": "a\tb", "X-Name": "caf\u00e9" };
    assert.deepEqual(
      accepted({ UPSTREAM_EXTRA_HEADERS_JSON: JSON.stringify(headers) }).upstreams[0].extraHeaders,
      headers,
    );
  });

  await t.step("extra headers: each bad one is named, the auth header too in any case", () => {
    const errors = refused({
      UPSTREAM_AUTH_HEADER: "api-key",
      UPSTREAM_EXTRA_HEADERS_JSON: JSON.stringify({
        "API-KEY": "x",
        "bad name": "v",
        "X-Number": 1,
        "X-Lines": "a\nb",
        "Accept-Encoding": "gzip",
        "X-Fine": "ok",
      }),
    });
    assert.deepEqual(errors.map((line) => line.replace(/;.*|:.*/, "")), [
      'UPSTREAM_EXTRA_HEADERS_JSON may not set "API-KEY"',
      'UPSTREAM_EXTRA_HEADERS_JSON has an invalid header name "bad name"',
      'UPSTREAM_EXTRA_HEADERS_JSON header "X-Number" must have a single-line string value',
      'UPSTREAM_EXTRA_HEADERS_JSON header "X-Lines" must have a single-line string value',
      'UPSTREAM_EXTRA_HEADERS_JSON may not set "Accept-Encoding"',
    ]);
  });

  await t.step("extra headers that are not a JSON object are refused with an example", () => {
    for (const json of ["[]", '"x"', "null", "{"]) {
      assert.match(refused({ UPSTREAM_EXTRA_HEADERS_JSON: json })[0], /^UPSTREAM_EXTRA_HEADERS_JSON .*e\.g\. \{/, json);
    }
  });
});

Deno.test("parseTrustProxy: which peers may set X-Forwarded-For", async (t) => {
  const parse = (raw: string | undefined) => {
    const errors: string[] = [];
    return { trust: parseTrustProxy(raw, errors), errors };
  };
  const privateRanges = PRIVATE_RANGES.map((range) => parseAddressRange(range));

  await t.step("unset and false (any case) trust nobody", () => {
    for (const raw of [undefined, "false", "FALSE"]) {
      assert.deepEqual(parse(raw), { trust: { ranges: [], hops: 0 }, errors: [] });
    }
  });

  await t.step("true and a number of proxies trust loopback and private addresses, that many hops back", () => {
    assert.deepEqual(parse("true"), { trust: { ranges: privateRanges, hops: 1 }, errors: [] });
    assert.deepEqual(parse("True").trust.hops, 1);
    assert.deepEqual(parse("3"), { trust: { ranges: privateRanges, hops: 3 }, errors: [] });
    assert.equal(parse("99").trust.hops, 99);
  });

  await t.step("addresses and CIDR ranges trust those only, and walk past every trusted entry (hops 0)", () => {
    const { trust, errors } = parse(" 203.0.113.7 , 2001:DB8::/32,10.0.0.0/8 ");
    assert.deepEqual(errors, []);
    assert.equal(trust.hops, 0);
    assert.deepEqual(
      trust.ranges,
      ["203.0.113.7", "2001:db8::/32", "10.0.0.0/8"].map((range) => parseAddressRange(range)),
    );
  });

  await t.step("anything else is one error naming TRUST_PROXY with an example, and trusts nobody", () => {
    // 0 proxies is refused rather than read as false: the message lists false for that.
    for (const raw of ["yes", "0", "100", "10.0.0.0/8,nope", "10.0.0.0/33", ",", "-1"]) {
      const { trust, errors } = parse(raw);
      assert.deepEqual(trust, { ranges: [], hops: 0 }, raw);
      assert.equal(errors.length, 1, raw);
      assert.match(errors[0], /^TRUST_PROXY must be false, true .* e\.g\. 127\.0\.0\.1,10\.0\.0\.0\/8, got "/, raw);
    }
  });
});

Deno.test("parseAddressRange and addressBytes: addresses as 16 bytes", async (t) => {
  const hex = (bytes: Uint8Array | undefined) =>
    bytes && [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");

  await t.step("IPv4 is IPv4-mapped IPv6, its prefix counted from the IPv4 part", () => {
    assert.equal(hex(addressBytes("192.0.2.1")), "00000000000000000000ffffc0000201");
    assert.deepEqual(parseAddressRange("10.0.0.0/8"), { bytes: addressBytes("10.0.0.0"), bits: 104 });
    assert.equal(parseAddressRange("10.1.2.3")?.bits, 128);
    assert.equal(parseAddressRange("0.0.0.0/0")?.bits, 96);
  });

  await t.step("IPv6 in every spelling: ::, embedded IPv4, brackets, zone, any case", () => {
    assert.equal(hex(addressBytes("::")), "0".repeat(32));
    assert.equal(hex(addressBytes("::1")), "0".repeat(31) + "1");
    assert.equal(hex(addressBytes("2001:DB8::1")), "20010db8" + "0".repeat(23) + "1");
    assert.equal(hex(addressBytes("1:2:3:4:5:6:7:8")), "00010002000300040005000600070008");
    assert.equal(hex(addressBytes("::ffff:192.0.2.1")), hex(addressBytes("192.0.2.1")));
    assert.equal(hex(addressBytes("[fe80::1%eth0]")), hex(addressBytes("fe80::1")));
    assert.equal(parseAddressRange("2001:db8::/32")?.bits, 32);
    assert.equal(parseAddressRange("::ffff:10.0.0.0/104")?.bits, 104, "IPv6 notation counts all 128 bits");
  });

  await t.step("anything that is not an address or range is undefined", () => {
    for (
      const text of [
        "",
        "1.2.3",
        "1.2.3.256",
        "1.2.3.4.5",
        "1::2::3",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7",
        "12345::",
        "g::1",
        "localhost",
        "1.2.3.4/33",
        "::/129",
        "1.2.3.4/",
        "/8",
        "1.2.3.4/8/8",
        "1.2.3.4/-1",
        "1.2.3.4/ 8",
        "::1.2.3.256",
      ]
    ) {
      assert.equal(parseAddressRange(text), undefined, text);
    }
  });
});

Deno.test("parsePasswordHash: pbkdf2-sha256:<iterations>:<salt>:<hash>", async (t) => {
  const salt = base64url(new Uint8Array(16).fill(7));
  const hash = base64url(new Uint8Array(32).fill(9));

  await t.step("a well-formed hash gives its iterations and bytes", () => {
    const parsed = parsePasswordHash(`pbkdf2-sha256:600000:${salt}:${hash}`);
    assert.deepEqual(parsed, {
      iterations: 600000,
      salt: new Uint8Array(16).fill(7),
      hash: new Uint8Array(32).fill(9),
    });
  });

  await t.step(
    "fewer than 1,000 iterations, a short salt, a hash of another size or another scheme are refused",
    () => {
      for (
        const text of [
          `pbkdf2-sha256:999:${salt}:${hash}`,
          `pbkdf2-sha256:1234567890:${salt}:${hash}`,
          `pbkdf2-sha256:600000:${salt.slice(0, 15)}:${hash}`,
          `pbkdf2-sha256:600000:${salt}:${hash.slice(1)}`,
          `pbkdf2-sha256:600000:${salt}:${hash}A`,
          `pbkdf2-sha1:600000:${salt}:${hash}`,
          `pbkdf2-sha256:600000:${salt}+:${hash}`,
          `pbkdf2-sha256:600000:${salt}:${hash}\n`,
          `pbkdf2-sha256:-1:${salt}:${hash}`,
        ]
      ) {
        assert.equal(parsePasswordHash(text), undefined, text);
      }
    },
  );

  await t.step("a user with a malformed hash is named by position in MC_RELAY_USERS", () => {
    const errors = refused({ MC_RELAY_USERS: `alice:pbkdf2-sha256:999:${salt}:${hash}` });
    assert.deepEqual(errors, ["MC_RELAY_USERS entry 1 has a malformed hash; make it with 'mc-relay hash-password'"]);
  });
});
