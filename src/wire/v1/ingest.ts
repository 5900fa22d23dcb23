import { z } from "zod";

/**
 * Version 1 of the HTTPS ingest body: what the agent's HTTPS sink POSTs (`src/relay/sinks/https/`)
 * and what the reference ingest endpoint reads (`src/registrar/ingest/`). The reader validates with
 * these schemas; the writer below produces exactly this shape by string building (the relay's hot
 * path: no object per message, cached topic/channel parts, JSON payloads embedded without a re-parse).
 * `test/unit/wire-ingest.test.ts` checks, property-based, that whatever the writer produces parses.
 */

export const INGEST_PATH = "/v1/ingest";
/** Most messages one POST may carry (the sink sends at most 500). */
export const INGEST_MAX_MESSAGES = 1000;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** Same grammar as the agent's channels: slash-separated levels of `[A-Za-z0-9_-]`. */
const CHANNEL_RE = /^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/;
const B64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** Deeper than any sensor payload; bounds the check's recursion on hostile input. */
const JSON_MAX_DEPTH = 64;

function isJsonValue(v: unknown, depth = 0): v is JsonValue {
  if (depth > JSON_MAX_DEPTH) return false;
  if (v === null || typeof v === "boolean" || typeof v === "string") return true;
  if (typeof v === "number") return Number.isFinite(v);
  if (Array.isArray(v)) return v.every((x) => isJsonValue(x, depth + 1));
  if (typeof v !== "object" || Object.getPrototypeOf(v) !== Object.prototype) return false;
  return Object.values(v).every((x) => isJsonValue(x, depth + 1));
}

/**
 * A JSON payload, passed through as parsed: `z.json()` rebuilds objects and drops an own
 * `__proto__` key, which would alter what the device sent (the relay keeps payloads byte-faithful).
 * An own `__proto__` from `JSON.parse` is plain data, not a prototype.
 */
const jsonPayloadSchema = z.custom<JsonValue>((v) => isJsonValue(v), { message: "payload is not JSON" });

export const ingestMessageSchema = z
  .object({
    /** The outbox id (UUID): the endpoint de-duplicates on it. */
    id: z.string().regex(UUID_RE),
    /** Expanded topic, e.g. `devices/{deviceId}/{channel}`. */
    topic: z.string().min(1).max(512),
    channel: z.string().min(1).max(128).regex(CHANNEL_RE),
    /** When the agent accepted the message (ms since the epoch). */
    ts: z.number().int().nonnegative(),
    content_type: z.string().min(1).max(128),
    /** A JSON payload, embedded as JSON. */
    payload: jsonPayloadSchema.optional(),
    /** Any other payload, base64. */
    payload_b64: z.string().regex(B64_RE).optional(),
  })
  .strict()
  .refine((m) => (m.payload !== undefined) !== (m.payload_b64 !== undefined), {
    message: "exactly one of payload and payload_b64",
  });
export type IngestMessage = z.infer<typeof ingestMessageSchema>;

export const ingestRequestSchema = z
  .object({ messages: z.array(ingestMessageSchema).min(1).max(INGEST_MAX_MESSAGES) })
  .strict();
export type IngestRequest = z.infer<typeof ingestRequestSchema>;

export const ingestResponseSchema = z.object({
  accepted: z.number().int().nonnegative(),
  duplicates: z.number().int().nonnegative(),
  /** Messages refused for good, each with a catalogue code (e.g. ERR_INGEST_TOPIC_NOT_OWNED). */
  rejected: z
    .array(
      z.object({
        id: z.string().max(64),
        code: z
          .string()
          .max(64)
          .regex(/^ERR_[A-Z0-9_]+$/),
      }),
    )
    .max(INGEST_MAX_MESSAGES),
});
export type IngestResponse = z.infer<typeof ingestResponseSchema>;

/** `"topic":…,"channel":…` of a message (the sink caches it per channel). */
export function ingestChannelPart(topic: string, channel: string): string {
  return `"topic":${JSON.stringify(topic)},"channel":${JSON.stringify(channel)}`;
}

/**
 * One message of the body. `payload` is a view of the stored bytes; when `json` is true they are a JSON
 * text validated when the message was accepted and are embedded as is, otherwise they go as base64.
 */
export function ingestMessageJson(
  id: string,
  channelPart: string,
  ts: number,
  contentType: string,
  payload: Buffer,
  json: boolean,
): string {
  const head = `{"id":${JSON.stringify(id)},${channelPart},"ts":${ts},"content_type":${JSON.stringify(contentType)}`;
  return json
    ? `${head},"payload":${payload.toString("utf8")}}`
    : `${head},"payload_b64":"${payload.toString("base64")}"}`;
}

/** The body around messages written by `ingestMessageJson`. */
export function ingestBodyJson(messages: readonly string[]): string {
  return `{"messages":[${messages.join(",")}]}`;
}
