import { writeEnrolmentState } from "../../src/enroll/state.js";

/**
 * Writes the enrolment state of PKCS#11 gateway dev-1 (key `pkcs11:token=x`, enrolled now) into
 * `stateDir`, for tests of what the agent does once enrolled (doctor, diagnostics) without a registrar.
 */
export function writeGatewayEnrolment(
  stateDir: string,
  o: {
    readonly certificatePem: string;
    readonly caChainPem: readonly string[];
    readonly keyThumbprint: string;
    readonly registrarUrl: string;
    readonly endpoints: { readonly registrar: string; readonly token: string; readonly est: string };
  },
): Promise<void> {
  return writeEnrolmentState(stateDir, {
    v: 1,
    deviceId: "dev-1",
    method: "pkcs11",
    role: "gateway",
    attributes: {},
    certificatePem: o.certificatePem,
    caChainPem: [...o.caChainPem],
    endpoints: { ...o.endpoints },
    keyRef: "pkcs11:token=x",
    keyThumbprint: o.keyThumbprint,
    registrarUrl: o.registrarUrl,
    enrolledAt: new Date().toISOString(),
  });
}
