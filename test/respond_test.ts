/**
 * The answer to the client: passed through byte for byte, streamed without buffering, cut visibly when
 * the upstream stalls or breaks, its usage read, its log line and metrics, and secrets masked.
 *
 * Proved through the real HTTP surface (see testing.ts); the last test checks that no secret leaked.
 */
import assert from "node:assert/strict";
import { parseConfig } from "../main.ts";
import {
  ALLOWED,
  assertNoSecretSeen,
  CANARY_KEY,
  CANARY_PASSWORD,
  chatBody,
  controlledStream,
  decoder,
  embeddingsUpstream,
  encoder,
  GOOD_BEARER,
  minimalEnv,
  openAiLikeUpstream,
  rawUpstream,
  relayFromEnv,
  sleep,
  startRelay,
  startUpstream,
  testConfig,
  USERNAME,
  within,
} from "./testing.ts";

/** An answer that declares 100 bytes and sends a few: the upstream then stalls, or breaks off. */
const PARTIAL_JSON_ANSWER =
  'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"partial":';

/** Re-chunks a byte stream into exactly the given text parts (the bytes are the same). */
function chunkEach(parts: string[]): TransformStream<Uint8Array, Uint8Array> {
  let index = 0;
  let buffered = new Uint8Array(0);
  return new TransformStream({
    transform(chunk, controller) {
      const joined = new Uint8Array(buffered.byteLength + chunk.byteLength);
      joined.set(buffered);
      joined.set(chunk, buffered.byteLength);
      buffered = joined;
      while (index < parts.length) {
        const size = encoder.encode(parts[index]).byteLength;
        if (buffered.byteLength < size) break;
        controller.enqueue(buffered.slice(0, size));
        buffered = buffered.slice(size);
        index++;
      }
    },
  });
}

