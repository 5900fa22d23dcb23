import "reflect-metadata";
import { createPublicKey, randomBytes, webcrypto } from "node:crypto";
import { mkdir, readFile } from "node:fs/promises";
import { isIP } from "node:net";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { writeFileAtomic } from "../../core/atomic-file.js";
import { type Clock, systemClock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;
// @peculiar/x509 defaults to globalThis.crypto, which is this same WebCrypto in Node >= 19.
const crypto = webcrypto;

const EC_ALG = { name: "ECDSA", namedCurve: "P-256" } as const;
const SIGN_ALG = { name: "ECDSA", hash: "SHA-256" } as const;
const DAY_MS = 86_400_000;

/** File names inside a CA directory (`m2m-registrar ca init --dir D`). */
export const CA_FILES = {
  caCert: "ca.pem",
  caKey: "ca.key.pem",
  serverCert: "server.pem",
  serverKey: "server.key.pem",
} as const;

export interface CaInitOptions {
  readonly dir: string;
  /** Extra subject alternative names of the registrar TLS certificate (DNS names or IP addresses). */
  readonly sans?: readonly string[];
  readonly commonName?: string;
  readonly caLifetimeDays?: number;
  readonly serverLifetimeDays?: number;
  readonly clock?: Clock;
  /** Refuse to overwrite an existing CA unless set. */
  readonly force?: boolean;
}

export interface CaPaths {
  readonly dir: string;
  readonly caCert: string;
  readonly caKey: string;
  readonly serverCert: string;
  readonly serverKey: string;
}

export function caPaths(dir: string): CaPaths {
  return {
    dir,
    caCert: join(dir, CA_FILES.caCert),
    caKey: join(dir, CA_FILES.caKey),
    serverCert: join(dir, CA_FILES.serverCert),
    serverKey: join(dir, CA_FILES.serverKey),
  };
}

/** A random positive 128-bit serial (hex), as RFC 5280 asks for unpredictable serials. */
export function randomSerial(): string {
  const b = randomBytes(16);
  b[0] = ((b[0] ?? 0) & 0x7f) | 0x01;
  return b.toString("hex");
}

async function exportPkcs8Pem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await crypto.subtle.exportKey("pkcs8", key));
  const b64 = der.toString("base64").replace(/(.{64})/g, "$1\n");
  return `-----BEGIN PRIVATE KEY-----\n${b64.trimEnd()}\n-----END PRIVATE KEY-----\n`;
}

function pemBody(pem: string, label: string): Buffer {
  const m = new RegExp(`-----BEGIN ${label}-----([A-Za-z0-9+/=\\s]+)-----END ${label}-----`).exec(pem);
  if (m?.[1] === undefined) throw new M2mError("ERR_CA_LOAD", "permanent", `not a ${label} PEM`);
  return Buffer.from(m[1].replace(/\s+/g, ""), "base64");
}

/**
 * Creates the fleet CA (ECDSA P-256 root, 10 years) and a TLS server certificate for the registrar
 * (SANs localhost, 127.0.0.1 and `sans`). Private keys are written 0600 from the first byte.
 * @throws ERR_CA_EXISTS when the directory already holds a CA and `force` is not set.
 */
