import { guardDecode, malformed, TpmReader, TpmWriter } from "./bytes.js";
import { MAX_DIGEST_BYTES, MAX_NAME_BYTES, TPM_ST } from "./constants.js";

/** TPMS_CLOCK_INFO. */
export interface TpmsClockInfo {
  readonly clock: bigint;
  readonly resetCount: number;
  readonly restartCount: number;
  /** TPMI_YES_NO: 0 or 1. */
  readonly safe: number;
}

/** One TPMS_PCR_SELECTION: hash bank and bitmap of selected PCRs. */
export interface TpmsPcrSelection {
  readonly hash: number;
  readonly pcrSelect: Uint8Array;
}

export interface TpmsCertifyInfo {
  readonly kind: "certify";
  readonly name: Uint8Array;
  readonly qualifiedName: Uint8Array;
}

export interface TpmsQuoteInfo {
  readonly kind: "quote";
  readonly pcrSelect: readonly TpmsPcrSelection[];
  readonly pcrDigest: Uint8Array;
}

/** An attestation type this codec does not parse: its union bytes are kept opaque. */
export interface TpmsOtherAttest {
  readonly kind: "other";
  readonly raw: Uint8Array;
}

/**
 * TPMS_ATTEST. `magic` and `type` are returned as read (the verifier checks them, each with its own
 * error code); the union is parsed for certify (0x8017) and quote (0x8018) only.
 */
export interface TpmsAttest {
  readonly magic: number;
  readonly type: number;
  readonly qualifiedSigner: Uint8Array;
  readonly extraData: Uint8Array;
  readonly clockInfo: TpmsClockInfo;
  readonly firmwareVersion: bigint;
  readonly attested: TpmsCertifyInfo | TpmsQuoteInfo | TpmsOtherAttest;
}

/** TPML_PCR_SELECTION caps: HASH_COUNT banks, PCR_SELECT_MAX bytes each (generous). */
const MAX_PCR_BANKS = 16;
const MAX_PCR_SELECT_BYTES = 32;
/** TPM2B_DATA holds at most sizeof(TPMT_HA). */
const MAX_DATA_BYTES = 2 + MAX_DIGEST_BYTES;

/**
 * Decodes TPMS_ATTEST bytes (exactly what the TPM signed). The whole input must be consumed.
 * @throws ERR_TPM_STRUCT_MALFORMED
 */
export function decodeTpmsAttest(bytes: Uint8Array): TpmsAttest {
  return guardDecode("TPMS_ATTEST", bytes, (buf) => {
    const r = new TpmReader(buf, "TPMS_ATTEST");
    const magic = r.u32("magic");
    const type = r.u16("type");
    const qualifiedSigner = r.tpm2b("qualifiedSigner", MAX_NAME_BYTES);
    const extraData = r.tpm2b("extraData", MAX_DATA_BYTES);
    const clock = r.u64("clockInfo.clock");
    const resetCount = r.u32("clockInfo.resetCount");
    const restartCount = r.u32("clockInfo.restartCount");
    const safe = r.u8("clockInfo.safe");
    if (safe > 1) throw malformed("TPMS_ATTEST", "clockInfo.safe", "is not 0 or 1");
    const firmwareVersion = r.u64("firmwareVersion");
    let attested: TpmsAttest["attested"];
    if (type === TPM_ST.ATTEST_CERTIFY) {
      const name = r.tpm2b("attested.certify.name", MAX_NAME_BYTES);
      const qualifiedName = r.tpm2b("attested.certify.qualifiedName", MAX_NAME_BYTES);
      attested = { kind: "certify", name, qualifiedName };
    } else if (type === TPM_ST.ATTEST_QUOTE) {
      const count = r.u32("attested.quote.pcrSelect.count");
      if (count > MAX_PCR_BANKS) {
        throw malformed("TPMS_ATTEST", "attested.quote.pcrSelect.count", `${count} exceeds ${MAX_PCR_BANKS}`);
      }
      const pcrSelect: TpmsPcrSelection[] = [];
      for (let i = 0; i < count; i++) {
        const hash = r.u16(`attested.quote.pcrSelect[${i}].hash`);
        const size = r.u8(`attested.quote.pcrSelect[${i}].sizeofSelect`);
        if (size > MAX_PCR_SELECT_BYTES) {
          throw malformed("TPMS_ATTEST", `attested.quote.pcrSelect[${i}].sizeofSelect`, "is too large");
        }
        pcrSelect.push({ hash, pcrSelect: r.bytes(size, `attested.quote.pcrSelect[${i}].pcrSelect`) });
      }
      const pcrDigest = r.tpm2b("attested.quote.pcrDigest", MAX_DIGEST_BYTES);
      attested = { kind: "quote", pcrSelect, pcrDigest };
    } else {
      attested = { kind: "other", raw: r.bytes(r.remaining, "attested") };
    }
    r.end();
    return {
      magic,
      type,
      qualifiedSigner,
      extraData,
      clockInfo: { clock, resetCount, restartCount, safe },
      firmwareVersion,
      attested,
    };
  });
}

/** Marshals a TPMS_ATTEST (tests and tamper tables; a real one comes from the TPM). */
export function encodeTpmsAttest(a: TpmsAttest): Uint8Array {
  const w = new TpmWriter()
    .u32(a.magic)
    .u16(a.type)
    .tpm2b(a.qualifiedSigner, "qualifiedSigner")
    .tpm2b(a.extraData, "extraData")
    .u64(a.clockInfo.clock)
    .u32(a.clockInfo.resetCount)
    .u32(a.clockInfo.restartCount)
    .u8(a.clockInfo.safe)
    .u64(a.firmwareVersion);
  const at = a.attested;
  if (at.kind === "certify") {
    w.tpm2b(at.name, "attested.certify.name").tpm2b(at.qualifiedName, "attested.certify.qualifiedName");
  } else if (at.kind === "quote") {
    w.u32(at.pcrSelect.length);
    for (const s of at.pcrSelect) w.u16(s.hash).u8(s.pcrSelect.length).raw(s.pcrSelect);
    w.tpm2b(at.pcrDigest, "attested.quote.pcrDigest");
  } else {
    w.raw(at.raw);
  }
  return w.finish();
}
