import { createHash } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { M2mError } from "../../core/errors.js";
import { Secret } from "../../core/secret.js";
import { decodeTpmsAttest } from "../../tpm/attest.js";
import { type EkAuthorization, ekAuthorizationOf } from "../../tpm/ek-policy.js";
import { readPublicOrUndefined } from "./read-public.js";
import type { TpmRunner, TpmTx } from "./runner.js";
import {
  ALG,
  ATTR,
  attrNames,
  CURVE,
  objectName,
  type ParsedPublic,
  publicKeyOf,
  toTpm2bPublic,
} from "./tpmt.js";
import { hex32, listHandles, withTransientCleanup } from "./transient.js";

/**
 * Agent-side TPM attestation operations used by enrolment: EK certificates and publics, a restricted
 * noDA attestation key (AK) under the RSA EK, credential activation (TPM2_ActivateCredential), and
 * TPM2_Certify of the device key with a verifier nonce (raw command, since tpm2_certify 5.4 has no
 * qualifying-data option).
 *
 * EK authorization is chosen from the EK's own public area (src/tpm/ek-policy.ts): low-range EKs (L-1
 * RSA-2048, L-2 ECC P-256; authPolicy = TCG PolicyA) through a PolicySecret(TPM_RH_ENDORSEMENT) session;
 * high-range EKs (H-1 RSA-2048, H-2 P-256, swtpm's H-3 P-384 at 0x81010016, …; authPolicy = PolicyB)
 * through PolicySecret + PolicyOR(PolicyA, PolicyC) in a session of the EK's nameAlg; an EK with another
 * policy but userWithAuth set with its empty auth value. Anything else fails with
 * ERR_TPM_EK_POLICY_UNSUPPORTED.
 */

export type EkKind = "rsa-2048" | "ecc-p256" | "ecc-p384" | "ecc-p521" | "rsa-3072" | "rsa-4096" | "other";

/** TCG EK Credential Profile 2.x standard NV indices of EK certificates. */
export const EK_CERT_NV_INDICES: readonly { index: number; kind: EkKind }[] = [
  { index: 0x01c00002, kind: "rsa-2048" }, // L-1
  { index: 0x01c0000a, kind: "ecc-p256" }, // L-2
  { index: 0x01c00012, kind: "rsa-2048" }, // H-1
  { index: 0x01c00014, kind: "ecc-p256" }, // H-2
  { index: 0x01c00016, kind: "ecc-p384" }, // H-3
  { index: 0x01c00018, kind: "ecc-p521" }, // H-4
  { index: 0x01c0001c, kind: "rsa-3072" }, // H-6
  { index: 0x01c0001e, kind: "rsa-4096" }, // H-7
];

/** Conventional persistent EK handles (TCG Provisioning Guidance; swtpm puts its P-384 EK at 0x81010016). */
export const RSA_EK_HANDLE = 0x81010001;
export const ECC_EK_HANDLE = 0x81010002;
export const SWTPM_ECC_P384_EK_HANDLE = 0x81010016;

/** TCG PolicyA (SHA-256): TPM2_PolicySecret(TPM_RH_ENDORSEMENT). */
export const EK_POLICY_A_SHA256 = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";

export const AK_ATTRIBUTES =
  ATTR.fixedTPM |
  ATTR.fixedParent |
  ATTR.sensitiveDataOrigin |
  ATTR.userWithAuth |
  ATTR.restricted |
  ATTR.sign |
  ATTR.noDA;
const AK_ATTRIBUTES_TEXT = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda";

const TPM_RS_PW = 0x40000009;
const TPM_CC_CERTIFY = 0x00000148;
const TPM_CC_QUOTE = 0x00000158;
const TPM_ALG_SHA256 = 0x000b;
const TPM_ST_SESSIONS = 0x8002;
/** TPM2B_DATA holds at most sizeof(TPMT_HA) = 2 + 64 bytes. */
const MAX_QUALIFYING_DATA = 64;

