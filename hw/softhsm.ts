import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { M2mError } from "../src/core/errors.js";
import { Secret } from "../src/core/secret.js";

/** Where Debian/Ubuntu put the SoftHSM2 PKCS#11 module (first existing one wins). */
export const SOFTHSM_MODULE_CANDIDATES: readonly string[] = [
  "/usr/lib/softhsm/libsofthsm2.so",
  "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/local/lib/softhsm/libsofthsm2.so",
];

export interface SoftHsmOptions {
  readonly label?: string;
  readonly pin?: string;
  readonly soPin?: string;
  /** Timeout for each softhsm2-util call (ms). */
  readonly timeoutMs?: number;
}

export interface SoftHsmHandle {
  /** Path of libsofthsm2.so, for `Pkcs11KeyProvider({ modulePath })`. */
  readonly modulePath: string;
  readonly tokenLabel: string;
  readonly pin: Secret;
  /** A 0600 file holding the user PIN (for `pin: { file }` and `?pin-source=file:` URIs). */
  readonly pinFile: string;
  /** Path of the private softhsm2.conf. */
  readonly conf: string;
  /** The temp dir holding conf, tokens/ and the PIN file. */
  readonly dir: string;
  /**
   * Environment for children (and for this process: SoftHSM reads SOFTHSM2_CONF when the module is
   * first C_Initialize'd, so set `process.env.SOFTHSM2_CONF = env.SOFTHSM2_CONF` before loading it).
   */
  readonly env: Readonly<Record<string, string>>;
  /** Removes the temp dir (token files included). Idempotent. */
  cleanup(): Promise<void>;
}

/** Finds libsofthsm2.so. @throws ERR_PKCS11_MODULE when SoftHSM2 is not installed. */
export function findSoftHsmModule(): string {
  const found = SOFTHSM_MODULE_CANDIDATES.find((p) => existsSync(p));
  if (found === undefined) {
    throw new M2mError("ERR_PKCS11_MODULE", "permanent", "libsofthsm2.so not found", {
      hint: "install SoftHSM2 (Debian: apt-get install softhsm2)",
      details: { searched: SOFTHSM_MODULE_CANDIDATES.join(":") },
    });
  }
  return found;
}

/**
 * Creates a fresh SoftHSM2 token in a private temp dir (test kit: tests, demo, `m2m-hw` CLI).
 * Nothing outside the temp dir is touched: the config is private and passed via SOFTHSM2_CONF.
 * @throws ERR_PKCS11_MODULE when SoftHSM2 is missing; ERR_HW_SOFTHSM_INIT when token init fails.
 */
export async function initSoftHsm(opts: SoftHsmOptions = {}): Promise<SoftHsmHandle> {
  const modulePath = findSoftHsmModule();
  const tokenLabel = opts.label ?? "m2m-test";
  const pin = opts.pin ?? "1234";
  const soPin = opts.soPin ?? "12345678";
  const timeout = opts.timeoutMs ?? 30_000;

  const dir = await mkdtemp(join(tmpdir(), "m2m-softhsm-"));
  await chmod(dir, 0o700);
  const cleanup = async (): Promise<void> => {
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const tokens = join(dir, "tokens");
    await mkdir(tokens, { mode: 0o700 });
    const conf = join(dir, "softhsm2.conf");
    await writeFile(
      conf,
      [
        `directories.tokendir = ${tokens}`,
        "objectstore.backend = file",
        "log.level = ERROR",
        "slots.removable = false",
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const env = { SOFTHSM2_CONF: conf };

    // The PIN file is created 0600 from the first byte (O_EXCL + mode), never chmod'ed afterwards.
    const pinFile = join(dir, "user.pin");
    const fh = await open(pinFile, "wx", 0o600);
    try {
      await fh.writeFile(`${pin}\n`);
    } finally {
      await fh.close();
    }

    // Test-only: softhsm2-util accepts PINs only on argv (or an interactive TTY). These are throwaway
    // PINs of a throwaway token in a private temp dir; production code never puts a PIN on argv.
    try {
      await execa(
        "softhsm2-util",
        ["--init-token", "--free", "--label", tokenLabel, "--pin", pin, "--so-pin", soPin],
        { env, extendEnv: true, timeout, killSignal: "SIGKILL", stdin: "ignore" },
      );
    } catch (err) {
      throw new M2mError("ERR_HW_SOFTHSM_INIT", "permanent", "softhsm2-util --init-token failed", {
        // The cause carries argv (test PINs); keep only stderr text.
        hint: "check that softhsm2-util is installed and the temp dir is writable",
        details: { stderr: String((err as { stderr?: unknown }).stderr ?? "").slice(0, 500) },
      });
    }
    return { modulePath, tokenLabel, pin: new Secret(pin), pinFile, conf, dir, env, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}
