/**
 * Registrar-side verification of a TPM2_Quote made at token time. Pure: no IO, no clock reads, no
 * store. Every check fails with its own stable code and a one-line reason that is safe to show the
 * device (it names PCR indices, never expected values); details for the registrar's log go to `cause`.
 *
 * Order: structures decode → signature by the enrolled AK → magic → type → signer is that AK under
 * the enrolled EK → extraData is this request's nonce → PCR selection is exactly the policy's →
 * reported PCR values hash to the quoted digest → clock/counters do not go backwards → the event log
 * (if sent) replays to the quoted values → the values equal the policy's golden values.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { decodeTpmsAttest, type TpmsAttest, type TpmsClockInfo } from "../../tpm/attest.js";
import { TPM_ALG, TPM_GENERATED_VALUE, TPM_ST } from "../../tpm/constants.js";
import { type EventLog, parseEventLog, replayEventLog } from "../../tpm/event-log.js";
import { decodeTpm2bPublic, type TpmtPublic } from "../../tpm/public.js";
import { decodeTpmtSignature, verifyTpmSignature } from "../../tpm/signature.js";
import type { PcrBank, PcrSelection } from "../../wire/v1/index.js";
import { akQualifiedNameUnderEk } from "../verifier/tpm-verifier.js";

/** Every code a quote verification can fail with (all `permanent` for this quote). */
export const QUOTE_ERRORS = {
  MALFORMED: "ERR_QUOTE_MALFORMED",
  SIGNATURE: "ERR_QUOTE_SIGNATURE",
  MAGIC: "ERR_QUOTE_MAGIC",
  TYPE: "ERR_QUOTE_TYPE",
  SIGNER: "ERR_QUOTE_SIGNER",
  NONCE: "ERR_QUOTE_NONCE",
  PCR_SELECTION: "ERR_QUOTE_PCR_SELECTION",
  PCR_VALUES: "ERR_QUOTE_PCR_VALUES",
  CLOCK: "ERR_QUOTE_CLOCK",
  EVENTLOG_MALFORMED: "ERR_EVENTLOG_MALFORMED",
  EVENTLOG_REPLAY: "ERR_EVENTLOG_REPLAY",
  NO_GOLDEN: "ERR_QUOTE_NO_GOLDEN",
  PCR_MISMATCH: "ERR_QUOTE_PCR_MISMATCH",
} as const;
export type QuoteErrorCode = (typeof QUOTE_ERRORS)[keyof typeof QUOTE_ERRORS];

export const BANK_ALG: Readonly<Record<PcrBank, number>> = {
  sha1: TPM_ALG.SHA1,
  sha256: TPM_ALG.SHA256,
  sha384: TPM_ALG.SHA384,
};
const BANK_SIZE: Readonly<Record<PcrBank, number>> = { sha1: 20, sha256: 32, sha384: 48 };

/** The clock state a device's previous accepted quote showed (persisted per device). */
export interface QuoteClock {
  /** TPMS_CLOCK_INFO.clock in ms, as a decimal string (u64). */
  readonly clock: string;
  readonly resetCount: number;
  readonly restartCount: number;
  readonly safe: boolean;
}

export interface QuoteInput {
  /** The enrolled AK (TPM2B_PUBLIC) and EK (TPM2B_PUBLIC) from the device's evidence on record. */
  readonly akPublic: Uint8Array;
  readonly ekPublic: Uint8Array;
  readonly quote: Uint8Array;
  readonly signature: Uint8Array;
  /** The qualifyingData the quote must carry (SHA-256 of the nonce issued for this request). */
  readonly qualifyingData: Uint8Array;
  readonly selection: PcrSelection;
  /** The PCR values the agent reported for the selection, index → bytes. */
  readonly reported: ReadonlyMap<number, Uint8Array>;
  readonly reportedBank: PcrBank;
  /** Approved golden values of the policy (index → bytes); undefined while none are approved. */
  readonly golden: ReadonlyMap<number, Uint8Array> | undefined;
  readonly previousClock: QuoteClock | undefined;
  /** Raw event log, when the device sent one. */
  readonly eventLog: Uint8Array | undefined;
}

/** What a verified (or policy-refused but authentic) quote shows. */
export interface QuoteFacts {
  readonly attest: TpmsAttest;
  readonly clock: QuoteClock;
  /** The TPM was reset (reboot) or restarted (resume) since the previous accepted quote. */
  readonly reboot: "none" | "reset" | "restart";
  readonly eventLog: EventLog | undefined;
}

/** A failure: code, a one-line reason safe for the device, and (when authentic) the facts. */
export class QuoteRefusal extends M2mError {
  /** Present once the quote proved authentic (signature, nonce, selection, digest): safe to record. */
  readonly facts: QuoteFacts | undefined;
  /** PCR indices that differ from the golden values (PCR_MISMATCH) or the event-log replay. */
  readonly pcrs: readonly number[];
  constructor(
    code: QuoteErrorCode | ErrorCode,
    reason: string,
    opts: { facts?: QuoteFacts; pcrs?: number[]; cause?: unknown } = {},
  ) {
    super(code, "permanent", reason, opts.cause === undefined ? {} : { cause: opts.cause });
    this.facts = opts.facts;
    this.pcrs = opts.pcrs ?? [];
  }
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

function decode<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new QuoteRefusal(QUOTE_ERRORS.MALFORMED, `the ${what} is malformed`, { cause: err });
  }
}

