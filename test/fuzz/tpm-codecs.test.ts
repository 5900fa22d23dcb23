import { generateKeyPairSync, randomBytes, sign } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { M2mError } from "../../src/core/errors.js";
import {
  type ActivationEvidence,
  akQualifiedNameUnderEk,
  beginActivation,
  TPM_VERIFY_ERRORS,
  verifyActivationAndCertify,
} from "../../src/registrar/verifier/tpm-verifier.js";
import { decodeTpmsAttest, encodeTpmsAttest } from "../../src/tpm/attest.js";
import { TPMA_OBJECT as A, TPM_ALG } from "../../src/tpm/constants.js";
import { decodeCredentialBlob, decodeIdObject, encodeCredentialBlob } from "../../src/tpm/credential-blob.js";
import { activateCredentialWithPrivateKey, makeCredential } from "../../src/tpm/make-credential.js";
import {
  computeName,
  decodeTpm2bPublic,
  decodeTpmtPublic,
  encodeTpm2bPublic,
  encodeTpmtPublic,
  publicAreaFromKey,
  toSpki,
} from "../../src/tpm/public.js";
import { decodeTpmtSignature, encodeTpmtSignature } from "../../src/tpm/signature.js";
import { hx, SWTPM_KNOWN_ANSWERS } from "../kit/tpm-known-answers.js";

// Every decoder gets random bytes and mutated valid structures: the only allowed outcomes are success
// (and then a byte-exact re-encode) or M2mError ERR_TPM_STRUCT_MALFORMED. Bounded runs; no timing asserts.

const RUNS = 5000;
const REAL = SWTPM_KNOWN_ANSWERS;

const ALLOWED_VERIFY_CODES: ReadonlySet<string> = new Set(Object.values(TPM_VERIFY_ERRORS));

/** Runs `fn`; returns its value, or undefined when it threw ERR_TPM_STRUCT_MALFORMED; rethrows anything else. */
function malformedOr<T>(fn: () => T): T | undefined {
  try {
    return fn();
  } catch (err) {
    if (err instanceof M2mError && err.code === "ERR_TPM_STRUCT_MALFORMED" && err.retry === "permanent") {
      return undefined;
    }
    throw new Error(
      `unexpected failure: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`,
    );
  }
}

type Mutation =
  | { kind: "flip"; at: number; bit: number }
  | { kind: "truncate"; at: number }
  | { kind: "insert"; at: number; bytes: Uint8Array }
  | { kind: "u16"; at: number; value: number }
  | { kind: "delete"; at: number; n: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant("truncate" as const), at: fc.nat() }),
  fc.record({
    kind: fc.constant("insert" as const),
    at: fc.nat(),
    bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }),
  }),
  fc.record({
    kind: fc.constant("u16" as const),
    at: fc.nat(),
    value: fc.oneof(
      fc.integer({ min: 0, max: 0xffff }),
      fc.constantFrom(0, 1, 0x10, 0x20, 0x7fff, 0x8000, 0xffff),
    ),
  }),
  fc.record({ kind: fc.constant("delete" as const), at: fc.nat(), n: fc.integer({ min: 1, max: 4 }) }),
);

function apply(seed: Uint8Array, ms: readonly Mutation[]): Uint8Array {
  let b = Buffer.from(seed);
  for (const m of ms) {
    const at = b.length === 0 ? 0 : m.at % b.length;
    if (m.kind === "flip" && b.length > 0) b[at] = (b[at] ?? 0) ^ (1 << m.bit);
    else if (m.kind === "truncate") b = b.subarray(0, at);
    else if (m.kind === "insert") b = Buffer.concat([b.subarray(0, at), m.bytes, b.subarray(at)]);
    else if (m.kind === "u16" && b.length >= 2) b.writeUInt16BE(m.value, Math.min(at, b.length - 2));
    else if (m.kind === "delete") b = Buffer.concat([b.subarray(0, at), b.subarray(at + m.n)]);
  }
  return new Uint8Array(b);
}

