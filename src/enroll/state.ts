import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { z } from "zod";
import { writeFileAtomic } from "../core/atomic-file.js";
import { M2mError } from "../core/errors.js";
import { endpointsSchema, enrolmentMethodSchema } from "../wire/v1/index.js";

export const ENROLMENT_STATE_FILE = "enrolment.json";

export const enrolmentStateSchema = z
  .object({
    v: z.literal(1),
    deviceId: z.string().min(1).max(64),
    method: enrolmentMethodSchema,
    role: z.string().max(64),
    attributes: z.record(z.string(), z.string()),
    certificatePem: z.string().min(1),
    caChainPem: z.array(z.string().min(1)).min(1),
    endpoints: endpointsSchema,
    /** The KeyProvider reference of the enrolled key (`tpm:` / `pkcs11:` URI). */
    keyRef: z.string().min(1),
    keyThumbprint: z.string().min(1),
    /**
     * SHA-256 (hex) of the TPM2B_PUBLIC of the EK the device was attested with (TPM enrolments; absent
     * in states written before it was recorded). A different EK at start means another TPM.
     */
    ekSha256: z
      .string()
      .regex(/^[0-9a-f]{64}$/)
      .optional(),
    registrarUrl: z.string().min(1),
    enrolledAt: z.iso.datetime(),
  })
  .strict();
export type EnrolmentState = z.infer<typeof enrolmentStateSchema>;

export function enrolmentStatePath(stateDir: string): string {
  return join(stateDir, ENROLMENT_STATE_FILE);
}

/**
 * Reads the enrolment state. Returns undefined when the device is not enrolled.
 * @throws ERR_STATE_CORRUPT when the file exists but is not a valid v1 state.
 */
export async function readEnrolmentState(stateDir: string): Promise<EnrolmentState | undefined> {
  let text: string;
  try {
    text = await readFile(enrolmentStatePath(stateDir), "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new M2mError("ERR_STATE_READ", "transient", "cannot read the enrolment state", { cause: err });
  }
  try {
    return enrolmentStateSchema.parse(JSON.parse(text));
  } catch (err) {
    throw new M2mError("ERR_STATE_CORRUPT", "permanent", "the enrolment state file is not valid", {
      cause: err,
      hint: "re-enrol with `m2m-agent enroll --force`",
    });
  }
}

/** Writes the state atomically (temp file 0600, fsync, rename, fsync dir). */
export async function writeEnrolmentState(stateDir: string, state: EnrolmentState): Promise<void> {
  await writeFileAtomic(enrolmentStatePath(stateDir), `${JSON.stringify(state, null, 2)}\n`, 0o600);
}