/** TPML_PCR_SELECTION bitmap for `pcrs` (3 bytes: PCR 0–23). */
export function selectionBitmap(pcrs: readonly number[]): Uint8Array {
  const out = new Uint8Array(3);
  for (const p of pcrs) out[p >> 3] = (out[p >> 3] ?? 0) | (1 << (p & 7));
  return out;
}

/** The quote's pcrDigest for values in ascending PCR order: H(v0 ‖ v1 ‖ …) with the bank's hash. */
export function pcrCompositeDigest(bank: PcrBank, values: readonly Uint8Array[]): Uint8Array {
  const h = createHash(bank);
  for (const v of values) h.update(v);
  return new Uint8Array(h.digest());
}

const plural = (pcrs: readonly number[]): string =>
  pcrs.length === 1 ? `PCR ${pcrs[0]} differs` : `PCRs ${pcrs.join(", ")} differ`;

/**
 * Verifies a quote against the policy and the device's previous quote. @returns the facts.
 * @throws QuoteRefusal with one of QUOTE_ERRORS.
 */
export function verifyQuote(input: QuoteInput): QuoteFacts {
  const ak = decode("AK on record", () => decodeTpm2bPublic(input.akPublic));
  const ek = decode("EK on record", () => decodeTpm2bPublic(input.ekPublic));
  const sig = decode("quote signature", () => decodeTpmtSignature(input.signature));
  const attest = decode("quote", () => decodeTpmsAttest(input.quote));

  // Why: only the AK enrolled for this device (credential-activated under its EK) may vouch for its
  // platform state; a quote signed by any other key — another device's AK included — proves nothing.
  const v = verifyTpmSignature(ak, input.quote, sig);
  if (!v.ok) {
    throw new QuoteRefusal(
      QUOTE_ERRORS.SIGNATURE,
      "the quote is not signed by this device's attestation key",
      {
        cause: new Error(v.reason),
      },
    );
  }
  // Why: TPM_GENERATED_VALUE marks data the TPM built itself; the restricted AK refuses to sign
  // external data that starts with it, so the magic is what makes the content trustworthy.
  if (attest.magic !== TPM_GENERATED_VALUE) {
    throw new QuoteRefusal(QUOTE_ERRORS.MAGIC, "the quote is not TPM-generated");
  }
  // Why: a certification or another attestation type says nothing about the PCRs.
  if (attest.type !== TPM_ST.ATTEST_QUOTE || attest.attested.kind !== "quote") {
    throw new QuoteRefusal(QUOTE_ERRORS.TYPE, "the attestation is not a TPM2_Quote");
  }
  // Why: the TPM names the signer by its qualified name; it must be the enrolled AK under the enrolled
  // EK (defence in depth beside the signature: catches an AK record swapped between devices).
  if (!bytesEqual(attest.qualifiedSigner, akQualifiedNameUnderEk(ek as TpmtPublic, ak))) {
    throw new QuoteRefusal(QUOTE_ERRORS.SIGNER, "the quote's signer is not this device's attestation key");
  }
  // Why: the nonce makes the quote fresh: without it an old quote of a good boot could be replayed
  // after the firmware was replaced.
  if (input.qualifyingData.length === 0 || !bytesEqual(attest.extraData, input.qualifyingData)) {
    throw new QuoteRefusal(QUOTE_ERRORS.NONCE, "the quote does not carry this request's nonce");
  }
  const want = input.selection;
  const sel = attest.attested.pcrSelect;
  const wantMap = selectionBitmap(want.pcrs);
  // Why: the digest covers exactly the selected PCRs; a different selection (a PCR left out, another
  // bank) would let a changed PCR go unnoticed.
  const selOk =
    sel.length === 1 &&
    sel[0]?.hash === BANK_ALG[want.bank] &&
    bytesEqual(trimBitmap(sel[0].pcrSelect, 3), wantMap) &&
    input.reportedBank === want.bank;
  if (!selOk) {
    throw new QuoteRefusal(
      QUOTE_ERRORS.PCR_SELECTION,
      `the quote does not cover exactly ${want.bank}:${want.pcrs.join(",")}`,
    );
  }
  const size = BANK_SIZE[want.bank];
  const values: Uint8Array[] = [];
  for (const p of want.pcrs) {
    const val = input.reported.get(p);
    if (val === undefined || val.length !== size) {
      throw new QuoteRefusal(QUOTE_ERRORS.PCR_VALUES, "the reported PCR values do not match the quote");
    }
    values.push(val);
  }
  if (input.reported.size !== want.pcrs.length) {
    throw new QuoteRefusal(QUOTE_ERRORS.PCR_VALUES, "the reported PCR values do not match the quote");
  }
  // Why: the per-PCR values are the agent's claim; only their hash equalling the signed digest makes
  // them the TPM's (and lets us say *which* PCR differs).
  if (!bytesEqual(pcrCompositeDigest(want.bank, values), attest.attested.pcrDigest)) {
    throw new QuoteRefusal(QUOTE_ERRORS.PCR_VALUES, "the reported PCR values do not match the quote");
  }

  const ci: TpmsClockInfo = attest.clockInfo;
  const clock: QuoteClock = {
    clock: ci.clock.toString(),
    resetCount: ci.resetCount,
    restartCount: ci.restartCount,
    safe: ci.safe === 1,
  };
  const reboot = clockCheck(input.previousClock, clock);
  let log: EventLog | undefined;
  const partial = (): QuoteFacts => ({ attest, clock, reboot, eventLog: log });
  if (input.eventLog !== undefined) {
    try {
      log = parseEventLog(input.eventLog);
    } catch (err) {
      throw new QuoteRefusal(QUOTE_ERRORS.EVENTLOG_MALFORMED, "the event log is malformed", {
        facts: partial(),
        cause: err,
      });
    }
    let replayed: ReadonlyMap<number, Uint8Array>;
    try {
      replayed = replayEventLog(log, BANK_ALG[want.bank]).pcrs;
    } catch (err) {
      throw new QuoteRefusal(QUOTE_ERRORS.EVENTLOG_MALFORMED, "the event log cannot be replayed", {
        facts: partial(),
        cause: err,
      });
    }
    // Why: the log is the agent's unsigned story of the boot; only a replay that reproduces the signed
    // PCRs makes its events evidence (the log covers the firmware PCRs 0–7 and whatever PCR it extends).
    const off = want.pcrs.filter((p, i) => {
      if (p > 7 && !replayed.has(p)) return false;
      const r = replayed.get(p) ?? new Uint8Array(size);
      return !bytesEqual(r, values[i] ?? new Uint8Array(0));
    });
    if (off.length > 0) {
      throw new QuoteRefusal(
        QUOTE_ERRORS.EVENTLOG_REPLAY,
        `the event log does not reproduce the quoted ${off.length === 1 ? `PCR ${off[0]}` : `PCRs ${off.join(", ")}`}`,
        { facts: partial(), pcrs: off },
      );
    }
  }
  const facts = partial();
  // Why: trust on first use is never silent: until an operator approves golden values, no token.
  if (input.golden === undefined) {
    throw new QuoteRefusal(
      QUOTE_ERRORS.NO_GOLDEN,
      "the policy has no approved PCR values yet (operator approval pending)",
      {
        facts,
      },
    );
  }
  const differ = want.pcrs.filter((p, i) => {
    const g = input.golden?.get(p);
    return g === undefined || !bytesEqual(g, values[i] ?? new Uint8Array(0));
  });
  // Why: this is the point of the whole exercise: the platform must have booted what the fleet expects.
  if (differ.length > 0) {
    throw new QuoteRefusal(QUOTE_ERRORS.PCR_MISMATCH, `${plural(differ)} from the policy`, {
      facts,
      pcrs: differ,
    });
  }
  return facts;
}

