import { request } from "node:http";
import type { z } from "zod";
import { toErrorCode } from "../../core/error-codes.js";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { apiErrorBodySchema } from "../../wire/v1/local-api.js";

/** Largest answer a CLI command reads from the local API (status with many stages stays far below). */
const MAX_ANSWER_BYTES = 1_000_000;

export interface LocalCall {
  readonly socketPath: string;
  readonly method: "GET" | "POST";
  /** Path and query, e.g. `/v1/token?scope=a`. */
  readonly path: string;
  readonly body?: string;
  readonly timeoutMs: number;
}

/** What answered: the HTTP status and the parsed JSON (undefined when the body was not JSON). */
export interface LocalAnswer {
  readonly status: number;
  readonly json: unknown;
}

/**
 * One request to the running agent over its Unix socket (the client end of `src/wire/v1/local-api.ts`).
 * Rejects only when the socket cannot be reached or the answer is cut off: the raw errno error, for
 * the caller to map to its own code (unreachable vs permission denied).
 */
export function callAgent(call: LocalCall): Promise<LocalAnswer> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> =
      call.body === undefined
        ? {}
        : { "content-type": "application/json", "content-length": Buffer.byteLength(call.body) };
    const req = request(
      { socketPath: call.socketPath, path: call.path, method: call.method, headers, timeout: call.timeoutMs },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on("data", (c: Buffer) => {
          size += c.length;
          if (size <= MAX_ANSWER_BYTES) chunks.push(c);
        });
        res.on("end", () => {
          let json: unknown;
          try {
            json = JSON.parse(Buffer.concat(chunks).toString("utf8"));
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, json });
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end(call.body);
  });
}

/**
 * The typed `200` body, or the agent's own error (code, retry class, message, hint) from the shared
 * error body; `fallback` names an answer that fits neither schema.
 * @throws M2mError with the agent's code, or `fallback`
 */
export function answerOf<T>(answer: LocalAnswer, schema: z.ZodType<T>, fallback: ErrorCode): T {
  if (answer.status === 200) {
    const ok = schema.safeParse(answer.json);
    if (ok.success) return ok.data;
    throw new M2mError(fallback, "transient", "unreadable answer from the agent", { cause: ok.error });
  }
  const err = apiErrorBodySchema.safeParse(answer.json);
  if (!err.success) {
    throw new M2mError(
      fallback,
      answer.status === 429 || answer.status >= 500 ? "transient" : "permanent",
      `agent answered HTTP ${answer.status}`,
    );
  }
  const e = err.data.error;
  throw new M2mError(
    toErrorCode(e.code, fallback),
    e.retry === "transient" || answer.status === 429 ? "transient" : e.retry,
    e.message,
    e.hint === undefined ? {} : { hint: e.hint },
  );
}
