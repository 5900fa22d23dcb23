import { AlternatingKeyRotation, currentRotationName } from "../rotation.js";
import { ownerPersistentHandle, TpmKeyProvider } from "./tpm-provider.js";

/**
 * The second TPM handle used by rotation: `home + 1`, skipping the SRK and AK handles (with the
 * defaults SRK 0x81000001, key 0x81000002, AK 0x81000003 that is 0x81000004).
 */
export function alternateTpmHandle(h: { keyHandle: number; srkHandle: number; akHandle: number }): number {
  let n = h.keyHandle + 1;
  while (n === h.srkHandle || n === h.akHandle) n++;
  return n;
}

const hex = (h: number): string => `0x${h.toString(16).padStart(8, "0")}`;

/** The two handle names (`0x…`) a TPM rotation alternates between, for the configured key handle. */
export function tpmRotationNames(h: {
  keyHandle: number;
  srkHandle: number;
  akHandle: number;
}): [string, string] {
  return [hex(h.keyHandle), hex(alternateTpmHandle(h))];
}

/**
 * The persistent handle of the current TPM key per the rotation state (the configured one until a
 * rotation committed). The daemon opens its key provider here, so a restart after a rotation
 * keeps using the new key. @throws ERR_KEY_ROTATION_STATE
 */
export async function currentTpmKeyHandle(
  stateFile: string,
  h: { keyHandle: number | string; srkHandle: number | string; akHandle: number | string },
): Promise<number> {
  const n = {
    keyHandle: ownerPersistentHandle(h.keyHandle, "keyHandle"),
    srkHandle: ownerPersistentHandle(h.srkHandle, "srkHandle"),
    akHandle: ownerPersistentHandle(h.akHandle, "akHandle"),
  };
  return ownerPersistentHandle(await currentRotationName(stateFile, tpmRotationNames(n)), "keyHandle");
}

/**
 * Crash-safe TPM key rotation between the configured `homeHandle` (default: the runner source's
 * handle) and `alternateTpmHandle`, sharing `runnerSource`'s TPM queue; `stateFile` records which
 * handle is current (and which is pending).
 */
export function tpmKeyRotation(
  runnerSource: TpmKeyProvider,
  stateFile: string,
  homeHandle: number = runnerSource.keyHandle,
): AlternatingKeyRotation {
  return new AlternatingKeyRotation({
    names: tpmRotationNames({ ...runnerSource, keyHandle: homeHandle }),
    stateFile,
    // Always a fresh provider on the shared runner: the rotation closes the providers it is done
    // with, and closing one that does not own the runner leaves the TPM queue to the others.
    make: (name) =>
      new TpmKeyProvider({
        runner: runnerSource.runner,
        srkHandle: runnerSource.srkHandle,
        akHandle: runnerSource.akHandle,
        keyHandle: name,
        algorithm: runnerSource.algorithm,
      }),
  });
}
