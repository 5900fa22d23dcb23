import { createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { calculateJwkThumbprint, type JWK } from "jose";
import { writeFileAtomic } from "../../core/atomic-file.js";
import { M2mError } from "../../core/errors.js";

/** The registrar's access-token signing key (ES256). */
export interface TokenSigningKey {
  readonly privateKey: KeyObject;
  readonly publicKey: KeyObject;
  readonly kid: string;
  /** Public JWK with kid, alg, use: what /jwks publishes. */
  readonly publicJwk: JWK;
}

export const SIGNING_KEY_FILE = "oauth-signing-key.pem";

/**
 * Loads the registrar's ES256 signing key from `dataDir`, creating it (0600 from the first byte) when
 * absent. kid = RFC 7638 thumbprint so resource servers can pick the key after a rotation.
 * @throws ERR_OAUTH_SIGNING_KEY when the file is unreadable, not P-256, or group/world readable.
 */
export async function loadOrCreateSigningKey(dataDir: string): Promise<TokenSigningKey> {
  const path = join(dataDir, SIGNING_KEY_FILE);
  let pem: string | undefined;
  try {
    const st = await stat(path);
    // Security: a signing key others can read lets them mint tokens for every device.
    if ((st.mode & 0o077) !== 0) {
      throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `${path} is readable by group/others`, {
        hint: `chmod 600 ${path}`,
      });
    }
    pem = await readFile(path, "utf8");
  } catch (err) {
    if (err instanceof M2mError) throw err;
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
      throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `cannot read ${path}`, { cause: err });
    }
  }
  if (pem === undefined) {
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    pem = privateKey.export({ format: "pem", type: "pkcs8" }).toString();
    await writeFileAtomic(path, pem, 0o600);
  }
  return signingKeyFromPem(pem);
}

export async function signingKeyFromPem(pem: string): Promise<TokenSigningKey> {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(pem);
  } catch (err) {
    throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", "signing key is not a valid PEM key", {
      cause: err,
    });
  }
  if (privateKey.asymmetricKeyType !== "ec" || privateKey.asymmetricKeyDetails?.namedCurve !== "prime256v1") {
    throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", "signing key must be EC P-256 (ES256)");
  }
  const publicKey = createPublicKey(privateKey);
  const jwk = publicKey.export({ format: "jwk" }) as JWK;
  const bare: JWK = { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y };
  const kid = await calculateJwkThumbprint(bare, "sha256");
  return { privateKey, publicKey, kid, publicJwk: { ...bare, kid, alg: "ES256", use: "sig" } };
}

/**
 * Signs a JWT with the registrar key (ES256). Done with node:crypto rather than jose's SignJWT:
 * jose signs through WebCrypto, ~4× slower per signature, and this is the token endpoint's hot path.
 * The KeyObject is parsed once at load (`signingKeyFromPem`) and reused for every token.
 */
export function signJwt(
  key: TokenSigningKey,
  header: Record<string, unknown>,
  claims: Record<string, unknown>,
): string {
  const b64u = (v: unknown) => Buffer.from(JSON.stringify(v), "utf8").toString("base64url");
  const input = `${b64u({ ...header, alg: "ES256", kid: key.kid })}.${b64u(claims)}`;
  const sig = sign("sha256", Buffer.from(input, "latin1"), {
    key: key.privateKey,
    dsaEncoding: "ieee-p1363",
  });
  return `${input}.${sig.toString("base64url")}`;
}

/**
 * `signJwt` with the signature computed in libuv's thread pool (node:crypto's callback form), so the
 * token endpoint's event loop keeps serving other requests meanwhile. Same output format.
 */
export async function signJwtInPool(
  key: TokenSigningKey,
  header: Record<string, unknown>,
  claims: Record<string, unknown>,
): Promise<string> {
  const b64u = (v: unknown) => Buffer.from(JSON.stringify(v), "utf8").toString("base64url");
  const input = `${b64u({ ...header, alg: "ES256", kid: key.kid })}.${b64u(claims)}`;
  const sig = await new Promise<Buffer>((resolve, reject) =>
    sign(
      "sha256",
      Buffer.from(input, "latin1"),
      { key: key.privateKey, dsaEncoding: "ieee-p1363" },
      (err, out) => (err === null ? resolve(out) : reject(err)),
    ),
  );
  return `${input}.${sig.toString("base64url")}`;
}
