import { M2mError } from "../../core/errors.js";

/**
 * Classification of tpm2-tools failures into stable M2mError codes. Pure functions (unit-testable):
 * the runner feeds them the tool name, exit code and stderr.
 *
 * | code                   | retry     | when                                                             |
 * |------------------------|-----------|------------------------------------------------------------------|
 * | ERR_TPM_LOCKOUT        | fatal     | TPM_RC_LOCKOUT 0x921: DA lockout; more attempts extend it        |
 * | ERR_TPM_BUSY           | transient | 0x901-0x90A (context gap, object/session memory, yielded, …),    |
 * |                        |           | 0x920 NV_RATE, 0x922 RETRY, 0x923 NV_UNAVAILABLE                 |
 * | ERR_TPM_AUTH           | fatal     | AUTH_FAIL 0x08E, BAD_AUTH 0x0A2, POLICY_FAIL 0x09D, AUTH_MISSING, |
 * |                        |           | AUTH_UNAVAILABLE, AUTH_TYPE: never retried (each try feeds DA)   |
 * | ERR_TPM_HANDLE_MISSING | permanent | HANDLE 0x08B, VALUE 0x084 on a handle, "Could not load tr"       |
 * | ERR_TPM_UNREACHABLE    | transient | TCTI layer errors, connection refused, tool exit code 4          |
 * | ERR_TPM_TOOLS_MISSING  | permanent | the tpm2_* binary is not installed                               |
 * | ERR_TPM_TIMEOUT        | transient | the call exceeded its timeout (process group killed)             |
 * | ERR_TPM_COMMAND        | permanent | any other TPM or tool error (details.rc names it)                |
 */

export const TPM_RC = {
  SUCCESS: 0x000,
  // Format-1 base codes (RC_FMT1 = 0x080); the handle/session/parameter number is stripped first.
  VALUE: 0x084,
  HANDLE: 0x08b,
  AUTH_FAIL: 0x08e,
  POLICY_FAIL: 0x09d,
  BAD_AUTH: 0x0a2,
  // Format-0 (RC_VER1 = 0x100)
  AUTH_TYPE: 0x124,
  AUTH_MISSING: 0x125,
  AUTH_UNAVAILABLE: 0x12f,
  // Warnings (RC_WARN = 0x900)
  CONTEXT_GAP: 0x901,
  OBJECT_MEMORY: 0x902,
  SESSION_MEMORY: 0x903,
  MEMORY: 0x904,
  SESSION_HANDLES: 0x905,
  OBJECT_HANDLES: 0x906,
  LOCALITY: 0x907,
  YIELDED: 0x908,
  CANCELED: 0x909,
  TESTING: 0x90a,
  NV_RATE: 0x920,
  LOCKOUT: 0x921,
  RETRY: 0x922,
  NV_UNAVAILABLE: 0x923,
} as const;

const BUSY = new Set<number>([
  TPM_RC.CONTEXT_GAP,
  TPM_RC.OBJECT_MEMORY,
  TPM_RC.SESSION_MEMORY,
  TPM_RC.MEMORY,
  TPM_RC.SESSION_HANDLES,
  TPM_RC.OBJECT_HANDLES,
  TPM_RC.YIELDED,
  TPM_RC.CANCELED,
  TPM_RC.TESTING,
  TPM_RC.NV_RATE,
  TPM_RC.RETRY,
  TPM_RC.NV_UNAVAILABLE,
]);

const AUTH = new Set<number>([
  TPM_RC.AUTH_FAIL,
  TPM_RC.BAD_AUTH,
  TPM_RC.POLICY_FAIL,
  TPM_RC.AUTH_TYPE,
  TPM_RC.AUTH_MISSING,
  TPM_RC.AUTH_UNAVAILABLE,
]);

/** TSS2 layer of a response code (bits 16-23): 0 = TPM, 0x07 ESYS, 0x0A TCTI, … */
export function rcLayer(rc: number): number {
  return (rc >>> 16) & 0xff;
}

/** The base code of a TPM-layer RC: format-1 codes lose their handle/session/parameter number. */
export function rcBase(rc: number): number {
  const r = rc & 0xffff;
  if ((r & 0x080) !== 0) return 0x080 | (r & 0x03f);
  return r & 0xfff;
}

/** For a format-1 RC: which handle (1..7) it is about, else undefined (parameter or session). */
export function rcHandleNumber(rc: number): number | undefined {
  const r = rc & 0xffff;
  if ((r & 0x080) === 0 || (r & 0x040) !== 0) return undefined;
  const n = (r >> 8) & 0xf;
  return n >= 1 && n <= 7 ? n : undefined;
}

/**
 * Extracts the most specific response code from tpm2-tools stderr. The tools print the ESYS chain
 * ("ErrorCode (0x0000018b)") and a summary ("ERROR: Esys_Sign(0x921) - …"); a TPM-layer code wins
 * over TSS-layer codes because it says what the TPM itself refused.
 */
