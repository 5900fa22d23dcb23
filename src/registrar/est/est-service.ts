import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import type { IncomingMessage } from "node:http";
import * as x509 from "@peculiar/x509";
import { calculateJwkThumbprint, type JWK } from "jose";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import {
  type IssuedCertificate,
  type IssueOptions,
  normaliseSpki,
  type VerifiedCsr,
  verifyCsr,
} from "../ca/fleet-ca.js";
import type { Route, RouteContext, RouteResponse } from "../http/router.js";
import {
  type AccessTokenCheck,
  parseAuthorization,
  type VerifiedAccessToken,
} from "../oauth/access-token.js";
import type { DeviceDirectory, DirectoryDevice } from "../oauth/directory.js";

/** What EST needs from the fleet CA (FleetCa satisfies it). */
export interface EstCertificateAuthority {
  chainPem(): string[];
  issueDeviceCertificate(verified: VerifiedCsr, options: IssueOptions): Promise<IssuedCertificate>;
}

export interface EstDeps {
  readonly directory: DeviceDirectory;
  readonly ca: EstCertificateAuthority;
  readonly clock: Clock;
  readonly certLifetimeSeconds: number;
  /** Base URL clients use (for DPoP `htu`), e.g. `https://registrar.example:8443`. */
  readonly publicUrl: string | (() => string);
  /** Access-token verification (TokenService satisfies it); token auth is off when omitted. */
  readonly accessTokens?: {
    verifyAccessToken(token: string, check: AccessTokenCheck): Promise<VerifiedAccessToken>;
  };
  /** `aud` an access token must carry to be used here. */
  readonly tokenAudience?: string;
  /**
   * Whether this device may rotate its key on re-enrolment. Default: never. Only a request
   * authenticated with the CURRENT key (its certificate over mTLS, or a DPoP-bound token whose proof
   * the current key signed) can rotate. TPM devices should stay refused here: accepting a new TPM key
   * needs a TPM2_Certify proof by the AK, which this endpoint does not check (re-enrol instead).
   */
  readonly allowKeyRotation?: (device: DirectoryDevice) => boolean | Promise<boolean>;
  /** Records the new key after a rotation (store update). Required for rotation to be accepted. */
  readonly onKeyRotated?: (deviceId: string, publicJwk: JWK, cert: IssuedCertificate) => Promise<void>;
  /**
   * Continuous attestation: the max quote age (seconds) when this device's group requires a fresh
   * quote for certificate renewal, else undefined (docs/attestation.md).
   */
  readonly renewalQuoteMaxAge?: (device: DirectoryDevice) => Promise<number | undefined>;
  /**
   * Called when a certificate is refused for want of a fresh quote (the registrar's audit trail, next
   * to the token endpoint's `attestation.refused`). `attestedAt`: the token's `attested.at`, if any.
   */
  readonly onRenewalRefused?: (
    device: DirectoryDevice,
    info: {
      readonly via: "mtls" | "token";
      readonly attestedAt: number | undefined;
      readonly maxAgeSec: number;
    },
  ) => Promise<void>;
  /** Records each issued certificate (serial, notAfter). */
  readonly onIssued?: (deviceId: string, cert: IssuedCertificate) => Promise<void> | void;
  readonly log?: Logger;
}

/** Codes → HTTP status for EST refusals. */
const STATUS: Readonly<Record<string, number>> = {
  ERR_EST_AUTH_REQUIRED: 401,
  ERR_EST_CLIENT_CERT: 401,
  ERR_ACCESS_TOKEN_INVALID: 401,
  ERR_ACCESS_TOKEN_EXPIRED: 401,
  ERR_ACCESS_TOKEN_DPOP_REQUIRED: 401,
  ERR_ACCESS_TOKEN_SCOPE: 403,
  ERR_DEVICE_UNKNOWN: 403,
  ERR_DEVICE_REVOKED: 403,
  ERR_EST_BODY: 400,
  ERR_CSR_INVALID: 400,
  ERR_CSR_SIGNATURE: 400,
  ERR_EST_CSR_SUBJECT: 400,
  ERR_CSR_KEY_MISMATCH: 403,
  ERR_EST_ROTATION_REFUSED: 403,
  ERR_ATTESTATION_RENEWAL: 403,
};

