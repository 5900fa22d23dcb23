import { readFile } from "node:fs/promises";
import { Agent, request } from "undici";
import type { z } from "zod";
import { errorCodeInfo, toErrorCode } from "../core/error-codes.js";
import { M2mError } from "../core/errors.js";
import { parseRetryAfter } from "../core/retry.js";
import { type TrustSource, tlsVerifyError } from "../core/tls-diagnosis.js";
import { errorBodySchema } from "../wire/v1/index.js";

export interface RegistrarClientOptions {
  /** Base URL, e.g. `https://registrar.example:8443`. */
  readonly baseUrl: string;
  /** PEM file with the registrar's trust anchor (the fleet CA). Default: the system store. */
  readonly caFile?: string | undefined;
  /** Overall deadline per request (connect + send + receive). Default 15 s. */
  readonly timeoutMs?: number;
  /** Cap on a response body. Default 256 KiB. */
  readonly maxResponseBytes?: number;
}

/**
 * A small JSON-over-HTTPS client for the registrar: TLS verified (against the configured CA only,
 * when given), no redirects followed, a deadline on every request, a cap on every response.
 */
export class RegistrarClient {
  readonly #base: URL;
  readonly #agent: Agent;
  readonly #timeoutMs: number;
  readonly #maxBytes: number;

  readonly #trust: TrustSource;

  private constructor(base: URL, agent: Agent, timeoutMs: number, maxBytes: number, trust: TrustSource) {
    this.#trust = trust;
    this.#base = base;
    this.#agent = agent;
    this.#timeoutMs = timeoutMs;
    this.#maxBytes = maxBytes;
  }

  /** @throws ERR_ENROLL_CONFIG when the URL is not https or the CA file cannot be read. */
  static async create(options: RegistrarClientOptions): Promise<RegistrarClient> {
    let base: URL;
    try {
      base = new URL(options.baseUrl);
    } catch (err) {
      throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "registrar URL is not a URL", { cause: err });
    }
    // Security: enrolment carries a bootstrap token and returns credentials; never over plain HTTP.
    if (base.protocol !== "https:") {
      throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "registrar URL must be https", {
        hint: "set enroll.registrar_url to an https:// URL",
      });
    }
    let ca: string | undefined;
    if (options.caFile !== undefined) {
      try {
        ca = await readFile(options.caFile, "utf8");
      } catch (err) {
        throw new M2mError("ERR_ENROLL_CONFIG", "permanent", `cannot read registrar CA ${options.caFile}`, {
          cause: err,
          hint: "set enroll.registrar_ca_file to the fleet CA PEM (ca.pem from `m2m-registrar ca init`)",
        });
      }
    }
    const timeoutMs = options.timeoutMs ?? 15_000;
    const agent = new Agent({
      connect: { ...(ca === undefined ? {} : { ca }), rejectUnauthorized: true, timeout: timeoutMs },
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
      connections: 4,
    });
    const trust: TrustSource =
      options.caFile === undefined
        ? {
            description: "the system CA store (enroll.registrar_ca_file is not set)",
            key: "enroll.registrar_ca_file",
          }
        : { description: `enroll.registrar_ca_file ${options.caFile}`, key: "enroll.registrar_ca_file" };
    return new RegistrarClient(base, agent, timeoutMs, options.maxResponseBytes ?? 256 * 1024, trust);
  }

  get baseUrl(): string {
    return this.#base.toString().replace(/\/+$/, "");
  }

  /**
   * POSTs `body` as JSON and validates a 200 response with `schema`.
   * @throws the registrar's own code (e.g. ERR_TOKEN_USED) on a 4xx/5xx with an error body (5xx/408/429
   *   transient, others permanent); ERR_REGISTRAR_UNREACHABLE (transient) on network/TLS failures;
   *   ERR_REGISTRAR_RESPONSE when the response is too large or does not match the schema.
   */
  async postJson<S extends z.ZodType>(
    path: string,
    body: unknown,
    schema: S,
    signal?: AbortSignal,
  ): Promise<z.infer<S>> {
    const url = new URL(path, this.#base);
    const deadline = AbortSignal.timeout(this.#timeoutMs);
    const combined = signal === undefined ? deadline : AbortSignal.any([deadline, signal]);
    let status: number;
    let raw: Buffer;
    let retryAfterMs: number | undefined;
    try {
      const res = await request(url, {
        method: "POST",
        dispatcher: this.#agent,
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify(body),
        signal: combined,
      });
      status = res.statusCode;
      const ra = res.headers["retry-after"];
      retryAfterMs = parseRetryAfter(Array.isArray(ra) ? ra[0] : ra, Date.now());
      raw = await readCapped(res.body, this.#maxBytes);
    } catch (err) {
      if (err instanceof M2mError) throw err;
      const tls = tlsVerifyError(err, url.href, this.#trust);
      if (tls !== undefined) throw tls;
      throw new M2mError("ERR_REGISTRAR_UNREACHABLE", "transient", `registrar ${url.origin} unreachable`, {
        cause: err,
        hint: "check enroll.registrar_url, the network, and that registrar_ca_file is the fleet CA",
      });
    }
    let json: unknown;
    try {
      json = JSON.parse(raw.toString("utf8"));
    } catch (err) {
      throw new M2mError(
        "ERR_REGISTRAR_RESPONSE",
        "transient",
        `registrar answered ${status} with non-JSON`,
        // A load balancer's own 502/503 page lands here: keep the status and its Retry-After.
        { cause: err, details: { status, ...(retryAfterMs === undefined ? {} : { retryAfterMs }) } },
      );
    }
    if (status !== 200) {
      const e = errorBodySchema.safeParse(json);
      const retry = status >= 500 || status === 408 || status === 429 ? "transient" : "permanent";
      // A shedding registrar (429/503) says when to come back; withRetry honours it with jitter.
      const later: Record<string, number> =
        retry === "transient" && retryAfterMs !== undefined ? { retryAfterMs } : {};
      if (e.success) {
        // A code this agent does not know (newer registrar) keeps its text in details.
        const code = toErrorCode(e.data.error.code, "ERR_REGISTRAR_RESPONSE");
        throw new M2mError(code, retry, `registrar refused: ${e.data.error.message}`, {
          // What to do comes from the catalogue (e.g. ERR_EK_ALREADY_REGISTERED → allow-reenrol).
          ...(code === e.data.error.code ? { hint: errorCodeInfo(code).action } : {}),
          details: {
            status,
            ...(code === e.data.error.code ? {} : { registrarCode: e.data.error.code }),
            ...later,
            ...(e.data.error.field === undefined ? {} : { field: e.data.error.field }),
          },
        });
      }
      throw new M2mError("ERR_REGISTRAR_RESPONSE", retry, `registrar answered ${status}`, {
        details: { status, ...later },
      });
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) {
      throw new M2mError(
        "ERR_REGISTRAR_RESPONSE",
        "permanent",
        "registrar response does not match the v1 schema",
        {
          cause: parsed.error,
        },
      );
    }
    return parsed.data;
  }

  async close(): Promise<void> {
    await this.#agent.close();
  }
}

async function readCapped(
  body: AsyncIterable<Buffer | Uint8Array> & { destroy?: () => void },
  max: number,
): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    // Security: a hostile or broken server cannot make the agent buffer without bound.
    if (size > max) {
      body.destroy?.();
      throw new M2mError("ERR_REGISTRAR_RESPONSE", "permanent", "registrar response too large");
    }
    chunks.push(Buffer.from(chunk));
  }
  return Buffer.concat(chunks);
}