export interface EkCertificate {
  readonly nvIndex: number;
  readonly kind: EkKind;
  /** DER as stored in NV (some TPMs pad it; the verifier parses the leading certificate). */
  readonly der: Uint8Array;
}

export interface TpmObjectPublic {
  readonly handle: number;
  /** TPMT_PUBLIC bytes as the TPM returns them. */
  readonly tpmtPublic: Uint8Array;
  /** TPM2B_PUBLIC = u16 size ‖ TPMT_PUBLIC (what tpm2_makecredential -u and the wire format take). */
  readonly tpm2bPublic: Uint8Array;
  /** SubjectPublicKeyInfo PEM. */
  readonly pem: string;
  /** Name = 000b ‖ SHA-256(TPMT_PUBLIC). */
  readonly name: Uint8Array;
  readonly objectAttributes: number;
}

export interface EkPublic extends TpmObjectPublic {
  readonly kind: EkKind;
  /** True when this call created and persisted the EK (it was absent). */
  readonly created: boolean;
  /** Whether `activateCredential` can use it (PolicyA EK). */
  readonly activationSupported: boolean;
}

export interface AkPublic extends TpmObjectPublic {
  readonly created: boolean;
}

export interface CertifyResult {
  /** TPMS_ATTEST bytes (the content of certifyInfo TPM2B_ATTEST). */
  readonly attest: Uint8Array;
  /** TPMT_SIGNATURE bytes over `attest` by the AK. */
  readonly signature: Uint8Array;
}

export interface QuoteResult {
  /** TPMS_ATTEST bytes (TPM2_Quote `quoted`). */
  readonly attest: Uint8Array;
  /** TPMT_SIGNATURE over `attest` by the AK. */
  readonly signature: Uint8Array;
  /** The quoted PCRs' values, ascending by index (as read by tpm2_quote with the quote). */
  readonly values: readonly Uint8Array[];
}

const BANK_SIZES = { sha1: 20, sha256: 32, sha384: 48 } as const;

function kindOf(pub: ParsedPublic): EkKind {
  if (pub.type === ALG.RSA) {
    return pub.keyBits === 2048
      ? "rsa-2048"
      : pub.keyBits === 3072
        ? "rsa-3072"
        : pub.keyBits === 4096
          ? "rsa-4096"
          : "other";
  }
  return pub.curveId === CURVE.P256
    ? "ecc-p256"
    : pub.curveId === CURVE.P384
      ? "ecc-p384"
      : pub.curveId === 0x0005
        ? "ecc-p521"
        : "other";
}

function toObjectPublic(handle: number, pub: ParsedPublic): TpmObjectPublic {
  return {
    handle,
    tpmtPublic: pub.bytes,
    tpm2bPublic: toTpm2bPublic(pub.bytes),
    pem: publicKeyOf(pub).export({ format: "pem", type: "spki" }).toString(),
    name: objectName(pub),
    objectAttributes: pub.objectAttributes,
  };
}

/** An EK: restricted decryption key, fixed to the TPM, generated inside it, admin by policy. */
function looksLikeEk(pub: ParsedPublic): boolean {
  const need =
    ATTR.fixedTPM |
    ATTR.fixedParent |
    ATTR.sensitiveDataOrigin |
    ATTR.adminWithPolicy |
    ATTR.restricted |
    ATTR.decrypt;
  return (pub.objectAttributes & need) === need && (pub.objectAttributes & ATTR.sign) === 0;
}

/** Activation/AK creation can authorize this EK: PolicyA, PolicyB, or userWithAuth with the empty auth. */
function ekUsable(pub: ParsedPublic): boolean {
  return ekAuthorizationOf(pub) !== undefined;
}

export class TpmAttestationOps {
  readonly #runner: TpmRunner;
  readonly akHandle: number;

