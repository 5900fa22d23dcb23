import { describe, expect, it } from "vitest";
import { messageBody } from "../../src/cli/agent/send.js";
import { M2mError } from "../../src/core/errors.js";
import { STATE_NAMES } from "../../src/daemon/lifecycle.js";
import { parseMessages } from "../../src/relay/sources/api/parse.js";
import {
  agentStateNameSchema,
  agentStatusSchema,
  apiErrorBodySchema,
  messagesRequestSchema,
  tokenResponseSchema,
} from "../../src/wire/v1/local-api.js";

const limits = { maxMessages: 10, maxPayloadBytes: 1024 };

describe("wire v1: local API", () => {
  it("names every lifecycle state the daemon can report (a new state must reach the wire type)", () => {
    expect([...agentStateNameSchema.options].sort()).toEqual([...STATE_NAMES].sort());
  });

  it("what `m2m-agent send` writes fits the schema and the server reads it back", () => {
    for (const [data, ct] of [
      ['{"c":21.5}', "application/json"],
      ["not json", "application/json"],
      ["\u0000\u0001bytes", "application/octet-stream"],
      ["[1,2]", "application/vnd.x+json"],
    ] as const) {
      const body = messageBody("sensors/temp", Buffer.from(data, "utf8"), ct);
      expect(messagesRequestSchema.safeParse(JSON.parse(body)).success, body).toBe(true);
      const [m] = parseMessages(Buffer.from(body), "application/json", limits);
      expect(m?.channel).toBe("sensors/temp");
      expect(m?.contentType).toBe(ct);
    }
  });

  it("the server refuses what the schema refuses, each with its own code", () => {
    const code = (o: unknown) => {
      try {
        parseMessages(Buffer.from(JSON.stringify(o)), "application/json", limits);
        return "accepted";
      } catch (err) {
        return (err as M2mError).code;
      }
    };
    expect(code({ channel: "a", payload: 1, extra: 1 })).toBe("ERR_API_INVALID_MESSAGE");
    expect(code({ channel: 7, payload: 1 })).toBe("ERR_CHANNEL_INVALID");
    expect(code({ channel: "a" })).toBe("ERR_API_INVALID_PAYLOAD");
    expect(code({ channel: "a", payload: 1, content_type: 3 })).toBe("ERR_API_INVALID_MESSAGE");
    expect(code({ channel: "a", payload: 1, ts: true })).toBe("ERR_API_INVALID_MESSAGE");
    expect(code(5)).toBe("ERR_API_INVALID_MESSAGE");
    expect(code({ channel: "a", payload: null })).toBe("accepted");
  });

  it("the error body of every route is the shared one", () => {
    const e = new M2mError("ERR_OUTBOX_FULL", "transient", "full", { hint: "wait" });
    expect(apiErrorBodySchema.safeParse({ error: e.toJSON() }).success).toBe(true);
  });

  it("token and status answers are checked, not cast", () => {
    expect(tokenResponseSchema.safeParse({ access_token: "x", token_type: "MAC" }).success).toBe(false);
    expect(agentStatusSchema.safeParse({ state: "running", stages: {} }).success).toBe(false);
  });
});
