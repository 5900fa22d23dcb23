import { createHash, createHmac } from "node:crypto";
import { malformed, TpmWriter } from "./bytes.js";
import { hashInfo } from "./constants.js";

function hashName(alg: number): string {
  const h = hashInfo(alg);
  if (h === undefined) throw malformed("KDF", "hashAlg", `0x${alg.toString(16)} is not supported`);
  return h.name;
}

/** The label as the TPM hashes it: ASCII bytes followed by a terminating NUL octet. */
function labelBytes(label: string): Uint8Array {
  return Buffer.concat([Buffer.from(label, "ascii"), Uint8Array.of(0)]);
}

function truncateBits(out: Uint8Array, bits: number): Uint8Array {
  const bytes = Math.ceil(bits / 8);
  const r = Uint8Array.prototype.slice.call(out, 0, bytes);
  const extra = bytes * 8 - bits;
  // Spec: the excess high-order bits of the first octet are cleared.
  if (extra > 0 && r.length > 0) r[0] = (r[0] ?? 0) & (0xff >> extra);
  return r;
}

const u32 = (n: number): Uint8Array => new TpmWriter().u32(n).finish();

/**
 * The counter loop KDFa and KDFe share: concatenates `block(hashName, [i]32, label ‖ 00)` for
 * i = 1, 2, … until `bits` are covered, then truncates to `bits`.
 */
function counterKdf(
  kdf: string,
  hashAlg: number,
  label: string,
  bits: number,
  block: (name: string, counter: Uint8Array, lbl: Uint8Array) => Buffer,
): Uint8Array {
  if (!Number.isInteger(bits) || bits <= 0 || bits > 8192) throw malformed(kdf, "bits", "out of range");
  const name = hashName(hashAlg);
  const lbl = labelBytes(label);
  const need = Math.ceil(bits / 8);
  const parts: Uint8Array[] = [];
  let have = 0;
  for (let i = 1; have < need; i++) {
    const d = block(name, u32(i), lbl);
    parts.push(d);
    have += d.length;
  }
  return truncateBits(Buffer.concat(parts), bits);
}

/**
 * KDFa (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode with HMAC):
 * K(i) = HMAC(key, [i]32 ‖ label ‖ 00 ‖ contextU ‖ contextV ‖ [bits]32).
 */
export function kdfa(
  hashAlg: number,
  key: Uint8Array,
  label: string,
  contextU: Uint8Array,
  contextV: Uint8Array,
  bits: number,
): Uint8Array {
  return counterKdf("KDFa", hashAlg, label, bits, (name, counter, lbl) =>
    createHmac(name, key)
      .update(counter)
      .update(lbl)
      .update(contextU)
      .update(contextV)
      .update(u32(bits))
      .digest(),
  );
}

/**
 * KDFe (TPM 2.0 Part 1 §11.4.10.3, SP 800-56A concatenation KDF):
 * K(i) = H([i]32 ‖ Z ‖ label ‖ 00 ‖ partyUInfo ‖ partyVInfo).
 */
export function kdfe(
  hashAlg: number,
  z: Uint8Array,
  label: string,
  partyUInfo: Uint8Array,
  partyVInfo: Uint8Array,
  bits: number,
): Uint8Array {
  return counterKdf("KDFe", hashAlg, label, bits, (name, counter, lbl) =>
    createHash(name).update(counter).update(z).update(lbl).update(partyUInfo).update(partyVInfo).digest(),
  );
}
