import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createLogger } from "../../src/core/log.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { useTempDir } from "../kit/temp-dir.js";

describe("SqliteOutbox: corruption is quarantined, never silently deleted", () => {
  const dir = useTempDir("m2m-quarantine-");

  it("a file that is not a database is renamed aside (kept byte for byte), counted, reported; a fresh outbox starts", async () => {
    const path = join(dir(), "outbox.db");
    const garbage = Buffer.from("this is not an sqlite database, it is a torn write ".repeat(200));
    await writeFile(path, garbage);
    const logs: string[] = [];
    const moved: string[] = [];
    const ob = SqliteOutbox.open({
      path,
      sinks: ["mqtt"],
      ttlCheckMs: 0,
      logger: createLogger({ write: (l) => logs.push(l) }),
      onQuarantine: (to) => moved.push(to),
    });
    const files = await readdir(dir());
    const aside = files.find((f) => f.startsWith("outbox.db.corrupt-"));
    expect(aside).toBeDefined();
    expect(moved).toEqual([join(dir(), aside ?? "")]);
    expect(await readFile(join(dir(), aside ?? ""))).toEqual(garbage);
    expect(ob.stats().quarantined).toBe(1);
    expect(logs.some((l) => l.includes("ERR_OUTBOX_CORRUPT"))).toBe(true);
    // The fresh outbox works.
    const ids = await ob.append([{ channel: "a", payload: new Uint8Array([1]) }]);
    expect((await ob.lease("mqtt", 1))[0]?.id).toBe(ids[0]);
    await ob.close();
  });

  it("a database whose header was overwritten is quarantined too", async () => {
    const path = join(dir(), "second.db");
    const ob = SqliteOutbox.open({ path, sinks: ["mqtt"], ttlCheckMs: 0 });
    await ob.append([{ channel: "a", payload: new Uint8Array([1]) }]);
    await ob.close();
    const bytes = await readFile(path);
    bytes.fill(0x41, 0, 100);
    await writeFile(path, bytes);
    const again = SqliteOutbox.open({ path, sinks: ["mqtt"], ttlCheckMs: 0 });
    expect(again.stats().quarantined).toBe(1);
    expect(again.stats().depth).toBe(0);
    expect((await readdir(dir())).some((f) => f.startsWith("second.db.corrupt-"))).toBe(true);
    await again.close();
  });

  it("opening with a large backlog reads depth and bytes from the meta row (no scan): counts are exact", async () => {
    const path = join(dir(), "big.db");
    const ob = SqliteOutbox.open({ path, sinks: ["mqtt"], ttlCheckMs: 0 });
    for (let i = 0; i < 20; i++) {
      await ob.append(Array.from({ length: 1000 }, () => ({ channel: "a", payload: new Uint8Array(10) })));
    }
    await ob.close();
    const again = SqliteOutbox.open({ path, sinks: ["mqtt"], ttlCheckMs: 0 });
    expect(again.stats().depth).toBe(20_000);
    expect(again.stats().bytes).toBe(200_000);
    // Delivery resumes from the head immediately.
    expect((await again.lease("mqtt", 5)).map((m) => m.seq)).toEqual([1, 2, 3, 4, 5]);
    await again.close();
  });
});
