import { createHash, randomBytes } from "node:crypto";
import { base64url } from "jose";
import type { Clock } from "../../core/clock.js";
import { Secret } from "../../core/secret.js";
import { signCompactJws } from "../../keys/jws.js";
import type { JwsAlgorithm, KeyInfo, KeyProvider } from "../../keys/key-provider.js";
import type { DpopSigner } from "./token-source.js";

/**
 * DPoP proofs (RFC 9449 §4.2) signed by the hardware key.
 *
 * Written by hand on purpose: oauth4webapi's `DPoP()` handle only accepts a WebCrypto CryptoKeyPair,
 * and a TPM / PKCS#11 key is not a CryptoKey. The nonce bookkeeping mirrors oauth4webapi's (latest
 * nonce per origin, bounded map).
 */
export class HardwareDpopSigner implements DpopSigner {
  readonly #provider: KeyProvider;
  readonly #info: KeyInfo;
  readonly #clock: Clock;
  readonly #alg: JwsAlgorithm | undefined;
  readonly #nonces = new Map<string, string>();

  constructor(provider: KeyProvider, info: KeyInfo, clock: Clock, alg?: JwsAlgorithm) {
    this.#provider = provider;
    this.#info = info;
    this.#clock = clock;
    this.#alg = alg;
  }

  /** RFC 7638 thumbprint of the proof key: what `cnf.jkt` of a bound token must equal. */
  get thumbprint(): string {
    return this.#info.thumbprint;
  }

  async proof(method: string, url: string | URL, accessToken?: Secret | string): Promise<string> {
    const u = new URL(url.toString());
    const nonce = this.#nonces.get(u.origin);
    const at = accessToken instanceof Secret ? accessToken.reveal() : accessToken;
    const payload: Record<string, unknown> = {
      jti: base64url.encode(randomBytes(18)),
      htm: method.toUpperCase(),
      // RFC 9449 §4.2: htu without query and fragment.
      htu: `${u.origin}${u.pathname}`,
      iat: this.#clock.nowSeconds(),
      ...(nonce === undefined ? {} : { nonce }),
      ...(at === undefined ? {} : { ath: base64url.encode(createHash("sha256").update(at).digest()) }),
    };
    return signCompactJws(
      this.#provider,
      this.#info,
      { typ: "dpop+jwt", jwk: this.#info.publicJwk },
      payload,
      this.#alg ?? this.#info.jwsAlgorithms[0],
    );
  }

  rememberNonce(url: string | URL, nonce: string): void {
    // Bounded, and a nonce is opaque printable ASCII (RFC 9449 §8.1); anything else is ignored.
    if (!/^[\x21-\x7E]{1,512}$/.test(nonce)) return;
    const origin = new URL(url.toString()).origin;
    this.#nonces.delete(origin);
    if (this.#nonces.size >= 100) {
      const oldest = this.#nonces.keys().next().value;
      if (oldest !== undefined) this.#nonces.delete(oldest);
    }
    this.#nonces.set(origin, nonce);
  }

  hasNonce(url: string | URL): boolean {
    return this.#nonces.has(new URL(url.toString()).origin);
  }
}
