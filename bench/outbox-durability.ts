/**
 * Quick measurement behind the outbox storage choice (docs/outbox.md): SQLite WAL with
 * synchronous=FULL vs NORMAL (through the real SqliteOutbox, group commit) vs a bare append-only
 * CRC32 record log with fdatasync per group. Same payloads, same group sizes.
 */
import { closeSync, fdatasyncSync, openSync, writeSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { SqliteOutbox } from "../src/relay/outbox/sqlite/sqlite-outbox.js";

const PAYLOAD = new Uint8Array(200).fill(65);
const DURATION_MS = 2000;

async function sqlite(sync: "FULL" | "NORMAL" | "FULL-inline", group: number, dir: string): Promise<number> {
  const ob = SqliteOutbox.open({
    path: join(dir, `o-${sync}-${group}.db`),
    sinks: ["s"],
    synchronous: sync === "NORMAL" ? "NORMAL" : "FULL",
    fsyncMode: sync === "FULL-inline" ? "inline" : "async-wal",
    ttlCheckMs: 0,
  });
  let n = 0;
  const start = performance.now();
  while (performance.now() - start < DURATION_MS) {
    // `group` concurrent single-message appends: the outbox commits them in one transaction.
    await Promise.all(Array.from({ length: group }, () => ob.append([{ channel: "t", payload: PAYLOAD }])));
    n += group;
  }
  const rate = n / ((performance.now() - start) / 1000);
  await ob.close();
  return rate;
}

function crcLog(group: number, dir: string): number {
  const fd = openSync(join(dir, `log-${group}`), "a");
  let n = 0;
  const start = performance.now();
  while (performance.now() - start < DURATION_MS) {
    const recs: Buffer[] = [];
    for (let i = 0; i < group; i++) {
      const body = Buffer.concat([
        Buffer.from(`{"id":"0190c0de-0000-7000-8000-${String(n + i).padStart(12, "0")}","channel":"t"}`),
        PAYLOAD,
      ]);
      const hdr = Buffer.alloc(8);
      hdr.writeUInt32LE(body.length, 0);
      hdr.writeUInt32LE(crc32(body), 4);
      recs.push(hdr, body);
    }
    writeSync(fd, Buffer.concat(recs));
    fdatasyncSync(fd);
    n += group;
  }
  closeSync(fd);
  return n / ((performance.now() - start) / 1000);
}

const dir = await mkdtemp(join(tmpdir(), "m2m-outbox-bench-"));
try {
  for (const group of [1, 100]) {
    const full = await sqlite("FULL", group, dir);
    const inline = await sqlite("FULL-inline", group, dir);
    const normal = await sqlite("NORMAL", group, dir);
    const log = crcLog(group, dir);
    console.log(
      JSON.stringify({
        group,
        sqliteFullAsyncWal: Math.round(full),
        sqliteFullInline: Math.round(inline),
        sqliteNormal: Math.round(normal),
        crcLogFdatasync: Math.round(log),
      }),
    );
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
