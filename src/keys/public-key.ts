import { createPublicKey, type KeyObject } from "node:crypto";
import { calculateJwkThumbprint, type JWK } from "jose";
import { M2mError } from "../core/errors.js";
import { JWS_ALGS_FOR, type KeyAlgorithm, type KeyInfo } from "./key-provider.js";

/** Builds the public half of a KeyInfo from an SPKI (PEM or DER) a backend returned. */
export async function keyInfoFromSpki(
  spki: string | Uint8Array,
  ref: string,
  created: boolean,
): Promise<KeyInfo> {
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
    ref,
    algorithm,
    jwsAlgorithms: JWS_ALGS_FOR[algorithm],
    publicJwk,
    spkiPem: key.export({ format: "pem", type: "spki" }).toString(),
    thumbprint: await calculateJwkThumbprint(publicJwk, "sha256"),
    created,
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
