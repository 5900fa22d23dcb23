import { createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import { open, readFile, stat } from "node:fs/promises";
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
 * Reads a key file only its owner may read. File-system errors (ENOENT included) pass through.
 * @throws ERR_OAUTH_SIGNING_KEY when the file is group/world readable.
 */
async function readOwnerOnlyPem(path: string): Promise<string> {
  const st = await stat(path);
  // Security: a signing key others can read lets them mint tokens for every device.
  if ((st.mode & 0o077) !== 0) {
    throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `${path} is readable by group/others`, {
      hint: `chmod 600 ${path}`,
    });
  }
  return readFile(path, "utf8");
}

/**
 * Loads the registrar's ES256 signing key from `dataDir`, creating it (0600 from the first byte) when
 * absent. kid = RFC 7638 thumbprint so resource servers can pick the key after a rotation.
 * @throws ERR_OAUTH_SIGNING_KEY when the file is unreadable, not P-256, or group/world readable.
 */
export async function loadOrCreateSigningKey(dataDir: string): Promise<TokenSigningKey> {
  const path = join(dataDir, SIGNING_KEY_FILE);
  let pem: string | undefined;
  try {
    pem = await readOwnerOnlyPem(path);
  } catch (err) {
    if (err instanceof M2mError) throw err;
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
      throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `cannot read ${path}`, { cause: err });
    }
  }
  if (pem === undefined) {
    pem = generateSigningKeyPem();
    await writeFileAtomic(path, pem, 0o600);
  }
  return signingKeyFromPem(pem);
}

/** A fresh ES256 (P-256) private key as PKCS#8 PEM. */
export function generateSigningKeyPem(): string {
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  return privateKey.export({ format: "pem", type: "pkcs8" }).toString();
}

/** Writes a new key file: 0600 from the first byte, never over an existing file. @throws ERR_OAUTH_SIGNING_KEY */
export async function writeNewKeyFile(path: string, pem: string): Promise<void> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(path, "wx", 0o600);
  } catch (err) {
    throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `cannot create ${path}`, {
      cause: err,
      hint: "the file must not exist yet (keys are never overwritten)",
    });
  }
  try {
    await fh.writeFile(pem);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Loads an existing signing key file (a path from `[keys]`, possibly a systemd credential).
 * @throws ERR_OAUTH_SIGNING_KEY when unreadable, group/world readable or not P-256.
 */
export async function loadSigningKeyFile(path: string): Promise<TokenSigningKey> {
  let pem: string;
  try {
    pem = await readOwnerOnlyPem(path);
  } catch (err) {
    if (err instanceof M2mError) throw err;
    throw new M2mError("ERR_OAUTH_SIGNING_KEY", "permanent", `cannot read ${path}`, { cause: err });
  }
  return signingKeyFromPem(pem);
}

/**
 * The keys a replica uses: one signs, all are published in /jwks and accepted by the registrar's own
 * resource servers (ingest, EST, rotation), selected by `kid`. Rollover keeps two published while
 * replicas switch the signing key one by one (docs/registrar-scale.md).
 */
export interface SigningKeySet {
  readonly signing: TokenSigningKey;
  /** Every published key, the signing one first; distinct kids. */
  readonly published: readonly TokenSigningKey[];
}

export async function loadSigningKeySet(config: {
  readonly dataDir: string;
  readonly keys: { readonly signingKey: string | undefined; readonly publishedKeys: readonly string[] };
}): Promise<SigningKeySet> {
  const signing =
    config.keys.signingKey === undefined
      ? await loadOrCreateSigningKey(config.dataDir)
      : await loadSigningKeyFile(config.keys.signingKey);
  const published = [signing];
  for (const p of config.keys.publishedKeys) {
    const k = await loadSigningKeyFile(p);
    if (!published.some((x) => x.kid === k.kid)) published.push(k);
  }
  return { signing, published };
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