export async function initCa(options: CaInitOptions): Promise<CaPaths> {
  const clock = options.clock ?? systemClock;
  const paths = caPaths(options.dir);
  await mkdir(options.dir, { recursive: true, mode: 0o700 });
  if (options.force !== true) {
    const exists = await readFile(paths.caKey).then(
      () => true,
      () => false,
    );
    if (exists) {
      throw new M2mError("ERR_CA_EXISTS", "permanent", `a CA already exists in ${options.dir}`, {
        hint: "use another --dir, or --force to replace it (every issued certificate becomes untrusted)",
      });
    }
  }
  const now = clock.now();
  const notBefore = new Date(now.getTime() - 5 * 60_000);
  const caKeys = (await crypto.subtle.generateKey(EC_ALG, true, ["sign", "verify"])) as CryptoKeyPair;
  const caName = `CN=${options.commonName ?? "m2m fleet CA"}`;
  const caCert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: caName,
    notBefore,
    notAfter: new Date(now.getTime() + (options.caLifetimeDays ?? 3650) * DAY_MS),
    signingAlgorithm: SIGN_ALG,
    keys: caKeys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(caKeys.publicKey),
    ],
  });

  const serverKeys = (await crypto.subtle.generateKey(EC_ALG, true, ["sign", "verify"])) as CryptoKeyPair;
  const sanEntries: x509.JsonGeneralName[] = [];
  for (const san of ["localhost", "127.0.0.1", ...(options.sans ?? [])]) {
    const entry: x509.JsonGeneralName = isIP(san) ? { type: "ip", value: san } : { type: "dns", value: san };
    if (!sanEntries.some((e) => e.type === entry.type && e.value === entry.value)) sanEntries.push(entry);
  }
  const serverCert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: "CN=m2m-registrar",
    issuer: caCert.subject,
    notBefore,
    notAfter: new Date(now.getTime() + (options.serverLifetimeDays ?? 397) * DAY_MS),
    signingAlgorithm: SIGN_ALG,
    publicKey: serverKeys.publicKey,
    signingKey: caKeys.privateKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension(sanEntries),
      await x509.SubjectKeyIdentifierExtension.create(serverKeys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(caKeys.publicKey),
    ],
  });

  await writeFileAtomic(paths.caKey, await exportPkcs8Pem(caKeys.privateKey), 0o600);
  await writeFileAtomic(paths.serverKey, await exportPkcs8Pem(serverKeys.privateKey), 0o600);
  await writeFileAtomic(paths.caCert, caCert.toString("pem"), 0o644);
  await writeFileAtomic(
    paths.serverCert,
    `${serverCert.toString("pem")}\n${caCert.toString("pem")}\n`,
    0o644,
  );
  return paths;
}

/** A CSR whose signature has been verified (proof of possession of the key in it). */
export interface VerifiedCsr {
  readonly csr: x509.Pkcs10CertificateRequest;
  /** The CSR's SubjectPublicKeyInfo, DER, normalised through Node's parser. */
  readonly spkiDer: Buffer;
}

/**
 * Parses a PKCS#10 CSR and checks its self-signature.
 * @throws ERR_CSR_INVALID (unparsable / unsupported key), ERR_CSR_SIGNATURE (signature does not verify)
 */
export async function verifyCsr(der: Uint8Array): Promise<VerifiedCsr> {
  let csr: x509.Pkcs10CertificateRequest;
  let spkiDer: Buffer;
  try {
    csr = new x509.Pkcs10CertificateRequest(Buffer.from(der));
    spkiDer = normaliseSpki(new Uint8Array(csr.publicKey.rawData));
  } catch (err) {
    throw new M2mError("ERR_CSR_INVALID", "permanent", "the CSR could not be parsed", { cause: err });
  }
  let ok = false;
  try {
    ok = await csr.verify();
  } catch (err) {
    throw new M2mError("ERR_CSR_SIGNATURE", "permanent", "the CSR signature does not verify", { cause: err });
  }
  // Security: the CSR signature is the proof that the requester holds the private key.
  if (!ok) throw new M2mError("ERR_CSR_SIGNATURE", "permanent", "the CSR signature does not verify");
  return { csr, spkiDer };
}

/** Re-encodes an SPKI through Node so two encodings of one key compare equal byte for byte. */
export function normaliseSpki(spki: Uint8Array | string): Buffer {
  const key =
    typeof spki === "string"
      ? createPublicKey(spki)
      : createPublicKey({ key: Buffer.from(spki), format: "der", type: "spki" });
  return key.export({ format: "der", type: "spki" });
}

