import { createHash } from "node:crypto";
import { z } from "zod";
import { b64url, WIRE_VERSION } from "./enrolment.js";

/**
 * Continuous attestation at the token endpoint (v1). For a device whose enrolment group has an
 * attestation policy, every token request carries a TPM2_Quote by the device's enrolled AK over the
 * policy's PCR selection, qualified with a registrar-issued nonce (see docs/attestation.md).
 *
 * The challenge travels like a DPoP nonce (RFC 9449 §8): the token endpoint answers a request without
 * evidence with `400 {"error":"use_attestation_nonce"}` and these headers, and every later token
 * response carries the next nonce so the steady state is one round trip. The nonce is opaque to the
 * agent, bound to the device, single-use and valid for `max-age` seconds.
 */
export const ATTESTATION_HEADERS = {
  /** The next nonce (opaque, ≤ 128 chars). The quote's qualifyingData is SHA-256 of its UTF-8 bytes. */
  nonce: "attestation-nonce",
  /** PCR selection the quote must cover, e.g. `sha256:0,1,2,3,7`. */
  pcrs: "attestation-pcrs",
  /** Seconds the nonce stays usable (the policy's max quote age). */
  maxAge: "attestation-nonce-max-age",
} as const;

/** Form parameter of the token request that carries the evidence (base64url of the JSON below). */
export const ATTESTATION_FORM_PARAM = "attestation";

/** OAuth error values (extensions, like RFC 9449's `use_dpop_nonce`). */
export const ATTESTATION_OAUTH_ERRORS = {
  /** Send a quote over the advertised PCRs with the nonce in the headers. */
  useNonce: "use_attestation_nonce",
  /** The evidence was refused; `error_description` says why in one line (no expected values). */
  failed: "attestation_failed",
} as const;

/** Hash banks a policy may select. */
export const PCR_BANKS = ["sha256", "sha384", "sha1"] as const;
export type PcrBank = (typeof PCR_BANKS)[number];

/** A PCR selection: one bank, PCR indices ascending, unique, 0–23. */
export interface PcrSelection {
  readonly bank: PcrBank;
  readonly pcrs: readonly number[];
}

/** `sha256:0,1,7` form (tpm2-tools syntax). */
export function formatPcrSelection(s: PcrSelection): string {
  return `${s.bank}:${s.pcrs.join(",")}`;
}

/** Parses `sha256:0,1,7`; undefined when malformed (unknown bank, PCR outside 0–23, duplicates). */
export function parsePcrSelection(text: string): PcrSelection | undefined {
  const m = /^(sha1|sha256|sha384):([0-9]{1,2}(?:,[0-9]{1,2}){0,23})$/.exec(text.trim());
  if (m?.[1] === undefined || m[2] === undefined) return undefined;
  const pcrs = m[2].split(",").map(Number);
  if (pcrs.some((p) => p > 23) || new Set(pcrs).size !== pcrs.length) return undefined;
  return { bank: m[1] as PcrBank, pcrs: [...pcrs].sort((a, b) => a - b) };
}

/** Largest event log the agent sends and the registrar parses (raw bytes). */
export const MAX_EVENT_LOG_BYTES = 192 * 1024;

const hexDigest = z.string().regex(/^[0-9a-f]{40}$|^[0-9a-f]{64}$|^[0-9a-f]{96}$/, "must be a hex digest");

/** The evidence JSON (base64url-encoded into the `attestation` form parameter). */
export const attestationEvidenceSchema = z
  .object({
    v: z.literal(WIRE_VERSION),
    /** The nonce exactly as received in the `attestation-nonce` header. */
    nonce: z.string().min(1).max(128),
    /** TPMS_ATTEST bytes exactly as the TPM signed them (TPM2_Quote `quoted`). */
    quote: b64url(2048),
    /** TPMT_SIGNATURE over `quote` by the AK. */
    signature: b64url(1024),
    /** The PCR values the quote covers, as read by the agent (verified against the quote's digest). */
    pcrs: z
      .object({
        bank: z.enum(PCR_BANKS),
        values: z.record(z.string().regex(/^([0-9]|1[0-9]|2[0-3])$/), hexDigest),
      })
      .strict(),
    /** TCG PC Client binary event log (crypto-agile), when the device has one. */
    eventLog: b64url(Math.ceil((MAX_EVENT_LOG_BYTES * 4) / 3)).optional(),
  })
  .strict();
export type AttestationEvidence = z.infer<typeof attestationEvidenceSchema>;

/** The `attested` access-token claim: when the quote was verified and against which policy. */
export interface AttestedClaim {
  /** Verification time, seconds since the epoch. */
  readonly at: number;
  /** Policy identity: `<group>#<version>` (the version bumps with every policy or golden-value change). */
  readonly policy: string;
}

/** The TPM2_Quote qualifyingData for a nonce: SHA-256 of its UTF-8 bytes (fixed 32 bytes, any nonce length). */
export function quoteQualifyingData(nonce: string): Uint8Array {
  return new Uint8Array(createHash("sha256").update(nonce, "utf8").digest());
}
