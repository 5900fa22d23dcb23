import { calculateJwkThumbprint, exportJWK, generateKeyPair, type JWK } from "jose";
import type { RegistrarStore } from "../../src/registrar/store/index.js";

/** A device's ES256 private key, as jose's `generateKeyPair` makes it. */
export type DevicePrivateKey = Awaited<ReturnType<typeof generateKeyPair>>["privateKey"];

/**
 * Writes an enrolled device straight into a registrar store, for tests of what comes after enrolment
 * (tokens, replicas, restarts): a fresh ES256 key pair, a bootstrap token (hash "h") of `group`, and
 * the enrolment that consumes it (PKCS#11 method, certificate serial "01" valid for a day). Returns the
 * device's private key, to sign client assertions.
 */
export async function registerTokenDevice(
  store: Pick<RegistrarStore, "addBootstrapToken" | "commitEnrolment">,
  o: {
    readonly deviceId: string;
    readonly group: string;
    readonly role: string;
    readonly hardwareSerial: string;
  },
): Promise<DevicePrivateKey> {
  const kp = await generateKeyPair("ES256", { extractable: true });
  const jwk = await exportJWK(kp.publicKey);
  const publicJwk: Record<string, string> = { kty: "EC", crv: "P-256", x: String(jwk.x), y: String(jwk.y) };
  const now = new Date();
  await store.addBootstrapToken({
    hash: "h",
    group: o.group,
    expiresAt: new Date(now.getTime() + 60_000),
    createdAt: now,
  });
  await store.commitEnrolment({
    method: "pkcs11",
    thumbprint: await calculateJwkThumbprint(publicJwk as JWK, "sha256"),
    ekHash: undefined,
    hardwareSerial: o.hardwareSerial,
    proposedDeviceId: o.deviceId,
    deviceId: o.deviceId,
    proof: { kind: "token", hash: "h" },
    now,
    group: o.group,
    role: o.role,
    attributes: {},
    publicJwk,
    evidence: undefined,
    certSerial: "01",
    certNotAfter: new Date(now.getTime() + 86_400_000),
  });
  return kp.privateKey;
}
