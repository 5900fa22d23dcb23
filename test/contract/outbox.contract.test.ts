import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { isM2mError } from "../../src/core/errors.js";
import { MemoryOutbox } from "../../src/relay/outbox/memory/memory-outbox.js";
import type { NewMessage, Outbox, OutboxLimits } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox, type SqliteOutboxOptions } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { WorkerOutbox } from "../../src/relay/outbox/worker/worker-outbox.js";
import { outboxWorkerUrl } from "./outbox-worker-bundle.js";

/** What every Outbox implementation must do. `reopen` is for durable implementations only. */
interface OutboxFactory {
  readonly name: string;
  readonly durable: boolean;
  /**
   * Whether the implementation takes an injected clock. WorkerOutbox does not (its worker uses the
   * system clock), so the cases driven by a ManualClock are not part of its suite; the worker runs
   * SqliteOutbox unchanged, whose own runs below cover them.
   */
  readonly manualClock: boolean;
  create(opts: {
    dir: string;
    sinks?: string[];
    limits?: Partial<OutboxLimits>;
    clock?: ManualClock;
  }): Outbox | Promise<Outbox>;
}

const enc = new TextEncoder();
const msg = (channel: string, n: number | string): NewMessage => ({
  channel,
  payload: enc.encode(JSON.stringify(n)),
});
const text = (p: Uint8Array): string => new TextDecoder().decode(p);

/** The SQLite outbox in one of its durability modes (the contract must hold in each). */
function sqliteFactory(
  name: string,
  mode: Pick<SqliteOutboxOptions, "fsyncMode" | "synchronous">,
): OutboxFactory {
  return {
    name,
    durable: true,
    manualClock: true,
    create: ({ dir, sinks, limits, clock }) =>
      SqliteOutbox.open({
        path: join(dir, "outbox.db"),
        sinks: sinks ?? ["s"],
        ...mode,
        ...(limits === undefined ? {} : { limits }),
        ...(clock === undefined ? {} : { clock }),
        ttlCheckMs: 0,
      }),
  };
}

const factories: OutboxFactory[] = [
  {
    name: "memory",
    durable: false,
    manualClock: true,
    create: ({ sinks, limits, clock }) =>
      new MemoryOutbox({
        sinks: sinks ?? ["s"],
        ...(limits === undefined ? {} : { limits }),
        ...(clock === undefined ? {} : { clock }),
      }),
  },
  sqliteFactory("sqlite (synchronous=FULL via async WAL fdatasync, default)", {}),
  sqliteFactory("sqlite (synchronous=FULL, inline fsync)", { fsyncMode: "inline" }),
  sqliteFactory("sqlite (synchronous=NORMAL)", { synchronous: "NORMAL" }),
  {
    name: "worker (SqliteOutbox in a worker thread, default fsync mode)",
    durable: true,
    manualClock: false,
    create: async ({ dir, sinks, limits }) =>
      WorkerOutbox.open({
        path: join(dir, "outbox.db"),
        sinks: sinks ?? ["s"],
        ...(limits === undefined ? {} : { limits }),
        ttlCheckMs: 0,
        workerUrl: await outboxWorkerUrl(),
      }),
  },
];

