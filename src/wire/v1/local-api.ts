import { z } from "zod";

/**
 * Version 1 of the agent's local API (HTTP/1.1 over its Unix socket): the bodies of
 * `POST /v1/messages`, `GET /v1/status` and `GET /v1/token`, and the error body every route shares.
 * The server (`src/api/`, the relay's messages route, the daemon's status route, the credentials'
 * token route) answers with these shapes; the clients (`m2m-agent send | status | token`, test
 * helpers) parse the answers with them, so a change on one end fails type checks on the other.
 */

export const MESSAGES_PATH = "/v1/messages";
export const STATUS_PATH = "/v1/status";
export const TOKEN_PATH = "/v1/token";

/** The retry classes of `core/errors.ts` (kept literal here: wire depends on nothing internal). */
export const retryClassSchema = z.enum(["transient", "permanent", "fatal"]);

/** `{ error: { code, retry, message, hint?, details? } }`: every non-2xx answer of the local API. */
export const apiErrorBodySchema = z.object({
  error: z.object({
    code: z.string().max(128),
    retry: retryClassSchema,
    message: z.string(),
    hint: z.string().optional(),
    details: z.record(z.string(), z.unknown()).optional(),
  }),
});
export type ApiErrorBody = z.infer<typeof apiErrorBodySchema>;

// ── POST /v1/messages ────────────────────────────────────────────────────────────────────────────

/**
 * One message a local producer hands over. With a JSON `content_type` (the default) `payload` is any
 * JSON value; otherwise it is the raw bytes in base64 (checked by the server, which knows the type).
 * The server additionally checks the channel grammar, the payload size and the base64 text, each with
 * its own error code (`src/relay/sources/api/parse.ts`).
 */
export const messageInputSchema = z
  .object({
    channel: z.string(),
    /**
     * Any JSON value (the reader got it from JSON.parse, so it is one: no deep re-validation on the hot
     * path); only its presence is checked here.
     */
    payload: z.unknown().refine((v) => v !== undefined, "payload is required"),
    /** Epoch milliseconds or an RFC 3339 string; default: when the agent accepted it. */
    ts: z.union([z.number(), z.string().max(40)]).optional(),
    content_type: z.string().max(100).optional(),
  })
  .strict();
export type MessageInput = z.infer<typeof messageInputSchema>;

/** The request body: one message, or an array of them (NDJSON sends one message per line). */
export const messagesRequestSchema = z.union([messageInputSchema, z.array(messageInputSchema)]);

/** `200`: the outbox ids, in request order, once the batch is durable. */
export const messagesResponseSchema = z.object({ ids: z.array(z.string()) });
export type MessagesResponse = z.infer<typeof messagesResponseSchema>;

// ── GET /v1/token ────────────────────────────────────────────────────────────────────────────────

/** `200` of `GET /v1/token?scope=S[&htm=M&htu=URL]` (and of `m2m-agent token --json`). */
export const tokenResponseSchema = z.object({
  access_token: z.string().min(1),
  token_type: z.enum(["Bearer", "DPoP"]),
  expires_at: z.string(),
  expires_in: z.number().int().nonnegative(),
  scope: z.string(),
  /** Present when `htm` and `htu` were given and the token is DPoP-bound. */
  dpop_proof: z.string().optional(),
});
export type TokenResponseBody = z.infer<typeof tokenResponseSchema>;

// ── GET /v1/status ───────────────────────────────────────────────────────────────────────────────

export const agentStateNameSchema = z.enum([
  "starting",
  "unprovisioned",
  "enrolling",
  "running",
  "degraded",
  "reprovision-required",
  "reloading",
  "stopping",
  "stopped",
]);

/**
 * The agent's latest TPM quote for continuous attestation (docs/attestation.md), shown as
 * `stages.credentials.attestation` of `GET /v1/status`. `result`: `verified` (the token endpoint
 * accepted it and issued a token), `refused` (`code`/`detail`: the registrar's one-line reason, e.g.
 * "PCR 7 differs from the policy"), `nonce-refused` (stale or used nonce: retried with a fresh one),
 * `unanswered` (no decision: network error or a refusal before the quote was looked at),
 * `quote-failed` (the TPM could not quote; `code` is the TPM error).
 */
export const attestationStatusSchema = z.object({
  lastQuoteAt: z.string(),
  /** `sha256:0,1,7` */
  selection: z.string(),
  result: z.enum(["verified", "refused", "nonce-refused", "unanswered", "quote-failed"]),
  code: z.string().optional(),
  detail: z.string().optional(),
  /** When a quote of this agent was last verified (absent: never since start). */
  lastVerifiedAt: z.string().optional(),
});
export type AttestationStatus = z.infer<typeof attestationStatusSchema>;

/** `200` of `GET /v1/status` (and of `m2m-agent status --json`). Stage statuses are each stage's own. */
export const agentStatusSchema = z.object({
  state: agentStateNameSchema,
  status: z.string(),
  reasons: z.record(z.string(), z.string()),
  since: z.string(),
  version: z.string(),
  pid: z.number().int(),
  uptimeS: z.number(),
  key: z
    .object({
      provider: z.string(),
      ref: z.string(),
      algorithm: z.string(),
      thumbprint: z.string(),
    })
    .optional(),
  enrolment: z.object({
    enrolled: z.boolean(),
    deviceId: z.string().optional(),
    certificateNotAfter: z.string().optional(),
  }),
  clock: z.object({
    trusted: z.boolean(),
    now: z.string(),
    floor: z.string(),
    floorSource: z.enum(["build", "persisted", "certificate"]),
    reason: z.string().optional(),
  }),
  anomalies: z.array(
    z.object({ kind: z.string(), channel: z.string(), since: z.string(), detail: z.string() }),
  ),
  stages: z.record(z.string(), z.unknown()),
  metrics: z.string().optional(),
});
export type AgentStatus = z.infer<typeof agentStatusSchema>;
