import { createHash } from "node:crypto";
import { M2mError } from "../core/errors.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import type { EnrolmentState } from "./state.js";
import { enrolmentEk } from "./tpm-adapter.js";

/**
 * Whether the enrolment state on disk can still be used with the key (and TPM) present now. One
 * owner for the decision, used by the daemon at start, `m2m-agent enroll` and `doctor`.
 *
 * What the key holder sees now is compared with what was enrolled:
 * - the key is missing (TPM cleared, token re-initialised, or a state directory copied to another box);
 * - a key is there but its public key is not the enrolled one (the key was re-created);
 * - the TPM's endorsement key is not the enrolled one (the TPM was replaced, or a copied state directory).
 * In each case the stored identity must not be used (its certificate is for another key) and no new
 * key may silently replace it: an operator re-provisions (docs/operations.md).
 */
export type KeyPresence = { readonly present: false } | { readonly present: true; readonly info: KeyInfo };

const short = (hex: string): string => `${hex.slice(0, 16)}…`;

/** The reason re-provisioning is needed, or undefined when the enrolled identity matches. */
export function reprovisionReason(
  state: EnrolmentState,
  key: KeyPresence,
  currentEkSha256?: string,
): string | undefined {
  if (!key.present)
    return `the enrolled device key ${state.keyRef} of ${state.deviceId} is missing: the TPM was cleared or replaced, the token was reset, or this state directory was copied from another device`;
  // Security: a certificate for another key would be presented by the wrong key.
  if (key.info.thumbprint !== state.keyThumbprint)
    return `the device key at ${key.info.ref} (${short(key.info.thumbprint)}) is not the key enrolled as ${state.deviceId} (${short(state.keyThumbprint)}): the key was re-created, or this state directory was copied from another device`;
  // Security: the identity was attested for one TPM; another TPM must not act as that device.
  if (state.ekSha256 !== undefined && currentEkSha256 !== undefined && currentEkSha256 !== state.ekSha256)
    return `this TPM's endorsement key (${short(currentEkSha256)}) is not the one enrolled as ${state.deviceId} (${short(state.ekSha256)}): the TPM was replaced, or this state directory was copied from another device`;
  return undefined;
}

/** The error for `reason` (the same text everywhere: status, doctor, CLI). */
export function reprovisionError(state: EnrolmentState, reason: string): M2mError {
  return new M2mError("ERR_REPROVISION_REQUIRED", "permanent", `re-provisioning required: ${reason}`, {
    hint: `ask the fleet operator to run \`m2m-registrar devices allow-reenrol ${state.deviceId}\`, then stop the agent and run \`m2m-agent enroll --force\` (docs/operations.md, "Re-provisioning")`,
    details: { deviceId: state.deviceId },
  });
}

/**
 * SHA-256 (hex) of the TPM2B_PUBLIC of the EK enrolment uses (the RSA low-range EK when it can
 * activate credentials, else the first that can), or undefined for keys without TPM attestation.
 * After `tpm2_clear` the persistent EK is gone: it is re-created from the unchanged endorsement seed
 * (same public), which is why `createIfAbsent` is on.
 */
export async function currentEkSha256(key: KeyProvider): Promise<string | undefined> {
  const ops = key.attestation;
  if (ops === undefined) return undefined;
  const eks = await ops.readEkPublics({ createIfAbsent: true });
  const ek = enrolmentEk(eks);
  return ek === undefined ? undefined : createHash("sha256").update(ek.tpm2bPublic).digest("hex");
}
