import type { JwsAlgorithm, KeyEvidence, KeyHealth, KeyInfo, KeyProvider } from "./key-provider.js";

/**
 * A KeyProvider that forwards to the current one, so that everything holding it (OAuth client, DPoP
 * signer, sinks) signs with the new key after a rotation without being rebuilt. `switchTo` is called
 * only once the new key's certificate is in place.
 */
export class SwitchableKeyProvider implements KeyProvider {
  #current: KeyProvider;

  constructor(initial: KeyProvider) {
    this.#current = initial;
  }

  get kind(): KeyProvider["kind"] {
    return this.#current.kind;
  }

  /** The provider signing now. */
  get current(): KeyProvider {
    return this.#current;
  }

  switchTo(next: KeyProvider): void {
    this.#current = next;
  }

  createOrOpen(): Promise<KeyInfo> {
    return this.#current.createOrOpen();
  }
  open(): Promise<KeyInfo> {
    return this.#current.open();
  }
  sign(data: Uint8Array, alg?: JwsAlgorithm): Promise<Uint8Array> {
    return this.#current.sign(data, alg);
  }
  evidence(): Promise<KeyEvidence> {
    return this.#current.evidence();
  }
  destroy(): Promise<void> {
    return this.#current.destroy();
  }
  health(): Promise<KeyHealth> {
    return this.#current.health();
  }
  close(): Promise<void> {
    return this.#current.close();
  }
}
