import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  ingestBodyJson,
  ingestChannelPart,
  ingestMessageJson,
  ingestRequestSchema,
  ingestResponseSchema,
} from "../../src/wire/v1/index.js";

const channel = fc
  .array(fc.stringMatching(/^[A-Za-z0-9_-]{1,12}$/), { minLength: 1, maxLength: 4 })
  .map((levels) => levels.join("/"))
  .filter((c) => c.length <= 128);

/** A message as the outbox holds it: JSON payloads are JSON text, others arbitrary bytes. */
const message = fc.record({
  id: fc.uuid({ version: 4 }),
  channel,
  ts: fc.integer({ min: 0, max: 2 ** 45 }),
  payload: fc.oneof(
    fc.jsonValue().map((v) => ({
      json: true,
      contentType: "application/json",
      bytes: Buffer.from(JSON.stringify(v)),
      value: v,
    })),
    fc.uint8Array({ maxLength: 300 }).map((b) => ({
      json: false,
      contentType: "application/octet-stream",
      bytes: Buffer.from(b),
      value: undefined,
    })),
  ),
});

interface Stored {
  readonly id: string;
  readonly channel: string;
  readonly ts: number;
  readonly payload: { readonly json: boolean; readonly contentType: string; readonly bytes: Buffer };
}

/** The sink's way of writing a body (same calls as HttpsSink#body). */
function write(batch: readonly Stored[]): string {
  return ingestBodyJson(
    batch.map((m) =>
      ingestMessageJson(
        m.id,
        ingestChannelPart(`devices/dev-1/${m.channel}`, m.channel),
        m.ts,
        m.payload.contentType,
        m.payload.bytes,
        m.payload.json,
      ),
    ),
  );
}

describe("wire v1 ingest: the sink's writer and the endpoint's schema agree", () => {
  it("whatever the writer produces parses with ingestRequestSchema and carries the same fields (property)", () => {
    fc.assert(
      fc.property(fc.array(message, { minLength: 1, maxLength: 20 }), (batch) => {
        const parsed = ingestRequestSchema.parse(JSON.parse(write(batch)));
        expect(parsed.messages).toHaveLength(batch.length);
        parsed.messages.forEach((p, i) => {
          const m = batch[i] as (typeof batch)[number];
          expect(p.id).toBe(m.id);
          expect(p.channel).toBe(m.channel);
          expect(p.topic).toBe(`devices/dev-1/${m.channel}`);
          expect(p.ts).toBe(m.ts);
          expect(p.content_type).toBe(m.payload.contentType);
          if (m.payload.json) {
            expect(p.payload_b64).toBeUndefined();
            expect(p.payload).toEqual(JSON.parse(m.payload.bytes.toString("utf8")));
          } else {
            expect(p.payload).toBeUndefined();
            expect(Buffer.from(p.payload_b64 ?? "", "base64").equals(m.payload.bytes)).toBe(true);
          }
        });
      }),
      { numRuns: 300 },
    );
  });

  it("keeps a JSON payload as sent, an own `__proto__` key included (found by the property above)", () => {
    const payload = '{"__proto__":null,"a":[1,{"b":"c"}]}';
    const body = `{"messages":[{"id":"00000000-0000-4000-8000-000000000000","topic":"devices/d/A","channel":"A","ts":0,"content_type":"application/json","payload":${payload}}]}`;
    const parsed = ingestRequestSchema.parse(JSON.parse(body));
    expect(JSON.stringify(parsed.messages[0]?.payload)).toBe(payload);
  });

  it("the schema refuses what the endpoint must refuse (one field at a time)", () => {
    const good = {
      id: "0b9e5f5e-8a7e-4b7c-9f7e-2b1d7c3a4e5f",
      topic: "devices/dev-1/t",
      channel: "t",
      ts: 1,
      content_type: "application/json",
      payload: { a: 1 },
    };
    expect(ingestRequestSchema.safeParse({ messages: [good] }).success).toBe(true);
    const bad: Record<string, unknown>[] = [
      { ...good, id: "not-a-uuid" },
      { ...good, channel: "a/+/b" },
      { ...good, channel: "" },
      { ...good, ts: -1 },
      { ...good, ts: 1.5 },
      { ...good, payload: undefined },
      { ...good, payload_b64: "AAAA" },
      { ...good, extra: 1 },
      { ...good, payload: undefined, payload_b64: "not base64!" },
    ];
    for (const b of bad)
      expect(ingestRequestSchema.safeParse({ messages: [b] }).success, JSON.stringify(b)).toBe(false);
    expect(ingestRequestSchema.safeParse({ messages: [] }).success).toBe(false);
    expect(ingestRequestSchema.safeParse({ messages: Array(1001).fill(good) }).success).toBe(false);
  });

  it("the endpoint's answer schema: rejected ids carry a code", () => {
    expect(ingestResponseSchema.safeParse({ accepted: 1, duplicates: 0, rejected: [] }).success).toBe(true);
    expect(
      ingestResponseSchema.safeParse({ accepted: 0, duplicates: 0, rejected: [{ id: "x", code: "nope" }] })
        .success,
    ).toBe(false);
  });
});