function inputs(seeds: readonly Uint8Array[]): fc.Arbitrary<Uint8Array> {
  return fc.oneof(
    fc.uint8Array({ maxLength: 700 }),
    fc
      .tuple(fc.constantFrom(...seeds), fc.array(mutation, { minLength: 1, maxLength: 4 }))
      .map(([s, ms]) => apply(s, ms)),
  );
}

const sym = { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB };
const ekAttrs = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.restricted | A.decrypt;
const rsaPub = publicAreaFromKey(generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey, {
  objectAttributes: ekAttrs,
  symmetric: sym,
  scheme: { scheme: TPM_ALG.NULL, hashAlg: TPM_ALG.NULL },
});
const eccPub = publicAreaFromKey(generateKeyPairSync("ec", { namedCurve: "prime256v1" }).publicKey, {
  objectAttributes: A.sign,
  scheme: { scheme: TPM_ALG.ECDAA, hashAlg: TPM_ALG.SHA256, count: 3 },
  kdf: { scheme: TPM_ALG.KDF1_SP800_108, hashAlg: TPM_ALG.SHA256 },
});
const tpmtSeeds = [
  hx(REAL.rsaEkTpmt),
  hx(REAL.eccEkTpmt),
  encodeTpmtPublic(rsaPub),
  encodeTpmtPublic(eccPub),
];
const tpm2bSeeds = [
  hx(REAL.akTpm2b),
  hx(REAL.devTpm2b),
  encodeTpm2bPublic(rsaPub),
  encodeTpm2bPublic(eccPub),
];
const realAttest = decodeTpmsAttest(hx(REAL.attest));
const attestSeeds = [
  hx(REAL.attest),
  encodeTpmsAttest({
    ...realAttest,
    type: 0x8018,
    attested: {
      kind: "quote",
      pcrSelect: [
        { hash: TPM_ALG.SHA256, pcrSelect: Uint8Array.of(0xff, 0xff, 0xff) },
        { hash: TPM_ALG.SHA1, pcrSelect: Uint8Array.of(1, 0, 0) },
      ],
      pcrDigest: new Uint8Array(32),
    },
  }),
];
const sigSeeds = [
  hx(REAL.sig),
  encodeTpmtSignature({
    sigAlg: TPM_ALG.RSASSA,
    hashAlg: TPM_ALG.SHA256,
    sig: new Uint8Array(randomBytes(256)),
  }),
];
const name = computeName(decodeTpm2bPublic(hx(REAL.akTpm2b)));
const mc = makeCredential(rsaPub, name, randomBytes(32));
const blobSeeds = [mc.blob, makeCredential(decodeTpmtPublic(hx(REAL.eccEkTpmt)), name, randomBytes(32)).blob];

const same = (a: Uint8Array, b: Uint8Array) => expect(Buffer.from(a).equals(Buffer.from(b))).toBe(true);