Deno.test("respond: answers passed through", async (t) => {
  await t.step(
    "hop-by-hop headers, set-cookie and alt-svc from the upstream are dropped; content headers pass",
    async () => {
      await using chatty = startUpstream(() =>
        new Response('{"ok":true}', {
          status: 201,
          headers: {
            "content-type": "application/json; charset=utf-8",
            "set-cookie": "tracking=1",
            "alt-svc": 'h3=":443"',
            "x-ratelimit-remaining-requests": "99",
            "connection": "x-private-hop",
            "x-private-hop": "1",
            "keep-alive": "timeout=5",
          },
        })
      );
      await using chattyRelay = startRelay(testConfig(chatty.url));
      const response = await chattyRelay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      assert.equal(response.status, 201);
      assert.equal(response.text, '{"ok":true}');
      assert.equal(response.headers.get("content-type"), "application/json; charset=utf-8");
      assert.equal(response.headers.get("x-ratelimit-remaining-requests"), "99");
      for (const name of ["set-cookie", "alt-svc", "x-private-hop", "keep-alive"]) {
        assert.equal(response.headers.get(name), null, name);
      }
    },
  );

  await t.step("upstream errors pass through unchanged (status, headers and body)", async () => {
    const providerError = { error: { message: "The server is overloaded", type: "server_error", code: null } };
    await using failing = startUpstream(() =>
      Response.json(providerError, { status: 503, headers: { "retry-after": "7", "x-request-id": "req_9" } })
    );
    await using failingRelay = startRelay(testConfig(failing.url));
    const response = await failingRelay.chat(chatBody());
    assert.equal(response.status, 503);
    assert.deepEqual(response.json(), providerError);
    assert.equal(response.headers.get("retry-after"), "7");
    assert.equal(response.headers.get("x-request-id"), "req_9");
  });

  await t.step("a compressed upstream body passes through byte for byte", async () => {
    const original = JSON.stringify({ data: "compressible ".repeat(200) });
    const gzipped = new Uint8Array(
      await new Response(new Blob([original]).stream().pipeThrough(new CompressionStream("gzip"))).arrayBuffer(),
    );
    await using gzipUpstream = startUpstream(() =>
      new Response(gzipped, { headers: { "content-type": "application/json", "content-encoding": "gzip" } })
    );
    await using gzipRelay = startRelay(testConfig(gzipUpstream.url));
    const response = await fetch(`${gzipRelay.url}/v1/models`, {
      headers: { authorization: GOOD_BEARER, "accept-encoding": "gzip" },
    });
    assert.equal(response.headers.get("content-encoding"), "gzip");
    assert.equal(await response.text(), original, "the client decodes exactly the upstream's bytes");
    assert.equal(gzipUpstream.requests.at(-1)!.headers.get("accept-encoding"), "identity");
  });

  await t.step("a body of unknown length, in chunks of every size, passes through byte for byte", async () => {
    // From one byte to 200 KiB a chunk, so the relay's read buffer starts small, fills, and grows on the way.
    const sizes = [1, 7, 2048, 2047, 2049, 8192, 70_000, 3, 200_000, 65_536, 131_072, 5, 300_000];
    const chunks = sizes.map((size, index) => Uint8Array.from({ length: size }, (_, at) => (at * 31 + index) % 251));
    await using upstream = startUpstream(() =>
      new Response(
        new ReadableStream<Uint8Array>({
          start(controller) {
            for (const chunk of chunks) controller.enqueue(chunk);
            controller.close();
          },
        }),
        { headers: { "content-type": "application/octet-stream" } },
      )
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    const received = new Uint8Array(await response.arrayBuffer());
    const sent = new Uint8Array(await new Blob(chunks).arrayBuffer());
    assert.equal(received.byteLength, sent.byteLength);
    const digest = async (bytes: Uint8Array<ArrayBuffer>) =>
      new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)).join(",");
    assert.equal(await digest(received), await digest(sent), "every byte arrives as the upstream sent it");
    await sleep(20);
    assert.equal(relay.requestLogs().at(-1)?.bytes_out, sent.byteLength);
  });

  await t.step("a non-streamed answer reaches the client byte for byte, small or large, its usage read", async () => {
    const answer = (content: string) =>
      `{ "id": "x",\n  "choices": [{"message": {"role": "assistant", "content": ${
        JSON.stringify(content)
      }}}],\n  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7} }\n`;
    const small = answer("grüße, 世界");
    const large = answer("x".repeat(300 * 1024)); // past the size read whole: relayed chunk by chunk
    await using upstream = startUpstream((_request, seen) =>
      new Response(JSON.parse(seen.body).model === "large" ? large : small, {
        headers: { "content-type": "application/json" },
      })
    );
    await using relay = startRelay(testConfig(upstream.url));
    for (const [model, text] of [["small", small], ["large", large]]) {
      const response = await relay.chat(chatBody({ model }));
      assert.equal(response.status, 200);
      assert.equal(response.text, text, model);
      assert.equal(Number(response.headers.get("content-length")), encoder.encode(text).byteLength, model);
      assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 });
      assert.equal(relay.requestLogs().at(-1)!.bytes_out, encoder.encode(text).byteLength, model);
    }
  });

  await t.step("an answer without a body (204, even with a Content-Length) to a POST passes on as it is", async () => {
    await using upstream = rawUpstream("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 0);
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.chat(chatBody());
    assert.equal(response.status, 204);
    assert.equal(response.text, "");
    assert.equal(relay.requestLogs().at(-1)?.status, 204);
  });
});

