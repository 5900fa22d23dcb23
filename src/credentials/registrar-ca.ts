import { readFile } from "node:fs/promises";
import type { AgentConfig } from "../config/index.js";
import type { EnrolmentState } from "../enroll/state.js";

/** The registrar's TLS anchors: `enroll.registrar_ca_file` plus the fleet CA chain from enrolment. */
export async function registrarCaPem(
  config: AgentConfig,
  enrolment: EnrolmentState | undefined,
): Promise<string | undefined> {
  const parts: string[] = [];
  if (config.enroll.registrar_ca_file !== undefined)
    parts.push(await readFile(config.enroll.registrar_ca_file, "utf8"));
  if (enrolment !== undefined) parts.push(...enrolment.caChainPem);
  return parts.length === 0 ? undefined : parts.join("\n");
}
