import { createHash } from "node:crypto";
import { calculateJwkThumbprint, type JWK } from "jose";
import type { Clock } from "../../core/clock.js";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import { decodeTpm2bPublic } from "../../tpm/public.js";
import {
  ROTATE_PATHS,
  type TpmRotateBeginResponse,
  type TpmRotateFinishResponse,
  tpmRotateBeginRequestSchema,
  tpmRotateFinishRequestSchema,
  WIRE_VERSION,
} from "../../wire/v1/index.js";
import { verifyCsr } from "../ca/index.js";
import { keyIdentity } from "../enrolment/complete.js";
import type { EstCertificateAuthority } from "../est/est-service.js";
import { HttpError, type Route, type RouteContext } from "../http/router.js";
import {
  type AccessTokenCheck,
  parseAuthorization,
  type VerifiedAccessToken,
} from "../oauth/access-token.js";
import type { DeviceRecord, RegistrarStore } from "../store/index.js";
import { TPM_VERIFY_ERRORS, verifyActivationAndCertify } from "../verifier/tpm-verifier.js";
import type { RotationPolicy } from "./policy.js";
import { RotationSessions } from "./sessions.js";

/** Stable codes of the rotation endpoints (besides the verifier's ERR_ATTEST_* / ERR_AK_* / ERR_DEVICE_KEY_*). */
export const ROTATION_ERRORS = {
  /** Rotation needs a DPoP-bound `est` token. */
  AUTH_REQUIRED: "ERR_ROTATION_AUTH_REQUIRED",
  /** The DPoP key of the token is not the device's registered (current) key. */
  NOT_CURRENT_KEY: "ERR_ROTATION_NOT_CURRENT_KEY",
  /** Policy forbids rotation for this device / group. */
  REFUSED: "ERR_ROTATION_REFUSED",
  /** The device was enrolled before the AK public was recorded: re-enrol instead. */
  NO_AK_ON_RECORD: "ERR_ROTATION_NO_AK_ON_RECORD",
  /** The session was begun by another device. */
  SESSION_DEVICE: "ERR_ROTATION_SESSION_DEVICE",
  /** The session was begun with a key that is no longer current. */
  SESSION_STALE: "ERR_ROTATION_SESSION_STALE",
  /** The CSR's key is not the key the AK certified. */
  CSR_KEY_MISMATCH: "ERR_ROTATION_CSR_KEY_MISMATCH",
  /** The CSR names something other than the device. */
  CSR_SUBJECT: "ERR_ROTATION_CSR_SUBJECT",
  /** The "new" key is the current key. */
  SAME_KEY: "ERR_ROTATION_SAME_KEY",
} as const;

const STATUS: Readonly<Partial<Record<ErrorCode, number>>> = {
  ERR_ROTATION_AUTH_REQUIRED: 401,
  ERR_ACCESS_TOKEN_INVALID: 401,
  ERR_ACCESS_TOKEN_EXPIRED: 401,
  ERR_ACCESS_TOKEN_DPOP_REQUIRED: 401,
  ERR_ACCESS_TOKEN_SCOPE: 403,
  ERR_ROTATION_NOT_CURRENT_KEY: 403,
  ERR_ROTATION_REFUSED: 403,
  ERR_DEVICE_UNKNOWN: 403,
  ERR_DEVICE_REVOKED: 403,
  ERR_ROTATION_NO_AK_ON_RECORD: 409,
  ERR_ROTATION_SESSION_DEVICE: 403,
  ERR_ROTATION_SESSION_STALE: 409,
  ERR_ROTATION_CONFLICT: 409,
  ERR_SESSION_UNKNOWN: 404,
  ERR_SESSION_CONSUMED: 409,
  ERR_SESSION_EXPIRED: 410,
  ERR_ROTATION_CSR_KEY_MISMATCH: 400,
  ERR_ROTATION_CSR_SUBJECT: 400,
  ERR_ROTATION_SAME_KEY: 400,
  ERR_KEY_ALREADY_REGISTERED: 409,
  ERR_CSR_INVALID: 400,
  ERR_CSR_SIGNATURE: 400,
  ERR_ROTATION_BUSY: 503,
};

export interface TpmRotationDeps {
  readonly store: RegistrarStore;
  readonly ca: EstCertificateAuthority;
  readonly clock: Clock;
  readonly policy: RotationPolicy;
  readonly certLifetimeSeconds: number;
  /** Base URL devices use (DPoP `htu` is `${publicUrl}${path}`). */
  readonly publicUrl: () => string;
  readonly accessTokens: {
    verifyAccessToken(token: string, check: AccessTokenCheck): Promise<VerifiedAccessToken>;
  };
  /** `aud` the token must carry (the EST audience: rotation is part of certificate upkeep). */
  readonly tokenAudience: string;
  readonly log?: Logger;
}