describe("fuzz: TPM codecs only succeed (canonically) or fail with ERR_TPM_STRUCT_MALFORMED", () => {
  it("TPMT_PUBLIC (+ Name, SPKI on whatever decodes)", () => {
    fc.assert(
      fc.property(inputs(tpmtSeeds), (b) => {
        const p = malformedOr(() => decodeTpmtPublic(b));
        if (p === undefined) return;
        same(encodeTpmtPublic(p), b);
        malformedOr(() => computeName(p));
        malformedOr(() => toSpki(p));
      }),
      { numRuns: RUNS },
    );
  });

  it("TPM2B_PUBLIC", () => {
    fc.assert(
      fc.property(inputs(tpm2bSeeds), (b) => {
        const p = malformedOr(() => decodeTpm2bPublic(b));
        if (p !== undefined) same(encodeTpm2bPublic(p), b);
      }),
      { numRuns: RUNS },
    );
  });

  it("TPMS_ATTEST", () => {
    fc.assert(
      fc.property(inputs(attestSeeds), (b) => {
        const a = malformedOr(() => decodeTpmsAttest(b));
        if (a !== undefined) same(encodeTpmsAttest(a), b);
      }),
      { numRuns: RUNS },
    );
  });

  it("TPMT_SIGNATURE", () => {
    fc.assert(
      fc.property(inputs(sigSeeds), (b) => {
        const s = malformedOr(() => decodeTpmtSignature(b));
        if (s !== undefined) same(encodeTpmtSignature(s), b);
      }),
      { numRuns: RUNS },
    );
  });

  it("credential blob and TPMS_ID_OBJECT", () => {
    fc.assert(
      fc.property(inputs(blobSeeds), (b) => {
        const c = malformedOr(() => decodeCredentialBlob(b));
        if (c === undefined) return;
        same(encodeCredentialBlob(c), b);
        malformedOr(() => decodeIdObject(c.idObject));
      }),
      { numRuns: RUNS },
    );
  });

  it("software ActivateCredential on mutated blobs never throws a foreign error", () => {
    const pair = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const ek = publicAreaFromKey(pair.publicKey, { objectAttributes: ekAttrs, symmetric: sym });
    const seed = makeCredential(ek, name, randomBytes(32)).blob;
    fc.assert(
      fc.property(inputs([seed]), (b) => {
        const c = malformedOr(() => decodeCredentialBlob(b));
        if (c === undefined) return;
        try {
          activateCredentialWithPrivateKey(ek, pair.privateKey, name, c);
        } catch (err) {
          // Integrity failure, malformed point/ID object, or an off-curve point: all typed errors.
          expect(err).toBeInstanceOf(M2mError);
        }
      }),
      { numRuns: 1000 },
    );
  });
});

describe("fuzz: the verifier only fails with its own codes", () => {
  const akPair = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const akAttrs = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.restricted | A.sign;
  const ak = publicAreaFromKey(akPair.publicKey, {
    objectAttributes: akAttrs,
    scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 },
  });
  const dev = decodeTpm2bPublic(hx(REAL.devTpm2b));
  const ch = beginActivation(rsaPub, computeName(ak));
  const attestBytes = encodeTpmsAttest({
    ...realAttest,
    qualifiedSigner: akQualifiedNameUnderEk(rsaPub, ak),
    extraData: ch.nonce,
    attested: { kind: "certify", name: computeName(dev), qualifiedName: computeName(dev) },
  });
  const p1363 = sign("sha256", attestBytes, { key: akPair.privateKey, dsaEncoding: "ieee-p1363" });
  const base: ActivationEvidence = {
    expectedSecret: ch.secret,
    recoveredSecret: ch.secret.reveal(),
    ekPublic: rsaPub,
    akPublic: encodeTpm2bPublic(ak),
    nonce: ch.nonce,
    attestBytes,
    signatureBytes: encodeTpmtSignature({
      sigAlg: TPM_ALG.ECDSA,
      hashAlg: TPM_ALG.SHA256,
      r: new Uint8Array(p1363.subarray(0, 32)),
      s: new Uint8Array(p1363.subarray(32)),
    }),
    devicePublic: hx(REAL.devTpm2b),
  };

  it("the unmutated evidence verifies", () => {
    expect(verifyActivationAndCertify(base).deviceName).toEqual(computeName(dev));
  });

  const fields = [
    "akPublic",
    "attestBytes",
    "signatureBytes",
    "devicePublic",
    "recoveredSecret",
    "nonce",
  ] as const;

  it("mutating any one evidence field", () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...fields),
        fc.array(mutation, { minLength: 1, maxLength: 3 }),
        (field, ms) => {
          const ev = { ...base, [field]: apply(base[field], ms) };
          try {
            verifyActivationAndCertify(ev);
          } catch (err) {
            expect(err).toBeInstanceOf(M2mError);
            expect(ALLOWED_VERIFY_CODES.has((err as M2mError).code)).toBe(true);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});
