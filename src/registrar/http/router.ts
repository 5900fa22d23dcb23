import type { IncomingMessage } from "node:http";
import type { TLSSocket } from "node:tls";
import type { z } from "zod";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { TPM_VERIFY_ERRORS } from "../verifier/tpm-verifier.js";

const VERIFIER_CODES: ReadonlySet<string> = new Set(Object.values(TPM_VERIFY_ERRORS));

/**
 * The registrar's tiny router. Other modules (oauth/, est/, ingest/) add routes by passing
 * `extraRoutes` to `startRegistrar`; they get size-limited raw bodies, typed JSON parsing and the
 * uniform error mapping for free.
 */
export type HttpMethod = "GET" | "POST" | "PUT" | "DELETE";

export interface RouteContext {
  readonly req: IncomingMessage;
  readonly url: URL;
  /** The request body, already size-limited (empty for bodiless methods). */
  readonly rawBody: Buffer;
  /** Media type of the request without parameters, lower-cased ("" when absent). */
  readonly contentType: string;
  /** Remote address (for audit lines; never used for authorisation). */
  readonly remote: string;
  /**
   * Parses `rawBody` as JSON and validates it.
   * @throws HttpError 400 ERR_BAD_JSON / ERR_SCHEMA (with the failing field path, never its value)
   */
  json<S extends z.ZodType>(schema: S): z.infer<S>;
  /** The TLS client certificate, when the client sent one (it is NOT verified by the router). */
  peerCertificateDer(): Buffer | undefined;
  /** Adds fields to this request's audit line (routes with `audit` set). Never secrets. */
  auditFields(fields: Record<string, string | number | boolean | undefined>): void;
}

export type RouteResponse =
  | { readonly status: number; readonly json: unknown; readonly headers?: Record<string, string> }
  | {
      readonly status: number;
      readonly body: string | Buffer;
      readonly contentType: string;
      readonly headers?: Record<string, string>;
    };

export interface Route {
  readonly method: HttpMethod;
  /** Exact path match (no parameters: ids travel in bodies). */
  readonly path: string;
  /** Accepted request media types for bodies. Default `["application/json"]`. */
  readonly contentTypes?: readonly string[];
  /** Body size cap in bytes. Default: the server's `maxBodyBytes` (64 KiB). */
  readonly maxBodyBytes?: number;
  /** When set, one audit line per request is written with this event name. */
  readonly audit?: string;
  handle(ctx: RouteContext): Promise<RouteResponse>;
}

/** A refusal with an HTTP status and a stable code; `message` is sent as is, so keep it generic. */
export class HttpError extends M2mError {
  readonly status: number;
  readonly field: string | undefined;

  constructor(
    status: number,
    code: ErrorCode,
    message: string,
    options: { field?: string; cause?: unknown } = {},
  ) {
    super(code, status >= 500 ? "transient" : "permanent", message, { cause: options.cause });
    this.status = status;
    this.field = options.field;
  }
}

/** Status for each stable code the registrar emits. Unknown permanent M2mErrors map to 403. */
export const STATUS_FOR_CODE: Readonly<Record<string, number>> = {
  // The shared store is unreachable or a transaction lost a serialisation race: retry (elsewhere).
  ERR_STORE_UNAVAILABLE: 503,
  ERR_STORE_CONFLICT: 503,
  ERR_STORE_QUERY: 500,
  ERR_BAD_JSON: 400,
  ERR_SCHEMA: 400,
  ERR_CSR_INVALID: 400,
  ERR_KEY_UNSUPPORTED: 400,
  ERR_TPM_STRUCT_MALFORMED: 400,
  ERR_EK_CERT_MALFORMED: 400,
  ERR_TOKEN_INVALID: 401,
  ERR_TOKEN_USED: 401,
  ERR_TOKEN_EXPIRED: 401,
  ERR_TOKEN_REVOKED: 401,
  ERR_GROUP_UNKNOWN: 403,
  ERR_METHOD_NOT_PERMITTED: 403,
  ERR_DEVICE_REVOKED: 403,
  ERR_NOT_FOUND: 404,
  ERR_SESSION_UNKNOWN: 404,
  ERR_METHOD_NOT_ALLOWED: 405,
  ERR_TIMEOUT: 408,
  ERR_SESSION_CONSUMED: 409,
  ERR_EK_ALREADY_REGISTERED: 409,
  ERR_KEY_ALREADY_REGISTERED: 409,
  ERR_HARDWARE_MISMATCH: 409,
  ERR_SESSION_EXPIRED: 410,
  ERR_SESSION_DISCARDED: 410,
  ERR_BODY_TOO_LARGE: 413,
  ERR_CONTENT_TYPE: 415,
  ERR_BUSY: 429,
  ERR_INTERNAL: 500,
};

/**
 * Generic messages per code. Error bodies never carry the offending or the expected value: the
 * detail goes to the registrar's own log via `cause`.
 */
