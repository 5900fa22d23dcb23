import { createHash, type KeyObject, constants as nc, verify as nodeVerify } from "node:crypto";
import { mkdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "../../core/atomic-file.js";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { TlsClientKey, TpmAttestation } from "../capabilities.js";
import type {
  JwsAlgorithm,
  KeyAlgorithm,
  KeyEvidence,
  KeyHealth,
  KeyInfo,
  KeyProvider,
} from "../key-provider.js";
import { JWS_ALGS_FOR } from "../key-provider.js";
import { keyInfoFromSpki } from "../public-key.js";
import { AkQuoter, TpmAttestationOps } from "./endorsement.js";
import { readPublicOrUndefined } from "./read-public.js";
import { readLockoutInfo, type TpmLatencySample, TpmRunner, type TpmTx } from "./runner.js";
import type { TpmTlsKeys } from "./tls.js";
import {
  ALG,
  ATTR,
  attrNames,
  CURVE,
  ecdsaTpmtToRaw,
  objectName,
  type ParsedPublic,
  publicKeyOf,
} from "./tpmt.js";
import { hex32, withTransientCleanup } from "./transient.js";

/**
 * Device key inside a TPM 2.0, driven through tpm2-tools (see ./runner.ts).
 *
 * Layout (all persistent, owner hierarchy, empty auth):
 * - SRK at `srkHandle` (default 0x81000001): TCG ECC P-256 storage template
 *   (restricted|decrypt|fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA, AES-128-CFB).
 * - Device key at `keyHandle` (default 0x81000002): ECC P-256 or RSA-2048, both scheme NULL (the
 *   scheme is chosen per signature: ECDSA-SHA256 for ES256 and TLS, RSASSA/RSAPSS for RS256/PS256;
 *   tpm2-pkcs11 cannot map a key with a fixed ECDSA scheme to a PKCS#11 mechanism, so a NULL scheme is
 *   what lets the same attested key sign TLS handshakes — keys created before with ECDSA-SHA256 are still
 *   accepted for JWS), attributes exactly
 *   fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign|noDA.
 * - AK at `akHandle` (default 0x81000003), created by `TpmAttestationOps` during enrolment.
 *
 * Key reference format: `tpm:tcti=<TCTI>;handle=0x81000002` (the TCTI string verbatim, e.g.
 * `tpm:tcti=device:/dev/tpmrm0;handle=0x81000002`).
 *
 * The key is never replaced silently: an occupied handle holding anything other than what this
 * provider creates fails with ERR_KEY_MISMATCH.
 */

export interface TpmKeyProviderConfig {
  /** Default `device:/dev/tpmrm0` (kernel resource manager). */
  readonly tcti?: string;
  readonly srkHandle?: number | string;
  readonly keyHandle?: number | string;
  readonly akHandle?: number | string;
  readonly algorithm?: KeyAlgorithm;
  /** Timeout of each TPM tool call (ms). Default 10 s. */
  readonly timeoutMs?: number;
  readonly clock?: Clock;
  readonly runtimeDir?: string;
  readonly onLatency?: (s: TpmLatencySample) => void;
  /** Share one runner (queue + scratch dir) with the attestation ops. */
  readonly runner?: TpmRunner;
  /**
   * Directory (0700) where a key created by this provider keeps its TPM2B_PUBLIC and TPM2B_PRIVATE
   * (`key-0x8100xxxx.pub` / `.priv`, 0600, atomic). The private blob is wrapped by the SRK and useless
   * outside this TPM, but it is what tpm2-pkcs11 needs to expose the key for TLS (see ./tls.ts): a
   * persistent object cannot be exported afterwards, so it is kept at creation or never.
   */
  readonly keyBlobDir?: string;
  /**
   * TLS through tpm2-pkcs11 (./tls.ts). With it (and `keyBlobDir`) the key offers the `tlsClient`
   * capability, and `destroy()` also unlinks the key from the tpm2-pkcs11 store.
   */
  readonly tls?: TpmTlsKeys;
}

/** Attributes of the device key, exactly. */
export const DEVICE_KEY_ATTRIBUTES =
  ATTR.fixedTPM | ATTR.fixedParent | ATTR.sensitiveDataOrigin | ATTR.userWithAuth | ATTR.sign | ATTR.noDA;
export const DEVICE_KEY_ATTRIBUTES_TEXT = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|noda";
const SRK_ATTRIBUTES_TEXT = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda";

const OWNER_PERSISTENT_MIN = 0x81000000;
const OWNER_PERSISTENT_MAX = 0x8100ffff;

/** Parses and validates a persistent owner-range handle (0x81000000–0x8100FFFF). */
export function ownerPersistentHandle(value: number | string, field: string): number {
  const n = typeof value === "number" ? value : /^0x[0-9a-f]{1,8}$/i.test(value) ? Number(value) : Number.NaN;
  // Security: the endorsement (0x8101xxxx) and platform (0x818xxxxx) ranges belong to other parties;
  // the device key must never be written over an EK.
  if (!Number.isInteger(n) || n < OWNER_PERSISTENT_MIN || n > OWNER_PERSISTENT_MAX) {
    throw new M2mError("ERR_KEY_CONFIG", "permanent", `${field} must be an owner persistent handle`, {
      hint: "use a handle in 0x81000000-0x8100FFFF (0x8101xxxx is reserved for endorsement keys)",
      details: { field },
    });
  }
  return n >>> 0;
}

export class TpmKeyProvider implements KeyProvider {
  readonly kind = "tpm" as const;
  readonly tcti: string;
  readonly srkHandle: number;
  readonly keyHandle: number;
  readonly akHandle: number;
  readonly algorithm: KeyAlgorithm;
  readonly ref: string;
  readonly #runner: TpmRunner;
  readonly #ownsRunner: boolean;
  readonly #keyHex: string;
  readonly #keyBlobDir: string | undefined;
  readonly #tls: TpmTlsKeys | undefined;
  /** Set once this key is known to be linked into the tpm2-pkcs11 token (linking costs ≈ 2 s). */
  #tlsLinked = false;
  /** Public key of the opened key; every signature is checked against it (detects a swapped handle). */
  #opened: { pub: ParsedPublic; key: KeyObject; info: KeyInfo } | undefined;

  constructor(config: TpmKeyProviderConfig = {}) {
    this.tcti = config.runner?.tcti ?? config.tcti ?? "device:/dev/tpmrm0";
    this.srkHandle = ownerPersistentHandle(config.srkHandle ?? 0x81000001, "srkHandle");
    this.keyHandle = ownerPersistentHandle(config.keyHandle ?? 0x81000002, "keyHandle");
    this.akHandle = ownerPersistentHandle(config.akHandle ?? 0x81000003, "akHandle");
    if (new Set([this.srkHandle, this.keyHandle, this.akHandle]).size !== 3) {
      throw new M2mError("ERR_KEY_CONFIG", "permanent", "srkHandle, keyHandle and akHandle must differ");
    }
    this.algorithm = config.algorithm ?? "ec-p256";
    if (this.algorithm !== "ec-p256" && this.algorithm !== "rsa-2048") {
      throw new M2mError("ERR_KEY_CONFIG", "permanent", "algorithm must be ec-p256 or rsa-2048");
    }
    this.#keyHex = hex32(this.keyHandle);
    this.#keyBlobDir = config.keyBlobDir;
    this.#tls = config.tls;
    this.ref = `tpm:tcti=${this.tcti};handle=${this.#keyHex}`;
    this.#ownsRunner = config.runner === undefined;
    this.#runner =
      config.runner ??
      new TpmRunner({
        tcti: this.tcti,
        ...(config.timeoutMs === undefined ? {} : { timeoutMs: config.timeoutMs }),
        ...(config.clock === undefined ? {} : { clock: config.clock }),
        ...(config.runtimeDir === undefined ? {} : { runtimeDir: config.runtimeDir }),
        ...(config.onLatency === undefined ? {} : { onLatency: config.onLatency }),
      });
  }

  /**
   * Paths of the key's TPM2B_PUBLIC / TPM2B_PRIVATE kept at creation (see `keyBlobDir`), or undefined
   * when no blob dir is configured. The files may be absent (key created without a blob dir).
   */
  /** The configured key blob dir (see TpmKeyProviderConfig.keyBlobDir). */
  get keyBlobDir(): string | undefined {
    return this.#keyBlobDir;
  }

  get keyBlobPaths(): { pub: string; priv: string } | undefined {
    if (this.#keyBlobDir === undefined) return undefined;
    const base = join(this.#keyBlobDir, `key-${this.#keyHex}`);
    return { pub: `${base}.pub`, priv: `${base}.priv` };
  }

  /** The runner (queue, scratch dir) this provider uses; share it with `TpmAttestationOps`. */
  get runner(): TpmRunner {
    return this.#runner;
  }

  #attestation: TpmAttestation | undefined;

  /** Capability: attestation of this key through the same serial TPM queue (see capabilities.ts). */
  get attestation(): TpmAttestation {
    this.#attestation ??= tpmAttestationOf(this);
    return this.#attestation;
  }

  /**
   * Capability: TLS client handshakes signed by THIS attested key through tpm2-pkcs11 and the OpenSSL
   * pkcs11 engine (./tls.ts). The key is linked into the token on first use (from the blobs kept at
   * creation). Undefined without a TLS config or a key blob dir.
   *
   * `connect` (what the MQTT sink uses) makes each connection in a child process of its own
   * (./tls-tunnel.ts), so a key rotated in while the daemon runs is found: tpm2-pkcs11 reads the
   * token's objects once per process. `secureContext` loads the module in THIS process: it sees only
   * keys linked before its first use here (a rotated-in key then fails with ERR_TLS_ENGINE_KEY).
   */
  get tlsClient(): TlsClientKey | undefined {
    const tls = this.#tls;
    const blobs = this.keyBlobPaths;
    if (tls === undefined || blobs === undefined) return undefined;
    const linked = (): Promise<void> => this.#linkTls();
    return {
      mechanism: "tpm2-pkcs11-engine",
      secureContext: async (input) => {
        await linked();
        return tls.createSecureContext(this.keyHandle, input);
      },
      connect: async (input) => {
        await linked();
        return tls.connect(this.keyHandle, input);
      },
    };
  }

  /**
   * Opens the device key, creating SRK and key first when the key handle is empty.
   * @throws ERR_KEY_MISMATCH when the handle holds another kind of object; ERR_TPM_* on TPM failures.
   */
  async createOrOpen(): Promise<KeyInfo> {
    const pub = await this.#runner.exclusive(async (tx) => {
      const existing = await readPublicOrUndefined(tx, this.keyHandle);
      if (existing !== undefined) return { pub: existing, created: false };
      await this.#ensureSrk(tx);
      let raced = false;
      await withTransientCleanup(tx, async () => {
        const ctx = tx.path("key.ctx");
        const pubBlob = tx.path("key.pub");
        const privBlob = tx.path("key.priv");
        // Scheme NULL for both (see the class comment: TLS through tpm2-pkcs11 needs it for ECC).
        const alg = this.algorithm === "ec-p256" ? "ecc256:null:null" : "rsa2048:null:null";
        // -c makes tpm2_create use CreateLoaded: one call instead of create + load; -u/-r still
        // return the blobs (kept for tpm2-pkcs11 when keyBlobDir is set).
        await tx.run(
          "tpm2_create",
          [
            "-C",
            hex32(this.srkHandle),
            "-g",
            "sha256",
            "-G",
            alg,
            "-a",
            DEVICE_KEY_ATTRIBUTES_TEXT,
            "-c",
            ctx,
            "-u",
            pubBlob,
            "-r",
            privBlob,
          ],
          { op: "create-key", timeoutMs: Math.max(this.#runner.timeoutMs, 60_000) },
        );
        try {
          await tx.run(
            "tpm2_evictcontrol",
            ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", ctx, this.#keyHex],
            { op: "persist-key" },
          );
        } catch (err) {
          // Another process (through its own queue) may have persisted a key at the handle meanwhile:
          // then that key wins and is adopted below (after the same checks); any other failure stands.
          if ((await readPublicOrUndefined(tx, this.keyHandle)) === undefined) throw err;
          raced = true;
        }
        if (!raced && this.#keyBlobDir !== undefined) {
          await mkdir(this.#keyBlobDir, { recursive: true, mode: 0o700 });
          const base = join(this.#keyBlobDir, `key-${this.#keyHex}`);
          await writeFileAtomic(`${base}.pub`, await readFile(pubBlob));
          await writeFileAtomic(`${base}.priv`, await readFile(privBlob));
        }
      });
      const created = await readPublicOrUndefined(tx, this.keyHandle);
      if (created === undefined) {
        throw new M2mError("ERR_KEY_NOT_FOUND", "permanent", "the key vanished right after creation");
      }
      return { pub: created, created: !raced };
    });
    const info = await this.#accept(pub.pub, pub.created);
    // A key created with TLS configured is linked into the tpm2-pkcs11 token now (≈ 2 s of tpm2_ptool),
    // not at its first handshake: a rotated-in key is then ready before the rotation commits, so the
    // MQTT sink's make-before-break switch only has to open a connection (well inside the owner's
    // switch timeout, after which the old key is destroyed regardless).
    if (pub.created) await this.#linkTls();
    return info;
  }

  /** Links this key into the tpm2-pkcs11 token once (no-op without a TLS config or blob dir). */
  async #linkTls(): Promise<void> {
    const tls = this.#tls;
    const blobs = this.keyBlobPaths;
    if (tls === undefined || blobs === undefined || this.#tlsLinked) return;
    if (!(await tls.isLinked(this.keyHandle))) await tls.link(this.keyHandle, blobs);
    this.#tlsLinked = true;
  }

  /** Opens the existing key. @throws ERR_KEY_NOT_FOUND when the handle is empty; ERR_KEY_MISMATCH. */
  async open(): Promise<KeyInfo> {
    const pub = await this.#runner.exclusive((tx) => readPublicOrUndefined(tx, this.keyHandle));
    if (pub === undefined) throw this.#notFound();
    return this.#accept(pub, false);
  }

  async #accept(pub: ParsedPublic, created: boolean): Promise<KeyInfo> {
    this.#checkDeviceKey(pub);
    const key = publicKeyOf(pub);
    const info = await keyInfoFromSpki(key.export({ format: "der", type: "spki" }), this.ref, created);
    this.#opened = { pub, key, info };
    return info;
  }

  /** Refuses anything at the key handle that is not exactly the key this provider creates. */
  #checkDeviceKey(pub: ParsedPublic): void {
    const problems: string[] = [];
    // Security: only a key born in this TPM (sensitiveDataOrigin) that can never leave it (fixedTPM,
    // fixedParent) is a hardware-backed identity; a foreign or imported object must not be adopted.
    if (pub.objectAttributes !== DEVICE_KEY_ATTRIBUTES) {
      problems.push(`attributes ${attrNames(pub.objectAttributes).join("|")}`);
    }
    if (pub.nameAlg !== ALG.SHA256) problems.push("nameAlg is not sha256");
    // Security: a non-empty authPolicy would let whoever knows the policy use or change the key.
    if (pub.authPolicy.length !== 0) problems.push("has an authPolicy");
    if (pub.symmetric.algorithm !== ALG.NULL) problems.push("is a storage key");
    if (this.algorithm === "ec-p256") {
      if (pub.type !== ALG.ECC || pub.curveId !== CURVE.P256) problems.push("is not ECC P-256");
      else if (
        !(
          pub.scheme.scheme === ALG.NULL ||
          (pub.scheme.scheme === ALG.ECDSA && pub.scheme.hashAlg === ALG.SHA256)
        )
      ) {
        problems.push("has a scheme other than ECDSA-SHA256");
      }
    } else if (pub.type !== ALG.RSA || pub.keyBits !== 2048) {
      problems.push("is not RSA-2048");
    } else if (pub.scheme.scheme !== ALG.NULL) {
      problems.push("has a fixed RSA scheme (RS256 and PS256 need scheme NULL)");
    }
    if (problems.length > 0) {
      throw new M2mError(
        "ERR_KEY_MISMATCH",
        "permanent",
        `the object at ${this.#keyHex} is not a device key of this agent`,
        {
          hint: "the handle is occupied by another object: configure another keyHandle, or evict the object deliberately (tpm2_evictcontrol -C o -c HANDLE)",
          details: { handle: this.#keyHex, problems: problems.join("; ") },
        },
      );
    }
  }

  async #ensureSrk(tx: TpmTx): Promise<void> {
    const srk = await readPublicOrUndefined(tx, this.srkHandle);
    if (srk !== undefined) {
      // Security: the parent must be a restricted decryption key bound to this TPM; anything else at
      // the SRK handle could be a key whose children an attacker can duplicate or unwrap.
      const need =
        ATTR.restricted | ATTR.decrypt | ATTR.fixedTPM | ATTR.fixedParent | ATTR.sensitiveDataOrigin;
      if ((srk.objectAttributes & need) !== need || (srk.objectAttributes & ATTR.sign) !== 0) {
        throw new M2mError(
          "ERR_KEY_MISMATCH",
          "permanent",
          `the object at ${hex32(this.srkHandle)} is not a storage root key`,
          {
            hint: "configure another srkHandle or evict the object deliberately",
            details: { handle: hex32(this.srkHandle), attributes: attrNames(srk.objectAttributes).join("|") },
          },
        );
      }
      return;
    }
    await withTransientCleanup(tx, async () => {
      const ctx = tx.path("srk.ctx");
      await tx.run(
        "tpm2_createprimary",
        [
          "-C",
          "o",
          ...(await tx.ownerAuthArgs()),
          "-g",
          "sha256",
          "-G",
          "ecc256:aes128cfb",
          "-a",
          SRK_ATTRIBUTES_TEXT,
          "-c",
          ctx,
        ],
        { op: "create-srk", timeoutMs: Math.max(this.#runner.timeoutMs, 60_000) },
      );
      await tx.run(
        "tpm2_evictcontrol",
        ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", ctx, hex32(this.srkHandle)],
        { op: "persist-srk" },
      );
    });
  }

  /**
   * Signs with the TPM key. ES256: SHA-256 in Node, `tpm2_sign -d` with the digest on stdin, TPMT_SIGNATURE
   * converted to r‖s. RS256/PS256: `-s rsassa|rsapss -f plain`.
   * @throws ERR_KEY_ALG_UNSUPPORTED, ERR_KEY_NOT_FOUND, ERR_KEY_MISMATCH (signature not by the opened
   * key), ERR_TPM_*.
   */
  async sign(data: Uint8Array, alg?: JwsAlgorithm): Promise<Uint8Array> {
    const jwsAlg = alg ?? (this.algorithm === "ec-p256" ? "ES256" : "RS256");
    if (!JWS_ALGS_FOR[this.algorithm].includes(jwsAlg)) {
      throw new M2mError("ERR_KEY_ALG_UNSUPPORTED", "permanent", `the device key cannot sign ${jwsAlg}`);
    }
    const digest = createHash("sha256").update(data).digest();
    const scheme = jwsAlg === "ES256" ? "ecdsa" : jwsAlg === "RS256" ? "rsassa" : "rsapss";
    const raw = await this.#runner
      .exclusive(async (tx) => {
        const out = tx.path("sig");
        const args = ["-c", this.#keyHex, "-g", "sha256", "-s", scheme, "-d", "-o", out];
        if (jwsAlg !== "ES256") args.push("-f", "plain");
        await tx.run("tpm2_sign", args, { input: digest, op: "sign" });
        return readFile(out);
      })
      .catch((err: unknown) => {
        throw this.#mapMissing(err);
      });
    const sig = jwsAlg === "ES256" ? ecdsaTpmtToRaw(raw) : new Uint8Array(raw);
    const opened = this.#opened;
    if (opened !== undefined) {
      // Security: the handle could have been evicted and refilled since open(); a signature that does not
      // verify under the key we announced must never reach a relying party.
      const ok =
        jwsAlg === "ES256"
          ? nodeVerify("sha256", data, { key: opened.key, dsaEncoding: "ieee-p1363" }, sig)
          : jwsAlg === "RS256"
            ? nodeVerify("sha256", data, opened.key, sig)
            : nodeVerify(
                "sha256",
                data,
                { key: opened.key, padding: nc.RSA_PKCS1_PSS_PADDING, saltLength: nc.RSA_PSS_SALTLEN_DIGEST },
                sig,
              );
      if (!ok) {
        this.#opened = undefined;
        throw new M2mError(
          "ERR_KEY_MISMATCH",
          "permanent",
          `the key at ${this.#keyHex} no longer matches the opened key`,
          {
            hint: "the TPM object was replaced; re-open the key (and re-enrol if its public key changed)",
          },
        );
      }
    }
    return sig;
  }

  /** TPM-reported protection of the key, read back from the TPM (not from a cache). */
  async evidence(): Promise<KeyEvidence> {
    const pub = await this.#runner.exclusive((tx) => readPublicOrUndefined(tx, this.keyHandle));
    if (pub === undefined) throw this.#notFound();
    this.#checkDeviceKey(pub);
    return {
      kind: "tpm",
      objectAttributes: pub.objectAttributes,
      attributeNames: attrNames(pub.objectAttributes),
      tpmtPublicHex: Buffer.from(pub.bytes).toString("hex"),
      nameHex: Buffer.from(objectName(pub)).toString("hex"),
    };
  }

  /**
   * Evicts the key (crypto-erase: the TPM forgets it). Idempotent.
   * @throws ERR_KEY_MISMATCH when the handle holds a foreign object (it is never evicted).
   */
  async destroy(): Promise<void> {
    await this.#runner.exclusive(async (tx) => {
      const pub = await readPublicOrUndefined(tx, this.keyHandle);
      if (pub === undefined) return;
      this.#checkDeviceKey(pub);
      await tx.run("tpm2_evictcontrol", ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", this.#keyHex], {
        op: "evict-key",
      });
    });
    // Security: evicting the persistent object is not enough while its SRK-wrapped private blob exists:
    // TPM2_Load under the same SRK would bring the key back. The kept blobs go with it (a tpm2-pkcs11
    // store holding a copy is unlinked by keys/tpm/tls.ts `TpmTlsKeys.unlink`).
    const blobs = this.keyBlobPaths;
    if (blobs !== undefined) {
      await rm(blobs.priv, { force: true });
      await rm(blobs.pub, { force: true });
    }
    if (this.#tls !== undefined) {
      await this.#tls.unlink(this.keyHandle);
      this.#tlsLinked = false;
    }
    this.#opened = undefined;
  }

  /** Reachability, DA state and key presence/identity. Never throws. */
  async health(): Promise<KeyHealth> {
    try {
      return await this.#runner.exclusive(async (tx) => {
        const vars = await tx.run("tpm2_getcap", ["properties-variable"], { op: "health" });
        const inLockout = /inLockout:\s*1/.test(vars.text);
        const pub = await readPublicOrUndefined(tx, this.keyHandle);
        if (pub === undefined) {
          return { ok: false, code: "ERR_KEY_NOT_FOUND", detail: `no key at ${this.#keyHex}` };
        }
        this.#checkDeviceKey(pub);
        if (this.#opened !== undefined && Buffer.compare(this.#opened.pub.bytes, pub.bytes) !== 0) {
          return { ok: false, code: "ERR_KEY_MISMATCH", detail: `the key at ${this.#keyHex} was replaced` };
        }
        return {
          ok: true,
          detail: `TPM key at ${this.#keyHex} present${inLockout ? " (TPM in DA lockout; the key is noDA and unaffected)" : ""}`,
        };
      });
    } catch (err) {
      const code = err instanceof M2mError ? err.code : "ERR_INTERNAL";
      return { ok: false, code, detail: err instanceof Error ? err.message : "TPM health check failed" };
    }
  }

  /** Releases the scratch dir (when the runner is ours). The key stays in the TPM. */
  async close(): Promise<void> {
    this.#opened = undefined;
    if (this.#ownsRunner) await this.#runner.close();
  }

  #notFound(cause?: unknown): M2mError {
    return new M2mError("ERR_KEY_NOT_FOUND", "permanent", `no device key at ${this.#keyHex}`, {
      hint: "run `m2m-agent keys init` to create it",
      details: { handle: this.#keyHex },
      ...(cause === undefined ? {} : { cause }),
    });
  }

  #mapMissing(err: unknown): unknown {
    return err instanceof M2mError && err.code === "ERR_TPM_HANDLE_MISSING" ? this.#notFound(err) : err;
  }
}

/**
 * Parses a key reference `tpm:tcti=<TCTI>;handle=0x8100xxxx` (as in KeyInfo.ref).
 * @throws ERR_KEY_CONFIG when malformed or the handle is outside the owner persistent range.
 */
export function parseTpmKeyRef(ref: string): { tcti: string; keyHandle: number } {
  const m = /^tpm:tcti=(.+);handle=(0x[0-9a-fA-F]{8})$/.exec(ref);
  if (m?.[1] === undefined || m[2] === undefined) {
    throw new M2mError("ERR_KEY_CONFIG", "permanent", "not a TPM key reference", {
      hint: "expected tpm:tcti=<TCTI>;handle=0x8100xxxx",
    });
  }
  return { tcti: m[1], keyHandle: ownerPersistentHandle(m[2], "handle") };
}

export { readPublicOrUndefined, spkiPemOf } from "./read-public.js";

/** The attestation capability of `key`: EK/AK/certify on the key's own runner (one TPM queue). */
function tpmAttestationOf(key: TpmKeyProvider): TpmAttestation {
  const ops = new TpmAttestationOps(key.runner, { akHandle: key.akHandle });
  const quoter = new AkQuoter(key.runner, key.akHandle);
  return {
    keyHandle: key.keyHandle,
    akHandle: key.akHandle,
    async devicePublic() {
      const ev = await key.evidence();
      if (ev.kind !== "tpm") throw new M2mError("ERR_KEY_EVIDENCE", "permanent", "not a TPM key");
      const tpmt = Buffer.from(ev.tpmtPublicHex, "hex");
      const out = Buffer.alloc(2 + tpmt.length);
      out.writeUInt16BE(tpmt.length, 0);
      tpmt.copy(out, 2);
      return new Uint8Array(out);
    },
    readEkPublics: (options) => ops.readEkPublics(options),
    readEkCertificates: () => ops.readEkCertificates(),
    createAk: (options) => ops.createAk(options),
    activateCredential: (blob, ekHandle) => ops.activateCredential(blob, ekHandle),
    certify: (nonce) => ops.certify(key.keyHandle, key.akHandle, nonce),
    quote: (qualifyingData, bank, pcrs) => quoter.quote(qualifyingData, bank, pcrs),
    evictAk: async () => {
      await key.runner
        .exclusive(async (tx) =>
          tx.run("tpm2_evictcontrol", ["-C", "o", ...(await tx.ownerAuthArgs()), "-c", hex32(key.akHandle)], {
            op: "evict-ak",
          }),
        )
        .catch(() => undefined);
    },
    lockout: () => readLockoutInfo(key.runner),
  };
}
