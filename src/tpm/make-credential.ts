import {
  constants,
  createCipheriv,
  createDecipheriv,
  createECDH,
  createHmac,
  createPrivateKey,
  diffieHellman,
  type KeyObject,
  privateDecrypt,
  publicEncrypt,
  randomBytes,
  timingSafeEqual,
} from "node:crypto";
import { M2mError } from "../core/errors.js";
import { guardDecode, TpmReader, TpmWriter, tpm2b } from "./bytes.js";
import { curveInfo, hashInfo, MAX_ECC_KEY_BYTES, TPM_ALG, TPMA_OBJECT } from "./constants.js";
import { type CredentialBlob, decodeIdObject, encodeCredentialBlob } from "./credential-blob.js";
import { kdfa, kdfe } from "./kdf.js";
import { publicKeyObject, type TpmtPublic } from "./public.js";

/** The EK (or other protector) cannot be used for MakeCredential (not a restricted AES-CFB storage key). */
export const ERR_TPM_CREDENTIAL_UNSUPPORTED = "ERR_TPM_CREDENTIAL_UNSUPPORTED";

export interface MakeCredentialResult extends CredentialBlob {
  /** tpm2-tools file format, ready for `tpm2_activatecredential -i`. */
  readonly blob: Uint8Array;
}

/** Test seams only: fixed randomness for known-answer tests. Production callers pass nothing. */
export interface MakeCredentialOptions {
  /** RSA protector: the seed (must be nameAlg digest size). */
  readonly seed?: Uint8Array;
  /** ECC protector: the ephemeral private key (on the protector's curve). */
  readonly ephemeralPrivateKey?: KeyObject;
}

function unsupported(message: string): M2mError {
  return new M2mError(ERR_TPM_CREDENTIAL_UNSUPPORTED, "permanent", message);
}

interface ProtectorParams {
  readonly nameAlg: number;
  readonly digestSize: number;
  readonly symKeyBits: number;
}

function protectorParams(ek: TpmtPublic): ProtectorParams {
  const h = hashInfo(ek.nameAlg);
  if (h === undefined || h.name === "sha1") throw unsupported("protector nameAlg is not SHA-256/384/512");
  const sym = ek.parameters.symmetric;
  if (sym.algorithm !== TPM_ALG.AES || sym.mode !== TPM_ALG.CFB || ![128, 192, 256].includes(sym.keyBits)) {
    throw unsupported("protector symmetric definition is not AES-CFB");
  }
  const need = TPMA_OBJECT.restricted | TPMA_OBJECT.decrypt;
  if ((ek.objectAttributes & need) !== need || (ek.objectAttributes & TPMA_OBJECT.sign) !== 0) {
    throw unsupported("protector is not a restricted decryption (storage) key");
  }
  return { nameAlg: ek.nameAlg, digestSize: h.size, symKeyBits: sym.keyBits };
}

function eccPointBytes(x: Uint8Array, y: Uint8Array): Uint8Array {
  return new TpmWriter().tpm2b(x).tpm2b(y).finish();
}

function jwkCoord(key: KeyObject, c: "x" | "y", size: number): Uint8Array {
  const jwk = key.export({ format: "jwk" });
  const v = jwk[c];
  if (typeof v !== "string") throw unsupported("ephemeral key has no coordinates");
  const b = Buffer.from(v, "base64url");
  const out = new Uint8Array(size);
  out.set(b, size - b.length);
  return out;
}

/** A big-endian coordinate at its curve's fixed size. @throws ERR_TPM_CREDENTIAL_UNSUPPORTED when longer. */
function leftPad(b: Uint8Array, size: number): Buffer {
  if (b.length > size) throw unsupported("protector point coordinate is longer than its curve allows");
  const out = Buffer.alloc(size);
  out.set(b, size - b.length);
  return out;
}

