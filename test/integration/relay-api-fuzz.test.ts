import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiServer } from "../../src/api/server.js";
import { isM2mError } from "../../src/core/errors.js";
import { isValidChannel } from "../../src/relay/channel.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { mountMessagesRoute } from "../../src/relay/sources/api/messages-route.js";
import { parseMessages } from "../../src/relay/sources/api/parse.js";
import { call } from "./relay-helpers.js";

const CODES = new Set([
  "ERR_API_INVALID_JSON",
  "ERR_API_INVALID_MESSAGE",
  "ERR_API_INVALID_PAYLOAD",
  "ERR_CHANNEL_INVALID",
  "ERR_API_TOO_MANY_MESSAGES",
  "ERR_API_PAYLOAD_TOO_LARGE",
  "ERR_API_UNSUPPORTED_MEDIA_TYPE",
]);
const limits = { maxMessages: 20, maxPayloadBytes: 512 };

/** Message-shaped values with every field sometimes wrong. */
const messageLike = fc.record(
  {
    channel: fc.oneof(
      fc.constantFrom("a", "a/b", "sensors/t-1", "/a", "a/", "a/+", "#", "", "a//b"),
      fc.string({ maxLength: 140 }),
      fc.integer(),
    ),
    payload: fc.oneof(
      fc.jsonValue({ maxDepth: 3 }),
      fc.base64String({ maxLength: 64 }),
      fc.constant(undefined),
    ),
    ts: fc.oneof(fc.integer(), fc.string({ maxLength: 30 }), fc.double(), fc.constant(undefined)),
    content_type: fc.oneof(
      fc.constantFrom("application/json", "application/octet-stream", "text/plain", "application/cbor", "x"),
      fc.string({ maxLength: 20 }),
    ),
    extra: fc.jsonValue({ maxDepth: 1 }),
  },
  { requiredKeys: [] },
);

describe("fuzz: POST /v1/messages input validation (fast-check, bounded)", () => {
  it("the parser either returns valid messages or throws a coded M2mError, never anything else", () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.jsonValue({ maxDepth: 4 }), messageLike, fc.array(messageLike, { maxLength: 25 })),
        fc.constantFrom("application/json", "application/x-ndjson", "text/plain", undefined),
        (value, ct) => {
          const text =
            ct === "application/x-ndjson" && Array.isArray(value)
              ? value.map((v) => JSON.stringify(v) ?? "").join("\n")
              : (JSON.stringify(value) ?? "");
          try {
            const msgs = parseMessages(Buffer.from(text), ct, limits);
            expect(msgs.length).toBeGreaterThan(0);
            expect(msgs.length).toBeLessThanOrEqual(limits.maxMessages);
            for (const m of msgs) {
              expect(isValidChannel(m.channel)).toBe(true);
              expect(m.payload.byteLength).toBeLessThanOrEqual(limits.maxPayloadBytes);
            }
          } catch (err) {
            if (!isM2mError(err) || !CODES.has(err.code)) throw err;
          }
        },
      ),
      { numRuns: 3000, interruptAfterTimeLimit: 10_000 },
    );
  });

  it("arbitrary bytes never crash the parser", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 300 }),
        fc.constantFrom("application/json", "application/x-ndjson"),
        (bytes, ct) => {
          try {
            parseMessages(Buffer.from(bytes), ct, limits);
          } catch (err) {
            if (!isM2mError(err) || !CODES.has(err.code)) throw err;
          }
        },
      ),
      { numRuns: 2000, interruptAfterTimeLimit: 5_000 },
    );
  });

  describe("through the real socket", () => {
    let dir: string;
    let api: ApiServer;
    let outbox: SqliteOutbox;
    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), "m2m-api-fuzz-"));
      outbox = SqliteOutbox.open({ path: join(dir, "o.db"), sinks: ["s"], ttlCheckMs: 0 });
      api = new ApiServer({ socketPath: join(dir, "api.sock") });
      mountMessagesRoute(api, { outbox, limits, maxBodyBytes: 8192 });
      await api.listen();
    });
    afterAll(async () => {
      await api?.close();
      await outbox?.close();
      await rm(dir, { recursive: true, force: true });
    });

    it("random bodies get 200/400/413/415 only; exactly the acknowledged messages are stored", async () => {
      let acknowledged = 0;
      await fc.assert(
        fc.asyncProperty(
          fc.oneof(
            fc.array(messageLike, { maxLength: 25 }).map((v) => JSON.stringify(v)),
            messageLike.map((v) => JSON.stringify(v)),
            fc.string({ maxLength: 200 }),
            fc.constant("x".repeat(9000)),
          ),
          fc.constantFrom("application/json", "application/x-ndjson", "text/plain"),
          async (body, ct) => {
            const r = await call(api.socketPath, "POST", "/v1/messages", body, ct);
            expect([200, 400, 413, 415]).toContain(r.status);
            if (r.status === 200) acknowledged += r.json.ids?.length ?? 0;
            else expect(typeof r.json.error?.code).toBe("string");
          },
        ),
        { numRuns: 150, interruptAfterTimeLimit: 15_000 },
      );
      expect(outbox.stats().depth).toBe(acknowledged);
    });
  });
});
