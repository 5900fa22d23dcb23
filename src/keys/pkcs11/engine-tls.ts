/**
 * ALL OpenSSL-engine code lives here: mTLS with the device key inside a PKCS#11 token through Node's
 * bundled OpenSSL 3 and Debian's libengine-pkcs11-openssl. Node marks the engine options deprecated
 * (DEP0183): when they go, only this module changes (e.g. to a provider-based key store).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createSecureContext, type SecureContext } from "node:tls";
import { M2mError } from "../../core/errors.js";
import type { TlsClientKey } from "../capabilities.js";

/** Where Debian puts OpenSSL 3 engines; Node's OpenSSL has no engine directory compiled in. */
export const DEFAULT_OPENSSL_ENGINES_DIR = "/usr/lib/x86_64-linux-gnu/engines-3";

export interface EngineKeyOptions {
  /** Path of the PKCS#11 module (e.g. libsofthsm2.so, libtpm2_pkcs11.so). */
  readonly modulePath: string;
  readonly tokenLabel: string;
  readonly keyLabel: string;
  /** A 0600 file holding the user PIN (the engine reads it; the PIN never enters this process). */
  readonly pinFile: string;
  /** Default DEFAULT_OPENSSL_ENGINES_DIR. */
  readonly enginesDir?: string;
}

function uriEscape(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** The RFC 7512 URI the engine loads the key by (the PIN comes from `pin-source=file:`). */
export function engineKeyUri(o: EngineKeyOptions): string {
  return `pkcs11:token=${uriEscape(o.tokenLabel)};object=${uriEscape(o.keyLabel)};type=private?pin-source=file:${o.pinFile}`;
}

/**
 * Builds a TLS context whose client key is used inside the token. Must run before anything else in
 * the process loads an engine, because OPENSSL_ENGINES / PKCS11_MODULE_PATH are read at first load.
 * Errors (missing module, wrong PIN, unknown key) are thrown synchronously by OpenSSL.
 * @throws ERR_TLS_ENGINE_KEY (permanent: retrying a wrong PIN would lock the token)
 */
export function createEngineSecureContext(
  o: EngineKeyOptions & { readonly certPem: string; readonly caPem: string },
): SecureContext {
  process.env.OPENSSL_ENGINES ??= o.enginesDir ?? DEFAULT_OPENSSL_ENGINES_DIR;
  process.env.PKCS11_MODULE_PATH = o.modulePath;
  // libp11 uses the pin-source file byte for byte: a trailing newline (what editors and `echo`
  // write) becomes part of the PIN and costs a failed login (towards the token's lockout). A PIN
  // file with a line ending is copied, trimmed, into a private 0600 file for the moment of loading.
  let pinFile = o.pinFile;
  let scratch: string | undefined;
  try {
    const raw = readFileSync(o.pinFile);
    let end = raw.length;
    while (end > 0 && (raw[end - 1] === 0x0a || raw[end - 1] === 0x0d)) end--;
    if (end !== raw.length) {
      scratch = mkdtempSync(join(tmpdir(), "m2m-engine-"));
      pinFile = join(scratch, "pin");
      writeFileSync(pinFile, raw.subarray(0, end), { mode: 0o600, flag: "wx" });
    }
    raw.fill(0);
    // The engine id, not the .so path: the path works once and then fails every later context
    // (breaks reconnects) — see hardware notes. The key is loaded now; the context keeps the handle.
    return createSecureContext({
      ca: o.caPem,
      cert: o.certPem,
      privateKeyEngine: "pkcs11",
      privateKeyIdentifier: engineKeyUri({ ...o, pinFile }),
    });
  } catch (err) {
    throw new M2mError(
      "ERR_TLS_ENGINE_KEY",
      "permanent",
      "cannot use the device key through the PKCS#11 engine",
      {
        cause: err,
        hint: "check PKCS11 module path, token/key labels, PIN file, and that libengine-pkcs11-openssl is installed",
      },
    );
  } finally {
    if (scratch !== undefined) rmSync(scratch, { recursive: true, force: true });
  }
}

/** The TLS capability of a key inside a PKCS#11 token: the engine signs the handshake in the token. */
export function engineTlsClient(o: EngineKeyOptions): TlsClientKey {
  return {
    mechanism: "pkcs11-engine",
    secureContext: async ({ certPem, caPem }) => createEngineSecureContext({ ...o, certPem, caPem }),
  };
}