Deno.test("respond: streaming, stalls and breaks", async (t) => {
  await t.step("each chunk reaches the client before the upstream sends the next (no buffering)", async () => {
    const stream = controlledStream();
    await using upstream = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await relay.fetchChat(chatBody({ stream: true }));
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.equal(response.headers.get("cache-control"), "no-cache, no-transform");
    assert.equal(response.headers.get("x-accel-buffering"), "no");
    const reader = response.body!.getReader();
    const delays: number[] = [];
    for (let i = 0; i < 5; i++) {
      const event = `data: {"choices":[{"delta":{"content":"token ${i}"}}]}\n\n`;
      const sentAt = performance.now();
      stream.send(event);
      // The upstream sends nothing more until this chunk has arrived: a buffering relay would hang here.
      const { value } = await within(3000, reader.read(), `chunk ${i} was held back by the relay`);
      delays.push(performance.now() - sentAt);
      assert.equal(decoder.decode(value), event);
    }
    stream.send("data: [DONE]\n\n");
    stream.close();
    assert.equal(decoder.decode((await reader.read()).value), "data: [DONE]\n\n");
    assert.ok((await reader.read()).done);
  });

  await t.step("a client that leaves mid-stream cancels the upstream at once", async () => {
    const stream = controlledStream();
    await using upstream = startUpstream(() =>
      new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
    );
    await using relay = startRelay(testConfig(upstream.url));
    const client = new AbortController();
    const response = await fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
      signal: client.signal,
    });
    const reader = response.body!.getReader();
    stream.send("data: first\n\n");
    await reader.read();
    client.abort();
    await reader.read().catch(() => {});
    await within(3000, stream.cancelled, "the upstream stream was not cancelled after the client left");
    await sleep(50);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "client_gone");
  });

  await t.step("a stream that keeps flowing is never cut, however much longer than the timeout it runs", async () => {
    await using upstream = startUpstream(() => {
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          await sleep(60);
          if (sent++ === 20) return controller.close();
          controller.enqueue(encoder.encode(`data: ${sent}\n\n`));
        },
      });
      return new Response(body, { headers: { "content-type": "text/event-stream" } });
    });
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 250 }));
    const started = performance.now();
    const response = await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
    });
    assert.ok(performance.now() - started > 4 * 250, "the stream ran well past the timeout");
    assert.equal(response.text.match(/data: /g)?.length, 20);
    assert.ok(response.text.endsWith("data: 20\n\n"));
  });

  await t.step(
    "a stream that stalls longer than the timeout is cut, visibly, and the upstream is cancelled",
    async () => {
      const stream = controlledStream();
      await using upstream = startUpstream(() =>
        new Response(stream.body, { headers: { "content-type": "text/event-stream" } })
      );
      await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
      const response = await fetch(`${relay.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: GOOD_BEARER },
        body: chatBody({ stream: true }),
      });
      const reader = response.body!.getReader();
      stream.send("data: first\n\n");
      assert.equal(decoder.decode((await reader.read()).value), "data: first\n\n");
      const ending = await within(
        3000,
        reader.read().then(() => "clean end", () => "error"),
        "the stalled stream hung",
      );
      assert.equal(ending, "error", "a cut stream must not look complete to the client");
      await within(3000, stream.cancelled, "the stalled upstream was not cancelled");
      await sleep(50);
      assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
    },
  );

  await t.step("a body of known length that stalls is cut after the timeout too", async () => {
    await using upstream = rawUpstream(PARTIAL_JSON_ANSWER);
    await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 200);
    const ending = await within(3000, response.text().then(() => "clean end", () => "error"), "the stalled body hung");
    assert.equal(ending, "error");
    await sleep(50);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
  });

  await t.step(
    "a non-streamed answer that stalls after its headers gets 504 with CORS headers, never a cut 200",
    async () => {
      await using upstream = rawUpstream(PARTIAL_JSON_ANSWER);
      await using relay = startRelay(testConfig(upstream.url, { requestTimeoutMs: 300 }));
      const response = await relay.chat(chatBody(), { origin: ALLOWED });
      assert.equal(response.status, 504);
      assert.equal(response.json().error.code, "upstream_timeout");
      assert.match(
        response.json().error.message,
        /did not finish its answer within 0\.3 s \(REQUEST_TIMEOUT_SECONDS\)/,
      );
      assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
      assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_timeout");
    },
  );

  await t.step("a non-streamed answer that breaks off before its end gets 502 upstream_stream_error", async () => {
    await using upstream = rawUpstream(PARTIAL_JSON_ANSWER, 50);
    await using relay = startRelay(testConfig(upstream.url, { publishUpstreamUrl: true }));
    const response = await relay.chat(chatBody(), { origin: ALLOWED });
    assert.equal(response.status, 502);
    assert.equal(response.json().error.code, "upstream_stream_error");
    assert.match(
      response.json().error.message,
      new RegExp(`^mc-relay: the upstream 127\\.0\\.0\\.1:${upstream.port} broke off`),
    );
    assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
    assert.equal(relay.requestLogs().at(-1)?.outcome, "upstream_stream_error");
  });

  await t.step("an upstream that resets mid-stream ends the client's stream with an error", async () => {
    await using upstream = rawUpstream(
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nd\r\ndata: first\n\n\r\n",
      100,
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: GOOD_BEARER },
      body: chatBody({ stream: true }),
    });
    const reader = response.body!.getReader();
    assert.equal(decoder.decode((await reader.read()).value), "data: first\n\n");
    const ending = await within(3000, reader.read().then(() => "clean end", () => "error"), "the reset stream hung");
    assert.equal(ending, "error");
  });

  await t.step("an endless upstream body stops as soon as the client leaves", async () => {
    let cancelled!: () => void;
    const upstreamCancelled = new Promise<void>((resolve) => (cancelled = resolve));
    await using upstream = startUpstream(() =>
      new Response(
        new ReadableStream<Uint8Array>({
          pull: (controller) => controller.enqueue(new Uint8Array(65536)),
          cancel: () => cancelled(),
        }),
        { headers: { "content-type": "application/octet-stream" } },
      )
    );
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/models`, { headers: { authorization: GOOD_BEARER } });
    const reader = response.body!.getReader();
    let received = 0;
    while (received < 1024 * 1024) received += (await reader.read()).value!.byteLength;
    await reader.cancel();
    await within(3000, upstreamCancelled, "the endless upstream body went on after the client left");
  });
});

