import { existsSync } from "node:fs";
import pkcs11js from "pkcs11js";
import { M2mError } from "../../core/errors.js";

/** The CKR_* name → value table of pkcs11js, reversed (value → name) for error normalisation. */
const CKR_NAMES: ReadonlyMap<number, string> = (() => {
  const m = new Map<number, string>();
  for (const [k, v] of Object.entries(pkcs11js)) {
    if (k.startsWith("CKR_") && typeof v === "number" && !m.has(v)) m.set(v, k);
  }
  return m;
})();

/** A PKCS#11 return value pulled out of whatever pkcs11js threw. */
export interface CkrError {
  readonly name: string;
  readonly code: number;
}

/**
 * pkcs11js throws two shapes: `Pkcs11Error` with a numeric `.code` (message = CKR name), and a plain
 * Error whose message is `CKR_X:code` (callback/async paths, some native errors). Both → {name, code}.
 */
export function ckrOf(err: unknown): CkrError | undefined {
  if (!(err instanceof Error)) return undefined;
  const m = /(CKR_[A-Z0-9_]+):(\d+)/.exec(`${err.message}\n${err.stack ?? ""}`);
  if (m?.[1] !== undefined && m[2] !== undefined) return { name: m[1], code: Number(m[2]) };
  const code = (err as { code?: unknown }).code;
  if (typeof code === "number" && code !== 0) {
    return {
      name: CKR_NAMES.get(code) ?? (/^CKR_\w+$/.test(err.message) ? err.message : "CKR_UNKNOWN"),
      code,
    };
  }
  if (/^CKR_[A-Z0-9_]+$/.test(err.message)) {
    return {
      name: err.message,
      code: Number((pkcs11js as unknown as Record<string, unknown>)[err.message] ?? -1),
    };
  }
  return undefined;
}

export function isCkr(err: unknown, ...names: string[]): boolean {
  const c = ckrOf(err);
  return c !== undefined && names.includes(c.name);
}

/** Return values after which the session (or the whole token connection) must be rebuilt. */
export const SESSION_LOST = [
  "CKR_SESSION_HANDLE_INVALID",
  "CKR_SESSION_CLOSED",
  "CKR_DEVICE_REMOVED",
  "CKR_TOKEN_NOT_PRESENT",
  "CKR_USER_NOT_LOGGED_IN",
  "CKR_OBJECT_HANDLE_INVALID",
  "CKR_KEY_HANDLE_INVALID",
] as const;

/** Return values that mean "the PIN is wrong / unusable": retrying burns attempts and locks the token. */
export const PIN_FATAL = [
  "CKR_PIN_INCORRECT",
  "CKR_PIN_LOCKED",
  "CKR_PIN_LEN_RANGE",
  "CKR_PIN_EXPIRED",
  "CKR_PIN_INVALID",
];

interface LoadedModule {
  readonly lib: pkcs11js.PKCS11;
  readonly path: string;
}

/** One loaded + initialised instance per module path per process (the TLS engine shares it too). */
const loaded = new Map<string, LoadedModule>();

/**
 * Loads and C_Initialize's a PKCS#11 module once per process. `CKF_OS_LOCKING_OK` is required:
 * without it SoftHSM turns its locking off and parallel async signing crashes the process.
 * `CKR_CRYPTOKI_ALREADY_INITIALIZED` is normal (the OpenSSL pkcs11 engine may have come first).
 * @throws ERR_PKCS11_MODULE (permanent) when the file is missing or is not a usable PKCS#11 module.
 */
export function loadModule(modulePath: string): pkcs11js.PKCS11 {
  const existing = loaded.get(modulePath);
  if (existing !== undefined) return existing.lib;
  if (!existsSync(modulePath)) {
    throw new M2mError("ERR_PKCS11_MODULE", "permanent", `PKCS#11 module ${modulePath} does not exist`, {
      hint: "install the token's PKCS#11 module (e.g. apt-get install softhsm2 / opensc) or fix keys.pkcs11.module",
      details: { modulePath },
    });
  }
  const lib = new pkcs11js.PKCS11();
  try {
    lib.load(modulePath);
  } catch (err) {
    throw new M2mError("ERR_PKCS11_MODULE", "permanent", `cannot load PKCS#11 module ${modulePath}`, {
      cause: err,
      hint: "check that the path points at a PKCS#11 shared library for this architecture (not a directory or a different file)",
      details: { modulePath },
    });
  }
  try {
    lib.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
  } catch (err) {
    if (!isCkr(err, "CKR_CRYPTOKI_ALREADY_INITIALIZED")) {
      try {
        lib.close();
      } catch {
        // Already failing; the initialise error is the one worth reporting.
      }
      throw new M2mError("ERR_PKCS11_MODULE", "permanent", `C_Initialize failed for ${modulePath}`, {
        cause: err,
        hint: "check the module's own configuration (e.g. SOFTHSM2_CONF and its token directory permissions)",
        details: { modulePath, ckr: ckrOf(err)?.name ?? "unknown" },
      });
    }
  }
  loaded.set(modulePath, { lib, path: modulePath });
  return lib;
}

/**
 * C_Finalize + unload. Only for tests and short-lived CLI commands at exit: a TLS context using the
 * pkcs11 engine shares this module instance, and finalising it under a live connection breaks it.
 * Providers never call this from `close()`. Idempotent.
 */
export function finalizeModule(modulePath: string): void {
  const m = loaded.get(modulePath);
  if (m === undefined) return;
  loaded.delete(modulePath);
  try {
    m.lib.C_Finalize();
  } catch {
    // Not initialised or already finalised: nothing left to release.
  }
  try {
    m.lib.close();
  } catch {
    // Unload failure at exit is harmless.
  }
}

/** Finalises every module this process loaded (tests' afterAll, CLI exit). */
export function finalizeAllModules(): void {
  for (const path of [...loaded.keys()]) finalizeModule(path);
}
