import { createHash, randomBytes } from "node:crypto";
import { M2mError } from "../../core/errors.js";
import { decodeTpmsAttest, decodeTpmtSignature, verifyTpmSignature } from "../../tpm/index.js";
import { decodeTpm2bPublic, type TpmtPublic } from "../../tpm/public.js";
import {
  ENROLL_PATHS,
  type TpmBeginRequest,
  type TpmBeginResponse,
  type TpmFinishRequest,
  tpmBeginRequestSchema,
  tpmFinishRequestSchema,
  WIRE_VERSION,
} from "../../wire/v1/index.js";
import { verifyCsr } from "../ca/index.js";
import type { Route, RouteContext, RouteResponse } from "../http/router.js";
import type { EnrolmentGroup, SessionData } from "../store/index.js";
import {
  beginActivation,
  checkAkPublic,
  checkDeviceKey,
  checkEkAllowlisted,
  checkEkPublic,
  ekFingerprint,
  TPM_VERIFY_ERRORS,
  verifyActivationAndCertify,
  verifyEkCertificate,
} from "../verifier/tpm-verifier.js";
import {
  completeEnrolment,
  type EnrolmentDeps,
  enrolmentRoute,
  keyIdentity,
  newDeviceId,
  requireGroup,
} from "./complete.js";
import { derToPem, loadEkTrustStore } from "./ek-trust.js";
import { deviceKeyObject } from "./tpm-key.js";

const b = (s: string): Buffer => Buffer.from(s, "base64url");
const sha256 = (data: Uint8Array): Buffer => createHash("sha256").update(data).digest();

function decodePublic(what: string, bytes: Uint8Array): TpmtPublic {
  try {
    return decodeTpm2bPublic(bytes);
  } catch (err) {
    throw new M2mError(TPM_VERIFY_ERRORS.TPM_STRUCT_MALFORMED, "permanent", `${what} is malformed`, {
      cause: err,
    });
  }
}

/**
 * Establishes that the EK belongs to a genuine TPM the group trusts: operator allowlist first, else an
 * EK certificate chaining to the group's trust folder whose key equals the EK public sent.
 * @returns the EK public area and its fingerprint (SHA-256 of SPKI DER, the registry's EK key).
 */
async function trustedEk(
  deps: EnrolmentDeps,
  group: EnrolmentGroup,
  body: { ekPublic: string; ekCertDer?: string | undefined; ekChainDer?: string[] | undefined },
): Promise<{ ek: TpmtPublic; ekHash: string }> {
  const ek = checkEkPublic(b(body.ekPublic));
  const fp = ekFingerprint(ek);
  if (group.ekAllow.length > 0 && group.ekAllow.some((h) => h.toLowerCase() === fp)) {
    return { ek, ekHash: checkEkAllowlisted(ek, group.ekAllow) };
  }
  const trustDir =
    group.ekTrustDir ?? (group.ekAllow.length === 0 ? deps.config.defaultEkTrustDir : undefined);
  if (body.ekCertDer === undefined || trustDir === undefined) {
    // Security: with neither a listed EK nor a manufacturer certificate nothing vouches for the TPM.
    if (group.ekAllow.length > 0) checkEkAllowlisted(ek, group.ekAllow);
    throw new M2mError(TPM_VERIFY_ERRORS.EK_CERT_UNTRUSTED, "permanent", "EK certificate is not trusted");
  }
  const now = deps.clock.now();
  const store = await loadEkTrustStore(trustDir, deps.clock.monotonicMs());
  // Security: the EK certificate must chain to a manufacturer CA the operator configured for this group.
  const cert = await verifyEkCertificate(
    b(body.ekCertDer),
    store.anchorsPem,
    [...store.intermediatesPem, ...(body.ekChainDer ?? []).map((d) => derToPem(b(d)))],
    now,
  );
  // Security: MakeCredential encrypts to the EK public sent; it must be the certified key.
  checkEkPublic(b(body.ekPublic), cert.publicKey);
  return { ek, ekHash: fp };
}

/** POST /v1/enroll/tpm/begin and /finish, calling the pure verifier in src/registrar/verifier/. */
export function tpmRoutes(deps: () => EnrolmentDeps): Route[] {
  return [
    enrolmentRoute(ENROLL_PATHS.tpmBegin, "enroll.tpm.begin", tpmBeginRequestSchema, deps, beginTpm),
    enrolmentRoute(ENROLL_PATHS.tpmFinish, "enroll.tpm.finish", tpmFinishRequestSchema, deps, finishTpm),
  ];
}

