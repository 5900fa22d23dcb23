import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { Agent, fetch as undiciFetch } from "undici";
import { M2mError } from "../../core/errors.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import type { CertifyResult } from "../../keys/tpm/endorsement.js";
import { ownerPersistentHandle, TpmKeyProvider } from "../../keys/tpm/tpm-provider.js";
import {
  ROTATE_PATHS,
  type TpmRotateFinishRequest,
  tpmRotateBeginResponseSchema,
  tpmRotateFinishResponseSchema,
  WIRE_VERSION,
} from "../../wire/v1/index.js";
import type { DpopSigner, TokenSource } from "../oauth/token-source.js";
import { AlternatingKeyRotation, currentRotationName } from "./key-rotation.js";

export interface TpmRotationClientConfig {
  /** The registrar base URL (`/v1/rotate/tpm/*` is appended). */
  readonly baseUrl: string;
  /** Trust anchor for the registrar's TLS. */
  readonly caPem: string;
  readonly timeoutMs?: number;
}

export interface TpmRotationClientDeps {
  /** Tokens with scope `est`, DPoP-bound to the CURRENT key (the daemon's OAuth client). */
  readonly tokens: TokenSource;
  readonly dpop: DpopSigner;
  /** TPM2_Certify(keyHandle, AK, nonce) (TpmAttestationOps.certify bound to the AK handle). */
  readonly certify: (keyHandle: number, nonce: Uint8Array) => Promise<CertifyResult>;
}

/**
 * Agent side of TPM key rotation (see registrar/rotation/): begin (fresh nonce, authenticated by the
 * current key), TPM2_Certify of the new key by the registered AK over that nonce, finish with the
 * certification and a CSR signed by the new key; returns the new certificate. Plug it into
 * `CertificateRenewer` as `issueWithNewKey`.
 *
 * Failures: ERR_ROTATION_UNREACHABLE / ERR_ROTATION_SERVER (transient), ERR_ROTATION_REFUSED_BY_SERVER
 * (permanent, server code in details.serverCode), ERR_ROTATION_RESPONSE (permanent).
 */
export class TpmRotationClient {
  readonly #config: TpmRotationClientConfig;
  readonly #deps: TpmRotationClientDeps;

  constructor(config: TpmRotationClientConfig, deps: TpmRotationClientDeps) {
    this.#config = config;
    this.#deps = deps;
  }