/** Seed and encrypted secret: RSA-OAEP("IDENTITY") or ECDH + KDFe("IDENTITY") (Part 1 §24.4, §B.10.3, §C.6.4). */
function secretAndSeed(ek: TpmtPublic, p: ProtectorParams, opts: MakeCredentialOptions) {
  const ekKey = publicKeyObject(ek);
  const hashName = hashInfo(p.nameAlg)?.name ?? "sha256";
  if (ek.type === TPM_ALG.RSA) {
    const seed = opts.seed ?? randomBytes(p.digestSize);
    if (seed.length !== p.digestSize) throw unsupported("seed size must equal the nameAlg digest size");
    const encryptedSecret = publicEncrypt(
      {
        key: ekKey,
        padding: constants.RSA_PKCS1_OAEP_PADDING,
        oaepHash: hashName,
        oaepLabel: Buffer.from("IDENTITY\0", "ascii"),
      },
      seed,
    );
    return { seed: new Uint8Array(seed), encryptedSecret: new Uint8Array(encryptedSecret) };
  }
  const curve = curveInfo(ek.parameters.curveId);
  if (curve === undefined) throw unsupported("protector curve is not supported");
  let z: Uint8Array;
  let ex: Uint8Array;
  let ey: Uint8Array;
  if (opts.ephemeralPrivateKey !== undefined) {
    const eph = opts.ephemeralPrivateKey;
    z = diffieHellman({ privateKey: eph, publicKey: ekKey });
    ex = jwkCoord(eph, "x", curve.coordBytes);
    ey = jwkCoord(eph, "y", curve.coordBytes);
  } else {
    // Not generateKeyPairSync + a JWK export: on Node 20 a registrar doing that once per enrolment
    // deadlocks under a storm (GC finalises a KeyGenJob while ExportJWK holds the key's mutex; seen
    // after ≈ 700 enrolments: main thread in __lll_lock_wait under ~KeyGenJob inside ExportJWKEcKey,
    // accept queue full, every device timing out). ECDH creates no KeyGenJob and no KeyObject.
    const ecdh = createECDH(curve.nodeCurve);
    ecdh.generateKeys();
    // ekKey above already proved the EK's point is on the curve.
    const ekPoint = Buffer.concat([
      Buffer.of(0x04),
      leftPad(ek.unique.x, curve.coordBytes),
      leftPad(ek.unique.y, curve.coordBytes),
    ]);
    z = ecdh.computeSecret(ekPoint);
    const point = ecdh.getPublicKey(); // 0x04 ‖ X ‖ Y, each coordBytes long
    ex = new Uint8Array(point.subarray(1, 1 + curve.coordBytes));
    ey = new Uint8Array(point.subarray(1 + curve.coordBytes));
  }
  const seed = kdfe(p.nameAlg, z, "IDENTITY", ex, ek.unique.x, p.digestSize * 8);
  return { seed, encryptedSecret: eccPointBytes(ex, ey) };
}

/** symKey/HMAC key derivation and the outer wrap shared by make and (software) activate. */
function wrapKeys(p: ProtectorParams, seed: Uint8Array, objectName: Uint8Array) {
  const symKey = kdfa(p.nameAlg, seed, "STORAGE", objectName, new Uint8Array(0), p.symKeyBits);
  const hmacKey = kdfa(p.nameAlg, seed, "INTEGRITY", new Uint8Array(0), new Uint8Array(0), p.digestSize * 8);
  return { symKey, hmacKey, cipher: `aes-${p.symKeyBits}-cfb` };
}

/**
 * TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6), for a registrar without a TPM.
 * Protects `credential` so that only a TPM holding the private part of `ekPublic` AND a loaded object
 * with Name `objectName` (the AK) can recover it with TPM2_ActivateCredential.
 *
 * RSA EK: seed random, encrypted with RSA-OAEP(nameAlg, label "IDENTITY\0").
 * ECC EK: ephemeral ECDH on the EK's curve, seed = KDFe(nameAlg, Z.x, "IDENTITY", eph.x, ek.x).
 * Then symKey = KDFa(nameAlg, seed, "STORAGE", name, ∅, symBits); encIdentity = AES-CFB(IV 0) of
 * TPM2B(credential); hmacKey = KDFa(nameAlg, seed, "INTEGRITY", ∅, ∅, digestBits);
 * idObject = TPM2B(HMAC(hmacKey, encIdentity ‖ name)) ‖ encIdentity.
 *
 * @throws ERR_TPM_CREDENTIAL_UNSUPPORTED when the EK is not a restricted AES-CFB decryption key, its
 *   nameAlg is weak/unknown, or the credential is empty or longer than the nameAlg digest.
 * @throws ERR_TPM_STRUCT_MALFORMED when the EK public is not a valid key.
 */
