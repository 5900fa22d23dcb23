import { constants } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { Secret } from "../../core/secret.js";

/**
 * Where the token user PIN comes from. Never a literal in config: a file (0600/0400), an environment
 * variable, or a systemd credential (`LoadCredential=` / `LoadCredentialEncrypted=`).
 */
export type PinSource =
  | { readonly file: string }
  | { readonly env: string }
  | { readonly credential: string };

/** A short, secret-free description of a PinSource (for logs and error details). */
export function describePinSource(source: PinSource): string {
  if ("file" in source) return `file:${source.file}`;
  if ("env" in source) return `env:${source.env}`;
  return `credential:${source.credential}`;
}

/** Max PIN file size: a PIN is short; a big file is a misconfiguration (not read into memory). */
const MAX_PIN_BYTES = 4096;

function trimOneNewline(s: string): string {
  if (s.endsWith("\r\n")) return s.slice(0, -2);
  if (s.endsWith("\n")) return s.slice(0, -1);
  return s;
}

function nonEmpty(pin: string, source: PinSource): Secret {
  if (pin.length === 0) {
    throw new M2mError("ERR_PIN_EMPTY", "permanent", `the PIN from ${describePinSource(source)} is empty`, {
      hint: "put the token user PIN into the configured PIN source",
    });
  }
  return new Secret(pin);
}

async function readPinFile(path: string, source: PinSource, code: ErrorCode): Promise<Secret> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    // O_NOFOLLOW: a symlink planted in place of the PIN file is not followed.
    fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (err) {
    throw new M2mError(code, "permanent", `cannot open the PIN file ${path}`, {
      cause: err,
      hint: "create the file (mode 0600, owned by the agent user) or fix the configured path",
      details: { path, errno: String((err as NodeJS.ErrnoException).code ?? "") },
    });
  }
  try {
    // fstat on the opened descriptor: the mode checked is the mode of the file actually read.
    const st = await fh.stat();
    if (!st.isFile()) {
      throw new M2mError(code, "permanent", `the PIN file ${path} is not a regular file`, {
        details: { path },
      });
    }
    // A PIN readable by group or others can be read by any local account: refuse to use it.
    if ((st.mode & 0o077) !== 0) {
      throw new M2mError(
        "ERR_PIN_FILE_PERMISSIONS",
        "permanent",
        `the PIN file ${path} is readable by group or others (mode ${(st.mode & 0o777).toString(8)})`,
        { hint: `run: chmod 600 ${path}`, details: { path, mode: (st.mode & 0o777).toString(8) } },
      );
    }
    if (st.size > MAX_PIN_BYTES) {
      throw new M2mError(code, "permanent", `the PIN file ${path} is too large`, { details: { path } });
    }
    const text = await fh.readFile({ encoding: "utf8" });
    return nonEmpty(trimOneNewline(text), source);
  } finally {
    await fh.close();
  }
}

/**
 * Reads the PIN from its source. One trailing newline is removed (files written by `echo`).
 * The PIN never appears in an error message, detail or log.
 * @throws ERR_PIN_FILE (unreadable), ERR_PIN_FILE_PERMISSIONS (mode & 0o077), ERR_PIN_ENV_MISSING,
 *   ERR_PIN_CREDENTIAL (CREDENTIALS_DIRECTORY unset, bad name, or missing), ERR_PIN_EMPTY. All permanent.
 */
export async function readPin(
  source: PinSource,
  env: Readonly<Record<string, string | undefined>> = process.env,
): Promise<Secret> {
  if ("file" in source) return readPinFile(source.file, source, "ERR_PIN_FILE");
  if ("env" in source) {
    const value = env[source.env];
    if (value === undefined || value.length === 0) {
      throw new M2mError(
        "ERR_PIN_ENV_MISSING",
        "permanent",
        `environment variable ${source.env} is not set`,
        {
          hint: `set ${source.env} in the service environment (e.g. an EnvironmentFile= readable only by root)`,
          details: { variable: source.env },
        },
      );
    }
    return nonEmpty(trimOneNewline(value), source);
  }
  const dir = env.CREDENTIALS_DIRECTORY;
  if (dir === undefined || dir.length === 0) {
    throw new M2mError(
      "ERR_PIN_CREDENTIAL",
      "permanent",
      `PIN credential ${source.credential} requested but CREDENTIALS_DIRECTORY is not set`,
      {
        hint: `add LoadCredential=${source.credential}:/path/to/pin (or LoadCredentialEncrypted=) to the systemd unit`,
        details: { credential: source.credential },
      },
    );
  }
  // A credential name is a single path component: no traversal out of the credentials directory.
  if (!/^[A-Za-z0-9_.:-]+$/.test(source.credential) || source.credential.startsWith(".")) {
    throw new M2mError("ERR_PIN_CREDENTIAL", "permanent", "invalid PIN credential name", {
      hint: "use a plain credential name such as m2m-pin",
      details: { credential: source.credential },
    });
  }
  return readPinFile(join(dir, source.credential), source, "ERR_PIN_CREDENTIAL");
}
