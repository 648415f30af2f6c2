/** The steady read of a reload: an env file is applied only once two reads 100 ms apart agree. */
import assert from "node:assert/strict";
import { type ReloadSource, steadyRead } from "./server.ts";

/** A source whose reads give `values` in turn (the last one again once they run out), counting the reads. */
function source(values: string[]): ReloadSource & { reads: number } {
  const it = {
    env: {},
    reads: 0,
    read() {
      const value = values[Math.min(it.reads, values.length - 1)];
      it.reads++;
      return Promise.resolve({ env: { LOG_LEVEL: value }, notes: [], problems: [] });
    },
  };
  return it;
}

Deno.test("steadyRead: two reads that agree are applied, without a problem", async () => {
  const read = await steadyRead(source(["info"]));
  assert.deepEqual(read, { env: { LOG_LEVEL: "info" }, notes: [], problems: [] });
});

Deno.test("steadyRead: a file caught halfway is read again until two reads agree, and the later one is applied", async () => {
  const changing = source(["info", "warn"]);
  const read = await steadyRead(changing);
  assert.equal(read.env.LOG_LEVEL, "warn");
  assert.deepEqual(read.problems, []);
  assert.equal(changing.reads, 3);
});

Deno.test("steadyRead: a file that keeps changing is a problem that says to write it whole", async () => {
  const read = await steadyRead(source(["a", "b", "c", "d", "e"]));
  assert.equal(read.problems.length, 1);
  assert.match(read.problems[0], /kept changing while it was read; write it whole/);
});