Deno.test("respond: usage read from answers", async (t) => {
  await using upstream = embeddingsUpstream();

  await t.step("a non-streamed chat's token usage goes into the log line, with user and model", async () => {
    await using relay = relayFromEnv(upstream.url, { MC_RELAY_USERS: "alice:alice-password-123" });
    await relay.call("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: "Bearer alice:alice-password-123", "content-type": "application/json" },
      body: chatBody({ model: "gpt-test" }),
    });
    const entry = relay.requestLogs().at(-1)!;
    assert.equal(entry.user, "alice");
    assert.equal(entry.model, "gpt-test");
    assert.deepEqual(entry.usage, { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 });
  });

  await t.step("a streamed chat: the relay asks for usage, logs it, and takes the extra event out again", async () => {
    const events = [
      'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n',
      'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
      "data: [DONE]\n\n",
    ];
    await using streaming = startUpstream((_request, seen) => {
      // The usage event arrives split across two chunks, as it can on a real network.
      const parts = [events[0], events[1].slice(0, 30), events[1].slice(30), events[2]];
      const body = seen.body.includes('"include_usage":true') ? parts : [events[0], events[2]];
      return new Response(new Blob(body).stream().pipeThrough(chunkEach(body)), {
        headers: { "content-type": "text/event-stream" },
      });
    });
    const result = parseConfig({ ...minimalEnv, UPSTREAM_BASE_URL: streaming.url });
    assert.ok(result.ok);
    await using relay = startRelay(result.config);
    const ask = (extra: Record<string, unknown>) => relay.chat(chatBody({ stream: true, ...extra }));

    const plain = await ask({});
    assert.deepEqual(JSON.parse(streaming.requests.at(-1)!.body).stream_options, { include_usage: true });
    assert.equal(plain.text, events[0] + events[2], "the client gets the stream it asked for, without the usage event");
    assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 });

    const asked = await ask({ stream_options: { include_usage: true } });
    assert.equal(asked.text, events.join(""), "a client that asked for usage keeps its event");
    assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 });
  });

  await t.step(
    "usage is read from CRLF-separated events too, and a usage:null on every chunk changes nothing",
    async () => {
      const events = [
        'data: {"choices":[{"delta":{"content":"\u00e9t\u00e9"}}],"usage":null}\r\n\r\n',
        'data: {"choices":[],"usage": {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\r\n\r\n',
        "data: [DONE]\r\n\r\n",
      ];
      await using crlf = startUpstream(() =>
        new Response(events.join(""), { headers: { "content-type": "text/event-stream" } })
      );
      await using relay = startRelay(testConfig(crlf.url));
      const response = await relay.chat(chatBody({ stream: true }));
      assert.equal(response.text, events[0] + events[2]);
      assert.deepEqual(relay.requestLogs().at(-1)!.usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 });
    },
  );
});

