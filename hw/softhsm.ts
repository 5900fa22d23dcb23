import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, rm, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
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
  /**
   * Initialises one more token in the same token directory (same conf). SoftHSM builds its slot list in
   * C_Initialize: create every token before the module is first loaded (or finalize and reload).
   */
  addToken(
    label: string,
    pin?: string,
    soPin?: string,
  ): Promise<{ tokenLabel: string; pin: Secret; pinFile: string }>;
  /** Removes the temp dir (token files included). Idempotent. */
  cleanup(): Promise<void>;
}

/**
 * The agent.toml `[keys]` and `[keys.pkcs11]` tables (one line each entry) for a key on this token.
 * `pin` is the TOML value of `pin`; by default the handle's PIN file.
 */
export function softHsmKeysToml(
  hsm: Pick<SoftHsmHandle, "modulePath" | "tokenLabel" | "pinFile">,
  pin = `{ file = "${hsm.pinFile}" }`,
): string[] {
  return [
    "[keys]",
    'provider = "pkcs11"',
    "[keys.pkcs11]",
    `module = "${hsm.modulePath}"`,
    `token_label = "${hsm.tokenLabel}"`,
    `pin = ${pin}`,
  ];
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

async function initToken(o: {
  env: Record<string, string>;
  label: string;
  pin: string;
  soPin: string;
  pinFile: string;
  timeout: number;
}): Promise<void> {
  // The PIN file is created 0600 from the first byte (O_EXCL + mode), never chmod'ed afterwards.
  const fh = await open(o.pinFile, "wx", 0o600);
  try {
    await fh.writeFile(`${o.pin}\n`);
  } finally {
    await fh.close();
  }
  // Test-only: softhsm2-util accepts PINs only on argv (or an interactive TTY). These are throwaway
  // PINs of a throwaway token in a private temp dir; production code never puts a PIN on argv.
  try {
    await execa(
      "softhsm2-util",
      ["--init-token", "--free", "--label", o.label, "--pin", o.pin, "--so-pin", o.soPin],
      { env: o.env, extendEnv: true, timeout: o.timeout, killSignal: "SIGKILL", stdin: "ignore" },
    );
  } catch (err) {
    // The execa error carries argv (test PINs): keep only stderr text, no cause.
    throw new M2mError("ERR_HW_SOFTHSM_INIT", "permanent", "softhsm2-util --init-token failed", {
      hint: "check that softhsm2-util is installed and the temp dir is writable",
      details: { label: o.label, stderr: String((err as { stderr?: unknown }).stderr ?? "").slice(0, 500) },
    });
  }
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

    let n = 0;
    const addToken = async (label: string, userPin = pin, so = soPin) => {
      const pinFile = join(dir, n++ === 0 ? "user.pin" : `user-${n}.pin`);
      await initToken({ env, label, pin: userPin, soPin: so, pinFile, timeout });
      return { tokenLabel: label, pin: new Secret(userPin), pinFile };
    };
    const first = await addToken(tokenLabel);
    return { modulePath, ...first, conf, dir, env, addToken, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/** What an independent process sees of a key pair on a SoftHSM token (public facts only). */
export interface TokenKeyView {
  readonly found: boolean;
  readonly privateKeys: number;
  readonly publicKeys: number;
  /** RFC 7638 thumbprint computed in the child from the public key attributes. */
  readonly thumbprint?: string;
  /** Uncompressed EC point (hex) from CKA_EC_POINT, when EC. */
  readonly ecPointHex?: string;
  /** Boolean attributes of the private key, by CKA_* name. */
  readonly attributes: Readonly<Record<string, boolean>>;
  /** The CKR name with which reading the secret value (CKA_VALUE / CKA_PRIVATE_EXPONENT) failed; "readable" if it did not. */
  readonly secretRead: string;
}

// Runs in a fresh `node` process: plain pkcs11js, no project code, so it is an independent witness.
const INSPECT_SCRIPT = `
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
const [pkcs11jsUrl, modulePath, tokenLabel, keyLabel] = process.argv.slice(2);
const { default: pkcs11js } = await import(pkcs11jsUrl);
const pin = readFileSync(process.env.M2M_PIN_FILE, "utf8").replace(/\\r?\\n$/, "");
const lib = new pkcs11js.PKCS11();
lib.load(modulePath);
lib.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
const ckr = (e) => (/CKR_[A-Z0-9_]+/.exec(String(e && (e.message + " " + e.stack))) || ["?"])[0];
const b64u = (b) => Buffer.from(b).toString("base64url");
const strip = (b) => { let i = 0; while (i < b.length - 1 && b[i] === 0) i++; return b.subarray(i); };
try {
  const slot = lib.C_GetSlotList(true).find((s) => lib.C_GetTokenInfo(s).label.trimEnd() === tokenLabel);
  if (!slot) throw new Error("token not found");
  const s = lib.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION);
  lib.C_Login(s, pkcs11js.CKU_USER, pin);
  const find = (cls) => {
    lib.C_FindObjectsInit(s, [{ type: pkcs11js.CKA_CLASS, value: cls }, { type: pkcs11js.CKA_LABEL, value: keyLabel }]);
    const r = lib.C_FindObjects(s, 100);
    lib.C_FindObjectsFinal(s);
    return r;
  };
  const privs = find(pkcs11js.CKO_PRIVATE_KEY);
  const pubs = find(pkcs11js.CKO_PUBLIC_KEY);
  const out = { found: privs.length > 0, privateKeys: privs.length, publicKeys: pubs.length, attributes: {}, secretRead: "n/a" };
  if (privs.length > 0) {
    const names = ["CKA_LOCAL", "CKA_NEVER_EXTRACTABLE", "CKA_ALWAYS_SENSITIVE", "CKA_EXTRACTABLE", "CKA_SENSITIVE",
      "CKA_PRIVATE", "CKA_TOKEN", "CKA_SIGN", "CKA_DECRYPT", "CKA_UNWRAP", "CKA_DERIVE"];
    const vals = lib.C_GetAttributeValue(s, privs[0], names.map((n) => ({ type: pkcs11js[n] })));
    names.forEach((n, i) => { out.attributes[n] = vals[i].value[0] !== 0; });
    const kt = lib.C_GetAttributeValue(s, privs[0], [{ type: pkcs11js.CKA_KEY_TYPE }])[0].value.readUInt32LE(0);
    const secretAttr = kt === pkcs11js.CKK_EC ? pkcs11js.CKA_VALUE : pkcs11js.CKA_PRIVATE_EXPONENT;
    try { lib.C_GetAttributeValue(s, privs[0], [{ type: secretAttr }]); out.secretRead = "readable"; }
    catch (e) { out.secretRead = ckr(e); }
  }
  if (pubs.length > 0) {
    const kt = lib.C_GetAttributeValue(s, pubs[0], [{ type: pkcs11js.CKA_KEY_TYPE }])[0].value.readUInt32LE(0);
    let jwk;
    if (kt === pkcs11js.CKK_EC) {
      const raw = lib.C_GetAttributeValue(s, pubs[0], [{ type: pkcs11js.CKA_EC_POINT }])[0].value;
      const point = raw.length === 67 ? raw.subarray(2) : raw;
      out.ecPointHex = point.toString("hex");
      jwk = '{"crv":"P-256","kty":"EC","x":"' + b64u(point.subarray(1, 33)) + '","y":"' + b64u(point.subarray(33, 65)) + '"}';
    } else {
      const [n, e] = lib.C_GetAttributeValue(s, pubs[0], [{ type: pkcs11js.CKA_MODULUS }, { type: pkcs11js.CKA_PUBLIC_EXPONENT }]);
      jwk = '{"e":"' + b64u(strip(e.value)) + '","kty":"RSA","n":"' + b64u(strip(n.value)) + '"}';
    }
    out.thumbprint = createHash("sha256").update(jwk).digest("base64url");
  }
  lib.C_CloseSession(s);
  process.stdout.write(JSON.stringify(out));
} finally {
  lib.C_Finalize();
}
`;

/**
 * Looks at a key pair from a brand-new `node` process using pkcs11js directly (no project code): the
 * witness that a key persists outside the process that made it and that its secret cannot be read.
 * The PIN travels as a file path in the environment, never on argv.
 */
export async function inspectKeyInNewProcess(
  h: Pick<SoftHsmHandle, "modulePath" | "dir" | "env">,
  token: { tokenLabel: string; pinFile: string },
  keyLabel: string,
): Promise<TokenKeyView> {
  const script = join(h.dir, "inspect-key.mjs");
  await writeFile(script, INSPECT_SCRIPT, { mode: 0o600 });
  const pkcs11jsUrl = pathToFileURL(createRequire(import.meta.url).resolve("pkcs11js")).href;
  const { stdout } = await execa(
    process.execPath,
    [script, pkcs11jsUrl, h.modulePath, token.tokenLabel, keyLabel],
    {
      env: { ...h.env, M2M_PIN_FILE: token.pinFile },
      extendEnv: true,
      timeout: 30_000,
      killSignal: "SIGKILL",
    },
  );
  return JSON.parse(stdout) as TokenKeyView;
}