export interface IssuedCertificate {
  readonly pem: string;
  readonly serial: string;
  readonly notAfter: Date;
}

/** A CRL entry to sign: a revoked certificate's serial (hex) and when it was revoked. */
export interface CrlEntryInput {
  readonly serial: string;
  readonly revokedAt: Date;
}

export interface CrlInput {
  readonly entries: readonly CrlEntryInput[];
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  /** The cRLNumber extension (RFC 5280 §5.2.3): monotonically increasing for this CA. */
  readonly crlNumber: bigint;
}

export interface SignedCrl {
  readonly der: Buffer;
  readonly pem: string;
  readonly crlNumber: bigint;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  readonly entries: number;
}

/** OID of the cRLNumber CRL extension (RFC 5280 §5.2.3). */
export const CRL_NUMBER_OID = "2.5.29.20";

/** DER INTEGER of a non-negative bigint (minimal two's-complement encoding). */
function derInteger(n: bigint): Uint8Array {
  if (n < 0n) throw new M2mError("ERR_INTERNAL", "permanent", "CRL number must not be negative");
  let hex = n.toString(16);
  if (hex.length % 2 === 1) hex = `0${hex}`;
  // A leading byte with the high bit set would read as negative: prefix 00.
  if (Number.parseInt(hex.slice(0, 2), 16) >= 0x80) hex = `00${hex}`;
  const body = Buffer.from(hex, "hex");
  if (body.length > 20) throw new M2mError("ERR_INTERNAL", "permanent", "CRL number longer than 20 octets");
  return Uint8Array.from([0x02, body.length, ...body]);
}

/** Reads the cRLNumber of a CRL (PEM or DER); undefined when it has none or cannot be parsed. */
export function crlNumberOf(crl: string | Uint8Array): bigint | undefined {
  try {
    const der = typeof crl === "string" ? pemBody(crl, "X509 CRL") : Buffer.from(crl);
    const parsed = new x509.X509Crl(der);
    const ext = parsed.extensions.find((e) => e.type === CRL_NUMBER_OID);
    if (ext === undefined) return undefined;
    const v = Buffer.from(ext.value);
    if (v[0] !== 0x02 || v.length < 3) return undefined;
    return BigInt(`0x${v.subarray(2, 2 + (v[1] ?? 0)).toString("hex")}`);
  } catch {
    return undefined;
  }
}

export interface IssueOptions {
  readonly deviceId: string;
  /** The registered / attested device key (SPKI DER); the CSR must carry exactly this key. */
  readonly expectedSpkiDer: Uint8Array;
  readonly lifetimeSeconds: number;
  readonly dnsNames?: readonly string[];
}

/** The fleet CA: a root that signs registrar TLS and device client certificates. */
export class FleetCa {
  readonly #cert: x509.X509Certificate;
  readonly #key: CryptoKey;
  readonly #clock: Clock;
  readonly #crlUrls: readonly string[];

  private constructor(cert: x509.X509Certificate, key: CryptoKey, clock: Clock, crlUrls: readonly string[]) {
    this.#cert = cert;
    this.#key = key;
    this.#clock = clock;
    this.#crlUrls = crlUrls;
  }

  /**
   * Loads `ca.pem` + `ca.key.pem` from a CA directory. `crlUrls`, when given, are written into every
   * device certificate as its CRL distribution point (RFC 5280 §4.2.1.13).
   * @throws ERR_CA_LOAD
   */
  static async load(
    dir: string,
    clock: Clock = systemClock,
    options: { readonly crlUrls?: readonly string[] } = {},
  ): Promise<FleetCa> {
    const paths = caPaths(dir);
    try {
      const cert = new x509.X509Certificate(await readFile(paths.caCert, "utf8"));
      const pkcs8 = pemBody(await readFile(paths.caKey, "utf8"), "PRIVATE KEY");
      const key = await crypto.subtle.importKey("pkcs8", pkcs8, EC_ALG, false, ["sign"]);
      return new FleetCa(cert, key, clock, options.crlUrls ?? []);
    } catch (err) {
      throw new M2mError("ERR_CA_LOAD", "permanent", `could not load the fleet CA from ${dir}`, {
        cause: err,
        hint: "run `m2m-registrar ca init --dir DIR` first",
      });
    }
  }