Deno.test("respond: usage that cannot be dodged [security]", async (t) => {
  await t.step(
    "every answered request is charged: usage of embeddings and responses, an estimate when none came",
    async () => {
      const stream = controlledStream();
      await using usageUpstream = startUpstream((_request, seen) => {
        if (seen.path === "/embeddings") {
          return Response.json({ object: "list", data: [], usage: { prompt_tokens: 7, total_tokens: 7 } });
        }
        if (seen.path === "/responses") {
          const events = [
            'event: response.output_text.delta\rdata: {"type":"response.output_text.delta","delta":"hi"}\r\r',
            'event: response.completed\rdata: {"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":3,"total_tokens":8}}}\r\r',
          ];
          return new Response(events.join(""), { headers: { "content-type": "text/event-stream" } });
        }
        return new Response(stream.body, { headers: { "content-type": "text/event-stream" } });
      });
      await using relay = startRelay(
        testConfig(usageUpstream.url),
      );
      const post = (path: string, body: string) =>
        relay.call(path, {
          method: "POST",
          headers: { authorization: GOOD_BEARER, "content-type": "application/json" },
          body,
        });
      assert.equal((await post("/v1/embeddings", '{"model":"e","input":"x"}')).status, 200);
      const responses = await post("/v1/responses", '{"model":"r","input":"x","stream":true}');
      assert.equal(responses.status, 200);
      assert.match(responses.text, /response\.completed/, "the Responses API keeps its own usage event");

      const response = await relay.fetchChat(chatBody({ stream: true }));
      const reader = response.body!.getReader();
      stream.send('data: {"choices":[{"delta":{"content":"a"}}]}\n\n');
      stream.send('data: {"choices":[{"delta":{"content":"b"}}]}\n\n');
      await reader.read();
      await reader.cancel(); // the client leaves before the usage event
      await stream.cancelled;
      await sleep(20);
      const [embeddings, responsesLog, chat] = relay.requestLogs().slice(-3);
      assert.deepEqual(embeddings.usage, { prompt_tokens: 7, total_tokens: 7 });
      assert.deepEqual(responsesLog.usage, { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 });
      assert.equal(chat.outcome, "client_gone");
      assert.equal(chat.usage.estimated, true);
      assert.ok(chat.usage.prompt_tokens > 0 && chat.usage.completion_tokens >= 1, JSON.stringify(chat.usage));
    },
  );

  await t.step(
    "events separated by bare CRs are split, their usage read and the asked-for usage event removed",
    async () => {
      await using crUpstream = startUpstream(() =>
        new Response(
          'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\r\rdata: [DONE]\r\r',
          { headers: { "content-type": "text/event-stream" } },
        )
      );
      await using relay = startRelay(testConfig(crUpstream.url));
      const response = await relay.chat(chatBody({ stream: true }));
      assert.equal(response.text, 'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: [DONE]\r\r');
      assert.deepEqual(relay.requestLogs().at(-1).usage, { prompt_tokens: 2, completion_tokens: 1, total_tokens: 3 });
    },
  );
});