for (const f of factories) {
  describe(`Outbox contract: ${f.name}`, () => {
    let root: string;
    let n = 0;
    const fresh = async (): Promise<string> => mkdtemp(join(root, `t${n++}-`));
    beforeAll(async () => {
      root = await mkdtemp(join(tmpdir(), "m2m-outbox-contract-"));
    });
    afterAll(async () => {
      await rm(root, { recursive: true, force: true });
    });

    it("appends and returns time-ordered UUIDv7 ids in order", async () => {
      const ob = await f.create({ dir: await fresh() });
      const ids = await ob.append([msg("a", 1), msg("a", 2), msg("b", 3)]);
      expect(ids).toHaveLength(3);
      for (const id of ids)
        expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect([...ids].sort()).toEqual(ids);
      expect(ob.stats().depth).toBe(3);
      await ob.close();
    });

    it("group-commits concurrent appends and keeps every id distinct", async () => {
      const ob = await f.create({ dir: await fresh() });
      const all = await Promise.all(Array.from({ length: 50 }, (_, i) => ob.append([msg("c", i)])));
      const ids = all.flat();
      expect(new Set(ids).size).toBe(50);
      const leased = await ob.lease("s", 100);
      expect(leased.map((m) => text(m.payload))).toEqual(Array.from({ length: 50 }, (_, i) => String(i)));
      await ob.close();
    });

    it("leases oldest first, does not hand out a leased message twice, ack deletes", async () => {
      const ob = await f.create({ dir: await fresh() });
      const ids = await ob.append([msg("a", 1), msg("a", 2), msg("a", 3)]);
      const first = await ob.lease("s", 2);
      expect(first.map((m) => m.id)).toEqual(ids.slice(0, 2));
      const second = await ob.lease("s", 10);
      expect(second.map((m) => m.id)).toEqual(ids.slice(2));
      expect(await ob.lease("s", 10)).toEqual([]);
      await ob.ack("s", ids);
      expect(ob.stats().depth).toBe(0);
      expect(ob.stats().bytes).toBe(0);
      await ob.close();
    });

    // Needs an injected clock (see OutboxFactory.manualClock): not part of the worker's suite.
    if (f.manualClock) {
      it("nack makes a message leasable again and blocks its channel until due (FIFO per channel)", async () => {
        const clock = new ManualClock();
        const ob = await f.create({ dir: await fresh(), clock });
        const ids = await ob.append([msg("a", 1), msg("b", 1), msg("a", 2)]);
        const l1 = await ob.lease("s", 1);
        expect(l1[0]?.id).toBe(ids[0]);
        await ob.nack("s", [ids[0] as string], 1000);
        // a/1 is deferred: a/2 must not overtake it; b/1 flows.
        const l2 = await ob.lease("s", 10);
        expect(l2.map((m) => m.id)).toEqual([ids[1]]);
        await clock.advance(1000);
        const l3 = await ob.lease("s", 10);
        expect(l3.map((m) => m.id)).toEqual([ids[0], ids[2]]);
        expect(l3[0]?.attempt).toBe(2);
        await ob.close();
      });
    }

    it("regression: messages appended after the outbox emptied are still leased (seq never reused)", async () => {
      const ob = await f.create({ dir: await fresh() });
      const [first] = await ob.append([msg("x", 0)]);
      await ob.lease("s", 1);
      await ob.ack("s", [first as string]);
      await ob.append([msg("a", 1), msg("b", 2)]);
      expect((await ob.lease("s", 10)).map((m) => text(m.payload))).toEqual(["1", "2"]);
      await ob.close();
    });

    it("respects lease maxBytes but always returns at least one", async () => {
      const ob = await f.create({ dir: await fresh() });
      await ob.append([
        { channel: "a", payload: new Uint8Array(100) },
        { channel: "a", payload: new Uint8Array(100) },
      ]);
      expect(await ob.lease("s", 10, { maxBytes: 50 })).toHaveLength(1);
      await ob.close();
    });

    it("dead-letters one message with its reason; the rest of the channel flows", async () => {
      const ob = await f.create({ dir: await fresh() });
      const ids = await ob.append([msg("a", 1), msg("a", 2)]);
      await ob.lease("s", 1);
      await ob.deadLetter("s", ids[0] as string, "ERR_MQTT_NOT_AUTHORIZED reasonCode=0x87");
      const l = await ob.lease("s", 10);
      expect(l.map((m) => m.id)).toEqual([ids[1]]);
      const dl = await ob.deadLetters();
      expect(dl).toHaveLength(1);
      expect(dl[0]).toMatchObject({
        id: ids[0],
        sink: "s",
        channel: "a",
        reason: "ERR_MQTT_NOT_AUTHORIZED reasonCode=0x87",
      });
      expect(text(dl[0]?.payload ?? new Uint8Array())).toBe("1");
      expect(ob.stats().deadLetters).toBe(1);
      expect(ob.stats().depth).toBe(1);
      await ob.close();
    });

    it("keeps a message until every sink has acked it", async () => {
      const ob = await f.create({ dir: await fresh(), sinks: ["mqtt", "https"] });
      const [id] = await ob.append([msg("a", 1)]);
      await ob.lease("mqtt", 1);
      await ob.ack("mqtt", [id as string]);
      expect(ob.stats().depth).toBe(1);
      expect(await ob.lease("mqtt", 1)).toEqual([]);
      const h = await ob.lease("https", 1);
      expect(h[0]?.id).toBe(id);
      await ob.ack("https", [id as string]);
      expect(ob.stats().depth).toBe(0);
      await ob.close();
    });

    it("drop-oldest by count: keeps the newest, counts the drops", async () => {
      const ob = await f.create({ dir: await fresh(), limits: { maxCount: 3 } });
      for (let i = 0; i < 5; i++) await ob.append([msg("a", i)]);
      const l = await ob.lease("s", 10);
      expect(l.map((m) => text(m.payload))).toEqual(["2", "3", "4"]);
      expect(ob.stats().drops.max_count).toBe(2);
      await ob.close();
    });

    it("drop-oldest by bytes", async () => {
      const ob = await f.create({ dir: await fresh(), limits: { maxBytes: 250 } });
      for (let i = 0; i < 4; i++) await ob.append([{ channel: "a", payload: new Uint8Array(100).fill(i) }]);
      const l = await ob.lease("s", 10);
      expect(l.map((m) => m.payload[0])).toEqual([2, 3]);
      expect(ob.stats().drops.max_bytes).toBe(2);
      expect(ob.stats().bytes).toBe(200);
      await ob.close();
    });

    it("refuse-new: ERR_OUTBOX_FULL (transient, retryAfterMs), counted, old data kept", async () => {
      const ob = await f.create({ dir: await fresh(), limits: { maxCount: 2, dropPolicy: "refuse-new" } });
      await ob.append([msg("a", 1), msg("a", 2)]);
      const err = await ob.append([msg("a", 3)]).catch((e: unknown) => e);
      expect(isM2mError(err, "ERR_OUTBOX_FULL")).toBe(true);
      expect(isM2mError(err) && err.retry).toBe("transient");
      expect(isM2mError(err) && typeof err.details.retryAfterMs).toBe("number");
      expect(ob.stats().drops.refused).toBe(1);
      expect((await ob.lease("s", 10)).map((m) => text(m.payload))).toEqual(["1", "2"]);
      await ob.close();
    });

    it("a message larger than the byte limit is refused permanently", async () => {
      const ob = await f.create({ dir: await fresh(), limits: { maxBytes: 10 } });
      const err = await ob.append([{ channel: "a", payload: new Uint8Array(11) }]).catch((e: unknown) => e);
      expect(isM2mError(err, "ERR_OUTBOX_MESSAGE_TOO_LARGE")).toBe(true);
      await ob.close();
    });

    // Needs an injected clock (see OutboxFactory.manualClock): not part of the worker's suite.
    if (f.manualClock) {
      it("TTL drops expired messages (oldest first) and counts them", async () => {
        const clock = new ManualClock();
        const ob = await f.create({ dir: await fresh(), clock, limits: { ttlMs: 10_000 } });
        await ob.append([msg("a", "old")]);
        await clock.advance(6000);
        await ob.append([msg("a", "new")]);
        await clock.advance(6000);
        expect(ob.stats().oldestAgeMs).toBe(12_000);
        expect(await ob.expire()).toBe(1);
        expect(ob.stats().drops.ttl).toBe(1);
        expect((await ob.lease("s", 10)).map((m) => text(m.payload))).toEqual(['"new"']);
        await ob.close();
      });
    }

    it("waitForWork resolves on append, and stays pending while there is nothing new", async () => {
      const ob = await f.create({ dir: await fresh() });
      expect(await ob.lease("s", 1)).toEqual([]);
      let woke = false;
      const w = ob.waitForWork("s").then(() => {
        woke = true;
      });
      await new Promise((r) => setTimeout(r, 50));
      expect(woke).toBe(false);
      await ob.append([msg("a", 1)]);
      await w;
      expect(await ob.lease("s", 1)).toHaveLength(1);
      await ob.close();
    });

    it("a wait that starts after an append it did not see returns at once (no lost wake-up)", async () => {
      // The relay leases (nothing), then waits. If an append commits in between (the outbox in a
      // worker thread answers the lease, then handles an append, then the wait), the wait must not
      // sleep through it: with no further traffic those messages would never be delivered.
      const ob = await f.create({ dir: await fresh() });
      expect(await ob.lease("s", 10)).toEqual([]);
      await ob.append([msg("a", 1)]);
      const r = await Promise.race([
        ob.waitForWork("s").then(() => "woke"),
        new Promise((res) => setTimeout(() => res("slept"), 1000)),
      ]);
      expect(r).toBe("woke");
      expect(await ob.lease("s", 10)).toHaveLength(1);
      await ob.close();
    });

    it("unknown sink → ERR_OUTBOX_SINK_UNKNOWN; closed → ERR_OUTBOX_CLOSED", async () => {
      const ob = await f.create({ dir: await fresh() });
      await expect(ob.lease("nope", 1)).rejects.toMatchObject({ code: "ERR_OUTBOX_SINK_UNKNOWN" });
      await ob.close();
      expect(() => ob.append([msg("a", 1)])).toThrow(expect.objectContaining({ code: "ERR_OUTBOX_CLOSED" }));
    });

    if (f.durable) {
      it("survives reopen: unacked messages come back with the same ids, acked ones do not", async () => {
        const dir = await fresh();
        const ob = await f.create({ dir });
        const ids = await ob.append([msg("a", 1), msg("a", 2), msg("b", 3)]);
        await ob.lease("s", 3);
        await ob.ack("s", [ids[0] as string]);
        await ob.close();
        const again = await f.create({ dir });
        expect(again.stats().depth).toBe(2);
        expect((await again.lease("s", 10)).map((m) => m.id)).toEqual(ids.slice(1));
        await again.close();
      });

      it("counters persist across reopen", async () => {
        const dir = await fresh();
        const ob = await f.create({ dir, limits: { maxCount: 1 } });
        await ob.append([msg("a", 1)]);
        await ob.append([msg("a", 2)]);
        await ob.close();
        const again = await f.create({ dir, limits: { maxCount: 1 } });
        expect(again.stats().drops.max_count).toBe(1);
        expect(again.stats().appended).toBe(2);
        await again.close();
      });
    }
  });
}
