import { open } from "node:fs/promises";
import { join } from "node:path";
import { M2mError } from "../core/errors.js";
import { Secret } from "../core/secret.js";
import type { SecretRef } from "./schema.js";

export interface ResolveSecretOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Largest accepted secret (PINs and tokens are small; a huge file is a misconfiguration). */
  readonly maxBytes?: number;
}

/** Human description of where a secret comes from (safe to log: no value). */
export function describeSecretRef(ref: SecretRef): string {
  if ("file" in ref) return `file ${ref.file}`;
  if ("credential" in ref) return `systemd credential ${ref.credential}`;
  return `environment variable ${ref.env}`;
}

/**
 * Reads a referenced secret. Trailing newlines are stripped (files written with `echo`).
 * @throws ERR_SECRET_UNAVAILABLE (missing file/variable/credential), ERR_SECRET_PERMISSIONS (a secret
 * file readable by group or others).
 */
export async function resolveSecret(ref: SecretRef, options: ResolveSecretOptions = {}): Promise<Secret> {
  const env = options.env ?? process.env;
  const maxBytes = options.maxBytes ?? 64 * 1024;
  if ("env" in ref) {
    const v = env[ref.env];
    if (v === undefined || v === "") {
      throw new M2mError(
        "ERR_SECRET_UNAVAILABLE",
        "permanent",
        `environment variable ${ref.env} is not set`,
        {
          hint: `set ${ref.env} in the service environment, or use a file / systemd credential reference`,
        },
      );
    }
    return new Secret(v.replace(/\r?\n$/, ""));
  }
  let path: string;
  let checkMode = true;
  if ("credential" in ref) {
    const dir = env.CREDENTIALS_DIRECTORY;
    if (dir === undefined || dir === "") {
      throw new M2mError(
        "ERR_SECRET_UNAVAILABLE",
        "permanent",
        `systemd credential ${ref.credential} requested but CREDENTIALS_DIRECTORY is not set`,
        {
          hint: `add LoadCredential=${ref.credential}:/path to the unit, or use { file = "/path" } outside systemd`,
        },
      );
    }
    path = join(dir, ref.credential);
    // systemd owns the credentials directory and its modes (ramfs, 0400/0440 to the service user).
    checkMode = false;
  } else {
    path = ref.file;
  }
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(path, "r");
  } catch (err) {
    throw new M2mError(
      "ERR_SECRET_UNAVAILABLE",
      "permanent",
      `cannot open secret ${describeSecretRef(ref)}`,
      {
        cause: err,
        hint: "check the path and that the agent user can read it",
      },
    );
  }
  try {
    const st = await fh.stat();
    // A secret readable by group or others is already disclosed to them: refuse rather than use it.
    if (checkMode && (st.mode & 0o077) !== 0) {
      throw new M2mError(
        "ERR_SECRET_PERMISSIONS",
        "permanent",
        `secret file ${path} is accessible by group or others (mode ${(st.mode & 0o777).toString(8)})`,
        { hint: `chmod 600 ${path} (and consider rotating the secret)`, details: { file: path } },
      );
    }
    if (st.size > maxBytes) {
      throw new M2mError("ERR_SECRET_UNAVAILABLE", "permanent", `secret file ${path} is too large`, {
        details: { file: path },
      });
    }
    const text = (await fh.readFile("utf8")).replace(/\r?\n$/, "");
    return new Secret(text);
  } finally {
    await fh.close();
  }
}