/** The bitmap without trailing zero bytes beyond `n` (TPMs may send 3 or 4 bytes). */
function trimBitmap(b: Uint8Array, n: number): Uint8Array {
  if (b.length <= n) {
    const out = new Uint8Array(n);
    out.set(b);
    return out;
  }
  for (let i = n; i < b.length; i++) if (b[i] !== 0) return b;
  return b.subarray(0, n);
}

/**
 * What a reboot means (docs/attestation.md): the TPM's resetCount counts TPM Resets (power cycle or
 * reboot: PCRs start over and are re-measured), restartCount counts TPM Restarts (resume from
 * hibernation). Either going up is a legitimate new boot — the quote itself proves the PCRs of that
 * boot, so it is accepted and recorded. Going down, or the clock going backwards within one boot, means
 * the evidence comes from an older TPM state (a replayed quote, a rolled-back swtpm/NV state): refused.
 */
function clockCheck(prev: QuoteClock | undefined, now: QuoteClock): QuoteFacts["reboot"] {
  if (prev === undefined) return "none";
  const back = (why: string) =>
    new QuoteRefusal(QUOTE_ERRORS.CLOCK, `the TPM clock or boot counters went backwards (${why})`);
  // Why: resetCount only ever increases on a genuine TPM; a lower value is an older state or another TPM.
  if (now.resetCount < prev.resetCount) throw back("resetCount");
  if (now.resetCount > prev.resetCount) return "reset";
  // Why: within one boot the restart counter only increases.
  if (now.restartCount < prev.restartCount) throw back("restartCount");
  if (now.restartCount > prev.restartCount) return "restart";
  // Why: within one boot and restart the TPM clock is monotonic; a smaller value is a replay or a
  // rolled-back TPM state.
  if (BigInt(now.clock) < BigInt(prev.clock)) throw back("clock");
  return "none";
}
