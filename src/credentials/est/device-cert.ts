import { X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { AgentConfig } from "../../config/index.js";
import { writeFileAtomic } from "../../core/atomic-file.js";
import type { EnrolmentState } from "../../enroll/state.js";

/** The device certificate the renewer keeps current (seeded from the enrolment state). */
export const DEVICE_CERT_FILE = "device-cert.pem";

export function deviceCertPath(config: AgentConfig): string {
  return join(config.agent.state_dir, DEVICE_CERT_FILE);
}

/** The EST base URL (without `/.well-known/est`): `[credentials.est] url`, else the enrolment's. */
export function estBaseUrl(config: AgentConfig, enrolment: EnrolmentState): string {
  const url = config.credentials.est?.url ?? enrolment.endpoints.est;
  return url.replace(/\/+$/, "").replace(/\/\.well-known\/est$/, "");
}

/**
 * Writes the enrolment certificate to the renewer's file when that file is missing, belongs to
 * another key, or is older than the enrolment's (a fresh enrolment or re-attestation wins).
 */
export async function seedCertificate(path: string, enrolment: EnrolmentState): Promise<void> {
  const fromState = new X509Certificate(enrolment.certificatePem);
  let current: X509Certificate | undefined;
  try {
    current = new X509Certificate(await readFile(path, "utf8"));
  } catch {
    current = undefined;
  }
  // A NEWER certificate for another key is a key rotation whose enrolment-state update a crash cut
  // off: it wins (its key is the current one; the enrolment's key may already be destroyed).
  const newer = current !== undefined && new Date(current.validFrom) > new Date(fromState.validFrom);
  const stale =
    current === undefined ||
    (!newer && !current.publicKey.equals(fromState.publicKey)) ||
    new Date(current.validFrom) < new Date(fromState.validFrom);
  if (stale) await writeFileAtomic(path, `${enrolment.certificatePem.trim()}\n`, 0o600);
}