function fail(code: ErrorCode, message: string, cause?: unknown): HttpError {
  return new HttpError(STATUS[code] ?? 403, code, message, cause === undefined ? {} : { cause });
}

/** Re-throws any failure as an HttpError with the code kept and a generic message. */
function asHttp(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof M2mError) {
    // Verifier codes (ERR_ATTEST_*, ERR_AK_*, ERR_DEVICE_KEY_*, ERR_TPM_STRUCT_MALFORMED) mean the same here.
    return fail(err.code, err.code.startsWith("ERR_ROTATION") ? err.message : "key rotation refused", err);
  }
  return new HttpError(500, "ERR_INTERNAL", "internal error", { cause: err });
}

const b = (s: string): Buffer => Buffer.from(s, "base64url");

/**
 * `POST /v1/rotate/tpm/begin` and `/v1/rotate/tpm/finish`: a TPM device replaces its key. Both calls
 * are authenticated by a DPoP-bound `est` token whose DPoP key is the device's CURRENT registered key;
 * finish must carry a TPM2_Certify of the new key by the AK registered at enrolment, over this
 * session's nonce, plus a CSR signed by the new key. Only when everything verifies is a certificate
 * issued and the registry updated (key + certificate in one transaction); any failure leaves the
 * registry as it was, and the session is spent either way.
 */
