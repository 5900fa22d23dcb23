import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { MemoryOutbox } from "../../src/relay/outbox/memory/memory-outbox.js";
import type { Outbox, OutboxLimits } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";

/**
 * Model test: the SQLite outbox (in-memory tail for leases, SQL scans otherwise) must lease exactly
 * what the MemoryOutbox (a plain scan of every row, the reference) leases, under random sequences of
 * appends, leases, acks, nacks with delays, dead letters, drops by limit and clock steps, with two
 * sinks that drift apart. Messages are compared by payload (each is a unique number): ids differ.
 */

type Op =
  | { kind: "append"; channels: number[] }
  | { kind: "lease"; sink: number; max: number }
  | { kind: "ack"; sink: number; pick: number }
  | { kind: "nack"; sink: number; pick: number; delay: number }
  | { kind: "dead"; sink: number; pick: number }
  | { kind: "ackUnleased"; sink: number; pick: number }
  | { kind: "advance"; ms: number };

const sinkArb = fc.integer({ min: 0, max: 1 });
const pickArb = fc.integer({ min: 0, max: 1000 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("append" as const),
      channels: fc.array(fc.integer({ min: 0, max: 2 }), { minLength: 1, maxLength: 6 }),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("lease" as const),
      sink: sinkArb,
      max: fc.integer({ min: 1, max: 8 }),
    }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("ack" as const), sink: sinkArb, pick: pickArb }) },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("nack" as const),
      sink: sinkArb,
      pick: pickArb,
      delay: fc.constantFrom(0, 500, 1000),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("dead" as const), sink: sinkArb, pick: pickArb }) },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("ackUnleased" as const), sink: sinkArb, pick: pickArb }),
  },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("advance" as const), ms: fc.constantFrom(250, 600, 1200) }),
  },
);

const SINKS = ["a", "b"] as const;
const enc = new TextEncoder();
const dec = new TextDecoder();

/** One outbox plus the book-keeping to address its messages by payload number. */
class Side {
  readonly leased: Map<number, string>[] = [new Map(), new Map()];
  readonly idOf = new Map<number, string>();
  constructor(
    readonly ob: Outbox,
    readonly clock: ManualClock,
  ) {}
}

describe("SqliteOutbox vs the reference MemoryOutbox (random operation sequences)", () => {
  let root: string;
  let n = 0;
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), "m2m-outbox-model-"));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it("leases the same messages in the same order, with the same depth, after every step", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 20, maxLength: 120 }), async (ops) => {
        const limits: Partial<OutboxLimits> = { maxCount: 24, dropPolicy: "drop-oldest", ttlMs: 0 };
        const mc = new ManualClock();
        const sc = new ManualClock();
        const mem = new Side(new MemoryOutbox({ sinks: [...SINKS], limits, clock: mc }), mc);
        const sql = new Side(
          SqliteOutbox.open({
            path: join(root, `m${n++}.db`),
            sinks: [...SINKS],
            limits,
            clock: sc,
            ttlCheckMs: 0,
          }),
          sc,
        );
        let next = 0;
        try {
          for (const op of ops) {
            switch (op.kind) {
              case "append": {
                const batch = op.channels.map((c) => ({
                  channel: `c${c}`,
                  payload: enc.encode(String(next++)),
                }));
                const first = next - batch.length;
                for (const side of [mem, sql]) {
                  const ids = await side.ob.append(batch);
                  for (const [i, id] of ids.entries()) side.idOf.set(first + i, id);
                }
                break;
              }
              case "lease": {
                const got: number[][] = [];
                for (const side of [mem, sql]) {
                  const ms = await side.ob.lease(SINKS[op.sink] as string, op.max);
                  const nums = ms.map((m) => Number(dec.decode(m.payload)));
                  for (const [i, m] of ms.entries()) side.leased[op.sink]?.set(nums[i] as number, m.id);
                  got.push(nums);
                }
                expect(got[1]).toEqual(got[0]);
                break;
              }
              case "ack":
              case "nack":
              case "dead": {
                // Pick the same leased message (by number) on both sides.
                const keys = [...(mem.leased[op.sink]?.keys() ?? [])].sort((x, y) => x - y);
                if (keys.length === 0) break;
                const num = keys[op.pick % keys.length] as number;
                for (const side of [mem, sql]) {
                  const id = side.leased[op.sink]?.get(num) as string;
                  side.leased[op.sink]?.delete(num);
                  const sink = SINKS[op.sink] as string;
                  if (op.kind === "ack") await side.ob.ack(sink, [id]);
                  else if (op.kind === "nack") await side.ob.nack(sink, [id], op.delay);
                  else await side.ob.deadLetter(sink, id, "model");
                }
                break;
              }
              case "ackUnleased": {
                // An ack for a message this sink never leased (e.g. delivered before a restart).
                if (next === 0) break;
                const num = op.pick % next;
                if (mem.leased[op.sink]?.has(num)) break;
                for (const side of [mem, sql]) {
                  const id = side.idOf.get(num) as string;
                  await side.ob.ack(SINKS[op.sink] as string, [id]);
                }
                break;
              }
              case "advance":
                await mc.advance(op.ms);
                await sc.advance(op.ms);
                break;
            }
            expect(sql.ob.stats().depth).toBe(mem.ob.stats().depth);
          }
          // Finally everything still pending drains identically once every deferral is due.
          await mc.advance(5000);
          await sc.advance(5000);
          for (let sink = 0; sink < 2; sink++) {
            const all: number[][] = [];
            for (const side of [mem, sql]) {
              const ms = await side.ob.lease(SINKS[sink] as string, 1000);
              all.push(ms.map((m) => Number(dec.decode(m.payload))));
            }
            expect(all[1]).toEqual(all[0]);
          }
        } finally {
          await mem.ob.close();
          await sql.ob.close();
        }
      }),
      { numRuns: 150 },
    );
  }, 120_000);
});
