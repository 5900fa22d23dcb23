import "reflect-metadata";
import type { SecureContext } from "node:tls";
import * as x509 from "@peculiar/x509";
import { Agent, fetch as undiciFetch } from "undici";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { parseRetryAfter } from "../../core/retry.js";
import { tlsVerifyError } from "../../core/tls-diagnosis.js";
import type { DpopSigner, TokenSource } from "../oauth/token-source.js";

/** How the agent authenticates to EST. */
export type EstAuth =
  | {
      /** TLS client auth with the device's current certificate (PKCS#11 engine key or software key). */
      readonly kind: "mtls";
      readonly certPem: () => Promise<string>;
      readonly key?: string;
      readonly privateKeyEngine?: string;
      readonly privateKeyIdentifier?: string;
      /**
       * Builds the whole TLS context (client cert, engine key, trust anchors) for the current
       * certificate, e.g. `createEngineSecureContext` of keys/pkcs11/engine-tls.ts. Wins over
       * `key` / `privateKeyEngine` / `privateKeyIdentifier` and `caPem`.
       */
      readonly secureContext?: (certPem: string) => SecureContext | Promise<SecureContext>;
    }
  | {
      /** An access token with scope `est` (DPoP-bound when a signer is given). Works for TPM keys. */
      readonly kind: "token";
      readonly tokens: TokenSource;
      readonly dpop?: DpopSigner;
      readonly scope?: string;
    };

export interface EstClientConfig {
  /** e.g. `https://registrar.example:8443` (the `/.well-known/est` prefix is added). */
  readonly baseUrl: string;
  /** Trust anchor for the registrar's TLS. */
  readonly caPem: string;
  readonly timeoutMs?: number;
  readonly maxResponseBytes?: number;
  /**
   * Refuses every request (before anything is signed or sent) while it returns an error: the
   * daemon's clock gate (`ERR_CLOCK_UNTRUSTED`).
   */
  readonly gate?: () => Error | undefined;
}

/**
 * RFC 7030 client: /cacerts, /simpleenroll, /simplereenroll with base64 PKCS#10 in and base64
 * certs-only PKCS#7 out. Failures: ERR_EST_UNREACHABLE / ERR_EST_SERVER (transient, Retry-After kept),
 * ERR_EST_REFUSED (permanent, with the server's stable code in details.serverCode).
 */
export class EstClient {
  readonly #config: EstClientConfig;
  readonly #auth: EstAuth;
  readonly #clock: Clock;

  constructor(config: EstClientConfig, auth: EstAuth, clock: Clock) {
    this.#config = config;
    this.#auth = auth;
    this.#clock = clock;
  }

  async cacerts(): Promise<x509.X509Certificate[]> {
    const body = await this.#request("GET", "cacerts");
    return parseCertsOnly(body);
  }