export function tpmRotationRoutes(deps: TpmRotationDeps): Route[] {
  const log = deps.log ?? silentLogger;
  const sessions = new RotationSessions(deps.store, deps.clock, deps.policy.sessionTtlSeconds);

  async function authenticate(ctx: RouteContext, path: string): Promise<DeviceRecord> {
    const parsed = parseAuthorization(ctx.req.headers.authorization);
    const proof = ctx.req.headers.dpop;
    // Security: only proof of possession of the current key may start or finish a rotation: a bearer
    // token alone (stolen, logged) must not be able to swap the device's key.
    if (parsed === undefined || parsed.scheme !== "DPoP" || typeof proof !== "string")
      throw fail(ROTATION_ERRORS.AUTH_REQUIRED, "DPoP-bound access token required");
    const url = `${deps.publicUrl().replace(/\/+$/, "")}${path}`;
    const verified = await deps.accessTokens.verifyAccessToken(parsed.token, {
      audience: deps.tokenAudience,
      requiredScope: "est",
      dpop: { proof, method: "POST", url },
    });
    const device = await deps.store.getDevice(verified.sub);
    if (device === undefined) throw fail("ERR_DEVICE_UNKNOWN", "device not accepted");
    // Security: a revoked device keeps no rights, rotation included.
    if (device.status !== "active") throw fail("ERR_DEVICE_REVOKED", "the device is revoked");
    const currentJkt = await calculateJwkThumbprint(device.publicJwk as JWK, "sha256");
    // Security: the token must be bound to the key registered NOW (not an older, rotated-away key).
    if (verified.jkt === undefined || verified.jkt !== currentJkt)
      throw fail(ROTATION_ERRORS.NOT_CURRENT_KEY, "the request is not signed by the current device key");
    // Security: policy per method and group; TPM keys only with an AK certification.
    if (device.method !== "tpm" || deps.policy.modeFor(device) !== "tpm-certify")
      throw fail(ROTATION_ERRORS.REFUSED, "key rotation not permitted");
    ctx.auditFields({ deviceId: device.deviceId });
    return device;
  }

  const begin: Route = {
    method: "POST",
    path: ROTATE_PATHS.tpmBegin,
    audit: "rotate.tpm.begin",
    async handle(ctx) {
      try {
        ctx.json(tpmRotateBeginRequestSchema);
        const device = await authenticate(ctx, ROTATE_PATHS.tpmBegin);
        const s = await sessions.begin(device.deviceId, device.thumbprint);
        ctx.auditFields({ session: s.id.slice(0, 8) });
        const body: TpmRotateBeginResponse = {
          v: WIRE_VERSION,
          sessionId: s.id,
          nonce: s.nonce.toString("base64url"),
          expiresAt: s.expiresAt.toISOString(),
        };
        return { status: 200, json: body };
      } catch (err) {
        throw asHttp(err);
      }
    },
  };

  const finish: Route = {
    method: "POST",
    path: ROTATE_PATHS.tpmFinish,
    audit: "rotate.tpm.finish",
    maxBodyBytes: 32_768,
    async handle(ctx) {
      try {
        const body = ctx.json(tpmRotateFinishRequestSchema);
        const device = await authenticate(ctx, ROTATE_PATHS.tpmFinish);
        ctx.auditFields({ session: body.sessionId.slice(0, 8) });
        const s = await sessions.take(body.sessionId, device.deviceId);
        // Security: the session was opened by the key that is current now; after another rotation
        // in between, this certification answers a question nobody asks any more.
        if (s.currentThumbprint !== device.thumbprint)
          throw fail(ROTATION_ERRORS.SESSION_STALE, "the device key changed since begin");
        const ev = device.evidence ?? {};
        const akPublic = typeof ev.akPublic === "string" ? ev.akPublic : undefined;
        const ekPublic = typeof ev.ekPublic === "string" ? ev.ekPublic : undefined;
        if (akPublic === undefined || ekPublic === undefined)
          throw fail(ROTATION_ERRORS.NO_AK_ON_RECORD, "no AK on record for this device: re-enrol");
        // The AK was activated against the EK at enrolment (credential activation); that proof is on
        // record, so the secret step is satisfied by construction and the certify checks run as then:
        // signature by the registered AK, magic, type, nonce, qualified signer under the EK, name,
        // device key attributes and algorithm, each with the verifier's own code.
        const marker = createHash("sha256").update("m2m-rotation: AK activated at enrolment").digest();
        const verified = verifyActivationAndCertify({
          expectedSecret: marker,
          recoveredSecret: marker,
          ekPublic: decodeTpm2bPublic(b(ekPublic)),
          akPublic: b(akPublic),
          nonce: s.nonce,
          attestBytes: b(body.attest),
          signatureBytes: b(body.signature),
          devicePublic: b(body.devicePublic),
        });
        const newSpki = verified.deviceKey.export({ format: "der", type: "spki" });
        const id = await keyIdentity(newSpki);
        // Security: "rotating" to the same key would only refresh trust in a possibly exposed key.
        if (id.thumbprint === device.thumbprint)
          throw fail(ROTATION_ERRORS.SAME_KEY, "the new key is the current key");
        // Security: the CSR signature proves the requester can use the certified key right now.
        const csr = await verifyCsr(b(body.csr));
        // Security: the certificate may only carry the key the AK certified.
        if (!csr.spkiDer.equals(newSpki))
          throw fail(ROTATION_ERRORS.CSR_KEY_MISMATCH, "the CSR key is not the certified key");
        // Security: a device may only ask for its own name.
        if (csr.csr.subjectName.getField("CN").some((cn) => cn !== device.deviceId))
          throw fail(ROTATION_ERRORS.CSR_SUBJECT, "the CSR does not name this device");
        const cert = await deps.ca.issueDeviceCertificate(csr, {
          deviceId: device.deviceId,
          expectedSpkiDer: newSpki,
          lifetimeSeconds: deps.certLifetimeSeconds,
        });
        const { akPublic: _a, ekPublic: _e, devicePublic: _d, deviceName: _n, ...kept } = ev;
        await deps.store.replaceDeviceKey({
          deviceId: device.deviceId,
          previousThumbprint: device.thumbprint,
          publicJwk: id.jwk,
          thumbprint: id.thumbprint,
          evidence: {
            ...kept,
            akPublic,
            ekPublic,
            devicePublic: body.devicePublic,
            deviceName: Buffer.from(verified.deviceName).toString("hex"),
            objectAttributes: verified.devicePublic.objectAttributes,
            rotatedAt: deps.clock.now().toISOString(),
          },
          certSerial: cert.serial,
          certNotAfter: cert.notAfter,
          at: deps.clock.now(),
        });
        ctx.auditFields({ serial: cert.serial, rotated: true });
        log.info("tpm device key rotated", { deviceId: device.deviceId, serial: cert.serial });
        const res: TpmRotateFinishResponse = {
          v: WIRE_VERSION,
          deviceId: device.deviceId,
          certificatePem: cert.pem,
          caChainPem: deps.ca.chainPem(),
        };
        return { status: 200, json: res };
      } catch (err) {
        const e = asHttp(err);
        log.info("tpm key rotation refused", { code: e.code });
        throw e;
      }
    },
  };
  return [begin, finish];
}

export { TPM_VERIFY_ERRORS };