Deno.test("respond: log lines and metrics", async (t) => {
  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = startUpstream(openAiLikeUpstream);

    await t.step(
      "one JSON line per request with id, method, path, status, duration, bytes and upstream status",
      async () => {
        await using relay = startRelay(testConfig(upstream.url));
        const body = chatBody();
        const response = await relay.call("/v1/chat/completions", {
          method: "POST",
          headers: { authorization: GOOD_BEARER, "content-type": "application/json", cookie: "session=secret-cookie" },
          body,
        });
        await sleep(20);
        assert.equal(relay.logs.length, 1);
        const entry = JSON.parse(relay.logs[0]);
        assert.equal(entry.msg, "request");
        assert.equal(entry.level, "info");
        assert.ok(!Number.isNaN(Date.parse(entry.time)));
        assert.equal(entry.request_id, response.headers.get("x-relay-request-id"));
        assert.equal(entry.method, "POST");
        assert.equal(entry.path, "/v1/chat/completions");
        assert.equal(entry.status, 200);
        assert.equal(entry.upstream_status, 200);
        assert.equal(entry.bytes_in, body.length);
        assert.equal(entry.bytes_out, response.text.length);
        assert.equal(typeof entry.duration_ms, "number");
        assert.ok(!relay.logs[0].includes("Hello"), "no body in the log");
        assert.ok(!relay.logs[0].includes("secret-cookie"), "no header in the log");
      },
    );

    await t.step("LOG_LEVEL=warn leaves out request lines", async () => {
      await using relay = startRelay(testConfig(upstream.url, { logLevel: "warn" }));
      await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
      assert.equal(relay.logs.length, 0);
    });

    await t.step("/health is logged at debug; answers the relay makes itself log their true bytes_out", async () => {
      await using relay = startRelay(testConfig(upstream.url, { logLevel: "debug" }));
      const answer = await relay.call("/health");
      const refused = await relay.call("/v1/models", { headers: { authorization: "Bearer team:wrong" } });
      const lines = relay.logs.map((line) => JSON.parse(line));
      const health = lines.find((line) => line.path === "/health");
      assert.equal(health.level, "debug");
      assert.equal(health.bytes_out, encoder.encode(answer.text).byteLength);
      assert.ok(answer.text.startsWith('{"status":"ok","ok":true,"endpoints":1,"state":"ok"'));
      const denied = lines.find((line) => line.status === 401);
      assert.equal(denied.level, "info");
      assert.equal(denied.bytes_out, encoder.encode(refused.text).byteLength);
    });
  }

  {
    // The steps in this block share these fixtures; the block disposes of them before the next one.
    await using upstream = embeddingsUpstream();

    await t.step(
      "METRICS=alice: /metrics, for the users it names only, counts requests, latency, tokens and streams",
      async () => {
        await using relay = relayFromEnv(upstream.url, {
          MC_RELAY_USERS: "alice:alice-password-123,bob:bob-password-1234",
          METRICS: "alice",
        });
        const alice = { authorization: "Bearer alice:alice-password-123", "content-type": "application/json" };
        await relay.call("/v1/chat/completions", { method: "POST", headers: alice, body: chatBody() });
        await relay.call("/v1/models", { headers: alice });
        await relay.call("/v1/models", { headers: { authorization: "Bearer alice:wrong" } });
        assert.equal((await relay.call("/metrics")).status, 401);
        const bob = await relay.call("/metrics", { headers: { authorization: "Bearer bob:bob-password-1234" } });
        assert.equal(bob.status, 403, "a user METRICS does not name reads no metrics");
        assert.doesNotMatch(bob.text, /mc_relay_/);
        const metrics = await relay.call("/metrics", { headers: alice });
        assert.equal(metrics.status, 200);
        assert.match(metrics.headers.get("content-type")!, /^text\/plain; version=0\.0\.4/);
        assert.match(
          metrics.text,
          /^mc_relay_requests_total\{route="\/v1\/chat\/completions",status="200",user="alice"\} 1$/m,
        );
        assert.match(metrics.text, /^mc_relay_requests_total\{route="\/v1\/models",status="401",user=""\} 1$/m);
        assert.match(metrics.text, /^mc_relay_upstream_latency_seconds_count 2$/m);
        assert.match(metrics.text, /^mc_relay_tokens_total\{user="alice",model="gpt-test",kind="prompt"\} 9$/m);
        assert.match(metrics.text, /^mc_relay_open_streams 0$/m);
      },
    );
  }
});

