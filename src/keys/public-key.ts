import { describePublicKey } from "../core/public-key.js";
import type { KeyInfo } from "./key-provider.js";

export { algorithmOf } from "../core/public-key.js";

/** Builds the public half of a KeyInfo from an SPKI (PEM or DER) a backend returned. */
export async function keyInfoFromSpki(
  spki: string | Uint8Array,
  ref: string,
  created: boolean,
): Promise<KeyInfo> {
  return { ref, ...(await describePublicKey(spki)), created };
}