  async issue(next: KeyProvider, csrDer: Uint8Array): Promise<x509.X509Certificate[]> {
    if (!(next instanceof TpmKeyProvider))
      throw new M2mError("ERR_KEY_ROTATION_STATE", "permanent", "TPM rotation needs a TPM key");
    const begun = tpmRotateBeginResponseSchema.safeParse(
      await this.#post(ROTATE_PATHS.tpmBegin, { v: WIRE_VERSION }),
    );
    if (!begun.success) throw new M2mError("ERR_ROTATION_RESPONSE", "permanent", "bad begin response");
    const cert = await this.#deps.certify(next.keyHandle, Buffer.from(begun.data.nonce, "base64url"));
    const ev = await next.evidence();
    if (ev.kind !== "tpm") throw new M2mError("ERR_KEY_EVIDENCE", "permanent", "not a TPM key");
    const tpmt = Buffer.from(ev.tpmtPublicHex, "hex");
    const tpm2b = Buffer.alloc(2 + tpmt.length);
    tpm2b.writeUInt16BE(tpmt.length, 0);
    tpmt.copy(tpm2b, 2);
    const req: TpmRotateFinishRequest = {
      v: WIRE_VERSION,
      sessionId: begun.data.sessionId,
      attest: Buffer.from(cert.attest).toString("base64url"),
      signature: Buffer.from(cert.signature).toString("base64url"),
      devicePublic: tpm2b.toString("base64url"),
      csr: Buffer.from(csrDer).toString("base64url"),
    };
    const done = tpmRotateFinishResponseSchema.safeParse(await this.#post(ROTATE_PATHS.tpmFinish, req));
    if (!done.success) throw new M2mError("ERR_ROTATION_RESPONSE", "permanent", "bad finish response");
    return [done.data.certificatePem, ...done.data.caChainPem].map((p) => new x509.X509Certificate(p));
  }

  async #post(path: string, body: unknown): Promise<unknown> {
    const url = `${this.#config.baseUrl.replace(/\/+$/, "")}${path}`;
    const token = await this.#deps.tokens.getToken("est");
    // Security: the registrar only accepts a proof by the current key; a bearer token is refused.
    if (token.tokenType !== "DPoP")
      throw new M2mError("ERR_ROTATION_CONFIG", "permanent", "TPM key rotation needs a DPoP-bound token");
    const dispatcher = new Agent({ connect: { ca: this.#config.caPem }, pipelining: 0 });
    try {
      let res: Awaited<ReturnType<typeof undiciFetch>>;
      try {
        res = await undiciFetch(url, {
          method: "POST",
          headers: {
            "content-type": "application/json",
            authorization: `DPoP ${token.token.reveal()}`,
            dpop: await this.#deps.dpop.proof("POST", url, token.token),
          },
          body: JSON.stringify(body),
          redirect: "manual",
          dispatcher,
          signal: AbortSignal.timeout(this.#config.timeoutMs ?? 20_000),
        });
      } catch (err) {
        throw new M2mError("ERR_ROTATION_UNREACHABLE", "transient", "registrar unreachable", { cause: err });
      }
      const nonce = res.headers.get("dpop-nonce");
      if (nonce !== null) this.#deps.dpop.rememberNonce(url, nonce);
      const text = await res.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      if (res.status === 429 || res.status >= 500)
        throw new M2mError("ERR_ROTATION_SERVER", "transient", `registrar answered ${res.status}`);
      if (res.status !== 200) {
        const code = (json as { error?: { code?: unknown } } | undefined)?.error?.code;
        const serverCode = typeof code === "string" ? code : `HTTP_${res.status}`;
        throw new M2mError(
          "ERR_ROTATION_REFUSED_BY_SERVER",
          "permanent",
          `key rotation refused (${serverCode})`,
          {
            details: { status: res.status, serverCode },
          },
        );
      }
      return json;
    } finally {
      await dispatcher.close();
    }
  }
}

/**
 * The second TPM handle used by rotation: `home + 1`, skipping the SRK and AK handles (with the
 * defaults SRK 0x81000001, key 0x81000002, AK 0x81000003 that is 0x81000004).
 */
export function alternateTpmHandle(h: { keyHandle: number; srkHandle: number; akHandle: number }): number {
  let n = h.keyHandle + 1;
  while (n === h.srkHandle || n === h.akHandle) n++;
  return n;
}

const hex = (h: number): string => `0x${h.toString(16).padStart(8, "0")}`;

/** The two handle names (`0x…`) a TPM rotation alternates between, for the configured key handle. */
export function tpmRotationNames(h: {
  keyHandle: number;
  srkHandle: number;
  akHandle: number;
}): [string, string] {
  return [hex(h.keyHandle), hex(alternateTpmHandle(h))];
}

/**
 * The persistent handle of the current TPM key per the rotation state (the configured one until a
 * rotation committed). The daemon opens its key provider here, so a restart after a rotation
 * keeps using the new key. @throws ERR_KEY_ROTATION_STATE
 */
export async function currentTpmKeyHandle(
  stateFile: string,
  h: { keyHandle: number | string; srkHandle: number | string; akHandle: number | string },
): Promise<number> {
  const n = {
    keyHandle: ownerPersistentHandle(h.keyHandle, "keyHandle"),
    srkHandle: ownerPersistentHandle(h.srkHandle, "srkHandle"),
    akHandle: ownerPersistentHandle(h.akHandle, "akHandle"),
  };
  return ownerPersistentHandle(await currentRotationName(stateFile, tpmRotationNames(n)), "keyHandle");
}

/**
 * Crash-safe TPM key rotation between the configured `homeHandle` (default: the runner source's
 * handle) and `alternateTpmHandle`, sharing `runnerSource`'s TPM queue; `stateFile` records which
 * handle is current (and which is pending).
 */
export function tpmKeyRotation(
  runnerSource: TpmKeyProvider,
  stateFile: string,
  homeHandle: number = runnerSource.keyHandle,
): AlternatingKeyRotation {
  return new AlternatingKeyRotation({
    names: tpmRotationNames({ ...runnerSource, keyHandle: homeHandle }),
    stateFile,
    // Always a fresh provider on the shared runner: the rotation closes the providers it is done
    // with, and closing one that does not own the runner leaves the TPM queue to the others.
    make: (name) =>
      new TpmKeyProvider({
        runner: runnerSource.runner,
        srkHandle: runnerSource.srkHandle,
        akHandle: runnerSource.akHandle,
        keyHandle: name,
        algorithm: runnerSource.algorithm,
        // A rotated-in key keeps its blobs like the first one (TLS through tpm2-pkcs11 needs them).
        ...(runnerSource.keyBlobDir === undefined ? {} : { keyBlobDir: runnerSource.keyBlobDir }),
      }),
  });
}
