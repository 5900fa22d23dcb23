import type { Duplex } from "node:stream";
import type { SecureContext } from "node:tls";
import type { Secret } from "../core/secret.js";
import type { AkPublic, CertifyResult, EkCertificate, EkPublic, QuoteResult } from "./tpm/endorsement.js";
import type { LockoutInfo } from "./tpm/runner.js";

/**
 * What only some device keys can do, as optional capabilities on `KeyProvider` that callers probe
 * for (`key.attestation`, `key.tlsClient`) instead of downcasting to a backend. A capability is
 * `undefined` when the key cannot do it (a PKCS#11 token has no EK; a PKCS#11 key whose PIN is not
 * in a file cannot be handed to the OpenSSL engine).
 */

/** TCG low-range RSA EK handle: the first EK tried for credential activation. */
export { RSA_EK_HANDLE } from "./tpm/endorsement.js";
/** What the attestation capability returns, for callers outside src/keys/. */
export type { AkPublic, CertifyResult, EkCertificate, EkPublic, QuoteResult };

/** TPM attestation of THIS key and its platform: EK, AK, credential activation, TPM2_Certify, TPM2_Quote. */
export interface TpmAttestation {
  /** Persistent handle of the key this capability certifies. */
  readonly keyHandle: number;
  readonly akHandle: number;
  /** TPM2B_PUBLIC of the key (what the registrar hashes into its Name). */
  devicePublic(): Promise<Uint8Array>;
  readEkPublics(options?: { createIfAbsent?: boolean }): Promise<EkPublic[]>;
  readEkCertificates(): Promise<EkCertificate[]>;
  /** Creates the AK under the EK (or returns the existing one). */
  createAk(options?: { ekHandle?: number; replace?: boolean }): Promise<AkPublic>;
  activateCredential(blob: Uint8Array, ekHandle: number): Promise<Secret<Uint8Array>>;
  /** TPM2_Certify of this key by the AK over `qualifyingData` (a registrar nonce). */
  certify(qualifyingData: Uint8Array): Promise<CertifyResult>;
  /**
   * TPM2_Quote by the AK over `pcrs` of `bank` with `qualifyingData` (≤ 64 bytes), plus the PCR values
   * it covers, ascending (one tpm2_quote call: ≈ one signature's cost).
   */
  quote(
    qualifyingData: Uint8Array,
    bank: "sha1" | "sha256" | "sha384",
    pcrs: readonly number[],
  ): Promise<QuoteResult>;
  /** Evicts the AK (decommissioning: it identified this TPM to the registrar). Idempotent. */
  evictAk(): Promise<void>;
  /** Dictionary-attack lockout state of the TPM. */
  lockout(): Promise<LockoutInfo>;
}

/** What a TLS client context needs besides the key: the certificate for that key and the trust anchors. */
export interface TlsClientContextInput {
  /** The certificate issued for THIS key (PEM). */
  readonly certPem: string;
  /** Trust anchors for the server's certificate (PEM). */
  readonly caPem: string;
}

/**
 * "Usable for a TLS client handshake": the key signs the handshake where it lives (PKCS#11 token through
 * the OpenSSL engine today; a TPM key through tpm2-pkcs11 plugs in here too). The context is built per
 * connection attempt (building it loads the key; ≈ 30–50 ms with a TPM), never per message.
 */
export interface TlsClientKey {
  /** How the key reaches OpenSSL, for logs and status (e.g. "pkcs11-engine"). Safe to print. */
  readonly mechanism: string;
  /**
   * A TLS client context whose private key is this device key.
   * @throws ERR_TLS_ENGINE_KEY (permanent: a wrong PIN is never retried, it would lock the token)
   */
  secureContext(input: TlsClientContextInput): Promise<SecureContext>;
  /**
   * Optional: a TLS connection to `host:port` whose handshake this key signs, made outside this
   * process (TPM: one child per connection, see keys/tpm/tls-tunnel.ts). Offered where an in-process
   * context cannot follow the key (tpm2-pkcs11 reads its objects once per process); callers that
   * can use a byte stream (the MQTT sink) prefer it over `secureContext`.
   * @throws ERR_TLS_ENGINE_KEY (permanent), ERR_MQTT_CONNECT (transient)
   */
  connect?(input: TlsTunnelInput): Promise<TlsTunnel>;
}

/** Where a `TlsClientKey.connect` connection goes. */
export interface TlsTunnelInput extends TlsClientContextInput {
  readonly host: string;
  readonly port: number;
  /** Expected server name (SNI and certificate check); default `host`. */
  readonly servername?: string;
  /** Handshake deadline (ms). */
  readonly timeoutMs: number;
}

/** An established TLS connection made elsewhere: its plaintext as a stream. */
export interface TlsTunnel {
  /** The plaintext of the TLS connection; destroying it closes the connection. */
  readonly stream: Duplex;
  /** Serial (hex) of the client certificate presented in the handshake. */
  readonly certSerial: string | undefined;
  /** Closes the connection (ends whatever holds the key for it). */
  close(): void;
  /** Settles once whatever held the key for this connection is gone (TPM: the child exited). */
  readonly closed: Promise<void>;
}
