import { readFileSync } from "node:fs";
import {
  createServer as createHttpServer,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { type Clock, systemClock } from "../core/clock.js";
import { type Logger, silentLogger } from "../core/log.js";
import { WIRE_VERSION } from "../wire/v1/index.js";
import { AuditLog } from "./audit.js";
import type { FleetCa } from "./ca/index.js";
import type { RegistrarConfig } from "./config.js";
import type { EnrolmentDeps } from "./enrolment/complete.js";
import { pkcs11Route } from "./enrolment/pkcs11-route.js";
import { tpmRoutes } from "./enrolment/tpm-routes.js";
import { Admission, type AdmissionStats } from "./http/admission.js";
import {
  HttpError,
  messageFor,
  parseJsonBody,
  peerCertificateOf,
  type Route,
  type RouteContext,
  type RouteResponse,
  toHttpError,
} from "./http/router.js";
import type { AuditEvent, RegistrarStore } from "./store/index.js";

export type { Route, RouteContext, RouteResponse } from "./http/router.js";
export { HttpError } from "./http/router.js";

export interface RegistrarDeps {
  readonly store: RegistrarStore;
  readonly ca: FleetCa;
  readonly clock?: Clock;
  readonly logger?: Logger;
  /** Routes added by other modules (oauth/, est/, ingest/). A path+method clash is an error. */
  readonly extraRoutes?: readonly Route[];
}

export interface RunningRegistrar {
  /** `https://127.0.0.1:PORT` (or http:// when insecure HTTP was configured). */
  readonly url: string;
  readonly port: number;
  readonly server: Server;
  /** Admission control counters (in flight, admitted, shed with 429). */
  load(): AdmissionStats;
  close(): Promise<void>;
}

/**
 * Starts the registrar: HTTPS (HTTP only when `tls.insecure_http` is spelled out in config, for
 * tests), the v1 enrolment routes, and any `extraRoutes`. Every body is size-limited and
 * content-type checked; every failure is a stable `{v:1, error:{code,message}}` with nothing persisted.
 */
export async function startRegistrar(
  config: RegistrarConfig,
  deps: RegistrarDeps,
): Promise<RunningRegistrar> {
  const clock = deps.clock ?? systemClock;
  const logger = deps.logger ?? silentLogger;
  let baseUrl = "";
  const enrolmentDeps = (): EnrolmentDeps => ({ store: deps.store, ca: deps.ca, clock, config, baseUrl });

  const routes = new Map<string, Route>();
  for (const r of [pkcs11Route(enrolmentDeps), ...tpmRoutes(enrolmentDeps), ...(deps.extraRoutes ?? [])]) {
    const key = `${r.method} ${r.path}`;
    if (routes.has(key)) throw new Error(`duplicate route ${key}`);
    routes.set(key, r);
  }
  const paths = new Set([...routes.values()].map((r) => r.path));
  const audit = new AuditLog(config.auditLog);

  const admission = new Admission({
    maxInFlight: config.maxInFlight,
    maxRetryAfterSeconds: config.retryAfterMaxSeconds,
    nowMs: () => clock.monotonicMs(),
  });
  const handler = (req: IncomingMessage, res: ServerResponse): void => {
    const ticket = admission.tryAdmit();
    if ("retryAfterSeconds" in ticket) {
      // Shed before reading the body or touching the store: a refusal must stay cheap under a storm.
      // Not audited (a storm would flood the audit log); counted in load().
      send(res, {
        status: 429,
        json: { v: WIRE_VERSION, error: { code: "ERR_BUSY", message: messageFor("ERR_BUSY") } },
        headers: { "retry-after": String(ticket.retryAfterSeconds) },
      });
      return;
    }
    res.once("finish", ticket.release);
    res.once("close", ticket.release);
    void handle(req, res);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const started = clock.monotonicMs();
    const url = new URL(req.url ?? "/", "http://registrar.invalid");
    const route = routes.get(`${req.method ?? ""} ${url.pathname}`);
    const fields: Record<string, string | number | boolean | undefined> = {};
    const remote = req.socket.remoteAddress ?? "";
    let response: RouteResponse;
    let failure: HttpError | undefined;
    try {
      if (route === undefined) {
        throw paths.has(url.pathname)
          ? new HttpError(405, "ERR_METHOD_NOT_ALLOWED", "method not allowed")
          : new HttpError(404, "ERR_NOT_FOUND", "not found");
      }
      const contentType = (req.headers["content-type"] ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
      const hasBody = route.method !== "GET" && route.method !== "DELETE";
      let rawBody: Buffer = Buffer.alloc(0);
      if (hasBody) {
        const accepted = route.contentTypes ?? ["application/json"];
        // Refuse early on a wrong media type: never parse what the route did not ask for.
        if (!accepted.includes(contentType)) {
          throw new HttpError(415, "ERR_CONTENT_TYPE", "unsupported content type");
        }
        rawBody = await readBody(req, route.maxBodyBytes ?? config.maxBodyBytes);
      }
      const ctx: RouteContext = {
        req,
        url,
        rawBody,
        contentType,
        remote,
        json: (schema) => parseJsonBody(rawBody, schema),
        peerCertificateDer: () => peerCertificateOf(req),
        auditFields: (f) => Object.assign(fields, f),
      };
      response = await route.handle(ctx);
    } catch (err) {
      failure = toHttpError(err);
      if (failure.status >= 500) logger.error("registrar request failed", { path: url.pathname, error: err });
      else
        logger.info("registrar request refused", {
          path: url.pathname,
          code: failure.code,
          cause: failure.cause,
        });
      const error: Record<string, string> = { code: failure.code, message: failure.message };
      if (failure.field !== undefined) error.field = failure.field;
      response = { status: failure.status, json: { v: WIRE_VERSION, error } };
    }
    if (route?.audit !== undefined) {
      const event: AuditEvent = {
        ts: clock.now().toISOString(),
        event: route.audit,
        outcome: failure === undefined ? "success" : "failure",
        ...(failure === undefined ? {} : { code: failure.code }),
        remote,
        ms: Math.round(clock.monotonicMs() - started),
        ...Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined)),
      };
      try {
        audit.write(event);
        await deps.store.appendAudit(event);
      } catch (err) {
        logger.error("audit write failed", { error: err });
      }
    }
    send(res, response);
  };

  // Slow clients cannot hold a request open (slowloris): Node answers 408 itself once a request
  // exceeds requestTimeout; the check interval bounds how late that happens.
  const timeouts = {
    requestTimeout: config.requestTimeoutMs,
    headersTimeout: Math.min(config.requestTimeoutMs, 10_000),
    connectionsCheckingInterval: Math.min(1_000, config.requestTimeoutMs),
    keepAliveTimeout: 5_000,
  };
  const server: Server =
    config.tls.kind === "https"
      ? createHttpsServer(
          {
            cert: readFileSync(config.tls.certFile),
            key: readFileSync(config.tls.keyFile),
            // Client certificates are requested (EST re-enrol, mTLS routes) but checked by routes.
            requestCert: true,
            rejectUnauthorized: false,
            ca: deps.ca.chainPem(),
            minVersion: "TLSv1.2",
            ...timeouts,
          },
          handler,
        )
      : createHttpServer(timeouts, handler);
  server.maxHeadersCount = 64;
  // Housekeeping: expired sessions are useless (finish refuses them); drop them once a minute.
  const purge = setInterval(() => {
    deps.store.purgeExpiredSessions(clock.now()).catch((err: unknown) => {
      logger.warn("session purge failed", { error: err });
    });
  }, 60_000);
  purge.unref();

  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(config.listen.port, config.listen.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  } catch (err) {
    clearInterval(purge);
    audit.close();
    throw err;
  }
  const port = (server.address() as AddressInfo).port;
  const host = config.listen.host.includes(":") ? `[${config.listen.host}]` : config.listen.host;
  baseUrl = `${config.tls.kind === "https" ? "https" : "http"}://${host}:${port}`;
  logger.info("registrar listening", { url: baseUrl, tls: config.tls.kind });

  return {
    url: baseUrl,
    port,
    server,
    load: () => admission.stats(),
    close: async () => {
      clearInterval(purge);
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      audit.close();
    },
  };
}

