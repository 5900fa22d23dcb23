import { createPublicKey, type KeyObject } from "node:crypto";
import { calculateJwkThumbprint, type JWK } from "jose";
import { M2mError } from "./errors.js";

/**
 * What both programs need to know about a device public key (the agent's key backends and the
 * registrar's enrolment both describe keys from an SPKI): shared here so that the registrar never
 * imports the agent's `src/keys/`.
 */

/** JWS algorithms a device key can produce. ES256 is required of every provider. */
export type JwsAlgorithm = "ES256" | "RS256" | "PS256";
export type KeyAlgorithm = "ec-p256" | "rsa-2048";

export const JWS_ALGS_FOR: Readonly<Record<KeyAlgorithm, readonly JwsAlgorithm[]>> = {
  "ec-p256": ["ES256"],
  "rsa-2048": ["RS256", "PS256"],
};

/** The public facts of a key, derived from its SPKI alone. */
export interface PublicKeyDescription {
  readonly algorithm: KeyAlgorithm;
  readonly jwsAlgorithms: readonly JwsAlgorithm[];
  /** Public JWK with only the key members (no `alg`, `kid`, `use`). */
  readonly publicJwk: JWK;
  readonly spkiPem: string;
  /** RFC 7638 SHA-256 thumbprint of `publicJwk`. */
  readonly thumbprint: string;
}

/**
 * Describes an SPKI (PEM or DER).
 * @throws ERR_KEY_PUBLIC_INVALID (unparsable), ERR_KEY_ALGORITHM (not EC P-256 / RSA-2048).
 */
export async function describePublicKey(spki: string | Uint8Array): Promise<PublicKeyDescription> {
  let key: KeyObject;
  try {
    key =
      typeof spki === "string"
        ? createPublicKey(spki)
        : createPublicKey({ key: Buffer.from(spki), format: "der", type: "spki" });
  } catch (err) {
    throw new M2mError("ERR_KEY_PUBLIC_INVALID", "permanent", "backend returned an unparsable public key", {
      cause: err,
    });
  }
  const algorithm = algorithmOf(key);
  const full = key.export({ format: "jwk" }) as JWK;
  const publicJwk: JWK =
    algorithm === "ec-p256"
      ? { kty: "EC", crv: "P-256", x: full.x, y: full.y }
      : { kty: "RSA", n: full.n, e: full.e };
  return {
    algorithm,
    jwsAlgorithms: JWS_ALGS_FOR[algorithm],
    publicJwk,
    spkiPem: key.export({ format: "pem", type: "spki" }).toString(),
    thumbprint: await calculateJwkThumbprint(publicJwk, "sha256"),
  };
}

export function algorithmOf(key: KeyObject): KeyAlgorithm {
  const d = key.asymmetricKeyDetails;
  if (key.asymmetricKeyType === "ec" && d?.namedCurve === "prime256v1") return "ec-p256";
  if (key.asymmetricKeyType === "rsa" && d?.modulusLength === 2048) return "rsa-2048";
  throw new M2mError(
    "ERR_KEY_ALGORITHM",
    "permanent",
    `unsupported device key type ${key.asymmetricKeyType ?? "?"} (${d?.namedCurve ?? d?.modulusLength ?? "?"}); expected EC P-256 or RSA-2048`,
  );
}
