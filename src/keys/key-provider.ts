import type { JWK } from "jose";
import type { ErrorCode } from "../core/error-codes.js";
import type { JwsAlgorithm, KeyAlgorithm } from "../core/public-key.js";
import type { TlsClientKey, TpmAttestation } from "./capabilities.js";

// Shared with the registrar (which never imports src/keys/): defined in core.
export { JWS_ALGS_FOR, type JwsAlgorithm, type KeyAlgorithm } from "../core/public-key.js";

/** Public facts about the device key; everything here is safe to print. */
export interface KeyInfo {
  /** Stable reference: `pkcs11:` URI (RFC 7512) or `tpm:` reference naming TCTI and handle. */
  readonly ref: string;
  readonly algorithm: KeyAlgorithm;
  readonly jwsAlgorithms: readonly JwsAlgorithm[];
  readonly publicJwk: JWK;
  readonly spkiPem: string;
  /** RFC 7638 SHA-256 thumbprint of `publicJwk`, base64url. */
  readonly thumbprint: string;
  /** True when this call generated the key, false when it found an existing one. */
  readonly created: boolean;
}

/** What the backend itself says about the key's protection. */
export type KeyEvidence =
  | {
      readonly kind: "tpm";
      /** TPMA_OBJECT bits of the key as read back from the TPM. */
      readonly objectAttributes: number;
      readonly attributeNames: readonly string[];
      /** Raw TPMT_PUBLIC, hex; what a verifier hashes into the key's Name. */
      readonly tpmtPublicHex: string;
      /** Name = nameAlg ‖ H(TPMT_PUBLIC), hex. */
      readonly nameHex: string;
    }
  | {
      readonly kind: "pkcs11";
      readonly local: boolean;
      readonly neverExtractable: boolean;
      readonly alwaysSensitive: boolean;
      readonly extractable: boolean;
      readonly sensitive: boolean;
      /** PKCS#11 attributes are the token's own claims, not a remotely verifiable attestation. */
      readonly selfAsserted: true;
    }
  | { readonly kind: "fake"; readonly software: true };

export interface KeyHealth {
  readonly ok: boolean;
  /** Stable code of the failure when not ok (same codes as thrown errors). */
  readonly code?: ErrorCode;
  readonly detail: string;
}

/**
 * The device-key seam. Implementations: `tpm/` (tpm2-tools), `pkcs11/` (pkcs11js), `fake/` (software,
 * unit tests only). The private key never leaves the backend; callers only ever see signatures.
 *
 * Errors are `M2mError` with codes `ERR_KEY_*`, `ERR_TPM_*`, `ERR_PKCS11_*` and a retry class.
 */
export interface KeyProvider {
  readonly kind: "tpm" | "pkcs11" | "fake";

  /**
   * Opens the device key, generating it first if (and only if) it does not exist. Idempotent: a
   * second call finds the existing key and never replaces it.
   */
  createOrOpen(): Promise<KeyInfo>;

  /** Opens the existing key. @throws ERR_KEY_NOT_FOUND when there is none. */
  open(): Promise<KeyInfo>;

  /**
   * Signs a JWS signing input (`base64url(header).base64url(payload)` bytes, or any message) and
   * returns exactly the bytes JWS wants: r‖s (64 bytes) for ES256, PKCS#1 v1.5 / PSS for RS256 / PS256.
   * The SHA-256 digest is computed by the provider. Safe to call concurrently.
   */
  sign(data: Uint8Array, alg?: JwsAlgorithm): Promise<Uint8Array>;

  evidence(): Promise<KeyEvidence>;

  /** Crypto-erase: evicts / destroys the key in the backend. Idempotent. */
  destroy(): Promise<void>;

  /** Cheap liveness probe of the backend and the key. Never throws. */
  health(): Promise<KeyHealth>;

  /** Releases sessions / processes. The key stays. */
  close(): Promise<void>;

  /** Capability: TPM attestation of this key (EK, AK, certify). Probe for it; never downcast. */
  readonly attestation?: TpmAttestation | undefined;

  /** Capability: this key can sign TLS client handshakes (mTLS to MQTT brokers and EST). */
  readonly tlsClient?: TlsClientKey | undefined;
}