/** Generic messages (nothing expected or offending is echoed). */
const MESSAGE: Readonly<Record<string, string>> = {
  ERR_EST_AUTH_REQUIRED: "client certificate or access token required",
  ERR_EST_CLIENT_CERT: "client certificate not accepted",
  ERR_DEVICE_UNKNOWN: "device not accepted",
  ERR_DEVICE_REVOKED: "the device is revoked",
  ERR_EST_BODY: "body must be a base64 PKCS#10 request",
  ERR_CSR_INVALID: "the CSR could not be parsed",
  ERR_CSR_SIGNATURE: "the CSR signature does not verify",
  ERR_EST_CSR_SUBJECT: "the CSR subject does not name this device",
  ERR_CSR_KEY_MISMATCH: "the CSR key is not the device key",
  ERR_EST_ROTATION_REFUSED: "key rotation not permitted",
  ERR_ATTESTATION_RENEWAL: "renewal needs a token issued after a fresh TPM quote",
};

export const PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only";
const DEVICE_URN = "urn:m2m:device:";

interface Authenticated {
  readonly deviceId: string;
  readonly via: "mtls" | "token";
  /** SPKI DER of the key that authenticated the request (current cert key, or DPoP key). */
  readonly currentSpki?: Buffer;
  /** The token's `attested.at` (seconds), when authenticated by an attested token. */
  readonly attestedAt?: number;
}

/** A certs-only CMS SignedData (RFC 7030 §4.1.3), base64 with 64-column lines. */
export function certsOnlyBase64(pems: readonly string[]): string {
  const b64 = new x509.X509Certificates(pems.map((p) => new x509.X509Certificate(p))).export("base64");
  return `${b64.replace(/(.{64})/g, "$1\n").trimEnd()}\n`;
}

/**
 * EST (RFC 7030) for device certificates: /cacerts, /simpleenroll, /simplereenroll.
 * Authentication is the device's current certificate (TLS client auth, verified here against the
 * fleet CA with the injected clock) or an access token with scope `est` (Bearer or DPoP).
 */
export class EstService {
  readonly #deps: EstDeps;
  readonly #log: Logger;
  readonly #caCerts: x509.X509Certificate[];

  constructor(deps: EstDeps) {
    this.#deps = deps;
    this.#log = deps.log ?? silentLogger;
    this.#caCerts = deps.ca.chainPem().map((p) => new x509.X509Certificate(p));
  }

  cacerts(): RouteResponse {
    return {
      status: 200,
      body: certsOnlyBase64(this.#deps.ca.chainPem()),
      contentType: "application/pkcs7-mime",
      headers: { "content-transfer-encoding": "base64" },
    };
  }

  async enroll(ctx: RouteContext, kind: "simpleenroll" | "simplereenroll"): Promise<RouteResponse> {
    try {
      const auth = await this.#authenticate(ctx, kind);
      const device = await this.#deps.directory.getDevice(auth.deviceId);
      if (device === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", "no such device");
      // Security: a revoked device gets no new certificate, whatever it authenticates with.
      if (device.status !== "active") throw new M2mError("ERR_DEVICE_REVOKED", "permanent", "device revoked");
      const maxAge = await this.#deps.renewalQuoteMaxAge?.(device);
      // Security: where the fleet requires it, a certificate is only renewed for a platform that proved
      // its boot state recently (a token minted after a verified quote; mTLS alone proves only the key).
      if (
        maxAge !== undefined &&
        (auth.attestedAt === undefined || this.#deps.clock.nowSeconds() - auth.attestedAt > maxAge)
      ) {
        await this.#deps.onRenewalRefused?.(device, {
          via: auth.via,
          attestedAt: auth.attestedAt,
          maxAgeSec: maxAge,
        });
        throw new M2mError("ERR_ATTESTATION_RENEWAL", "permanent", "renewal requires a fresh TPM quote");
      }
      const verified = await verifyCsr(decodeBase64Body(ctx.rawBody));
      checkCsrNames(verified, device.deviceId);
      const registered = spkiOfJwk(device.publicJwk);
      let expected = registered;
      let rotated = false;
      if (!verified.spkiDer.equals(registered)) {
        // Security: a new key is accepted only on re-enrolment, authenticated by the CURRENT key, and
        // only when policy allows it for this device; otherwise the CSR must carry the registered key.
        const byCurrentKey = auth.currentSpki?.equals(registered) === true;
        if (
          kind !== "simplereenroll" ||
          !byCurrentKey ||
          (await this.#deps.allowKeyRotation?.(device)) !== true ||
          this.#deps.onKeyRotated === undefined
        ) {
          throw new M2mError(
            kind === "simplereenroll" ? "ERR_EST_ROTATION_REFUSED" : "ERR_CSR_KEY_MISMATCH",
            "permanent",
            "CSR key is not the registered device key",
          );
        }
        expected = verified.spkiDer;
        rotated = true;
      }
      const cert = await this.#deps.ca.issueDeviceCertificate(verified, {
        deviceId: device.deviceId,
        expectedSpkiDer: expected,
        lifetimeSeconds: this.#deps.certLifetimeSeconds,
      });
      if (rotated) {
        const jwk = createPublicKey({ key: verified.spkiDer, format: "der", type: "spki" }).export({
          format: "jwk",
        }) as JWK;
        await this.#deps.onKeyRotated?.(device.deviceId, jwk, cert);
      }
      await this.#deps.onIssued?.(device.deviceId, cert);
      ctx.auditFields({ deviceId: device.deviceId, via: auth.via, serial: cert.serial, rotated });
      this.#log.info("est certificate issued", { deviceId: device.deviceId, kind, via: auth.via, rotated });
      return {
        status: 200,
        body: certsOnlyBase64([cert.pem]),
        contentType: PKCS7_CERTS_ONLY,
        headers: { "content-transfer-encoding": "base64" },
      };
    } catch (err) {
      const code = err instanceof M2mError ? err.code : "ERR_INTERNAL";
      const status = STATUS[code] ?? (code.startsWith("ERR_DPOP") ? 401 : 500);
      if (status >= 500) this.#log.error("est request failed", { error: err });
      else this.#log.info("est request refused", { code, kind });
      ctx.auditFields({ code });
      const headers: Record<string, string> = { "x-m2m-error": code };
      if (status === 401) headers["www-authenticate"] = 'Bearer realm="est", DPoP algs="ES256 RS256 PS256"';
      return {
        status,
        body: `${code}: ${MESSAGE[code] ?? (status >= 500 ? "internal error" : "request refused")}\n`,
        contentType: "text/plain",
        headers,
      };
    }
  }

