import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import type { AuditEvent } from "./store/index.js";

/**
 * Append-only JSON-lines audit log (one line per enrolment attempt). Opened O_APPEND with 0600 from
 * the first byte; each line is one `write` so concurrent lines never interleave.
 */
export class AuditLog {
  #fd: number | undefined;

  constructor(path: string) {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    this.#fd = openSync(path, "a", 0o600);
  }

  write(event: AuditEvent): void {
    if (this.#fd === undefined) return;
    writeSync(this.#fd, `${JSON.stringify(event)}\n`);
  }

  close(): void {
    if (this.#fd !== undefined) closeSync(this.#fd);
    this.#fd = undefined;
  }
}
