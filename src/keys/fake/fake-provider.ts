import { constants, generateKeyPairSync, type KeyObject, sign as nodeSign } from "node:crypto";
import { createSecureContext } from "node:tls";
import { M2mError } from "../../core/errors.js";
import type { TlsClientKey } from "../capabilities.js";
import type { JwsAlgorithm, KeyEvidence, KeyHealth, KeyInfo, KeyProvider } from "../key-provider.js";
import { keyInfoFromSpki } from "../public-key.js";
import { generateP256KeyPair } from "./p256.js";

/** Shared in-memory "hardware" so that two FakeKeyProvider instances see the same key (like a TPM). */
export class FakeKeyStore {
  readonly keys = new Map<string, { privateKey: KeyObject; publicKey: KeyObject }>();
}

/**
 * A software KeyProvider for unit tests of other modules. Never used outside tests: it holds the
 * private key in process memory.
 */
export class FakeKeyProvider implements KeyProvider {
  readonly kind = "fake" as const;
  readonly #store: FakeKeyStore;
  readonly #label: string;
  readonly #algorithm: "ec-p256" | "rsa-2048";

  constructor(options: { store?: FakeKeyStore; label?: string; algorithm?: "ec-p256" | "rsa-2048" } = {}) {
    this.#store = options.store ?? new FakeKeyStore();
    this.#label = options.label ?? "device";
    this.#algorithm = options.algorithm ?? "ec-p256";
  }

  /** Capability: TLS client handshakes with the software key (unit tests of mTLS consumers). */
  readonly tlsClient: TlsClientKey = {
    mechanism: "software",
    secureContext: async ({ certPem, caPem }) => {
      const pair = this.#store.keys.get(this.#label);
      if (pair === undefined)
        throw new M2mError("ERR_KEY_NOT_FOUND", "permanent", `no device key ${this.#ref()}`);
      return createSecureContext({
        ca: caPem,
        cert: certPem,
        key: pair.privateKey.export({ format: "pem", type: "pkcs8" }),
      });
    },
  };

  #ref(): string {
    return `fake:${this.#label}`;
  }

  async createOrOpen(): Promise<KeyInfo> {
    let created = false;
    if (!this.#store.keys.has(this.#label)) {
      const pair =
        this.#algorithm === "ec-p256"
          ? generateP256KeyPair()
          : generateKeyPairSync("rsa", { modulusLength: 2048 });
      this.#store.keys.set(this.#label, pair);
      created = true;
    }
    return this.#info(created);
  }

  async open(): Promise<KeyInfo> {
    return this.#info(false);
  }

  async #info(created: boolean): Promise<KeyInfo> {
    const pair = this.#store.keys.get(this.#label);
    if (pair === undefined) {
      throw new M2mError("ERR_KEY_NOT_FOUND", "permanent", `no device key ${this.#ref()}`, {
        hint: "run `m2m-agent keys init`",
      });
    }
    return keyInfoFromSpki(pair.publicKey.export({ format: "der", type: "spki" }), this.#ref(), created);
  }

  async sign(data: Uint8Array, alg: JwsAlgorithm = this.#algorithm === "ec-p256" ? "ES256" : "RS256") {
    const pair = this.#store.keys.get(this.#label);
    if (pair === undefined)
      throw new M2mError("ERR_KEY_NOT_FOUND", "permanent", `no device key ${this.#ref()}`);
    switch (alg) {
      case "ES256":
        if (this.#algorithm !== "ec-p256") break;
        return new Uint8Array(nodeSign("sha256", data, { key: pair.privateKey, dsaEncoding: "ieee-p1363" }));
      case "RS256":
        if (this.#algorithm !== "rsa-2048") break;
        return new Uint8Array(nodeSign("sha256", data, pair.privateKey));
      case "PS256":
        if (this.#algorithm !== "rsa-2048") break;
        return new Uint8Array(
          nodeSign("sha256", data, {
            key: pair.privateKey,
            padding: constants.RSA_PKCS1_PSS_PADDING,
            saltLength: 32,
          }),
        );
    }
    throw new M2mError("ERR_KEY_ALG_UNSUPPORTED", "permanent", `the device key cannot sign ${alg}`);
  }

  async evidence(): Promise<KeyEvidence> {
    return { kind: "fake", software: true };
  }

  async destroy(): Promise<void> {
    this.#store.keys.delete(this.#label);
  }

  async health(): Promise<KeyHealth> {
    return this.#store.keys.has(this.#label)
      ? { ok: true, detail: "fake key present" }
      : { ok: false, code: "ERR_KEY_NOT_FOUND", detail: "no fake key" };
  }

  async close(): Promise<void> {}
}
