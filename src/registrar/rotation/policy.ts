import { z } from "zod";
import { M2mError } from "../../core/errors.js";

/**
 * Key rotation policy, from the registrar config table `[rotation]`:
 *
 *   [rotation]
 *   pkcs11 = "allow"          # "allow" (default) | "deny": new key over EST simplereenroll
 *   tpm = "tpm-certify"       # "tpm-certify" (default) | "deny": new key only via /v1/rotate/tpm/*
 *   session_ttl = 120         # seconds a TPM rotation session lives (10..600)
 *   [rotation.groups]         # per enrolment group override
 *   gateways = "deny"
 *
 * A TPM device never rotates over plain EST, whatever the setting: accepting a TPM key needs a
 * TPM2_Certify by the registered AK, which only the /v1/rotate/tpm endpoints check.
 */
export type RotationMode = "allow" | "deny" | "tpm-certify";

const modeSchema = z.enum(["allow", "deny", "tpm-certify"]);
export const rotationPolicySchema = z
  .object({
    pkcs11: z.enum(["allow", "deny"]).default("allow"),
    tpm: z.enum(["tpm-certify", "deny"]).default("tpm-certify"),
    session_ttl: z.number().int().min(10).max(600).default(120),
    groups: z.record(z.string().min(1).max(64), modeSchema).default({}),
  })
  .strict();

export interface RotationPolicy {
  readonly sessionTtlSeconds: number;
  /** What a device of this method and group may do. */
  modeFor(device: { readonly method: string; readonly group: string }): RotationMode;
}

/** @throws ERR_CONFIG_INVALID naming the key (never the value). */
export function rotationPolicyFrom(raw: unknown, file = "<config>"): RotationPolicy {
  const r = rotationPolicySchema.safeParse(raw ?? {});
  if (!r.success) {
    const issue = r.error.issues[0];
    const key = ["rotation", ...(issue?.path.map(String) ?? [])].join(".");
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
      details: { file, key },
      hint: issue?.message ?? "see docs/credentials.md (key rotation)",
    });
  }
  const c = r.data;
  return {
    sessionTtlSeconds: c.session_ttl,
    modeFor(device) {
      const override = c.groups[device.group];
      if (device.method === "tpm") {
        // Security: for TPM keys "allow" still means "prove it with the AK"; only deny is weaker.
        return (override ?? c.tpm) === "deny" ? "deny" : "tpm-certify";
      }
      const m = override ?? c.pkcs11;
      return m === "deny" ? "deny" : "allow";
    },
  };
}