export function parseTpmRc(stderr: string): number | undefined {
  const codes: number[] = [];
  for (const m of stderr.matchAll(
    /ErrorCode \((0x[0-9a-fA-F]+)\)|\b(?:Esys|Tss2|Fapi)_\w+\((0x[0-9a-fA-F]+)\)/g,
  )) {
    const hex = m[1] ?? m[2];
    if (hex !== undefined) codes.push(Number.parseInt(hex, 16));
  }
  const nonZero = codes.filter((c) => c !== 0);
  return nonZero.find((c) => rcLayer(c) === 0) ?? nonZero.at(-1);
}

export function rcHex(rc: number): string {
  return `0x${rc.toString(16).padStart(3, "0")}`;
}

export interface ToolFailure {
  readonly tool: string;
  readonly exitCode?: number | undefined;
  readonly stderr: string;
  /** Node/execa errno code of the spawn (ENOENT when the binary is missing). */
  readonly spawnCode?: string | undefined;
  readonly timedOut?: boolean;
  readonly timeoutMs?: number;
  /** A TPM response code already known (raw commands through tpm2_send). */
  readonly rc?: number;
}

const UNREACHABLE_TEXT =
  /Could not load tcti|Failed to instantiate TCTI|Failed to initialize tcti|Cannot connect to swtpm|Connection refused|Failed to connect|No such file or directory.*tpm|tcti.*(?:Failed|error)/i;

/** Maps one tool failure to a typed M2mError. Stderr goes into `cause` only (operators see it in logs). */
export function classifyToolFailure(f: ToolFailure): M2mError {
  const cause = new Error(`${f.tool} failed: ${lastLines(f.stderr)}`);
  const base = { tool: f.tool, ...(f.exitCode === undefined ? {} : { exitCode: f.exitCode }) };
  if (f.spawnCode === "ENOENT") {
    return new M2mError("ERR_TPM_TOOLS_MISSING", "permanent", `${f.tool} is not installed`, {
      hint: "apt-get install tpm2-tools (and libtss2-tcti-swtpm0 for swtpm)",
      details: base,
      cause,
    });
  }
  if (f.timedOut === true) {
    return new M2mError(
      "ERR_TPM_TIMEOUT",
      "transient",
      `${f.tool} did not finish in ${f.timeoutMs ?? "?"} ms`,
      {
        hint: "the TPM or its TCTI hangs; check the TPM device / resource manager",
        details: { ...base, timeoutMs: f.timeoutMs ?? 0 },
        cause,
      },
    );
  }
  const rc = f.rc ?? parseTpmRc(f.stderr);
  if (rc !== undefined && rcLayer(rc) === 0) {
    const err = classifyTpmRc(rc, f.tool, cause);
    if (err !== undefined) return err;
  }
  if ((rc !== undefined && rcLayer(rc) === 0x0a) || f.exitCode === 4 || UNREACHABLE_TEXT.test(f.stderr)) {
    return new M2mError("ERR_TPM_UNREACHABLE", "transient", "the TPM cannot be reached through its TCTI", {
      hint: "check the TCTI (device:/dev/tpmrm0 exists and is accessible, or the simulator is running)",
      details: { ...base, ...(rc === undefined ? {} : { rc: rcHex(rc) }) },
      cause,
    });
  }
  if (/Could not load tr\b/.test(f.stderr)) {
    return new M2mError("ERR_TPM_HANDLE_MISSING", "permanent", "the TPM object does not exist", {
      details: base,
      cause,
    });
  }
  return new M2mError("ERR_TPM_COMMAND", "permanent", `${f.tool} failed`, {
    details: { ...base, ...(rc === undefined ? {} : { rc: rcHex(rc) }) },
    cause,
  });
}

/** Classifies a TPM-layer response code; undefined for success. */
export function classifyTpmRc(rc: number, tool: string, cause?: unknown): M2mError | undefined {
  if (rc === 0) return undefined;
  const b = rcBase(rc);
  const details = { tool, rc: rcHex(rc) };
  const opts = (extra: { hint?: string } = {}) => ({
    ...extra,
    details,
    ...(cause === undefined ? {} : { cause }),
  });
  if (b === TPM_RC.LOCKOUT) {
    return new M2mError(
      "ERR_TPM_LOCKOUT",
      "fatal",
      "the TPM is in dictionary-attack lockout",
      opts({
        hint: "stop using DA-protected keys until the lockout interval has passed, or clear it with the lockout authorization (tpm2_dictionarylockout -c)",
      }),
    );
  }
  if (BUSY.has(b)) {
    return new M2mError("ERR_TPM_BUSY", "transient", "the TPM is busy", opts());
  }
  if (AUTH.has(b)) {
    return new M2mError(
      "ERR_TPM_AUTH",
      "fatal",
      "TPM authorization failed",
      opts({
        hint: "check the authorization value / policy (an owner hierarchy with a password needs keys.tpm.owner_auth); retrying would feed the dictionary-attack counter",
      }),
    );
  }
  if (b === TPM_RC.HANDLE || (b === TPM_RC.VALUE && rcHandleNumber(rc) !== undefined)) {
    return new M2mError("ERR_TPM_HANDLE_MISSING", "permanent", "the TPM object does not exist", opts());
  }
  return undefined;
}

function lastLines(stderr: string): string {
  return stderr
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l.length > 0)
    .slice(-4)
    .join(" | ")
    .slice(0, 600);
}
