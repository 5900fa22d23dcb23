import { base64url } from "jose";
import { M2mError } from "../core/errors.js";
import type { JwsAlgorithm, KeyInfo, KeyProvider } from "./key-provider.js";

const enc = new TextEncoder();

/**
 * Builds a compact JWS whose signature is made by the hardware key. jose has no "external signer"
 * hook, so the header/payload encoding is done here and verification is left to jose.
 */
export async function signCompactJws(
  provider: KeyProvider,
  info: KeyInfo,
  header: Record<string, unknown>,
  payload: Record<string, unknown> | Uint8Array,
  alg: JwsAlgorithm = defaultJwsAlg(info),
): Promise<string> {
  if (!info.jwsAlgorithms.includes(alg)) {
    throw new M2mError("ERR_KEY_ALG_UNSUPPORTED", "permanent", `the device key cannot sign ${alg}`);
  }
  const h = base64url.encode(JSON.stringify({ ...header, alg }));
  const p = base64url.encode(payload instanceof Uint8Array ? payload : JSON.stringify(payload));
  const signingInput = `${h}.${p}`;
  const sig = await provider.sign(enc.encode(signingInput), alg);
  return `${signingInput}.${base64url.encode(sig)}`;
}

export function defaultJwsAlg(info: KeyInfo): JwsAlgorithm {
  const first = info.jwsAlgorithms[0];
  if (first === undefined)
    throw new M2mError("ERR_KEY_ALG_UNSUPPORTED", "permanent", "key has no JWS algorithm");
  return first;
}