  get certificatePem(): string {
    return this.#cert.toString("pem");
  }

  /** The chain a device needs to validate its certificate (the root only, for now). */
  chainPem(): string[] {
    return [this.certificatePem];
  }

  /**
   * Issues a short-lived client certificate for a device from a verified CSR.
   * Subject CN = deviceId, SAN URI `urn:m2m:device:<deviceId>`, EKU clientAuth, random serial.
   * @throws ERR_CSR_KEY_MISMATCH when the CSR's key is not the registered device key.
   */
  async issueDeviceCertificate(verified: VerifiedCsr, options: IssueOptions): Promise<IssuedCertificate> {
    // Security: a CSR is only honoured for the key that was attested / registered, never another one.
    if (!verified.spkiDer.equals(normaliseSpki(options.expectedSpkiDer))) {
      throw new M2mError("ERR_CSR_KEY_MISMATCH", "permanent", "the CSR key is not the device key");
    }
    const now = this.#clock.now();
    const notAfter = new Date(now.getTime() + options.lifetimeSeconds * 1000);
    const serial = randomSerial();
    const san: x509.JsonGeneralName[] = [{ type: "url", value: `urn:m2m:device:${options.deviceId}` }];
    for (const dns of options.dnsNames ?? []) san.push({ type: "dns", value: dns });
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serial,
      // The subject comes from the registry, never from the CSR (the requester does not choose its name).
      subject: [{ CN: [options.deviceId] }],
      issuer: this.#cert.subject,
      notBefore: new Date(now.getTime() - 60_000),
      notAfter,
      signingAlgorithm: SIGN_ALG,
      publicKey: verified.csr.publicKey,
      signingKey: this.#key,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
        new x509.SubjectAlternativeNameExtension(san),
        await x509.SubjectKeyIdentifierExtension.create(verified.csr.publicKey),
        await x509.AuthorityKeyIdentifierExtension.create(this.#cert),
        ...(this.#crlUrls.length > 0 ? [new x509.CRLDistributionPointsExtension([...this.#crlUrls])] : []),
      ],
    });
    return { pem: cert.toString("pem"), serial, notAfter };
  }

  /**
   * Signs a CRL (RFC 5280 v2) for this CA: issuer = the CA subject, thisUpdate/nextUpdate, the
   * cRLNumber and the authority key identifier extensions, one entry per revoked serial.
   */
  async signCrl(input: CrlInput): Promise<SignedCrl> {
    const crl = await x509.X509CrlGenerator.create({
      issuer: this.#cert.subject,
      thisUpdate: input.thisUpdate,
      nextUpdate: input.nextUpdate,
      signingAlgorithm: SIGN_ALG,
      signingKey: this.#key,
      extensions: [
        await x509.AuthorityKeyIdentifierExtension.create(this.#cert),
        new x509.Extension(CRL_NUMBER_OID, false, derInteger(input.crlNumber)),
      ],
      entries: input.entries.map((e) => ({ serialNumber: e.serial, revocationDate: e.revokedAt })),
    });
    const der = Buffer.from(crl.rawData);
    return {
      der,
      // RFC 7468 label: OpenSSL (and so mosquitto) reads "X509 CRL" only, not @peculiar's "CRL".
      pem: `-----BEGIN X509 CRL-----\n${der
        .toString("base64")
        .replace(/(.{64})/g, "$1\n")
        .trimEnd()}\n-----END X509 CRL-----\n`,
      crlNumber: input.crlNumber,
      thisUpdate: input.thisUpdate,
      nextUpdate: input.nextUpdate,
      entries: input.entries.length,
    };
  }
}