  constructor(runner: TpmRunner, options: { akHandle?: number } = {}) {
    this.#runner = runner;
    this.akHandle = options.akHandle ?? 0x81000003;
  }

  /**
   * Reads every EK certificate present at the standard NV indices. A missing index is "absent", not
   * an error.
   */
  async readEkCertificates(): Promise<EkCertificate[]> {
    return this.#runner.exclusive(async (tx) => {
      const present = new Set(await listHandles(tx, "handles-nv-index"));
      const out: EkCertificate[] = [];
      for (const { index, kind } of EK_CERT_NV_INDICES) {
        if (!present.has(`0x${index.toString(16)}`)) continue;
        const file = tx.path("ekcert.der");
        try {
          await tx.run("tpm2_nvread", [hex32(index), "-o", file], { op: "nvread-ekcert" });
        } catch (err) {
          // An index can disappear between listing and reading, or be unreadable with owner auth.
          if (err instanceof M2mError && err.code === "ERR_TPM_HANDLE_MISSING") continue;
          throw err;
        }
        out.push({ nvIndex: index, kind, der: new Uint8Array(await readFile(file)) });
      }
      return out;
    });
  }

  /**
   * Reads the persisted EKs (0x8101xxxx). When no RSA EK is persisted, creates the standard RSA EK
   * (tpm2_createek, TCG template L-1) and persists it at 0x81010001 (`createIfAbsent`, default true).
   */
  async readEkPublics(options: { createIfAbsent?: boolean } = {}): Promise<EkPublic[]> {
    return this.#runner.exclusive(async (tx) => {
      const eks = await this.#persistedEks(tx);
      if (!eks.some((e) => e.kind === "rsa-2048") && options.createIfAbsent !== false) {
        await withTransientCleanup(tx, async () => {
          await tx.run(
            "tpm2_createek",
            [
              "-c",
              hex32(RSA_EK_HANDLE),
              ...(await tx.ownerAuthArgs("-w")),
              "-G",
              "rsa",
              "-u",
              tx.path("ek.pub"),
            ],
            {
              op: "createek",
              timeoutMs: Math.max(this.#runner.timeoutMs, 60_000),
            },
          );
        });
        const pub = await readPublicOrUndefined(tx, RSA_EK_HANDLE);
        if (pub === undefined || !looksLikeEk(pub)) {
          throw new M2mError("ERR_TPM_EK", "permanent", "could not create the RSA endorsement key");
        }
        eks.push({
          ...toObjectPublic(RSA_EK_HANDLE, pub),
          kind: kindOf(pub),
          created: true,
          activationSupported: ekUsable(pub),
        });
      }
      return eks;
    });
  }

  async #persistedEks(tx: TpmTx): Promise<EkPublic[]> {
    const handles = (await listHandles(tx, "handles-persistent"))
      .map((h) => Number(h))
      .filter((h) => h >= 0x81010000 && h <= 0x8101ffff);
    const out: EkPublic[] = [];
    for (const h of handles) {
      const pub = await readPublicOrUndefined(tx, h);
      if (pub === undefined || !looksLikeEk(pub)) continue;
      out.push({
        ...toObjectPublic(h, pub),
        kind: kindOf(pub),
        created: false,
        activationSupported: ekUsable(pub),
      });
    }
    return out;
  }

  /**
   * Creates the AK (restricted ECDSA-P256/SHA-256 signing key, noDA) under the EK and persists it at
   * `akHandle`. Idempotent: an existing AK with the right shape is returned (`created: false`);
   * `replace: true` evicts it first (new enrolment ⇒ new AK). Anything else at the handle fails with
   * ERR_KEY_MISMATCH and is never evicted.
   */
  async createAk(options: { ekHandle?: number; replace?: boolean } = {}): Promise<AkPublic> {
    const ekHandle = options.ekHandle ?? RSA_EK_HANDLE;
    return this.#runner.exclusive(async (tx) => {
      const existing = await readPublicOrUndefined(tx, this.akHandle);
      if (existing !== undefined) {
        this.#checkAk(existing);
        if (options.replace !== true) return { ...toObjectPublic(this.akHandle, existing), created: false };
        await tx.run(
          "tpm2_evictcontrol",
          ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", hex32(this.akHandle)],
          { op: "evict-ak" },
        );
      }
      const ek = await this.#requireUsableEk(tx, ekHandle);
      await withTransientCleanup(tx, async () => {
        const ctx = tx.path("ak.ctx");
        await this.#withEkAuth(tx, ek, (ekAuth) =>
          tx.run(
            "tpm2_create",
            [
              "-C",
              hex32(ekHandle),
              ...ekAuth,
              "-g",
              "sha256",
              // A restricted signing key needs an explicit NULL symmetric, else TPM_RC_SYMMETRIC (0x2D6).
              "-G",
              "ecc256:ecdsa-sha256:null",
              "-a",
              AK_ATTRIBUTES_TEXT,
              "-c",
              ctx,
            ],
            { op: "create-ak" },
          ),
        );
        await tx.run(
          "tpm2_evictcontrol",
          ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", ctx, hex32(this.akHandle)],
          { op: "persist-ak" },
        );
      });
      const ak = await readPublicOrUndefined(tx, this.akHandle);
      if (ak === undefined)
        throw new M2mError("ERR_TPM_AK", "permanent", "the AK vanished right after creation");
      this.#checkAk(ak);
      return { ...toObjectPublic(this.akHandle, ak), created: true };
    });
  }

  /** Reads the AK. @throws ERR_KEY_NOT_FOUND when absent; ERR_KEY_MISMATCH when not an AK. */
  async readAk(): Promise<AkPublic> {
    const ak = await this.#runner.exclusive((tx) => readPublicOrUndefined(tx, this.akHandle));
    if (ak === undefined) {
      throw new M2mError("ERR_KEY_NOT_FOUND", "permanent", `no attestation key at ${hex32(this.akHandle)}`);
    }
    this.#checkAk(ak);
    return { ...toObjectPublic(this.akHandle, ak), created: false };
  }

  #checkAk(pub: ParsedPublic): void {
    // Security: only a restricted signing key makes TPMS_ATTEST's magic meaningful (the TPM refuses to
    // sign external data that starts with TPM_GENERATED_VALUE); an unrestricted key could forge attests.
    const ok =
      pub.objectAttributes === AK_ATTRIBUTES &&
      pub.type === ALG.ECC &&
      pub.curveId === CURVE.P256 &&
      pub.nameAlg === ALG.SHA256 &&
      pub.scheme.scheme === ALG.ECDSA &&
      pub.scheme.hashAlg === ALG.SHA256 &&
      pub.authPolicy.length === 0;
    if (!ok) {
      throw new M2mError(
        "ERR_KEY_MISMATCH",
        "permanent",
        `the object at ${hex32(this.akHandle)} is not an attestation key of this agent`,
        {
          hint: "configure another akHandle or evict the object deliberately",
          details: { handle: hex32(this.akHandle), attributes: attrNames(pub.objectAttributes).join("|") },
        },
      );
    }
  }

  async #requireUsableEk(tx: TpmTx, ekHandle: number): Promise<ParsedPublic> {
    const ek = await readPublicOrUndefined(tx, ekHandle);
    if (ek === undefined) {
      throw new M2mError("ERR_TPM_EK", "permanent", `no endorsement key at ${hex32(ekHandle)}`, {
        hint: "call readEkPublics() first (it creates the RSA EK when absent)",
      });
    }
    // Security: the EK must be a real endorsement key (restricted decrypt, fixed, admin by policy);
    // activation against another key would prove nothing about this TPM.
    if (!looksLikeEk(ek)) {
      throw new M2mError(
        "ERR_TPM_EK",
        "permanent",
        `the object at ${hex32(ekHandle)} is not an endorsement key`,
      );
    }
    if (!ekUsable(ek)) {
      throw new M2mError(
        "ERR_TPM_EK_POLICY_UNSUPPORTED",
        "permanent",
        `the EK at ${hex32(ekHandle)} can be authorized neither by PolicyA/PolicyB nor by its (empty) auth value`,
        { hint: "use an EK made from a TCG template (e.g. the RSA-2048 EK at 0x81010001)" },
      );
    }
    return ek;
  }

  /**
   * Authorizes a USER-role use of the EK with the session its authPolicy asks for (see the module
   * comment): PolicyA → PolicySecret(endorsement); PolicyB → PolicySecret(endorsement) then
   * PolicyOR(PolicyA, PolicyC), both in a session of the EK's nameAlg; otherwise the empty password.
   * The session is always flushed.
   */
  async #withEkAuth<T>(tx: TpmTx, ek: ParsedPublic, fn: (authArgs: string[]) => Promise<T>): Promise<T> {
    const auth: EkAuthorization | undefined = ekAuthorizationOf(ek);
    if (auth === undefined) {
      throw new M2mError("ERR_TPM_EK_POLICY_UNSUPPORTED", "permanent", "the EK's policy is not supported");
    }
    if (auth.kind === "password") return fn([]);
    const session = tx.path("ek-session.ctx");
    await tx.run("tpm2_startauthsession", ["--policy-session", "-g", auth.hash, "-S", session], {
      op: "start-session",
    });
    try {
      await tx.run("tpm2_policysecret", ["-S", session, "-c", "e"], { op: "policysecret" });
      if (auth.kind === "policy-b") {
        const files: string[] = [];
        for (const [i, branch] of auth.branches.entries()) {
          const f = tx.path(`ek-policy-${i}.bin`);
          await writeFile(f, branch, { mode: 0o600 });
          files.push(f);
        }
        // The session digest is PolicyA now; PolicyOR replaces it with PolicyB = the EK's authPolicy.
        await tx.run("tpm2_policyor", ["-S", session, "-l", `${auth.hash}:${files.join(",")}`], {
          op: "policyor",
        });
      }
      return await fn(["-P", `session:${session}`]);
    } finally {
      await tx.run("tpm2_flushcontext", [session], { op: "flush-session" }).catch(() => undefined);
    }
  }

  /**
   * TPM2_ActivateCredential: recovers the secret a verifier bound to (EK, Name(AK)). Proves that the AK
   * lives in the same TPM as the EK.
   * @param blob tpm2-tools format: `BADCC0DE 00000001 TPM2B_ID_OBJECT TPM2B_ENCRYPTED_SECRET`.
   * @throws ERR_TPM_CREDENTIAL_BLOB (malformed blob), ERR_TPM_EK_POLICY_UNSUPPORTED, ERR_TPM_COMMAND
   * (the TPM refused: wrong EK / AK name / tampered blob), ERR_TPM_*.
   */
  async activateCredential(blob: Uint8Array, ekHandle: number = RSA_EK_HANDLE): Promise<Secret<Uint8Array>> {
    checkBlob(blob);
    return this.#runner.exclusive(async (tx) => {
      const ek = await this.#requireUsableEk(tx, ekHandle);
      const blobFile = tx.path("credential.blob");
      await writeFile(blobFile, blob, { mode: 0o600 });
      const out = tx.path("credential.secret");
      // The secret is written to a 0600 file in the private dir (removed when this block ends); the tool
      // also prints it on stdout, which the runner never logs.
      await this.#withEkAuth(tx, ek, (ekAuth) =>
        tx.run(
          "tpm2_activatecredential",
          ["-c", hex32(this.akHandle), "-C", hex32(ekHandle), "-i", blobFile, "-o", out, ...ekAuth],
          { op: "activatecredential" },
        ),
      );
      return new Secret(new Uint8Array(await readFile(out)));
    });
  }

  /**
   * TPM2_Certify of `keyHandle` by the AK with a verifier nonce as qualifyingData (raw command through
   * tpm2_send; both objects authorized with empty-password sessions, so both need adminWithPolicy clear).
   */
  async certify(keyHandle: number, akHandle: number, qualifyingData: Uint8Array): Promise<CertifyResult> {
    if (qualifyingData.length > MAX_QUALIFYING_DATA) {
      throw new M2mError(
        "ERR_TPM_ARGUMENT",
        "permanent",
        `qualifying data longer than ${MAX_QUALIFYING_DATA} bytes`,
      );
    }
    const cmd = buildCertifyCommand(keyHandle, akHandle, qualifyingData);
    const resp = await this.#runner.sendRaw(cmd, { op: "certify" });
    return parseCertifyResponse(resp.body);
  }
}