function send(res: ServerResponse, response: RouteResponse): void {
  if (res.headersSent || res.destroyed) return;
  const headers: Record<string, string> = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    ...(response.headers ?? {}),
  };
  // Strings stay strings: Node then sends head + body in one write (one TLS record, one syscall)
  // instead of a writev of two chunks, measurably cheaper on the token endpoint's hot path.
  let payload: string | Buffer;
  if ("json" in response) {
    payload = JSON.stringify(response.json);
    headers["content-type"] = "application/json";
  } else {
    payload = response.body;
    headers["content-type"] = response.contentType;
  }
  headers["content-length"] = String(Buffer.byteLength(payload));
  // After a refused oversized body the rest of the stream is unread: do not reuse the connection.
  if (response.status === 413) headers.connection = "close";
  res.writeHead(response.status, headers);
  res.end(payload);
}

/** Reads a body up to `limit` bytes. @throws HttpError 413 ERR_BODY_TOO_LARGE */
function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"] ?? Number.NaN);
  if (Number.isFinite(declared) && declared > limit) {
    // Security: refuse before reading; close the connection so the client cannot keep streaming.
    req.socket.setTimeout(1000);
    return Promise.reject(new HttpError(413, "ERR_BODY_TOO_LARGE", messageFor("ERR_BODY_TOO_LARGE")));
  }
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    req.on("data", (chunk: Buffer) => {
      if (done) return;
      size += chunk.length;
      if (size > limit) {
        done = true;
        req.pause();
        reject(new HttpError(413, "ERR_BODY_TOO_LARGE", "request body too large"));
        return;
      }
      chunks.push(chunk);
    });
    req.on("end", () => {
      if (done) return;
      done = true;
      resolve(Buffer.concat(chunks));
    });
    req.on("error", (err) => {
      if (done) return;
      done = true;
      reject(new HttpError(400, "ERR_BAD_REQUEST", "request body could not be read", { cause: err }));
    });
    // The deadline (or the client) closed the connection mid-body: settle, so nothing waits forever.
    req.on("close", () => {
      if (done) return;
      done = true;
      reject(new HttpError(408, "ERR_TIMEOUT", "request body incomplete"));
    });
  });
}