  async simpleenroll(csrDer: Uint8Array): Promise<x509.X509Certificate[]> {
    return parseCertsOnly(await this.#post("simpleenroll", csrDer));
  }

  async simplereenroll(csrDer: Uint8Array): Promise<x509.X509Certificate[]> {
    return parseCertsOnly(await this.#post("simplereenroll", csrDer));
  }

  async #post(op: string, csr: Uint8Array): Promise<string> {
    try {
      return await this.#request("POST", op, csr);
    } catch (err) {
      // The group requires a fresh quote for renewal and the cached `est` token predates it: drop it,
      // get a new one (its request carries a new quote) and try once more.
      const auth = this.#auth;
      if (
        auth.kind === "token" &&
        auth.tokens.invalidate !== undefined &&
        err instanceof M2mError &&
        err.details.serverCode === "ERR_ATTESTATION_RENEWAL"
      ) {
        auth.tokens.invalidate(auth.scope ?? "est");
        return this.#request("POST", op, csr);
      }
      throw err;
    }
  }

  async #request(method: "GET" | "POST", op: string, csr?: Uint8Array): Promise<string> {
    const held = this.#config.gate?.();
    if (held !== undefined) throw held;
    const url = `${this.#config.baseUrl.replace(/\/+$/, "")}/.well-known/est/${op}`;
    const headers: Record<string, string> = {};
    let connect: Record<string, unknown> = { ca: this.#config.caPem };
    const auth = this.#auth;
    if (method === "POST") {
      if (auth.kind === "mtls" && auth.secureContext !== undefined) {
        connect = { secureContext: await auth.secureContext(await auth.certPem()) };
      } else if (auth.kind === "mtls") {
        connect = {
          ...connect,
          cert: await auth.certPem(),
          ...(auth.key === undefined ? {} : { key: auth.key }),
          ...(auth.privateKeyEngine === undefined ? {} : { privateKeyEngine: auth.privateKeyEngine }),
          ...(auth.privateKeyIdentifier === undefined
            ? {}
            : { privateKeyIdentifier: auth.privateKeyIdentifier }),
        };
      } else {
        const token = await auth.tokens.getToken(auth.scope ?? "est");
        if (token.tokenType === "DPoP") {
          if (auth.dpop === undefined)
            throw new M2mError("ERR_EST_CONFIG", "permanent", "DPoP token without a signer");
          headers.authorization = `DPoP ${token.token.reveal()}`;
          headers.dpop = await auth.dpop.proof("POST", url, token.token);
        } else {
          headers.authorization = `Bearer ${token.token.reveal()}`;
        }
      }
    }
    // A fresh connection per request: the client certificate may have just been renewed.
    const dispatcher = new Agent({ connect, pipelining: 0 });
    try {
      let res: Awaited<ReturnType<typeof undiciFetch>>;
      try {
        res = await undiciFetch(url, {
          method,
          headers: {
            ...headers,
            ...(csr === undefined
              ? {}
              : { "content-type": "application/pkcs10", "content-transfer-encoding": "base64" }),
          },
          ...(csr === undefined ? {} : { body: Buffer.from(csr).toString("base64") }),
          redirect: "manual",
          dispatcher,
          signal: AbortSignal.timeout(this.#config.timeoutMs ?? 20_000),
        });
      } catch (err) {
        throw (
          tlsVerifyError(err, url, {
            description: "the fleet CA (enroll.registrar_ca_file and the enrolment's CA chain)",
            key: "enroll.registrar_ca_file",
          }) ?? new M2mError("ERR_EST_UNREACHABLE", "transient", "EST server unreachable", { cause: err })
        );
      }
      const text = await readCapped(res, this.#config.maxResponseBytes ?? 262_144);
      const nonce = res.headers.get("dpop-nonce");
      if (nonce !== null && auth.kind === "token") auth.dpop?.rememberNonce(url, nonce);
      if (res.status === 429 || res.status >= 500) {
        throw new M2mError("ERR_EST_SERVER", "transient", `EST server answered ${res.status}`, {
          details: retryAfterDetail(res.headers.get("retry-after"), this.#clock),
        });
      }
      if (res.status === 202) {
        // RFC 7030 §4.2.3: manual approval pending; retry later.
        throw new M2mError("ERR_EST_PENDING", "transient", "EST enrolment pending", {
          details: retryAfterDetail(res.headers.get("retry-after"), this.#clock),
        });
      }
      if (res.status !== 200) {
        const serverCode = res.headers.get("x-m2m-error") ?? `HTTP_${res.status}`;
        throw new M2mError("ERR_EST_REFUSED", "permanent", `EST ${op} refused (${serverCode})`, {
          details: { status: res.status, serverCode },
          hint: "the registrar refused the request: check the device status and its certificate",
        });
      }
      return text;
    } finally {
      await dispatcher.close();
    }
  }
}

/** Parses a base64 (or PEM-armoured) certs-only PKCS#7. @throws ERR_EST_RESPONSE */
export function parseCertsOnly(body: string): x509.X509Certificate[] {
  try {
    const b64 = body.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
    const certs = new x509.X509Certificates(Buffer.from(b64, "base64"));
    const out = [...certs];
    if (out.length === 0) throw new Error("no certificates");
    return out;
  } catch (err) {
    throw new M2mError("ERR_EST_RESPONSE", "transient", "EST response is not a certs-only PKCS#7", {
      cause: err,
    });
  }
}

function retryAfterDetail(v: string | null, clock: Clock): Record<string, number> {
  const ms = parseRetryAfter(v, clock.now().getTime());
  return ms === undefined ? {} : { retryAfterMs: ms };
}

async function readCapped(res: Awaited<ReturnType<typeof undiciFetch>>, cap: number): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  if (res.body === null) return "";
  for await (const c of res.body as AsyncIterable<Uint8Array>) {
    size += c.length;
    if (size > cap) throw new M2mError("ERR_EST_RESPONSE", "transient", "EST response too large");
    chunks.push(Buffer.from(c));
  }
  return Buffer.concat(chunks).toString("utf8");
}
