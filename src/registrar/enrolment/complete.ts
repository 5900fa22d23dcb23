import { randomBytes } from "node:crypto";
import type { z } from "zod";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { describePublicKey } from "../../core/public-key.js";
import type { Attributes, EnrolmentMethod, EnrolmentResult } from "../../wire/v1/index.js";
import { WIRE_VERSION } from "../../wire/v1/index.js";
import type { FleetCa, VerifiedCsr } from "../ca/index.js";
import type { RegistrarConfig } from "../config.js";
import type { Route, RouteContext, RouteResponse } from "../http/router.js";
import type { EnrolmentGroup, EnrolmentProof, RegistrarStore } from "../store/index.js";

/** Random, unguessable device ids (`dev-` + 20 hex chars); the registry is the only mapping. */
export function newDeviceId(): string {
  return `dev-${randomBytes(10).toString("hex")}`;
}

/** JWK + RFC 7638 thumbprint of an SPKI. @throws ERR_KEY_UNSUPPORTED for anything but P-256 / RSA-2048. */
export async function keyIdentity(
  spkiDer: Uint8Array,
): Promise<{ jwk: Record<string, string>; thumbprint: string }> {
  try {
    const info = await describePublicKey(spkiDer);
    const jwk: Record<string, string> = {};
    for (const [k, v] of Object.entries(info.publicJwk)) if (typeof v === "string") jwk[k] = v;
    return { jwk, thumbprint: info.thumbprint };
  } catch (err) {
    throw new M2mError("ERR_KEY_UNSUPPORTED", "permanent", "unsupported device key type", { cause: err });
  }
}

export interface CompleteEnrolmentInput {
  readonly method: EnrolmentMethod;
  readonly group: EnrolmentGroup;
  readonly proof: EnrolmentProof;
  readonly csr: VerifiedCsr;
  /** The key the certificate must carry (attested TPM key, or the CSR key for PKCS#11). */
  readonly deviceSpkiDer: Uint8Array;
  readonly ekHash: string | undefined;
  readonly hardwareSerial: string;
  readonly evidence: Record<string, unknown> | undefined;
}

export interface EnrolmentDeps {
  readonly store: RegistrarStore;
  readonly ca: FleetCa;
  readonly clock: Clock;
  readonly config: RegistrarConfig;
  /** Base URL the agent reached us at (for `endpoints.registrar` and defaults). */
  readonly baseUrl: string;
}

/**
 * A POST endpoint of the enrolment API: deps are resolved per request (a reload replaces them), then
 * the body is parsed and validated with `schema` before `handle` sees it.
 */
export function enrolmentRoute<S extends z.ZodType>(
  path: string,
  audit: string,
  schema: S,
  deps: () => EnrolmentDeps,
  handle: (body: z.infer<S>, d: EnrolmentDeps, ctx: RouteContext) => Promise<RouteResponse>,
): Route {
  return {
    method: "POST",
    path,
    audit,
    async handle(ctx) {
      const d = deps();
      return handle(ctx.json(schema), d, ctx);
    },
  };
}

/**
 * The common tail of every enrolment method: resolve the device id (same hardware keeps its id),
 * issue the certificate, then atomically consume the proof and write the registry. If anything
 * fails, nothing is written and the issued certificate is discarded unseen.
 */
export async function completeEnrolment(
  deps: EnrolmentDeps,
  input: CompleteEnrolmentInput,
): Promise<{ result: EnrolmentResult; reenrolled: boolean }> {
  const { jwk, thumbprint } = await keyIdentity(input.deviceSpkiDer);
  const base = {
    method: input.method,
    thumbprint,
    ekHash: input.ekHash,
    hardwareSerial: input.hardwareSerial,
    proposedDeviceId: newDeviceId(),
  };
  const plan = await deps.store.planEnrolment(base);
  const issued = await deps.ca.issueDeviceCertificate(input.csr, {
    deviceId: plan.deviceId,
    expectedSpkiDer: input.deviceSpkiDer,
    lifetimeSeconds: deps.config.certLifetimeSeconds,
  });
  // Role and attributes come from the operator's group, never from the request.
  const attributes: Attributes = { ...input.group.attributes };
  const committed = await deps.store.commitEnrolment({
    ...base,
    proof: input.proof,
    now: deps.clock.now(),
    deviceId: plan.deviceId,
    group: input.group.name,
    role: input.group.role,
    attributes,
    publicJwk: jwk,
    evidence: input.evidence,
    certSerial: issued.serial,
    certNotAfter: issued.notAfter,
  });
  const device = committed.device;
  return {
    reenrolled: committed.reenrolled,
    result: {
      v: WIRE_VERSION,
      deviceId: device.deviceId,
      role: device.role,
      attributes: device.attributes,
      certificatePem: issued.pem,
      caChainPem: deps.ca.chainPem(),
      endpoints: endpointsFor(deps.config, deps.baseUrl),
      method: input.method,
    },
  };
}

export function endpointsFor(config: RegistrarConfig, baseUrl: string): EnrolmentResult["endpoints"] {
  const base = (config.publicUrl ?? baseUrl).replace(/\/+$/, "");
  return {
    registrar: base,
    // Same paths as APP_PATHS in app.ts (the token service, EST) so defaults point at live routes.
    token: config.endpoints.token ?? `${base}/oauth2/token`,
    est: config.endpoints.est ?? `${base}/.well-known/est`,
    ...(config.endpoints.mqtt === undefined ? {} : { mqtt: config.endpoints.mqtt }),
    ...(config.endpoints.ingest === undefined ? {} : { ingest: config.endpoints.ingest }),
  };
}

/** Refuses when a group does not exist or does not allow the method. */
export async function requireGroup(
  store: RegistrarStore,
  name: string | undefined,
  method: EnrolmentMethod,
): Promise<EnrolmentGroup> {
  const group = name === undefined ? undefined : await store.getGroup(name);
  // Security: a device can only join a group the operator created, by a method the operator allowed.
  if (group === undefined)
    throw new M2mError("ERR_GROUP_UNKNOWN", "permanent", "enrolment group not accepted");
  if (!group.methods.includes(method)) {
    throw new M2mError(
      "ERR_METHOD_NOT_PERMITTED",
      "permanent",
      "enrolment method not permitted for this group",
    );
  }
  return group;
}
