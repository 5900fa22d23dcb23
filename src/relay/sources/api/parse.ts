import type { z } from "zod";
import { type ErrorCode, M2mError } from "../../../core/errors.js";
import { type MessageInput, messageInputSchema } from "../../../wire/v1/local-api.js";
import { MAX_CHANNEL_LENGTH, validateChannel } from "../../channel.js";
import type { NewMessage } from "../../outbox/outbox.js";

export interface ParseLimits {
  readonly maxMessages: number;
  readonly maxPayloadBytes: number;
}

export const defaultParseLimits: ParseLimits = { maxMessages: 1000, maxPayloadBytes: 256 * 1024 };

const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const CONTENT_TYPE_RE = /^[a-z0-9!#$&^_.+-]+\/[a-z0-9!#$&^_.+-]+(;[ -~]*)?$/i;
const enc = new TextEncoder();

function invalid(code: ErrorCode, message: string, index: number): M2mError {
  return new M2mError(code, "permanent", `message ${index}: ${message}`, { details: { index } });
}

export function isJsonContentType(ct: string): boolean {
  const base = (ct.split(";")[0] ?? "").trim().toLowerCase();
  return base === "application/json" || base.endsWith("+json");
}

/**
 * Parses a `POST /v1/messages` body: one JSON object, a JSON array of objects, or NDJSON (one object
 * per line, when the request content type is `application/x-ndjson`). Each object is
 * `{ channel, payload, ts?, content_type? }`: with a JSON content type (the default) `payload` is any
 * JSON value; otherwise it is a base64 string of the raw bytes.
 * @throws ERR_API_INVALID_JSON, ERR_API_INVALID_MESSAGE, ERR_API_INVALID_PAYLOAD, ERR_CHANNEL_INVALID
 *         (400, `details.index`), ERR_API_TOO_MANY_MESSAGES, ERR_API_PAYLOAD_TOO_LARGE (413)
 */
export function parseMessages(
  body: Buffer,
  requestContentType: string | undefined,
  limits: ParseLimits,
): NewMessage[] {
  const ct = (requestContentType ?? "application/json").split(";")[0]?.trim().toLowerCase() ?? "";
  let items: unknown[];
  if (ct === "application/x-ndjson" || ct === "application/jsonl") {
    items = [];
    const lines = body.toString("utf8").split("\n");
    for (let i = 0; i < lines.length; i++) {
      const line = (lines[i] ?? "").trim();
      if (line === "") continue;
      if (items.length >= limits.maxMessages) throw tooMany(limits);
      try {
        items.push(JSON.parse(line));
      } catch {
        throw new M2mError("ERR_API_INVALID_JSON", "permanent", `line ${i + 1} is not valid JSON`, {
          details: { line: i + 1 },
        });
      }
    }
  } else if (ct === "application/json") {
    let parsed: unknown;
    try {
      parsed = JSON.parse(body.toString("utf8"));
    } catch {
      throw new M2mError("ERR_API_INVALID_JSON", "permanent", "body is not valid JSON");
    }
    items = Array.isArray(parsed) ? parsed : [parsed];
  } else {
    throw new M2mError(
      "ERR_API_UNSUPPORTED_MEDIA_TYPE",
      "permanent",
      "content-type must be application/json or application/x-ndjson",
    );
  }
  if (items.length === 0)
    throw new M2mError("ERR_API_INVALID_MESSAGE", "permanent", "no messages in the body");
  if (items.length > limits.maxMessages) throw tooMany(limits);
  return items.map((item, i) => parseOne(item, i, limits));
}

function tooMany(limits: ParseLimits): M2mError {
  return new M2mError(
    "ERR_API_TOO_MANY_MESSAGES",
    "permanent",
    `more than the per-request limit of ${limits.maxMessages} messages`,
    {
      details: { httpStatus: 413, limitMessages: limits.maxMessages },
    },
  );
}

/** The first field a schema issue is about: its code is the one the route answers with. */
function firstIssue(issues: readonly z.core.$ZodIssue[]): { code: ErrorCode; message: string } {
  // Report in the order a producer fixes things: unknown fields, channel, content type, payload, ts.
  const at = (field: string) => issues.find((i) => i.path[0] === field);
  const unknown = issues.find((i) => i.code === "unrecognized_keys");
  if (unknown !== undefined && unknown.code === "unrecognized_keys") {
    return {
      code: "ERR_API_INVALID_MESSAGE",
      message: `unknown field "${(unknown.keys[0] ?? "").slice(0, 32)}"`,
    };
  }
  if (issues.some((i) => i.path.length === 0))
    return { code: "ERR_API_INVALID_MESSAGE", message: "must be an object" };
  if (at("channel") !== undefined)
    return { code: "ERR_CHANNEL_INVALID", message: "channel must be a string" };
  if (at("content_type") !== undefined)
    return { code: "ERR_API_INVALID_MESSAGE", message: "content_type must be a media type" };
  if (at("payload") !== undefined) return { code: "ERR_API_INVALID_PAYLOAD", message: "payload is required" };
  return { code: "ERR_API_INVALID_MESSAGE", message: "ts must be epoch milliseconds or an RFC 3339 string" };
}

function parseOne(item: unknown, i: number, limits: ParseLimits): NewMessage {
  // The shape is the wire schema shared with the clients; grammar, size and base64 are checked below.
  const parsed = messageInputSchema.safeParse(item);
  if (!parsed.success) {
    const { code, message } = firstIssue(parsed.error.issues);
    if (code === "ERR_CHANNEL_INVALID") {
      throw new M2mError(
        code,
        "permanent",
        `message ${i}: channel must be 1-${MAX_CHANNEL_LENGTH} of A-Z a-z 0-9 _ - / (no wildcards, no leading /)`,
        { details: { index: i } },
      );
    }
    throw invalid(code, message, i);
  }
  const o: MessageInput = parsed.data;
  let channel: string;
  try {
    channel = validateChannel(o.channel);
  } catch (err) {
    throw new M2mError(
      "ERR_CHANNEL_INVALID",
      "permanent",
      `message ${i}: channel must be 1-${MAX_CHANNEL_LENGTH} of A-Z a-z 0-9 _ - / (no wildcards, no leading /)`,
      { details: { index: i }, cause: err },
    );
  }
  let contentType = "application/json";
  if (o.content_type !== undefined) {
    if (!CONTENT_TYPE_RE.test(o.content_type)) {
      throw invalid("ERR_API_INVALID_MESSAGE", "content_type must be a media type", i);
    }
    contentType = o.content_type;
  }
  let payload: Uint8Array;
  if (isJsonContentType(contentType)) {
    payload = enc.encode(JSON.stringify(o.payload));
  } else {
    if (typeof o.payload !== "string" || o.payload.length % 4 !== 0 || !BASE64_RE.test(o.payload)) {
      throw invalid("ERR_API_INVALID_PAYLOAD", "payload must be base64 for a non-JSON content_type", i);
    }
    payload = Buffer.from(o.payload, "base64");
  }
  if (payload.byteLength > limits.maxPayloadBytes) {
    throw new M2mError(
      "ERR_API_PAYLOAD_TOO_LARGE",
      "permanent",
      `message ${i}: payload of ${payload.byteLength} bytes exceeds the per-message limit of ${limits.maxPayloadBytes} bytes`,
      {
        details: { index: i, httpStatus: 413, limitBytes: limits.maxPayloadBytes },
      },
    );
  }
  let ts: number | undefined;
  if (o.ts !== undefined) {
    if (typeof o.ts === "number" && Number.isSafeInteger(o.ts) && o.ts >= 0 && o.ts < 1e14) ts = o.ts;
    else if (typeof o.ts === "string" && o.ts.length <= 40 && !Number.isNaN(Date.parse(o.ts)))
      ts = Date.parse(o.ts);
    else throw invalid("ERR_API_INVALID_MESSAGE", "ts must be epoch milliseconds or an RFC 3339 string", i);
  }
  return { channel, payload, contentType, ...(ts === undefined ? {} : { ts }) };
}