Deno.test("respond: provider errors, masked secrets and metric labels [security]", async (t) => {
  await using upstream = startUpstream(openAiLikeUpstream);

  await t.step("the provider's own 429 passes through, saying that it is the provider's quota", async () => {
    await using limited = startUpstream(() =>
      Response.json(
        { error: { message: "Rate limit reached for gpt-4o", type: "requests", code: "rate_limit_exceeded" } },
        { status: 429, headers: { "retry-after": "7", "x-ratelimit-remaining-requests": "0" } },
      )
    );
    await using relay = startRelay(testConfig(limited.url, { publishUpstreamUrl: true }));
    const response = await relay.chat(chatBody());
    assert.equal(response.status, 429);
    assert.equal(response.headers.get("retry-after"), "7");
    assert.equal(response.headers.get("x-ratelimit-remaining-requests"), "0");
    const { error } = response.json();
    assert.equal(error.code, "rate_limit_exceeded");
    assert.equal(error.type, "requests");
    assert.match(error.message, /^The provider 127\.0\.0\.1:\d+ is rate-limiting the relay \(the provider's quota/);
    assert.match(error.message, /Rate limit reached for gpt-4o$/);
  });

  await t.step("a provider key that an upstream error echoes is masked before the client sees it", async () => {
    await using echoing = startUpstream((request) =>
      Response.json({
        error: { message: `Incorrect API key provided: ${request.headers.get("authorization")?.slice(7)}.` },
      }, { status: 401 })
    );
    await using relay = startRelay(testConfig(echoing.url));
    const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
    assert.equal(response.status, 401);
    assert.equal(response.json().error.message, "Incorrect API key provided: [REDACTED].");
  });

  await t.step(
    "a provider key echoed in any form, or in a body the relay cannot inspect, never reaches the client",
    async () => {
      const key = CANARY_KEY;
      const base64 = btoa(key);
      const cases: [string, () => Response][] = [
        ["JSON \\u escapes", () =>
          new Response(`{"error":{"message":"bad key ${key.replaceAll("-", "\\u002d")}"}}`, {
            status: 401,
            headers: { "content-type": "application/json" },
          })],
        [
          "JSON \\/ escapes",
          () =>
            new Response(JSON.stringify({ error: { message: `bad key ${key}` } }).replaceAll("-", "-"), {
              status: 401,
            }),
        ],
        ["URL-encoded", () => new Response(`key=${encodeURIComponent(key)}`, { status: 400 })],
        ["base64", () => new Response(`auth was ${base64}`, { status: 403 })],
        ["base64 after one byte", () => new Response(`auth ${btoa(`:${key}`)}`, { status: 403 })],
        ["a 401 sent as an event stream", () =>
          new Response(`data: {"error":"${key}"}\n\n`, {
            status: 401,
            headers: { "content-type": "text/event-stream" },
          })],
        ["a 300 without Location", () => new Response(`see ${key}`, { status: 300 })],
        ["response headers", () =>
          new Response("{}", {
            status: 401,
            headers: { "www-authenticate": `Bearer realm="${key}"`, "x-debug-auth": `Bearer ${key}` },
          })],
      ];
      for (const [label, answer] of cases) {
        await using echoing = startUpstream(() => answer());
        await using relay = startRelay(testConfig(echoing.url));
        const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
        const everything = `${response.text} ${JSON.stringify([...response.headers])}`;
        const unescaped = everything.replace(/\\u([0-9a-fA-F]{4})/g, (_, hex) => String.fromCharCode(parseInt(hex, 16)))
          .replaceAll("\\/", "/");
        for (const form of [key, base64.slice(0, -4), encodeURIComponent(key), btoa(`:${key}`).slice(4, -4)]) {
          assert.ok(
            !unescaped.includes(form) && !decodeURIComponent(everything).includes(key),
            `${label}: ${everything}`,
          );
        }
      }
      const replaced: [string, () => Response][] = [
        [
          "a gzip error body",
          () =>
            new Response(new Blob([`{"error":"${key}"}`]).stream().pipeThrough(new CompressionStream("gzip")), {
              status: 401,
              headers: { "content-encoding": "gzip", "content-type": "application/json" },
            }),
        ],
        ["an error body over 1 MiB", () => new Response(`${"x".repeat(1_100_000)} ${key}`, { status: 500 })],
      ];
      for (const [label, answer] of replaced) {
        await using echoing = startUpstream(() => answer());
        await using relay = startRelay(testConfig(echoing.url));
        const response = await relay.call("/v1/models", { headers: { authorization: GOOD_BEARER } });
        assert.ok(response.status >= 400, label);
        assert.equal(response.json().error.code, "upstream_error", label);
        assert.match(response.json().error.message, /does not pass on/, label);
        assert.equal(response.headers.get("content-encoding"), null, label);
        assert.ok(!response.text.includes(key), label);
      }
    },
  );

  await t.step("metric label sets: one user's junk models cannot push other users' tokens into 'other'", async () => {
    await using relay = startRelay(testConfig(upstream.url, {
      users: [{ name: USERNAME, password: CANARY_PASSWORD }, { name: "quiet", password: "quiet-password-123" }],
      metricsUsers: [USERNAME],
    }));
    const chat = (authorization: string, model: string) =>
      relay.call("/v1/chat/completions", {
        method: "POST",
        headers: { authorization, "content-type": "application/json" },
        body: chatBody({ model }),
      });
    for (let i = 0; i < 30; i++) await chat(GOOD_BEARER, `junk-${i}`);
    await chat("Bearer quiet:quiet-password-123", "real-model");
    const metrics = (await relay.call("/metrics", { headers: { authorization: GOOD_BEARER } })).text;
    assert.match(metrics, /^mc_relay_tokens_total\{user="quiet",model="real-model",kind="prompt"\} 9$/m);
    assert.match(metrics, /^mc_relay_tokens_total\{user="team",model="other",kind="prompt"\} 90$/m);
    assert.match(metrics, /^mc_relay_tokens_total\{user="team",model="other",kind="completion"\} 10$/m);
    assert.equal(
      (metrics.match(/^mc_relay_tokens_total\{user="team"/gm) ?? []).length,
      21 * 2,
      "20 models and other, two kinds each",
    );
  });

  await t.step("a secret that a client puts into the path is masked in the log line", async () => {
    await using relay = startRelay(testConfig(upstream.url));
    const response = await fetch(`${relay.url}/v1/${CANARY_KEY}`);
    await response.body?.cancel();
    assert.equal(response.status, 404);
    assert.match(relay.logs[0], /"path":"\/v1\/\[REDACTED\]"/);
  });
});

Deno.test("no secret ever appeared in anything the relay logged or returned, in any test above", () => {
  assertNoSecretSeen(200);
});