export function makeCredential(
  ekPublic: TpmtPublic,
  objectName: Uint8Array,
  credential: Uint8Array,
  opts: MakeCredentialOptions = {},
): MakeCredentialResult {
  const p = protectorParams(ekPublic);
  if (credential.length === 0 || credential.length > p.digestSize) {
    throw unsupported("credential must be 1..digest-size bytes");
  }
  if (objectName.length < 3) throw unsupported("object name is too short");
  const { seed, encryptedSecret } = secretAndSeed(ekPublic, p, opts);
  const { symKey, hmacKey, cipher } = wrapKeys(p, seed, objectName);
  const c = createCipheriv(cipher, symKey, Buffer.alloc(16));
  const encIdentity = Buffer.concat([c.update(tpm2b(credential)), c.final()]);
  const hmacName = hashInfo(p.nameAlg)?.name ?? "sha256";
  const outerHmac = createHmac(hmacName, hmacKey).update(encIdentity).update(objectName).digest();
  const idObject = new Uint8Array(Buffer.concat([tpm2b(outerHmac), encIdentity]));
  const out: CredentialBlob = { idObject, encryptedSecret };
  return { ...out, blob: encodeCredentialBlob(out) };
}

/**
 * TPM2_ActivateCredential in software, given the protector's PRIVATE key. Reference/test use only: a
 * real EK private key never leaves its TPM. Returns the credential.
 * @throws ERR_TPM_CREDENTIAL_UNSUPPORTED on an integrity failure (wrong name, wrong key, tampering).
 */
export function activateCredentialWithPrivateKey(
  ekPublic: TpmtPublic,
  ekPrivate: KeyObject | string,
  objectName: Uint8Array,
  blob: CredentialBlob,
): Uint8Array {
  const p = protectorParams(ekPublic);
  const priv = typeof ekPrivate === "string" ? createPrivateKey(ekPrivate) : ekPrivate;
  const hashName = hashInfo(p.nameAlg)?.name ?? "sha256";
  let seed: Uint8Array;
  if (ekPublic.type === TPM_ALG.RSA) {
    seed = privateDecrypt(
      {
        key: priv,
        padding: constants.RSA_PKCS1_OAEP_PADDING,
        oaepHash: hashName,
        oaepLabel: Buffer.from("IDENTITY\0", "ascii"),
      },
      blob.encryptedSecret,
    );
  } else {
    const curve = curveInfo(ekPublic.parameters.curveId);
    if (curve === undefined) throw unsupported("protector curve is not supported");
    const { x, y } = guardDecode("TPMS_ECC_POINT", blob.encryptedSecret, (buf) => {
      const r = new TpmReader(buf, "TPMS_ECC_POINT");
      const pt = { x: r.tpm2b("x", MAX_ECC_KEY_BYTES), y: r.tpm2b("y", MAX_ECC_KEY_BYTES) };
      r.end();
      return pt;
    });
    const ephPub = publicKeyObject({
      ...ekPublic,
      unique: { x, y },
    });
    const z = diffieHellman({ privateKey: priv, publicKey: ephPub });
    seed = kdfe(p.nameAlg, z, "IDENTITY", x, ekPublic.unique.x, p.digestSize * 8);
  }
  const { symKey, hmacKey, cipher } = wrapKeys(p, seed, objectName);
  const { integrityHmac, encIdentity } = decodeIdObject(blob.idObject);
  const expect = createHmac(hashName, hmacKey).update(encIdentity).update(objectName).digest();
  if (expect.length !== integrityHmac.length || !timingSafeEqual(expect, integrityHmac)) {
    throw unsupported("credential integrity check failed");
  }
  const d = createDecipheriv(cipher, symKey, Buffer.alloc(16));
  const plain = Buffer.concat([d.update(encIdentity), d.final()]);
  const r = new TpmReader(plain, "TPM2B_DIGEST");
  const cred = r.tpm2b("credential", p.digestSize);
  r.end();
  return cred;
}
