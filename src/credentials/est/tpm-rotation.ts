import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { Agent, fetch as undiciFetch } from "undici";
import { M2mError } from "../../core/errors.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import {
  ROTATE_PATHS,
  type TpmRotateFinishRequest,
  tpmRotateBeginResponseSchema,
  tpmRotateFinishResponseSchema,
  WIRE_VERSION,
} from "../../wire/v1/index.js";
import type { DpopSigner, TokenSource } from "../oauth/token-source.js";

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
    const attestation = next.attestation;
    if (attestation === undefined)
      throw new M2mError("ERR_KEY_ROTATION_STATE", "permanent", "TPM rotation needs a TPM key");
    const begun = tpmRotateBeginResponseSchema.safeParse(
      await this.#post(ROTATE_PATHS.tpmBegin, { v: WIRE_VERSION }),
    );
    if (!begun.success) throw new M2mError("ERR_ROTATION_RESPONSE", "permanent", "bad begin response");
    // Security: the registered AK certifies the NEW key over the registrar's fresh nonce.
    const cert = await attestation.certify(Buffer.from(begun.data.nonce, "base64url"));
    const tpm2b = Buffer.from(await attestation.devicePublic());
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
