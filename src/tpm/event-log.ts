import { createHash } from "node:crypto";
import { M2mError } from "../core/errors.js";
import { ERR_TPM_STRUCT_MALFORMED } from "./bytes.js";

/**
 * TCG PC Client Platform Firmware Profile binary event log, crypto-agile format (what Linux exposes at
 * `/sys/kernel/security/tpm0/binary_bios_measurements`): a TCG_PCR_EVENT header carrying the
 * TCG_EfiSpecIDEvent (which digest algorithms each later event has, and their sizes), then
 * TCG_PCR_EVENT2 records. All integers are little endian (unlike TPM structures).
 *
 * The parser is bounds-checked like the other TPM codecs: every read checks the remaining length,
 * counts and sizes are capped, and any problem fails with `ERR_TPM_STRUCT_MALFORMED` naming the event
 * index and field — never RangeError, never an allocation larger than the input.
 */

/** Caps: generous for real firmware (a few hundred events, < 100 KiB), fatal for hostile input. */
export const MAX_EVENT_LOG_INPUT_BYTES = 1024 * 1024;
export const MAX_EVENT_LOG_EVENTS = 16_384;
const MAX_ALGORITHMS = 8;
const MAX_DIGEST_SIZE = 64;
const MAX_PCR_INDEX = 23;

export const EV_NO_ACTION = 0x00000003;
const SPEC_ID_SIGNATURE = "Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE = "StartupLocality\0";

/** TPM_ALG_ID → Node hash name for the banks a replay supports. */
export const EVENT_LOG_HASHES: Readonly<Record<number, { name: string; size: number }>> = {
  4: { name: "sha1", size: 20 },
  11: { name: "sha256", size: 32 },
  12: { name: "sha384", size: 48 },
  13: { name: "sha512", size: 64 },
};

export interface EventLogAlgorithm {
  readonly algorithmId: number;
  readonly digestSize: number;
}

export interface EventLogEvent {
  /** Position in the log (0 = the Spec ID header event). */
  readonly index: number;
  readonly pcrIndex: number;
  readonly eventType: number;
  /** algorithmId → digest. */
  readonly digests: ReadonlyMap<number, Uint8Array>;
  readonly data: Uint8Array;
}

export interface EventLog {
  readonly algorithms: readonly EventLogAlgorithm[];
  /** TCG_PCR_EVENT2 records (the header event is not included). */
  readonly events: readonly EventLogEvent[];
}

function fail(field: string, problem: string, cause?: unknown): M2mError {
  return new M2mError(ERR_TPM_STRUCT_MALFORMED, "permanent", `malformed event log: ${field} ${problem}`, {
    details: { structure: "TCG_EVENT_LOG", field },
    ...(cause === undefined ? {} : { cause }),
  });
}

