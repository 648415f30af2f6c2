/**
 * Unit tests of src/secrets.ts: the secret masker (`createSecretMasker`) finds configured secrets in every form a
 * server may echo them in, and `secretForms` lists those forms. The masker works on whole texts (bodies are read
 * whole before they are masked, see `rewriteBody`), so there are no chunk boundaries to test here.
 */
import assert from "node:assert/strict";
import { createSecretMasker, secretForms } from "./secrets.ts";

/** A provider key with every character URL- and JSON-encoding touch: '/', '+', '=', '?', '&', '-'. */
const KEY = "sk-proj/Ab+Cd=Ef?gh&ij";
/** An extra header value. */
const EXTRA = "attribution-token-0123456789";

const masker = createSecretMasker([KEY, EXTRA]);

/** True when `text` shows `secret` in no form the masker knows: the check every masked text must pass. */
const hides = (text: string, secret: string) => secretForms(secret).every((form) => !text.includes(form));

Deno.test("secretForms: every form a secret may take in text", async (t) => {
  await t.step("raw, JSON-escaped and URL-encoded (both hex cases)", () => {
    const forms = secretForms(KEY);
    for (
      const form of [
        KEY,
        "sk-proj\\/Ab+Cd=Ef?gh&ij",
        encodeURIComponent(KEY),
        "sk-proj%2fAb%2bCd%3dEf%3fgh%26ij",
      ]
    ) assert.ok(forms.includes(form), form);
  });

  await t.step("a form is found in base64 of the secret after any number of other bytes, standard or URL-safe", () => {
    const forms = secretForms(KEY);
    for (let before = 0; before < 6; before++) {
      for (const after of ["", "x", "xy", "xyz"]) {
        const standard = btoa("\u00ff".repeat(before) + KEY + after);
        const urlSafe = standard.replaceAll("+", "-").replaceAll("/", "_");
        assert.ok(forms.some((form) => standard.includes(form)), `${before} bytes before, ${after.length} after`);
        assert.ok(forms.some((form) => urlSafe.includes(form)), `URL-safe, ${before} before, ${after.length} after`);
      }
    }
  });

  await t.step("a base64 form covers at least 8 characters, so it cannot match ordinary text by chance", () => {
    for (const secret of [KEY, "12345678", EXTRA]) {
      for (const form of secretForms(secret)) assert.ok(form.length >= 8, `${secret}: ${form}`);
    }
  });
});