/**
 * TPM2_Quote by the AK over `pcrs` of `bank`, qualified with `qualifyingData`, plus the PCR values
 * (tpm2_quote reads them in the same call). The AK is persistent, so no transient is left loaded.
 * @throws ERR_TPM_ARGUMENT, ERR_TPM_RESPONSE, ERR_TPM_*
 */
export async function quoteWithAk(
  runner: TpmRunner,
  akHandle: number,
  qualifyingData: Uint8Array,
  bank: keyof typeof BANK_SIZES,
  pcrs: readonly number[],
): Promise<QuoteResult> {
  const sorted = checkQuoteArgs(qualifyingData, pcrs);
  return runner.exclusive(async (tx) => {
    const msg = tx.path("quote.msg");
    const sig = tx.path("quote.sig");
    const vals = tx.path("quote.pcrs");
    await tx.run(
      "tpm2_quote",
      [
        "-c",
        hex32(akHandle),
        "-l",
        `${bank}:${sorted.join(",")}`,
        "-q",
        Buffer.from(qualifyingData).toString("hex"),
        "-m",
        msg,
        "-s",
        sig,
        "-o",
        vals,
        "-F",
        "values",
        "-g",
        "sha256",
      ],
      { op: "quote" },
    );
    const raw = await readFile(vals);
    const size = BANK_SIZES[bank];
    if (raw.length !== size * sorted.length) {
      throw new M2mError(
        "ERR_TPM_RESPONSE",
        "permanent",
        "tpm2_quote returned an unexpected number of PCR values",
      );
    }
    const values = sorted.map((_, i) => new Uint8Array(raw.subarray(i * size, (i + 1) * size)));
    return {
      attest: new Uint8Array(await readFile(msg)),
      signature: new Uint8Array(await readFile(sig)),
      values,
    };
  });
}