/** Bounds-checked little-endian reader. */
class LeReader {
  #off = 0;
  constructor(readonly buf: Uint8Array) {}
  get remaining(): number {
    return this.buf.length - this.#off;
  }
  #need(n: number, field: string): void {
    if (n > this.buf.length - this.#off) throw fail(field, `needs ${n} bytes, ${this.remaining} left`);
  }
  u8(field: string): number {
    this.#need(1, field);
    return this.buf[this.#off++] ?? 0;
  }
  u16(field: string): number {
    this.#need(2, field);
    const b = this.buf;
    const o = this.#off;
    this.#off += 2;
    return (b[o] ?? 0) | ((b[o + 1] ?? 0) << 8);
  }
  u32(field: string): number {
    this.#need(4, field);
    const b = this.buf;
    const o = this.#off;
    this.#off += 4;
    return ((b[o] ?? 0) | ((b[o + 1] ?? 0) << 8) | ((b[o + 2] ?? 0) << 16) | ((b[o + 3] ?? 0) << 24)) >>> 0;
  }
  bytes(n: number, field: string): Uint8Array {
    this.#need(n, field);
    const out = Uint8Array.prototype.slice.call(this.buf, this.#off, this.#off + n);
    this.#off += n;
    return out;
  }
}

function ascii(b: Uint8Array): string {
  return Buffer.from(b).toString("latin1");
}

/**
 * Parses a crypto-agile event log. @throws ERR_TPM_STRUCT_MALFORMED (also for a SHA-1-only legacy log,
 * which has no Spec ID event: it cannot be replayed into the SHA-256 bank).
 */
export function parseEventLog(input: unknown): EventLog {
  if (!(input instanceof Uint8Array)) throw fail("input", "is not a byte array");
  if (input.length > MAX_EVENT_LOG_INPUT_BYTES) throw fail("input", "is over the size limit");
  try {
    return parseInner(input);
  } catch (err) {
    if (err instanceof M2mError && err.code === ERR_TPM_STRUCT_MALFORMED) throw err;
    throw fail("input", "could not be decoded", err);
  }
}

function parseInner(buf: Uint8Array): EventLog {
  const r = new LeReader(buf);
  // Header: TCG_PCR_EVENT with the Spec ID event (SHA-1 log format, digest all zero).
  const pcr0 = r.u32("header.pcrIndex");
  const type0 = r.u32("header.eventType");
  r.bytes(20, "header.digest");
  const size0 = r.u32("header.eventSize");
  if (pcr0 !== 0 || type0 !== EV_NO_ACTION) throw fail("header", "is not a Spec ID event");
  if (size0 > r.remaining) throw fail("header.eventSize", "exceeds the input");
  const spec = new LeReader(r.bytes(size0, "header.event"));
  if (ascii(spec.bytes(16, "specId.signature")) !== SPEC_ID_SIGNATURE) {
    throw fail("specId.signature", "is not 'Spec ID Event03' (not a crypto-agile log)");
  }
  spec.u32("specId.platformClass");
  spec.u8("specId.specVersionMinor");
  spec.u8("specId.specVersionMajor");
  spec.u8("specId.specErrata");
  spec.u8("specId.uintnSize");
  const nAlg = spec.u32("specId.numberOfAlgorithms");
  if (nAlg === 0 || nAlg > MAX_ALGORITHMS) throw fail("specId.numberOfAlgorithms", `${nAlg} is out of range`);
  const algorithms: EventLogAlgorithm[] = [];
  for (let i = 0; i < nAlg; i++) {
    const algorithmId = spec.u16(`specId.digestSizes[${i}].algorithmId`);
    const digestSize = spec.u16(`specId.digestSizes[${i}].digestSize`);
    if (digestSize === 0 || digestSize > MAX_DIGEST_SIZE)
      throw fail(`specId.digestSizes[${i}].digestSize`, "is out of range");
    if (algorithms.some((a) => a.algorithmId === algorithmId))
      throw fail(`specId.digestSizes[${i}].algorithmId`, "is listed twice");
    const known = EVENT_LOG_HASHES[algorithmId];
    if (known !== undefined && known.size !== digestSize)
      throw fail(`specId.digestSizes[${i}].digestSize`, "does not match the algorithm");
    algorithms.push({ algorithmId, digestSize });
  }
  const vendorSize = spec.u8("specId.vendorInfoSize");
  spec.bytes(vendorSize, "specId.vendorInfo");
  const sizeOf = new Map(algorithms.map((a) => [a.algorithmId, a.digestSize]));

  const events: EventLogEvent[] = [];
  while (r.remaining > 0) {
    const index = events.length + 1;
    if (events.length >= MAX_EVENT_LOG_EVENTS) throw fail(`event[${index}]`, "exceeds the event limit");
    const f = (name: string) => `event[${index}].${name}`;
    const pcrIndex = r.u32(f("pcrIndex"));
    if (pcrIndex > MAX_PCR_INDEX) throw fail(f("pcrIndex"), `${pcrIndex} is out of range`);
    const eventType = r.u32(f("eventType"));
    const count = r.u32(f("digests.count"));
    if (count > MAX_ALGORITHMS) throw fail(f("digests.count"), `${count} is out of range`);
    const digests = new Map<number, Uint8Array>();
    for (let i = 0; i < count; i++) {
      const alg = r.u16(f(`digests[${i}].hashAlg`));
      const size = sizeOf.get(alg);
      if (size === undefined) throw fail(f(`digests[${i}].hashAlg`), "is not declared in the Spec ID event");
      if (digests.has(alg)) throw fail(f(`digests[${i}].hashAlg`), "appears twice");
      digests.set(alg, r.bytes(size, f(`digests[${i}].digest`)));
    }
    const eventSize = r.u32(f("eventSize"));
    if (eventSize > r.remaining) throw fail(f("eventSize"), "exceeds the input");
    const data = r.bytes(eventSize, f("event"));
    events.push({ index, pcrIndex, eventType, digests, data });
  }
  return { algorithms, events };
}

/** Recomputed PCR values of one bank (only PCRs that at least one event touches, plus PCR 0 locality). */
export interface ReplayResult {
  /** PCR index → value. */
  readonly pcrs: ReadonlyMap<number, Uint8Array>;
}

/**
 * Replays the log into the bank `algorithmId`: PCR[i] = H(PCR[i] ‖ digest) for every event that is not
 * EV_NO_ACTION; a StartupLocality EV_NO_ACTION event sets PCR 0's initial value to the locality.
 * @throws ERR_TPM_STRUCT_MALFORMED when an extending event lacks a digest for the bank, or the bank is
 *   not one the replay knows.
 */
export function replayEventLog(log: EventLog, algorithmId: number): ReplayResult {
  const hash = EVENT_LOG_HASHES[algorithmId];
  if (hash === undefined) throw fail("bank", `0x${algorithmId.toString(16)} is not supported`);
  const pcrs = new Map<number, Uint8Array>();
  const get = (i: number): Uint8Array => pcrs.get(i) ?? new Uint8Array(hash.size);
  for (const ev of log.events) {
    if (ev.eventType === EV_NO_ACTION) {
      const d = ev.data;
      if (ev.pcrIndex === 0 && d.length === 17 && ascii(d.subarray(0, 16)) === STARTUP_LOCALITY_SIGNATURE) {
        const init = new Uint8Array(hash.size);
        init[hash.size - 1] = d[16] ?? 0;
        pcrs.set(0, init);
      }
      continue;
    }
    const digest = ev.digests.get(algorithmId);
    if (digest === undefined) throw fail(`event[${ev.index}].digests`, "lack the replayed bank");
    pcrs.set(ev.pcrIndex, createHash(hash.name).update(get(ev.pcrIndex)).update(digest).digest());
  }
  return { pcrs };
}

/** One event that differs between two logs, for the operator ("which event changed"). */
export interface EventDifference {
  readonly pcrIndex: number;
  /** Position among this PCR's extending events (0-based). */
  readonly position: number;
  readonly eventType: number | undefined;
  /** Printable excerpt of the event data (at most 64 chars), for a human. */
  readonly description: string;
  readonly expectedDigest: string | undefined;
  readonly actualDigest: string | undefined;
}

/** The first event of `pcrIndex` whose digest (in bank `algorithmId`) differs between the two logs. */
export function firstDifferingEvent(
  expected: EventLog,
  actual: EventLog,
  pcrIndex: number,
  algorithmId: number,
): EventDifference | undefined {
  const of = (log: EventLog) =>
    log.events.filter((e) => e.pcrIndex === pcrIndex && e.eventType !== EV_NO_ACTION);
  const a = of(expected);
  const b = of(actual);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const ea = a[i];
    const eb = b[i];
    const da = ea?.digests.get(algorithmId);
    const db = eb?.digests.get(algorithmId);
    const same = da !== undefined && db !== undefined && Buffer.from(da).equals(Buffer.from(db));
    if (!same) {
      const ev = eb ?? ea;
      return {
        pcrIndex,
        position: i,
        eventType: ev?.eventType,
        description: ev === undefined ? "" : describeEventData(ev.data),
        expectedDigest: da === undefined ? undefined : Buffer.from(da).toString("hex"),
        actualDigest: db === undefined ? undefined : Buffer.from(db).toString("hex"),
      };
    }
  }
  return undefined;
}

/** Printable excerpt of event data (ASCII or UTF-16LE strings are common in firmware events). */
export function describeEventData(data: Uint8Array): string {
  const utf16 = data.length >= 4 && data.length % 2 === 0 && data[1] === 0 && data[3] === 0;
  const text = utf16 ? Buffer.from(data).toString("utf16le") : Buffer.from(data).toString("latin1");
  return text
    .replace(/[^\x20-\x7e]+/g, " ")
    .trim()
    .slice(0, 64);
}

/** One event to encode (tests, the swtpm "firmware" simulator). */
export interface EventToEncode {
  readonly pcrIndex: number;
  readonly eventType: number;
  readonly data: Uint8Array;
  /** Explicit digests by algorithm; default: each declared bank's hash of `data`. */
  readonly digests?: ReadonlyMap<number, Uint8Array>;
}

/** Encodes a crypto-agile log (tests and simulation; a real one comes from the firmware). */
export function encodeEventLog(
  algorithmIds: readonly number[],
  events: readonly EventToEncode[],
): Uint8Array {
  const parts: Buffer[] = [];
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    return b;
  };
  const u16 = (v: number) => {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(v);
    return b;
  };
  const algs = algorithmIds.map((id) => {
    const h = EVENT_LOG_HASHES[id];
    if (h === undefined) throw fail("bank", "unsupported");
    return { id, ...h };
  });
  const spec = Buffer.concat([
    Buffer.from(SPEC_ID_SIGNATURE, "latin1"),
    u32(0),
    Buffer.from([0, 2, 0, 2]),
    u32(algs.length),
    ...algs.map((a) => Buffer.concat([u16(a.id), u16(a.size)])),
    Buffer.from([0]),
  ]);
  parts.push(u32(0), u32(EV_NO_ACTION), Buffer.alloc(20), u32(spec.length), spec);
  for (const ev of events) {
    parts.push(u32(ev.pcrIndex), u32(ev.eventType), u32(algs.length));
    for (const a of algs) {
      const d = ev.digests?.get(a.id) ?? createHash(a.name).update(ev.data).digest();
      parts.push(u16(a.id), Buffer.from(d));
    }
    parts.push(u32(ev.data.length), Buffer.from(ev.data));
  }
  return new Uint8Array(Buffer.concat(parts));
}
