import { createHash } from "node:crypto";
import { M2mError } from "../../core/errors.js";
import { ENROLL_PATHS, pkcs11EnrollRequestSchema } from "../../wire/v1/index.js";
import { verifyCsr } from "../ca/index.js";
import type { Route } from "../http/router.js";
import {
  completeEnrolment,
  type EnrolmentDeps,
  enrolmentRoute,
  keyIdentity,
  requireGroup,
} from "./complete.js";

/** SHA-256 (hex) of a bootstrap token: the only form the registrar ever stores. */
export function hashBootstrapToken(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}

/**
 * POST /v1/enroll/pkcs11: bootstrap token + CSR signed by the token-held key. The PKCS#11 attributes
 * are recorded as self-asserted evidence; the bootstrap token is the only authorisation.
 */
export function pkcs11Route(deps: () => EnrolmentDeps): Route {
  return enrolmentRoute(
    ENROLL_PATHS.pkcs11,
    "enroll.pkcs11",
    pkcs11EnrollRequestSchema,
    deps,
    async (body, d, ctx) => {
      ctx.auditFields({ method: "pkcs11", hardwareSerial: body.hardwareSerial });
      const hash = hashBootstrapToken(body.bootstrapToken);
      const token = await d.store.getBootstrapToken(hash);
      // Security: early, read-only checks; the atomic consume in commitEnrolment is what counts.
      if (token === undefined)
        throw new M2mError("ERR_TOKEN_INVALID", "permanent", "bootstrap token not accepted");
      if (token.expiresAt.getTime() <= d.clock.now().getTime()) {
        throw new M2mError(
          token.usedAt !== undefined ? "ERR_TOKEN_USED" : "ERR_TOKEN_EXPIRED",
          "permanent",
          token.usedAt !== undefined ? "bootstrap token used" : "bootstrap token expired",
        );
      }
      const group = await requireGroup(d.store, token.group, "pkcs11");
      ctx.auditFields({ group: group.name });
      // Security: the CSR signature proves possession of the private key being certified.
      const csr = await verifyCsr(Buffer.from(body.csr, "base64url"));
      if (token.usedAt !== undefined) {
        // A used token is accepted again only as the retry of the device it enrolled (same key: a
        // crash after our commit, before the device stored the answer); the store re-checks atomically.
        const { thumbprint } = await keyIdentity(csr.spkiDer);
        const device = await d.store.findDeviceByThumbprint(thumbprint);
        if (device === undefined || device.deviceId !== token.usedBy)
          throw new M2mError("ERR_TOKEN_USED", "permanent", "bootstrap token used");
        ctx.auditFields({ tokenRetry: true });
      }
      const { result, reenrolled } = await completeEnrolment(d, {
        method: "pkcs11",
        group,
        proof: { kind: "token", hash },
        csr,
        deviceSpkiDer: csr.spkiDer,
        ekHash: undefined,
        hardwareSerial: body.hardwareSerial,
        evidence: { ...body.evidence, selfAsserted: true, requestedAttributes: body.requestedAttributes },
      });
      ctx.auditFields({ deviceId: result.deviceId, reenrolled });
      return { status: 200, json: result };
    },
  );
}