const MESSAGE_FOR_CODE: Readonly<Record<string, string>> = {
  ERR_STORE_UNAVAILABLE: "service temporarily unavailable, retry later",
  ERR_STORE_CONFLICT: "service temporarily unavailable, retry later",
  ERR_STORE_QUERY: "internal error",
  ERR_BAD_JSON: "request body is not valid JSON",
  ERR_SCHEMA: "request body does not match the schema",
  ERR_CSR_INVALID: "the CSR could not be parsed",
  ERR_CSR_SIGNATURE: "the CSR signature does not verify",
  ERR_CSR_KEY_MISMATCH: "the CSR key is not the attested device key",
  ERR_KEY_UNSUPPORTED: "unsupported key type",
  ERR_TOKEN_INVALID: "bootstrap token not accepted",
  ERR_TOKEN_USED: "bootstrap token already used",
  ERR_TOKEN_EXPIRED: "bootstrap token expired",
  ERR_TOKEN_REVOKED: "bootstrap token revoked",
  ERR_GROUP_UNKNOWN: "enrolment group not accepted",
  ERR_METHOD_NOT_PERMITTED: "enrolment method not permitted for this group",
  ERR_DEVICE_REVOKED: "the device is revoked",
  ERR_SESSION_UNKNOWN: "enrolment session not found",
  ERR_SESSION_CONSUMED: "enrolment session already used",
  ERR_SESSION_EXPIRED: "enrolment session expired",
  ERR_SESSION_DISCARDED: "enrolment session discarded after too many failed activations",
  ERR_EK_ALREADY_REGISTERED: "this endorsement key is already registered",
  ERR_KEY_ALREADY_REGISTERED: "this device key is already registered",
  ERR_HARDWARE_MISMATCH: "hardware does not match the registered device",
  ERR_EK_UNTRUSTED: "endorsement key not trusted",
  ERR_EK_MISMATCH: "endorsement key does not match its certificate",
  ERR_BODY_TOO_LARGE: "request body too large",
  ERR_CONTENT_TYPE: "unsupported content type",
  ERR_NOT_FOUND: "not found",
  ERR_METHOD_NOT_ALLOWED: "method not allowed",
  ERR_BUSY: "registrar busy: retry after the Retry-After delay",
  ERR_INTERNAL: "internal error",
};

/** Maps any thrown value to (status, code, generic message, field). */
export function toHttpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof M2mError) {
    const status = STATUS_FOR_CODE[err.code] ?? (err.code === "ERR_INTERNAL" ? 500 : 403);
    // Verifier messages are generic by contract (ERR_EK_*, ERR_AK_*, ERR_ATTEST_*, ERR_DEVICE_KEY_*, …).
    const message =
      MESSAGE_FOR_CODE[err.code] ??
      (VERIFIER_CODES.has(err.code) ? err.message : "enrolment evidence refused");
    return new HttpError(status, err.code, message, { cause: err });
  }
  return new HttpError(500, "ERR_INTERNAL", "internal error", { cause: err });
}

export function messageFor(code: string): string {
  return MESSAGE_FOR_CODE[code] ?? "request refused";
}

/** Builds a RouteContext's `json` function. */
export function parseJsonBody<S extends z.ZodType>(raw: Buffer, schema: S): z.infer<S> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw.toString("utf8"));
  } catch (err) {
    throw new HttpError(400, "ERR_BAD_JSON", messageFor("ERR_BAD_JSON"), { cause: err });
  }
  const result = schema.safeParse(parsed);
  if (!result.success) {
    const issue = result.error.issues[0];
    // Only the path of the failing field goes back, never the value (it may be a secret).
    const field = issue === undefined ? "" : staticPath(schema, issue.path);
    throw new HttpError(400, "ERR_SCHEMA", messageFor("ERR_SCHEMA"), { field });
  }
  return result.data;
}

export function peerCertificateOf(req: IncomingMessage): Buffer | undefined {
  const sock = req.socket as Partial<TLSSocket>;
  if (typeof sock.getPeerCertificate !== "function") return undefined;
  const cert = sock.getPeerCertificate(false);
  return cert !== null && typeof cert === "object" && Buffer.isBuffer(cert.raw) ? cert.raw : undefined;
}

interface ZodDefLike {
  readonly type?: string;
  readonly shape?: Record<string, unknown>;
  readonly innerType?: unknown;
  readonly element?: unknown;
  readonly in?: unknown;
}

function defOf(schema: unknown): ZodDefLike | undefined {
  return (schema as { _zod?: { def?: ZodDefLike } } | undefined)?._zod?.def;
}

/**
 * The failing field's path, but only as far as it is made of names from the schema itself: keys of
 * records (e.g. attribute names) are request data and are not echoed back.
 */
export function staticPath(schema: unknown, path: readonly PropertyKey[]): string {
  const out: string[] = [];
  let node: unknown = schema;
  for (const seg of path) {
    let def = defOf(node);
    while (
      def !== undefined &&
      def.shape === undefined &&
      def.element === undefined &&
      (def.innerType ?? def.in) !== undefined
    ) {
      node = def.innerType ?? def.in;
      def = defOf(node);
    }
    if (def?.shape !== undefined && typeof seg === "string" && Object.hasOwn(def.shape, seg)) {
      out.push(seg);
      node = def.shape[seg];
    } else if (def?.element !== undefined && typeof seg === "number") {
      out.push(String(seg));
      node = def.element;
    } else {
      out.push("*");
      break;
    }
  }
  return out.join(".");
}
