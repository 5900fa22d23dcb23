import { join } from "node:path";
import type * as x509 from "@peculiar/x509";
import type { AgentConfig } from "../../config/index.js";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import type { DpopSigner, TokenSource } from "../oauth/token-source.js";
import { EstClient } from "./est-client.js";
import { AlternatingKeyRotation, KEY_ROTATION_STATE_FILE, pkcs11RotationLabels } from "./key-rotation.js";

/** A token client on a given key (the daemon builds an OAuthClient; tests may too). */
export interface KeyTokenClient {
  readonly tokens: TokenSource;
  readonly dpop: DpopSigner | undefined;
  close(): Promise<void>;
}

export interface DaemonRotationInput {
  readonly config: AgentConfig;
  /** Registrar/EST base URL (the `/v1/rotate/tpm/*` and `/.well-known/est/*` routes live there). */
  readonly baseUrl: string;
  readonly caPem: string;
  readonly clock: Clock;
  /** `est` tokens DPoP-bound to the CURRENT key (follows the key after a switch). */
  readonly tokens: TokenSource;
  readonly dpop: DpopSigner | undefined;
  /** Builds a token client on another key (pending-key recovery). */
  readonly tokenClientFor: (keys: KeyProvider) => Promise<KeyTokenClient>;
}

export interface DaemonRotation {
  readonly rotation: AlternatingKeyRotation;
  /** The PKCS#11 label of the current key (for the engine TLS context), undefined for TPM. */
  readonly currentLabel: (() => Promise<string>) | undefined;
  readonly issueWithNewKey:
    | ((next: KeyProvider, csr: Uint8Array) => Promise<x509.X509Certificate[]>)
    | undefined;
  readonly issueForPendingKey: (next: KeyProvider, csr: Uint8Array) => Promise<x509.X509Certificate[]>;
  close(): Promise<void>;
}

/**
 * The daemon's key rotation backend for `credentials.est.rotate_key` (docs/credentials.md):
 * TPM alternates `key_handle` and its alternate handle (key_handle+1, skipping SRK/AK) and proves
 * each new key with a TPM2_Certify by the AK over a registrar nonce; PKCS#11 alternates `key_label`
 * and `key_label-alt` and rotates over EST simplereenroll. State: `<state_dir>/key-rotation.json`.
 */
export async function daemonKeyRotation(input: DaemonRotationInput): Promise<DaemonRotation> {
  const { config } = input;
  const stateFile = join(config.agent.state_dir, KEY_ROTATION_STATE_FILE);
  const issueForPendingKey = async (next: KeyProvider, csr: Uint8Array): Promise<x509.X509Certificate[]> => {
    const c = await input.tokenClientFor(next);
    try {
      return await new EstClient(
        { baseUrl: input.baseUrl, caPem: input.caPem },
        { kind: "token", tokens: c.tokens, ...(c.dpop === undefined ? {} : { dpop: c.dpop }), scope: "est" },
        input.clock,
      ).simplereenroll(csr);
    } finally {
      await c.close();
    }
  };
  const k = config.keys;
  if (k.provider === "tpm") {
    const { TpmKeyProvider, ownerPersistentHandle } = await import("../../keys/tpm/tpm-provider.js");
    const { TpmAttestationOps } = await import("../../keys/tpm/endorsement.js");
    const { TpmRotationClient, tpmKeyRotation } = await import("./tpm-rotation.js");
    const home = ownerPersistentHandle(k.tpm.key_handle, "keys.tpm.key_handle");
    // Own runner for the rotation's keys; the kernel resource manager (tpmrm0) multiplexes it.
    const base = new TpmKeyProvider({
      tcti: k.tpm.tcti,
      srkHandle: k.tpm.srk_handle,
      keyHandle: home,
      akHandle: k.tpm.ak_handle,
      algorithm: k.tpm.algorithm,
      timeoutMs: k.tpm.timeout_ms,
      clock: input.clock,
      ...(await import("../../daemon/compose.js")).tpmKeyBlobDirOf(config),
    });
    if (input.dpop === undefined)
      throw new M2mError("ERR_CONFIG", "permanent", "TPM key rotation needs DPoP (credentials.oauth.dpop)");
    const ops = new TpmAttestationOps(base.runner, { akHandle: base.akHandle });
    const client = new TpmRotationClient(
      { baseUrl: input.baseUrl, caPem: input.caPem },
      { tokens: input.tokens, dpop: input.dpop, certify: (h, nonce) => ops.certify(h, base.akHandle, nonce) },
    );
    return {
      rotation: tpmKeyRotation(base, stateFile, home),
      currentLabel: undefined,
      issueWithNewKey: (next, csr) => client.issue(next, csr),
      issueForPendingKey,
      close: () => base.close(),
    };
  }
  if (k.provider === "pkcs11") {
    const p = k.pkcs11;
    if (p.module === undefined || p.token_label === undefined || p.pin === undefined)
      throw new M2mError("ERR_CONFIG", "permanent", "keys.pkcs11: module, token_label and pin are required");
    const { Pkcs11KeyProvider } = await import("../../keys/pkcs11/index.js");
    const { module, token_label, pin } = p;
    const rotation = new AlternatingKeyRotation({
      names: pkcs11RotationLabels(p.key_label),
      stateFile,
      make: (label) =>
        new Pkcs11KeyProvider({
          modulePath: module,
          tokenLabel: token_label,
          keyLabel: label,
          algorithm: p.algorithm,
          pin,
          clock: input.clock,
        }),
    });
    return {
      rotation,
      currentLabel: () => rotation.currentName(),
      issueWithNewKey: undefined,
      issueForPendingKey,
      close: async () => undefined,
    };
  }
  throw new M2mError("ERR_CONFIG", "permanent", "credentials.est.rotate_key needs a TPM or PKCS#11 key");
}