Deno.test("createSecretMasker: mask", async (t) => {
  await t.step("[security] a raw secret is replaced wherever it stands", () => {
    const masked = masker.mask(`invalid key ${KEY} (extra: ${EXTRA}${EXTRA})`);
    assert.equal(masked, "invalid key [REDACTED] (extra: [REDACTED][REDACTED])");
  });

  await t.step("[security] a JSON body is parsed: escaped secrets, in values and keys, are masked", () => {
    const escaped = JSON.stringify({ error: { message: `bad key ${KEY}`, [EXTRA]: [KEY] } })
      .replaceAll("/", "\\/").replaceAll("-", "\\u002d");
    const masked = masker.mask(escaped);
    assert.ok(masked !== undefined);
    assert.deepEqual(JSON.parse(masked), { error: { message: "bad key [REDACTED]", "[REDACTED]": ["[REDACTED]"] } });
  });

  await t.step("[security] a secret escaped \\u by \\u in JSON is found once parsed", () => {
    const every = [...KEY].map((char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, "0")}`).join("");
    assert.deepEqual(JSON.parse(masker.mask(`{"key":"${every}"}`)!), { key: "[REDACTED]" });
  });

  await t.step("[security] URL-encoded secrets are masked, upper- or lower-case hex", () => {
    for (const encoded of [encodeURIComponent(KEY), "sk-proj%2fAb%2bCd%3dEf%3fgh%26ij"]) {
      assert.equal(masker.mask(`https://x.invalid/?key=${encoded}&a=1`), "https://x.invalid/?key=[REDACTED]&a=1");
    }
  });

  await t.step("[security] base64 echoes are masked at every alignment, standard and URL-safe", () => {
    for (let before = 0; before < 3; before++) {
      const standard = btoa("x".repeat(before) + `Authorization: Bearer ${KEY}`);
      for (const encoded of [standard, standard.replaceAll("+", "-").replaceAll("/", "_")]) {
        const masked = masker.mask(`echo: ${encoded}`);
        assert.ok(masked?.includes("[REDACTED]") && hides(masked, KEY), encoded);
      }
    }
  });

  await t.step("[security] text that still reveals a secret once unescaped is refused (undefined), not passed", () => {
    const mixedCase = encodeURIComponent(KEY).replace("%2F", "%2f"); // neither all-upper nor all-lower hex
    const unicodeOutsideJson = `not json: ${KEY.replace("-", "\\u002d")}`;
    const slashOutsideJson = `not json: ${KEY.replace("/", "\\/").replace("k", "\\u006b")}`;
    for (const text of [mixedCase, unicodeOutsideJson, slashOutsideJson]) {
      assert.equal(masker.mask(text), undefined, text);
    }
  });

  await t.step("text without a secret comes back unchanged, JSON spacing and all", () => {
    for (const text of ['{ "a" : 1 }', "sk-proj/ not the key", "", "%E0%A4%A invalid escape", "[]"]) {
      assert.equal(masker.mask(text), text);
    }
  });

  await t.step("secrets shorter than 8 characters are not masked (they would match ordinary words)", () => {
    assert.equal(createSecretMasker(["none"]).mask("none of it"), "none of it");
    assert.equal(createSecretMasker(["1234567"]).mask("1234567"), "1234567");
    assert.equal(createSecretMasker(["12345678"]).mask("12345678"), "[REDACTED]");
  });

  await t.step("a secret inside a longer one is masked with it, the longer first", () => {
    const nested = createSecretMasker(["sk-abcdefgh", "sk-abcdefgh-longer-key"]);
    assert.equal(nested.mask("a sk-abcdefgh-longer-key b sk-abcdefgh c"), "a [REDACTED] b [REDACTED] c");
  });

  await t.step("a masker without secrets passes everything", () => {
    const none = createSecretMasker([]);
    assert.equal(none.mask(`x ${KEY}`), `x ${KEY}`);
    assert.equal(none.maskHeaderValue(KEY), KEY);
  });
});

Deno.test({
  // Masking used to replace one secret after the other, so where two secrets overlapped in the text (the end of one
  // is the start of the other), the first replacement left the rest of the second in clear.
  name: "[security] createSecretMasker: overlapping secrets leave no part of either in clear",
  fn() {
    const overlapping = createSecretMasker(["abcdefgh12345678", "12345678XYZWVUTS"]);
    const masked = overlapping.mask("x abcdefgh12345678XYZWVUTS y");
    assert.ok(masked === undefined || !/abcdefgh|12345678|XYZWVUTS/.test(masked), masked);
  },
});

Deno.test("createSecretMasker: maskHeaderValue", async (t) => {
  await t.step("[security] a header value that holds a secret in any form is replaced whole", () => {
    const values = [
      `Bearer ${KEY}`,
      `token=${encodeURIComponent(KEY)}`,
      `b64 ${btoa(`x${EXTRA}`)}`,
      encodeURIComponent(KEY).replace("%2F", "%2f"),
      `a\\/b ${KEY.replace("/", "\\/")}`,
    ];
    for (const value of values) assert.equal(masker.maskHeaderValue(value), "[REDACTED]", value);
  });

  await t.step("other values pass unchanged, escapes and all", () => {
    for (const value of ["text/event-stream", "req_123%2F", "a\\b", "sk-proj"]) {
      assert.equal(masker.maskHeaderValue(value), value);
    }
  });
});