/**
 * Quotes by the AK with one light TPM call where it can. tpm2_quote reads the PCR values in the same
 * process as the quote, but each call pays ESYS start-up and three TPM commands (ReadPublic of the AK,
 * PCR_Read, Quote). Once the values of a selection are known, a raw TPM2_Quote (`tpm2_send`, one
 * command) suffices while they do not change: the TPM signs the digest of the PCRs' *current* values,
 * so cached values that hash to the quoted digest are the current values. When they do not (a PCR was
 * extended), the full tpm2_quote runs and the cache is refreshed. The registrar checks the same digest
 * against the reported values, so nothing here is trusted beyond what it verifies anyway.
 */
export class AkQuoter {
  readonly #runner: TpmRunner;
  readonly #akHandle: number;
  /** Last values per `bank:pcrs`; only for selections whose sha256 composite matched a quote. */
  readonly #values = new Map<string, readonly Uint8Array[]>();
  #rawRefused = false;

  constructor(runner: TpmRunner, akHandle: number) {
    this.#runner = runner;
    this.#akHandle = akHandle;
  }

  /** Same contract as `quoteWithAk`. @throws ERR_TPM_ARGUMENT, ERR_TPM_RESPONSE, ERR_TPM_* */
  async quote(
    qualifyingData: Uint8Array,
    bank: keyof typeof BANK_SIZES,
    pcrs: readonly number[],
  ): Promise<QuoteResult> {
    const sorted = checkQuoteArgs(qualifyingData, pcrs);
    const key = `${bank}:${sorted.join(",")}`;
    const cached = this.#rawRefused ? undefined : this.#values.get(key);
    if (cached !== undefined) {
      const cmd = buildQuoteCommand(this.#akHandle, qualifyingData, BANK_ALGS[bank], sorted);
      let resp: Awaited<ReturnType<TpmRunner["sendRaw"]>> | undefined;
      try {
        resp = await this.#runner.sendRaw(cmd, { op: "quote-raw" });
      } catch (err) {
        // A TPM that refuses the hand-built command (e.g. an AK needing other auth): tpm2_quote from now on.
        if (!(err instanceof M2mError && err.code === "ERR_TPM_COMMAND")) throw err;
        this.#rawRefused = true;
      }
      if (resp !== undefined) {
        const { attest, signature } = parseSignedAttestResponse(resp.body, "TPM2_Quote");
        if (quotedDigestIs(attest, compositeSha256(cached))) return { attest, signature, values: cached };
      }
      // The PCRs changed since: this quote is discarded, the full call reads the new values.
      this.#values.delete(key);
    }
    const q = await quoteWithAk(this.#runner, this.#akHandle, qualifyingData, bank, sorted);
    // Cache only when the composite is sha256 (the AK's scheme hash): otherwise every raw quote would miss.
    if (quotedDigestIs(q.attest, compositeSha256(q.values))) this.#values.set(key, q.values);
    return q;
  }
}

const BANK_ALGS = { sha1: 0x0004, sha256: TPM_ALG_SHA256, sha384: 0x000c } as const;

function compositeSha256(values: readonly Uint8Array[]): Uint8Array {
  const h = createHash("sha256");
  for (const v of values) h.update(v);
  return new Uint8Array(h.digest());
}

function quotedDigestIs(attest: Uint8Array, digest: Uint8Array): boolean {
  let a: ReturnType<typeof decodeTpmsAttest>;
  try {
    a = decodeTpmsAttest(attest);
  } catch {
    return false;
  }
  return a.attested.kind === "quote" && Buffer.from(a.attested.pcrDigest).equals(digest);
}

function checkQuoteArgs(qualifyingData: Uint8Array, pcrs: readonly number[]): number[] {
  if (qualifyingData.length === 0 || qualifyingData.length > MAX_QUALIFYING_DATA) {
    throw new M2mError(
      "ERR_TPM_ARGUMENT",
      "permanent",
      `qualifying data must be 1-${MAX_QUALIFYING_DATA} bytes`,
    );
  }
  const sorted = [...new Set(pcrs)].sort((a, b) => a - b);
  if (sorted.length === 0 || sorted.some((p) => !Number.isInteger(p) || p < 0 || p > 23)) {
    throw new M2mError("ERR_TPM_ARGUMENT", "permanent", "PCR selection must be indices 0-23");
  }
  return sorted;
}

/**
 * Builds TPM2_Quote (0x158) by `akHandle` with one TPM_RS_PW session (empty auth), inScheme
 * TPM_ALG_NULL (the AK's own scheme) and a single-bank selection of PCRs 0–23 (3-byte bitmap).
 */
export function buildQuoteCommand(
  akHandle: number,
  qualifyingData: Uint8Array,
  bankAlg: number,
  pcrs: readonly number[],
): Uint8Array {
  const bitmap = [0, 0, 0];
  for (const p of pcrs) bitmap[p >> 3] = (bitmap[p >> 3] ?? 0) | (1 << (p & 7));
  const pwSession = [...u32(TPM_RS_PW), 0, 0, /* attrs */ 0, 0, 0];
  const params = [
    ...u16(qualifyingData.length),
    ...qualifyingData,
    ...u16(ALG.NULL),
    ...u32(1),
    ...u16(bankAlg),
    3,
    ...bitmap,
  ];
  const body = [...u32(akHandle), ...u32(pwSession.length), ...pwSession, ...params];
  const size = 10 + body.length;
  return Uint8Array.from([...u16(TPM_ST_SESSIONS), ...u32(size), ...u32(TPM_CC_QUOTE), ...body]);
}

/** Builds TPM2_Certify (0x148) with two TPM_RS_PW sessions and inScheme TPM_ALG_NULL (use the AK's scheme). */
export function buildCertifyCommand(
  keyHandle: number,
  akHandle: number,
  qualifyingData: Uint8Array,
): Uint8Array {
  const pwSession = [...u32(TPM_RS_PW), 0, 0, /* attrs */ 0, 0, 0];
  const auth = [...pwSession, ...pwSession];
  const params = [...u16(qualifyingData.length), ...qualifyingData, ...u16(ALG.NULL)];
  const body = [...u32(keyHandle), ...u32(akHandle), ...u32(auth.length), ...auth, ...params];
  const size = 10 + body.length;
  return Uint8Array.from([...u16(TPM_ST_SESSIONS), ...u32(size), ...u32(TPM_CC_CERTIFY), ...body]);
}

/** Parses a TPM2_Certify response body (after the 10-byte header): parameterSize, TPM2B_ATTEST, TPMT_SIGNATURE. */
export function parseCertifyResponse(body: Uint8Array): CertifyResult {
  return parseSignedAttestResponse(body, "TPM2_Certify");
}

/** TPM2_Certify and TPM2_Quote answer alike: parameterSize, TPM2B_ATTEST, TPMT_SIGNATURE. */
function parseSignedAttestResponse(body: Uint8Array, command: string): CertifyResult {
  const fail = (why: string) =>
    new M2mError("ERR_TPM_RESPONSE", "permanent", `malformed ${command} response: ${why}`);
  const rd16 = (o: number) => ((body[o] ?? 0) << 8) | (body[o + 1] ?? 0);
  if (body.length < 6) throw fail("too short");
  const paramSize = ((rd16(0) << 16) | rd16(2)) >>> 0;
  if (4 + paramSize > body.length) throw fail("parameterSize beyond the response");
  const attestSize = rd16(4);
  if (6 + attestSize > 4 + paramSize) throw fail("certifyInfo beyond the parameters");
  const attest = body.slice(6, 6 + attestSize);
  const signature = body.slice(6 + attestSize, 4 + paramSize);
  if (signature.length < 4) throw fail("no signature");
  return { attest, signature };
}

function checkBlob(blob: Uint8Array): void {
  const fail = (why: string) =>
    new M2mError("ERR_TPM_CREDENTIAL_BLOB", "permanent", `malformed credential blob: ${why}`);
  if (blob.length < 12 || blob.length > 2048) throw fail("size");
  const dv = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  if (dv.getUint32(0) !== 0xbadcc0de || dv.getUint32(4) !== 1) throw fail("header");
  const idLen = dv.getUint16(8);
  if (10 + idLen + 2 > blob.length) throw fail("TPM2B_ID_OBJECT");
  const secLen = dv.getUint16(10 + idLen);
  if (12 + idLen + secLen !== blob.length) throw fail("TPM2B_ENCRYPTED_SECRET");
}

function u16(v: number): number[] {
  return [(v >>> 8) & 0xff, v & 0xff];
}
function u32(v: number): number[] {
  return [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

/** QN(child) = 000b ‖ SHA-256(QN(parent) ‖ Name(child)); QN of a primary's parent is its hierarchy handle. */
export function qualifiedName(parentQn: Uint8Array, name: Uint8Array): Uint8Array {
  return Buffer.concat([
    Buffer.from([0x00, 0x0b]),
    createHash("sha256").update(parentQn).update(name).digest(),
  ]);
}