  async #authenticate(ctx: RouteContext, kind: string): Promise<Authenticated> {
    const authz = ctx.req.headers.authorization;
    if (authz !== undefined && this.#deps.accessTokens !== undefined) {
      return this.#byToken(ctx.req, authz, kind);
    }
    const der = ctx.peerCertificateDer();
    if (der !== undefined) return this.#byCertificate(der);
    throw new M2mError("ERR_EST_AUTH_REQUIRED", "permanent", "no client certificate and no access token");
  }

  async #byCertificate(der: Buffer): Promise<Authenticated> {
    let cert: x509.X509Certificate;
    try {
      cert = new x509.X509Certificate(der);
    } catch (err) {
      throw new M2mError("ERR_EST_CLIENT_CERT", "permanent", "unparsable client certificate", { cause: err });
    }
    const now = this.#deps.clock.now();
    // Security: the TLS layer only proved possession of the key; the certificate itself must be
    // issued by the fleet CA and valid now (checked here with the injected clock, not by OpenSSL).
    let signedByCa = false;
    for (const ca of this.#caCerts) {
      if (await cert.verify({ publicKey: ca, signatureOnly: true }).catch(() => false)) signedByCa = true;
    }
    if (!signedByCa)
      throw new M2mError("ERR_EST_CLIENT_CERT", "permanent", "client certificate not issued by the fleet CA");
    if (now < cert.notBefore || now > cert.notAfter) {
      throw new M2mError("ERR_EST_CLIENT_CERT", "permanent", "client certificate not valid now");
    }
    // Security: only device (clientAuth) certificates authenticate devices; not the registrar's TLS cert.
    const eku = cert.getExtension(x509.ExtendedKeyUsageExtension);
    if (eku === null || !eku.usages.includes(x509.ExtendedKeyUsage.clientAuth)) {
      throw new M2mError("ERR_EST_CLIENT_CERT", "permanent", "client certificate lacks clientAuth");
    }
    const deviceId = deviceIdOfCertificate(cert);
    if (deviceId === undefined)
      throw new M2mError("ERR_EST_CLIENT_CERT", "permanent", "client certificate names no device");
    return { deviceId, via: "mtls", currentSpki: normaliseSpki(new Uint8Array(cert.publicKey.rawData)) };
  }

  async #byToken(req: IncomingMessage, header: string, kind: string): Promise<Authenticated> {
    const parsed = parseAuthorization(header);
    if (parsed === undefined)
      throw new M2mError("ERR_ACCESS_TOKEN_INVALID", "permanent", "malformed Authorization");
    const dpopHeader = req.headers.dpop;
    const base = typeof this.#deps.publicUrl === "function" ? this.#deps.publicUrl() : this.#deps.publicUrl;
    const url = `${base.replace(/\/+$/, "")}/.well-known/est/${kind}`;
    const verified = await this.#deps.accessTokens?.verifyAccessToken(parsed.token, {
      audience: this.#deps.tokenAudience ?? base,
      requiredScope: "est",
      ...(typeof dpopHeader === "string" ? { dpop: { proof: dpopHeader, method: "POST", url } } : {}),
    });
    if (verified === undefined)
      throw new M2mError("ERR_EST_AUTH_REQUIRED", "permanent", "token auth disabled");
    // Security: a DPoP-bound token is only usable with the DPoP scheme (RFC 9449 §7.1).
    if (verified.jkt !== undefined && parsed.scheme !== "DPoP") {
      throw new M2mError("ERR_ACCESS_TOKEN_INVALID", "permanent", "DPoP-bound token sent as Bearer");
    }
    const device = await this.#deps.directory.getDevice(verified.sub);
    let currentSpki: Buffer | undefined;
    // A DPoP proof by the registered key proves possession of the current key (enables rotation).
    if (
      device !== undefined &&
      verified.jkt !== undefined &&
      verified.jkt === (await calculateJwkThumbprint(device.publicJwk, "sha256"))
    ) {
      currentSpki = spkiOfJwk(device.publicJwk);
    }
    const att = verified.claims.attested as { at?: unknown } | undefined;
    const attestedAt = typeof att?.at === "number" ? att.at : undefined;
    return {
      deviceId: verified.sub,
      via: "token",
      ...(currentSpki === undefined ? {} : { currentSpki }),
      ...(attestedAt === undefined ? {} : { attestedAt }),
    };
  }
}

