import { randomBytes } from "node:crypto";

let lastMs = 0;
/** Random bytes drawn 4 KiB at a time (one syscall per 256 ids instead of one per id). */
let pool = randomBytes(4096);
let poolOffset = 0;
function randomInto(b: Buffer): void {
  if (poolOffset + b.length > pool.length) {
    pool = randomBytes(4096);
    poolOffset = 0;
  }
  pool.copy(b, 0, poolOffset, poolOffset + b.length);
  // Zero what was handed out: a later heap dump shows no earlier id randomness.
  pool.fill(0, poolOffset, poolOffset + b.length);
  poolOffset += b.length;
}
let counter = 0;

/**
 * A UUIDv7 (RFC 9562): 48-bit Unix ms timestamp, then a 12-bit counter that keeps IDs made in the
 * same millisecond strictly increasing within this process, then 62 random bits. Time-ordered, so
 * receivers can deduplicate and roughly order by ID.
 */
export function newMessageId(nowMs: number = Date.now()): string {
  let ms = nowMs;
  if (ms <= lastMs) {
    ms = lastMs;
    counter++;
    if (counter > 0xfff) {
      // Counter exhausted inside one ms: borrow the next ms (still monotonic, still unique).
      ms = lastMs + 1;
      counter = 0;
    }
  } else {
    counter = 0;
  }
  lastMs = ms;
  const b = Buffer.allocUnsafe(16);
  randomInto(b);
  b.writeUIntBE(ms, 0, 6);
  b[6] = 0x70 | ((counter >> 8) & 0x0f);
  b[7] = counter & 0xff;
  b[8] = 0x80 | ((b[8] ?? 0) & 0x3f);
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** True for a lowercase canonical UUID (any version); used to validate IDs that travel upstream. */
export function isMessageId(s: string): boolean {
  return UUID_RE.test(s);
}
