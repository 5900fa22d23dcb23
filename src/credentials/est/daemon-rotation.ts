import type * as x509 from "@peculiar/x509";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import type { DpopSigner, TokenSource } from "../oauth/token-source.js";
import { EstClient } from "./est-client.js";
import { TpmRotationClient } from "./tpm-rotation.js";

/** A token client on a given key (the daemon builds an OAuthClient; tests may too). */
export interface KeyTokenClient {
  readonly tokens: TokenSource;
  readonly dpop: DpopSigner | undefined;
  close(): Promise<void>;
}

export interface RotationIssuersInput {
  /** The current device key: its capabilities pick the protocol (TPM attestation or plain EST). */
  readonly key: KeyProvider;
  /** Registrar/EST base URL (the `/v1/rotate/tpm/*` and `/.well-known/est/*` routes live there). */
  readonly baseUrl: string;
  readonly caPem: string;
  readonly clock: Clock;
  /** `est` tokens DPoP-bound to the CURRENT key (follows the key after a switch). */
  readonly tokens: TokenSource;
  readonly dpop: DpopSigner | undefined;
  /** Builds a token client on another key (pending-key recovery). */
  readonly tokenClientFor: (keys: KeyProvider) => Promise<KeyTokenClient>;
  /** The clock gate (see `EstClientConfig.gate`): nothing is signed or sent while it returns an error. */
  readonly gate?: () => Error | undefined;
}

/** How the renewer gets a certificate for a new key during a rotation (see `CertificateRenewerDeps`). */
export interface RotationIssuers {
  readonly issueWithNewKey:
    | ((next: KeyProvider, csr: Uint8Array) => Promise<x509.X509Certificate[]>)
    | undefined;
  readonly issueForPendingKey: (next: KeyProvider, csr: Uint8Array) => Promise<x509.X509Certificate[]>;
}

/**
 * The registrar side of the daemon's key rotation (`credentials.est.rotate_key`, docs/credentials.md);
 * WHICH key is current and the crash-safe switch belong to `DeviceKeyOwner` (src/keys/). A key with
 * TPM attestation proves each new key with a TPM2_Certify by the AK over a registrar nonce
 * (`/v1/rotate/tpm/*`); other keys rotate over EST simplereenroll authenticated by the current key.
 */
export function rotationIssuers(input: RotationIssuersInput): RotationIssuers {
  const issueForPendingKey = async (next: KeyProvider, csr: Uint8Array): Promise<x509.X509Certificate[]> => {
    // The pending key's own token client bypasses the daemon's gated token source: gate it here.
    const held = input.gate?.();
    if (held !== undefined) throw held;
    const c = await input.tokenClientFor(next);
    try {
      return await new EstClient(
        {
          baseUrl: input.baseUrl,
          caPem: input.caPem,
          ...(input.gate === undefined ? {} : { gate: input.gate }),
        },
        { kind: "token", tokens: c.tokens, ...(c.dpop === undefined ? {} : { dpop: c.dpop }), scope: "est" },
        input.clock,
      ).simplereenroll(csr);
    } finally {
      await c.close();
    }
  };
  if (input.key.attestation === undefined) return { issueWithNewKey: undefined, issueForPendingKey };
  if (input.dpop === undefined)
    throw new M2mError("ERR_CONFIG", "permanent", "TPM key rotation needs DPoP (credentials.oauth.dpop)");
  const client = new TpmRotationClient(
    { baseUrl: input.baseUrl, caPem: input.caPem },
    { tokens: input.tokens, dpop: input.dpop },
  );
  return {
    issueWithNewKey: async (next, csr) => {
      const held = input.gate?.();
      if (held !== undefined) throw held;
      return client.issue(next, csr);
    },
    issueForPendingKey,
  };
}