function decodeBase64Body(raw: Buffer): Uint8Array {
  const text = raw.toString("ascii").replace(/\s+/g, "");
  // Security: strict alphabet; Buffer.from(base64) silently skips garbage otherwise.
  if (text === "" || !/^[A-Za-z0-9+/]+={0,2}$/.test(text)) {
    throw new M2mError("ERR_EST_BODY", "permanent", "body is not base64");
  }
  return Buffer.from(text, "base64");
}

/** The CSR may name the device (CN and/or SAN) but nothing else. */
function checkCsrNames(verified: VerifiedCsr, deviceId: string): void {
  const cns = verified.csr.subjectName.getField("CN");
  // Security: a device may only ask for its own name (the CA writes the name from the registry anyway).
  if (cns.some((cn) => cn !== deviceId)) {
    throw new M2mError("ERR_EST_CSR_SUBJECT", "permanent", "CSR CN is not the device ID");
  }
  const san = verified.csr.extensions.find((e) => e instanceof x509.SubjectAlternativeNameExtension) as
    | x509.SubjectAlternativeNameExtension
    | undefined;
  for (const n of san?.names.items ?? []) {
    const ok =
      (n.type === "url" && n.value === `${DEVICE_URN}${deviceId}`) ||
      (n.type === "dns" && n.value === deviceId);
    if (!ok) throw new M2mError("ERR_EST_CSR_SUBJECT", "permanent", "CSR SAN names something else");
  }
}

export function deviceIdOfCertificate(cert: x509.X509Certificate): string | undefined {
  const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
  const urn = san?.names.items.find((n) => n.type === "url" && n.value.startsWith(DEVICE_URN));
  const cn = cert.subjectName.getField("CN")[0];
  const fromUrn = urn?.value.slice(DEVICE_URN.length);
  if (fromUrn !== undefined && cn !== undefined && fromUrn !== cn) return undefined;
  return fromUrn ?? cn;
}

function spkiOfJwk(jwk: JWK): Buffer {
  const bare =
    jwk.kty === "EC" ? { kty: "EC", crv: jwk.crv, x: jwk.x, y: jwk.y } : { kty: jwk.kty, n: jwk.n, e: jwk.e };
  return createPublicKey({ key: bare as import("node:crypto").JsonWebKey, format: "jwk" }).export({
    format: "der",
    type: "spki",
  });
}

/** The EST routes for the registrar server (`extraRoutes`). */
export function estRoutes(deps: EstDeps): Route[] {
  const svc = new EstService(deps);
  const csrTypes = ["application/pkcs10"];
  return [
    { method: "GET", path: "/.well-known/est/cacerts", handle: async () => svc.cacerts() },
    {
      method: "POST",
      path: "/.well-known/est/simpleenroll",
      contentTypes: csrTypes,
      maxBodyBytes: 16_384,
      audit: "est.simpleenroll",
      handle: (ctx) => svc.enroll(ctx, "simpleenroll"),
    },
    {
      method: "POST",
      path: "/.well-known/est/simplereenroll",
      contentTypes: csrTypes,
      maxBodyBytes: 16_384,
      audit: "est.simplereenroll",
      handle: (ctx) => svc.enroll(ctx, "simplereenroll"),
    },
  ];
}
