import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import { readdir, readFile, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import * as x509 from "@peculiar/x509";
import { writeFileAtomic } from "../../core/atomic-file.js";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import { defaultRetryPolicy, type RetryPolicy, withRetry } from "../../core/retry.js";
import { createCsr } from "../../keys/csr.js";
import type { KeyInfo, KeyProvider } from "../../keys/key-provider.js";
import type { KeyRotation } from "../../keys/rotation.js";
import type { CredentialHealth } from "../oauth/token-source.js";
import type { EstClient } from "./est-client.js";

export interface CertificateRenewerConfig {
  readonly deviceId: string;
  /** The device certificate (PEM); replaced atomically, never torn. */
  readonly certFile: string;
  /** Fleet CA certificate(s), PEM: a new certificate must chain to one of them. */
  readonly caPem: string;
  /** Renew when this fraction of the lifetime has passed (default 2/3). */
  readonly renewFraction?: number;
  /** ± jitter around the renewal point, as a fraction of the lifetime (default 0.05). */
  readonly jitterFraction?: number;
  /** Rotate the hardware key on each renewal (needs `rotation`). */
  readonly rotateKey?: boolean;
  readonly retry?: RetryPolicy;
}

export type { KeyRotation } from "../../keys/rotation.js";

export interface CertificateRenewerDeps {
  readonly keys: KeyProvider;
  readonly est: EstClient;
  readonly clock: Clock;
  readonly log?: Logger;
  readonly random?: () => number;
  readonly rotation?: KeyRotation;
  /**
   * Recovery when the certificate expired while offline (TPM devices): re-attest through the
   * enrolment flow, which writes a fresh certificate. Injected by the composition root.
   */
  readonly reattest?: () => Promise<void>;
  /**
   * Gets the certificate for a NEW key during a rotation (TPM: `TpmRotationClient.issue`, which adds
   * the AK certification); default `est.simplereenroll(csr)` (PKCS#11: CSR signed by the new key,
   * request authenticated by the current one).
   */
  readonly issueWithNewKey?: (next: KeyProvider, csrDer: Uint8Array) => Promise<x509.X509Certificate[]>;
  /**
   * Recovery of a rotation whose answer was lost (crash or cut connection after the registrar had
   * switched the registry to the new key): asks for a certificate authenticated BY the pending key
   * (e.g. EST simplereenroll with an `est` token whose assertion and DPoP proof the pending key
   * signs). A definitive refusal means the registry still has the old key: the rotation restarts.
   */
  readonly issueForPendingKey?: (next: KeyProvider, csrDer: Uint8Array) => Promise<x509.X509Certificate[]>;
  /** Called once a rotation committed (new cert on disk, old key destroyed): switch signers here. */
  readonly onRotated?: (next: KeyProvider, certPem: string) => Promise<void> | void;
  /** Test seam for crash injection; default writeFileAtomic (temp + fsync + rename + fsync dir). */
  readonly writeFile?: (path: string, data: string) => Promise<void>;
}

export type RenewOutcome = "not-due" | "renewed" | "reattested";

export interface CertificateStatus {
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly renewAt: Date;
  readonly serial: string;
}

/**
 * Renews the device certificate over EST at a fraction of its lifetime (default 2/3, jittered),
 * with retry; the new certificate replaces the old one only after it chains to the fleet CA, is
 * valid now, names this device and carries the hardware key.
 */
export class CertificateRenewer {
  readonly #config: CertificateRenewerConfig;
  readonly #deps: CertificateRenewerDeps;
  readonly #log: Logger;
  readonly #ca: x509.X509Certificate[];
  readonly #jitter = new Map<string, number>();
  #health: CredentialHealth = { ok: true, detail: "not checked yet" };
  #keys: KeyProvider;
  #tempsSwept = false;

  constructor(config: CertificateRenewerConfig, deps: CertificateRenewerDeps) {
    this.#config = config;
    this.#deps = deps;
    this.#keys = deps.keys;
    this.#log = deps.log ?? silentLogger;
    this.#ca = splitPem(config.caPem).map((p) => new x509.X509Certificate(p));
    if (config.rotateKey === true && deps.rotation === undefined) {
      throw new M2mError("ERR_CONFIG", "permanent", "est.rotate_key needs a key rotation backend");
    }
  }

  health(): CredentialHealth {
    return this.#health;
  }

  /** The key provider currently behind the certificate (changes after a rotation). */
  get keys(): KeyProvider {
    return this.#keys;
  }

  /** Reads the current certificate and computes its renewal point. @throws ERR_CERT_MISSING */
  async status(): Promise<CertificateStatus> {
    const cert = await this.#readCert();
    const lifeMs = cert.notAfter.getTime() - cert.notBefore.getTime();
    let j = this.#jitter.get(cert.serialNumber);
    if (j === undefined) {
      j = ((this.#deps.random ?? Math.random)() * 2 - 1) * (this.#config.jitterFraction ?? 0.05);
      this.#jitter.clear();
      this.#jitter.set(cert.serialNumber, j);
    }
    const fraction = Math.min(0.95, Math.max(0.1, (this.#config.renewFraction ?? 2 / 3) + j));
    return {
      notBefore: cert.notBefore,
      notAfter: cert.notAfter,
      renewAt: new Date(cert.notBefore.getTime() + lifeMs * fraction),
      serial: cert.serialNumber,
    };
  }

  /**
   * Finishes a rotation interrupted between "new certificate written" and "old key destroyed": if the
   * certificate on disk carries the next key, that key becomes current. Idempotent.
   */
  async recoverRotation(): Promise<boolean> {
    const rotation = this.#deps.rotation;
    if (rotation === undefined) return false;
    const cert = await this.#readCert().catch(() => undefined);
    if (cert === undefined) return false;
    const certSpki = spkiDer(cert.publicKey.toString("pem"));
    const current = await this.#keys.open().catch(() => undefined);
    if (current !== undefined && spkiDer(current.spkiPem).equals(certSpki))
      return this.#recoverLostAnswer(rotation);
    const next = await rotation.prepare();
    if (!spkiDer((await next.open()).spkiPem).equals(certSpki)) {
      await rotation.abort(next);
      return false;
    }
    await rotation.commit(next);
    this.#keys = next;
    await this.#deps.onRotated?.(next, cert.toString("pem"));
    this.#log.warn("completed an interrupted key rotation", {});
    return true;
  }

  /**
   * A rotation is pending and the certificate on disk is still the old one: the registrar may have
   * switched to the pending key without us hearing back. Probe with the pending key.
   */
  async #recoverLostAnswer(rotation: KeyRotation): Promise<boolean> {
    const probe = this.#deps.issueForPendingKey;
    if (probe === undefined || rotation.hasPending === undefined || !(await rotation.hasPending()))
      return false;
    const next = await rotation.prepare();
    const info = await next.open();
    let certs: x509.X509Certificate[];
    try {
      certs = await probe(next, await createCsr(next, info, { commonName: this.#config.deviceId }));
    } catch (err) {
      // Refused: the registry still names the old key; the pending key is reused by the next rotation.
      if (err instanceof M2mError && err.retry !== "transient") return false;
      throw err;
    }
    const { leaf, pem } = await this.#installIssued(certs, info);
    await rotation.commit(next);
    this.#keys = next;
    await this.#deps.onRotated?.(next, pem);
    this.#log.warn("recovered a key rotation whose answer was lost", { serial: leaf.serialNumber });
    return true;
  }

  /** Renews when due; re-attests when expired and a reattest hook exists. */
  async renewIfDue(): Promise<RenewOutcome> {
    await this.#sweepTemps();
    await this.recoverRotation();
    const now = this.#deps.clock.now();
    let st: CertificateStatus | undefined;
    try {
      st = await this.status();
    } catch (err) {
      if (!(err instanceof M2mError && err.code === "ERR_CERT_MISSING") || this.#deps.reattest === undefined)
        throw err;
    }
    if (st !== undefined && now < st.renewAt) {
      this.#health = { ok: true, detail: `certificate valid until ${st.notAfter.toISOString()}` };
      return "not-due";
    }
    if ((st === undefined || now >= st.notAfter) && this.#deps.reattest !== undefined) {
      // The certificate can no longer authenticate us; re-attestation with the EK/AK is the way back.
      this.#log.warn("device certificate expired or missing: re-attesting", {});
      await this.#deps.reattest();
      await this.#verifyOnDisk();
      this.#health = { ok: true, detail: "re-attested after certificate expiry" };
      return "reattested";
    }
    await this.renew();
    return "renewed";
  }

  /** Removes temp files a crash left between write and rename (writeFileAtomic's `.name.*.tmp`). */
  async #sweepTemps(): Promise<void> {
    if (this.#tempsSwept) return;
    this.#tempsSwept = true;
    const dir = dirname(this.#config.certFile);
    const prefix = `.${basename(this.#config.certFile)}.`;
    const names = await readdir(dir).catch(() => [] as string[]);
    for (const n of names) {
      if (n.startsWith(prefix) && n.endsWith(".tmp")) await unlink(join(dir, n)).catch(() => undefined);
    }
  }

  /** Renews now (with retry). */
  async renew(): Promise<void> {
    await this.#sweepTemps();
    const policy = this.#config.retry ?? { ...defaultRetryPolicy, deadlineMs: 600_000, maxAttempts: 10 };
    try {
      await withRetry(policy, () => this.#renewOnce(), {
        clock: this.#deps.clock,
        ...(this.#deps.random === undefined ? {} : { random: this.#deps.random }),
        onRetry: ({ attempt, delayMs, error }) =>
          this.#log.warn("certificate renewal failed, retrying", { attempt, delayMs, code: error.code }),
      });
      const st = await this.status();
      this.#health = { ok: true, detail: `certificate renewed, valid until ${st.notAfter.toISOString()}` };
    } catch (err) {
      const e =
        err instanceof M2mError
          ? err
          : new M2mError("ERR_EST_RENEW", "transient", "renewal failed", { cause: err });
      this.#health = { ok: false, code: e.code, detail: e.message };
      throw e;
    }
  }

  /**
   * Runs until `signal` aborts: sleeps (monotonic, in ≤ 1 h steps so wall-clock corrections are
   * noticed) until the renewal point, renews, repeats.
   */
  async run(signal: AbortSignal): Promise<void> {
    const clock = this.#deps.clock;
    while (!signal.aborted) {
      let waitMs = 60_000;
      try {
        await this.renewIfDue();
        const st = await this.status();
        waitMs = Math.max(1000, Math.min(3_600_000, st.renewAt.getTime() - clock.now().getTime()));
      } catch (err) {
        this.#log.warn("certificate check failed", { error: err });
      }
      try {
        await clock.sleep(waitMs, signal);
      } catch {
        return;
      }
    }
  }

  async #renewOnce(): Promise<void> {
    // A rotation left pending (earlier attempt, crash) may already be done at the registrar.
    if (await this.recoverRotation()) return;
    const rotating = this.#config.rotateKey === true && this.#deps.rotation !== undefined;
    const next = rotating ? await this.#deps.rotation?.prepare() : undefined;
    const keys = next ?? this.#keys;
    let written = false;
    try {
      const info = await keys.open();
      const csr = await createCsr(keys, info, { commonName: this.#config.deviceId });
      const certs =
        next !== undefined && this.#deps.issueWithNewKey !== undefined
          ? await this.#deps.issueWithNewKey(next, csr)
          : await this.#deps.est.simplereenroll(csr);
      const { leaf, pem } = await this.#installIssued(certs, info);
      written = true;
      if (next !== undefined) {
        // Only now, with the new certificate in place, may the old key go.
        await this.#deps.rotation?.commit(next);
        this.#keys = next;
        await this.#deps.onRotated?.(next, pem);
      }
      this.#log.info("device certificate renewed", {
        serial: leaf.serialNumber,
        notAfter: leaf.notAfter.toISOString(),
        rotated: next !== undefined,
      });
    } catch (err) {
      // The new key is dropped only on a definitive refusal before its certificate was written.
      // After the write, recoverRotation() finishes the commit; after a transient failure (lost
      // answer: the registrar may already hold the new key) the pending key is kept and reused.
      const definitive = err instanceof M2mError && err.retry !== "transient";
      if (next !== undefined && !written && definitive)
        await this.#deps.rotation?.abort(next).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Verifies the issued chain (leaf for `info`'s key, chaining to the trusted CA) and writes the leaf
   * to the certificate file. Returns the leaf and its PEM.
   */
  async #installIssued(
    certs: x509.X509Certificate[],
    info: KeyInfo,
  ): Promise<{ leaf: x509.X509Certificate; pem: string }> {
    const leaf = this.#verifyIssued(certs, info);
    await this.#verifyChain(leaf);
    const pem = leaf.toString("pem");
    // Atomic replacement: a crash leaves the old or the new certificate, never a torn file.
    await (this.#deps.writeFile ?? ((p, d) => writeFileAtomic(p, d, 0o600)))(
      this.#config.certFile,
      `${pem}\n`,
    );
    return { leaf, pem };
  }

  /** @throws ERR_EST_CERT_* (permanent) when the server's answer is not a certificate we can use. */
  #verifyIssued(certs: x509.X509Certificate[], info: KeyInfo): x509.X509Certificate {
    const want = spkiDer(info.spkiPem);
    // Security: a certificate for any key but the hardware key would be useless or a substitution.
    const leaf = certs.find((c) => Buffer.from(spkiDer(c.publicKey.toString("pem"))).equals(want));
    if (leaf === undefined)
      throw new M2mError(
        "ERR_EST_CERT_KEY_MISMATCH",
        "permanent",
        "issued certificate does not carry the device key",
      );
    return leaf;
  }

  async #verifyChain(cert: x509.X509Certificate): Promise<void> {
    let ok = false;
    for (const ca of this.#ca) {
      if (await cert.verify({ publicKey: ca, signatureOnly: true }).catch(() => false)) ok = true;
    }
    // Security: only the fleet CA may issue our identity.
    if (!ok)
      throw new M2mError(
        "ERR_EST_CERT_UNTRUSTED",
        "permanent",
        "issued certificate does not chain to the fleet CA",
      );
    const now = this.#deps.clock.now();
    if (now < new Date(cert.notBefore.getTime() - 300_000) || now >= cert.notAfter) {
      throw new M2mError("ERR_EST_CERT_NOT_VALID", "permanent", "issued certificate is not valid now");
    }
    // Security: the certificate must name this device, or services would see another identity.
    if (cert.subjectName.getField("CN")[0] !== this.#config.deviceId) {
      throw new M2mError("ERR_EST_CERT_SUBJECT", "permanent", "issued certificate names another device");
    }
  }

  async #readCert(): Promise<x509.X509Certificate> {
    let pem: string;
    try {
      pem = await readFile(this.#config.certFile, "utf8");
    } catch (err) {
      throw new M2mError("ERR_CERT_MISSING", "permanent", "no device certificate", { cause: err });
    }
    try {
      return new x509.X509Certificate(pem);
    } catch (err) {
      throw new M2mError("ERR_CERT_INVALID", "permanent", "device certificate unreadable", { cause: err });
    }
  }

  async #verifyOnDisk(): Promise<void> {
    await this.verifyCurrent();
  }

  /** Full check of the certificate on disk: fleet CA, validity now, device name, hardware key. */
  async verifyCurrent(): Promise<void> {
    const cert = await this.#readCert();
    await this.#verifyChain(cert);
    this.#verifyIssued([cert], await this.#keys.open());
  }
}

function spkiDer(pem: string): Buffer {
  return createPublicKey(pem).export({ format: "der", type: "spki" });
}

function splitPem(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}
