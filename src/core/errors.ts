import { ERROR_CODES, type ErrorCode, type RetryClass } from "./error-codes.js";

/**
 * Typed errors with stable codes from the catalogue (`./error-codes.ts`). Callers branch on `code` and
 * `retry`, never on message text. Retry classes are explained there.
 */
export type { ErrorCode, RetryClass } from "./error-codes.js";

export interface M2mErrorOptions {
  /** What the operator should do about it. Never contains secrets or expected values. */
  readonly hint?: string;
  readonly cause?: unknown;
  /** Extra machine-readable fields (e.g. `retryAfterMs`, `file`, `key`). Never secrets. */
  readonly details?: Readonly<Record<string, string | number | boolean>>;
}

export class M2mError extends Error {
  readonly code: ErrorCode;
  readonly retry: RetryClass;
  readonly hint: string | undefined;
  readonly details: Readonly<Record<string, string | number | boolean>>;

  constructor(code: ErrorCode, retry: RetryClass, message: string, options: M2mErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "M2mError";
    this.code = code;
    this.retry = retry;
    this.hint = options.hint;
    this.details = options.details ?? {};
  }

  /** A JSON shape safe to print or send to a local client (no cause chain, no stack). */
  toJSON(): Record<string, unknown> {
    return {
      code: this.code,
      retry: this.retry,
      message: this.message,
      ...(this.hint === undefined ? {} : { hint: this.hint }),
      ...(Object.keys(this.details).length === 0 ? {} : { details: this.details }),
    };
  }
}

/** An error with the catalogue's default retry class for `code`. */
export function m2mError(code: ErrorCode, message: string, options: M2mErrorOptions = {}): M2mError {
  return new M2mError(code, ERROR_CODES[code].retry, message, options);
}

export function isM2mError(err: unknown, code?: ErrorCode): err is M2mError {
  return err instanceof M2mError && (code === undefined || err.code === code);
}

/** Wraps an unknown failure so that it always carries a code; keeps the original as `cause`. */
export function asM2mError(err: unknown, fallbackCode: ErrorCode = "ERR_INTERNAL"): M2mError {
  if (err instanceof M2mError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new M2mError(fallbackCode, "permanent", message, { cause: err });
}
