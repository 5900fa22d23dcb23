import { constants, verify as cryptoVerify } from "node:crypto";
import { guardDecode, malformed, TpmReader, TpmWriter } from "./bytes.js";
import { curveInfo, hashInfo, MAX_ECC_KEY_BYTES, MAX_RSA_KEY_BYTES, TPM_ALG } from "./constants.js";
import { publicKeyObject, type TpmtPublic } from "./public.js";

export interface TpmtSignatureEcdsa {
  readonly sigAlg: typeof TPM_ALG.ECDSA;
  readonly hashAlg: number;
  readonly r: Uint8Array;
  readonly s: Uint8Array;
}

export interface TpmtSignatureRsa {
  readonly sigAlg: typeof TPM_ALG.RSASSA | typeof TPM_ALG.RSAPSS;
  readonly hashAlg: number;
  readonly sig: Uint8Array;
}

/** TPMT_SIGNATURE for the schemes a registrar accepts (ECDSA, RSASSA, RSAPSS). */
export type TpmtSignature = TpmtSignatureEcdsa | TpmtSignatureRsa;

/**
 * Decodes a TPMT_SIGNATURE. Other schemes (HMAC, ECDAA, SM2, ECSCHNORR, NULL) are refused as malformed
 * since nothing here can verify them. @throws ERR_TPM_STRUCT_MALFORMED
 */
export function decodeTpmtSignature(bytes: Uint8Array): TpmtSignature {
  return guardDecode("TPMT_SIGNATURE", bytes, (buf) => {
    const rd = new TpmReader(buf, "TPMT_SIGNATURE");
    const sigAlg = rd.u16("sigAlg");
    let out: TpmtSignature;
    if (sigAlg === TPM_ALG.ECDSA) {
      const hashAlg = rd.u16("signature.ecdsa.hash");
      const r = rd.tpm2b("signature.ecdsa.signatureR", MAX_ECC_KEY_BYTES, 1);
      const s = rd.tpm2b("signature.ecdsa.signatureS", MAX_ECC_KEY_BYTES, 1);
      out = { sigAlg, hashAlg, r, s };
    } else if (sigAlg === TPM_ALG.RSASSA || sigAlg === TPM_ALG.RSAPSS) {
      const hashAlg = rd.u16("signature.rsa.hash");
      const sig = rd.tpm2b("signature.rsa.sig", MAX_RSA_KEY_BYTES, 1);
      out = { sigAlg, hashAlg, sig };
    } else {
      throw malformed("TPMT_SIGNATURE", "sigAlg", `0x${sigAlg.toString(16)} is not ECDSA, RSASSA or RSAPSS`);
    }
    rd.end();
    return out;
  });
}

export function encodeTpmtSignature(sig: TpmtSignature): Uint8Array {
  const w = new TpmWriter().u16(sig.sigAlg).u16(sig.hashAlg);
  if (sig.sigAlg === TPM_ALG.ECDSA) w.tpm2b(sig.r, "signatureR").tpm2b(sig.s, "signatureS");
  else w.tpm2b(sig.sig, "sig");
  return w.finish();
}

function fixedWidth(v: Uint8Array, size: number): Uint8Array | undefined {
  let start = 0;
  while (v.length - start > size && v[start] === 0) start++;
  const t = v.subarray(start);
  if (t.length > size) return undefined;
  const out = new Uint8Array(size);
  out.set(t, size - t.length);
  return out;
}

/** Why a signature did not verify (for `cause`; callers expose only a generic message). */
export type SignatureFailure =
  | "scheme-key-mismatch"
  | "scheme-not-key-scheme"
  | "weak-or-unknown-hash"
  | "bad-signature";

/**
 * Verifies `sig` over `message` with the signer's TPMT_PUBLIC. The signature scheme must suit the key
 * type, must equal the key's own scheme when the key has one (a restricted AK is bound to it), and the
 * hash must be SHA-256/384/512. Returns `ok` or the reason it failed; never throws on a bad signature.
 * @throws ERR_TPM_STRUCT_MALFORMED when the signer public is not a usable key.
 */
export function verifyTpmSignature(
  signer: TpmtPublic,
  message: Uint8Array,
  sig: TpmtSignature,
): { ok: true } | { ok: false; reason: SignatureFailure } {
  const key = publicKeyObject(signer);
  const keyScheme = signer.parameters.scheme;
  if (
    keyScheme.scheme !== TPM_ALG.NULL &&
    (keyScheme.scheme !== sig.sigAlg || keyScheme.hashAlg !== sig.hashAlg)
  ) {
    return { ok: false, reason: "scheme-not-key-scheme" };
  }
  const h = hashInfo(sig.hashAlg);
  if (h === undefined || h.name === "sha1") return { ok: false, reason: "weak-or-unknown-hash" };
  let good = false;
  try {
    if (sig.sigAlg === TPM_ALG.ECDSA) {
      if (signer.type !== TPM_ALG.ECC) return { ok: false, reason: "scheme-key-mismatch" };
      const curve = curveInfo(signer.parameters.curveId);
      if (curve === undefined) return { ok: false, reason: "scheme-key-mismatch" };
      const r = fixedWidth(sig.r, curve.coordBytes);
      const s = fixedWidth(sig.s, curve.coordBytes);
      if (r === undefined || s === undefined) return { ok: false, reason: "bad-signature" };
      good = cryptoVerify(h.name, message, { key, dsaEncoding: "ieee-p1363" }, Buffer.concat([r, s]));
    } else {
      if (signer.type !== TPM_ALG.RSA) return { ok: false, reason: "scheme-key-mismatch" };
      good =
        sig.sigAlg === TPM_ALG.RSASSA
          ? cryptoVerify(h.name, message, { key, padding: constants.RSA_PKCS1_PADDING }, sig.sig)
          : cryptoVerify(
              h.name,
              message,
              // The TPM picks the salt length (digest size on current TPMs); accept what the encoding says.
              { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_AUTO },
              sig.sig,
            );
    }
  } catch {
    good = false;
  }
  return good ? { ok: true } : { ok: false, reason: "bad-signature" };
}
