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

// Every decoder gets random bytes and mutated valid structures: the only allowed outcomes are success
// (and then a byte-exact re-encode) or M2mError ERR_TPM_STRUCT_MALFORMED. Bounded runs; no timing asserts.

const RUNS = 5000;
const hx = (s: string): Uint8Array => new Uint8Array(Buffer.from(s, "hex"));
const REAL = {
  rsaEkTpmt:
    "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100a065fb4af0c10647033a17a5f52c4d3d608e468462214aff2d95683e4d699bdbbe00eac61183ae6b751d926009fc632c1e4ba146ffed7b5523507d07306a9ac6ce52877c12660e8c599ea7003ab4faa0b0065437ce4bee5d7d90b478e4b02973b0350b8a40cd24d4446b7e5f9c9f8a83f7b6f883a842a2452f556ea0524586143199ee25604852bdc9f16ae760b30dfd685557b22b3a92b8dfe03eee088da7962b49a2386197f1be92bab1a27eaeb70ce68b8d7ca461822c005bc762ecf842667accdc039f0370ef96240b976ece7100f1505329a8c82ba8a7020601a441bc15f1111640301718d82479dd38724b685a0ad3ec96abfb488e9f511fd753df1721",
  eccEkTpmt:
    "0023000c000300f20030b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12000601000043001000040010003043d009ee4626610a24db6dabb978c3f9270f7a3a482e146953d1f5f2ddf48cf41f4d6796c51ab9cd114e4ed7f7f778ed0030b2947125770ca94e8b3352dfc41a0e2fc422aaf114eea897f12dbaa3964397e879aebc5da90e81971079d12bd3c62d60",
  akTpm2b:
    "00580023000b00050472000000100018000b0003001000206c24486fcac09dc1f698fd1fe6ffb5b1bdd92125faa3ae92f519904c7b21b7b30020bf373f0d2fd1d4af4e58a37815ccd631e6200cd068771220afaf2dcdab7060d2",
  devTpm2b:
    "00580023000b00040472000000100018000b000300100020ab93cb23e29e2494c601e8cfa977c09a307f275930353638aef1125c941b009d0020cc8fec5c893d9a920d5d84c127678c8f251f3aac0245f55a3fe200544806dd04",
  attest:
    "ff54434780170022000ba586b28aafa5b54c88266adc5a35d93f151be5abe9d3ec7d5364c4844adb2fbb000400ff55aa00000000000021b500000002000000000120191023001636360022000b122c614f9e739f26a52a9d2d15e9633061d8a643c653e317f30e94c30138140b0022000bf78f65cd08a2fc88537d66d7c5220985c3f3045f314346275e5e5aa1bc8e71e6",
  sig: "0018000b00204d611c56a1f6c81114f19721818b923aab838dedffe7263295b6a44864bf4e3e00204ece0c5daf4192e4a610ec54848b3d2e94c3b062c6d282f38d97f6f57886ff6a",
} as const;

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