/** begin: EK trusted, AK and device key checked; answers with a credential challenge and a nonce. */
async function beginTpm(body: TpmBeginRequest, d: EnrolmentDeps, ctx: RouteContext): Promise<RouteResponse> {
  ctx.auditFields({ method: "tpm", hardwareSerial: body.hardwareSerial, group: body.group });
  const group = await requireGroup(d.store, body.group, "tpm");
  const { ek, ekHash } = await trustedEk(d, group, body);
  ctx.auditFields({ ekHash });
  // Security: the AK must be a restricted, TPM-resident signing key, or its attestations mean nothing.
  const ak = checkAkPublic(b(body.akPublic));
  const devicePublicBytes = b(body.devicePublic);
  const device = decodePublic("device public", devicePublicBytes);
  // Security: refuse unfit device keys before spending a credential on them (finish re-checks).
  checkDeviceKey(device);
  const { thumbprint } = await keyIdentity(deviceKeyObject(device));
  // Identity takeover is refused here already (same EK with another key, etc.); finish re-checks
  // atomically. Nothing is written to the device registry by begin.
  await d.store.planEnrolment({
    method: "tpm",
    thumbprint,
    ekHash,
    hardwareSerial: body.hardwareSerial,
    proposedDeviceId: newDeviceId(),
  });
  const challenge = beginActivation(ek, ak.name);
  const now = d.clock.now();
  const expiresAt = new Date(now.getTime() + d.config.sessionTtlSeconds * 1000);
  const sessionId = randomBytes(16).toString("hex");
  const data: SessionData = {
    group: group.name,
    // Only the hash of the expected secret is stored; finish compares hashes in constant time.
    secretHash: sha256(challenge.secret.reveal()).toString("hex"),
    nonce: Buffer.from(challenge.nonce).toString("base64url"),
    ekHash,
    ekPublic: body.ekPublic,
    akPublic: body.akPublic,
    devicePublic: body.devicePublic,
    hardwareSerial: body.hardwareSerial,
    requestedAttributes: body.requestedAttributes,
  };
  await d.store.createSession({ id: sessionId, data, createdAt: now, expiresAt });
  ctx.auditFields({ session: sessionId.slice(0, 8) });
  const response: TpmBeginResponse = {
    v: WIRE_VERSION,
    sessionId,
    credentialBlob: Buffer.from(challenge.blob).toString("base64url"),
    nonce: data.nonce,
    expiresAt: expiresAt.toISOString(),
  };
  return { status: 200, json: response };
}

/** finish: the activated secret and the AK's certification of the device key; issues the certificate. */
async function finishTpm(
  body: TpmFinishRequest,
  d: EnrolmentDeps,
  ctx: RouteContext,
): Promise<RouteResponse> {
  ctx.auditFields({ method: "tpm", session: body.sessionId.slice(0, 8) });
  const session = await d.store.getSession(body.sessionId);
  // Security: early read-only checks; the atomic consume in commitEnrolment decides races.
  if (session === undefined) throw new M2mError("ERR_SESSION_UNKNOWN", "permanent", "session not found");
  if (session.consumedAt !== undefined)
    throw new M2mError("ERR_SESSION_CONSUMED", "permanent", "session used");
  if (session.expiresAt.getTime() <= d.clock.now().getTime()) {
    throw new M2mError("ERR_SESSION_EXPIRED", "permanent", "session expired");
  }
  const s = session.data;
  ctx.auditFields({ group: s.group, hardwareSerial: s.hardwareSerial, ekHash: s.ekHash });
  const group = await requireGroup(d.store, s.group, "tpm");
  // A wrong secret counts against the session only when the AK signed this session's nonce:
  // only the device (its TPM's AK) can spend attempts, so nobody else can cancel its session.
  const fromDevice = signedByAk(b(s.akPublic), b(body.attest), b(body.signature), b(s.nonce));
  let verified: ReturnType<typeof verifyActivationAndCertify>;
  try {
    verified = verifyActivationAndCertify({
      // Both sides hashed: equal-length constant-time compare without keeping the secret at rest.
      expectedSecret: Buffer.from(s.secretHash, "hex"),
      recoveredSecret: sha256(b(body.secret)),
      ekPublic: decodePublic("EK public", b(s.ekPublic)),
      akPublic: b(s.akPublic),
      nonce: b(s.nonce),
      attestBytes: b(body.attest),
      signatureBytes: b(body.signature),
      devicePublic: b(s.devicePublic),
    });
  } catch (err) {
    if (fromDevice && err instanceof M2mError && err.code === TPM_VERIFY_ERRORS.CREDENTIAL_SECRET_MISMATCH) {
      const { attempts, discarded } = await d.store.recordFailedActivation(
        body.sessionId,
        d.config.maxActivationAttempts,
        d.clock.now(),
      );
      ctx.auditFields({ failedAttempts: attempts, discarded });
      if (discarded)
        throw new M2mError(
          "ERR_SESSION_DISCARDED",
          "permanent",
          `credential activation failed ${attempts} times: session discarded`,
          { cause: err },
        );
    }
    throw err;
  }
  // Security: the CSR signature proves the requester can use the certified key right now.
  const csr = await verifyCsr(b(body.csr));
  const deviceSpkiDer = verified.deviceKey.export({ format: "der", type: "spki" });
  const { result, reenrolled } = await completeEnrolment(d, {
    method: "tpm",
    group,
    proof: { kind: "session", id: body.sessionId },
    csr,
    deviceSpkiDer,
    ekHash: s.ekHash,
    hardwareSerial: s.hardwareSerial,
    evidence: {
      akName: Buffer.from(verified.akName).toString("hex"),
      // Kept so key rotation can verify a later TPM2_Certify by this AK (registrar/rotation/).
      akPublic: s.akPublic,
      ekPublic: s.ekPublic,
      devicePublic: s.devicePublic,
      deviceName: Buffer.from(verified.deviceName).toString("hex"),
      objectAttributes: verified.devicePublic.objectAttributes,
      requestedAttributes: s.requestedAttributes,
    },
  });
  ctx.auditFields({ deviceId: result.deviceId, reenrolled });
  return { status: 200, json: result };
}

/**
 * True when `signature` is the session AK's valid signature over an attestation carrying this
 * session's nonce. Never throws: malformed input just means "not shown to be the device".
 */
function signedByAk(
  akPublic: Uint8Array,
  attest: Uint8Array,
  signature: Uint8Array,
  nonce: Uint8Array,
): boolean {
  try {
    const ak = checkAkPublic(akPublic);
    const parsed = decodeTpmsAttest(attest);
    if (nonce.length === 0 || Buffer.compare(Buffer.from(parsed.extraData), Buffer.from(nonce)) !== 0)
      return false;
    return verifyTpmSignature(ak.public, attest, decodeTpmtSignature(signature)).ok;
  } catch {
    return false;
  }
}
