import { chmod, chown, lstat, mkdtemp, rename, rm, unlink } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { connect } from "node:net";
import { dirname, join } from "node:path";
import { asM2mError, M2mError } from "../core/errors.js";
import { type Logger, silentLogger } from "../core/log.js";

/**
 * The agent's local API: HTTP/1.1 over a Unix socket (owner/group-restricted by file mode). Features
 * mount their routes (`/v1/messages` from the relay, `/v1/status` from the daemon, `/v1/token` from
 * credentials) through `route()`; the server owns limits, timeouts and the error shape.
 */

export type HttpMethod = "GET" | "POST" | "PUT" | "DELETE";

export interface ApiRequest {
  readonly method: HttpMethod;
  readonly path: string;
  readonly query: URLSearchParams;
  readonly headers: IncomingMessage["headers"];
  /**
   * Reads the whole body, enforcing the route's byte limit (413) and the idle body timeout (408).
   * @throws ERR_API_BODY_TOO_LARGE, ERR_API_BODY_TIMEOUT
   */
  body(): Promise<Buffer>;
  readonly raw: IncomingMessage;
}

export interface ApiResponse {
  readonly status: number;
  /** Serialised as JSON with `content-type: application/json`. */
  readonly json?: unknown;
  readonly text?: string;
  readonly headers?: Readonly<Record<string, string>>;
}

export type ApiHandler = (req: ApiRequest) => Promise<ApiResponse>;

export interface RouteOptions {
  /** Default: the server's `maxBodyBytes`. */
  readonly maxBodyBytes?: number;
}

export interface ApiServerOptions {
  readonly socketPath: string;
  /** File mode of the socket; default 0o660 (owner + group may connect). */
  readonly mode?: number;
  /** Group id to chown the socket to (lets a `m2m-producers` group send data). */
  readonly gid?: number;
  readonly maxBodyBytes?: number;
  /** Concurrent requests across all connections; beyond it → 503 ERR_API_BUSY. */
  readonly maxConcurrentRequests?: number;
  readonly maxConnections?: number;
  /** A client must send its headers within this time (slowloris). */
  readonly headersTimeoutMs?: number;
  /** Whole request (headers + body) deadline. */
  readonly requestTimeoutMs?: number;
  /** Body stalls longer than this → 408. */
  readonly bodyIdleTimeoutMs?: number;
  readonly keepAliveTimeoutMs?: number;
  readonly logger?: Logger;
  /**
   * Consulted for a request no mounted route serves: a feature that is configured but not started
   * (the agent is degraded, unprovisioned, still enrolling) answers with this error (e.g. 503
   * ERR_AGENT_NOT_READY naming the state) instead of 404 "not found".
   */
  readonly notReady?: (method: string, path: string) => M2mError | undefined;
}

/** Maps stable error codes to HTTP statuses; anything else → 500 (permanent) or 503 (transient). */
const STATUS_BY_CODE: Readonly<Record<string, number>> = {
  ERR_API_BODY_TOO_LARGE: 413,
  ERR_API_BODY_TIMEOUT: 408,
  ERR_API_NOT_FOUND: 404,
  ERR_API_METHOD: 405,
  ERR_API_BUSY: 503,
  ERR_AGENT_NOT_READY: 503,
  ERR_API_UNSUPPORTED_MEDIA_TYPE: 415,
  ERR_OUTBOX_FULL: 429,
  ERR_OUTBOX_MESSAGE_TOO_LARGE: 413,
  ERR_OUTBOX_BATCH_TOO_LARGE: 413,
};

export function statusForError(err: M2mError): number {
  const mapped = STATUS_BY_CODE[err.code];
  if (mapped !== undefined) return mapped;
  const explicit = err.details.httpStatus;
  if (typeof explicit === "number") return explicit;
  if (err.code.startsWith("ERR_API_INVALID") || err.code === "ERR_CHANNEL_INVALID") return 400;
  return err.retry === "transient" ? 503 : 500;
}

export class ApiServer {
  readonly socketPath: string;
  readonly #opts: ApiServerOptions;
  readonly #log: Logger;
  readonly #routes = new Map<string, { handler: ApiHandler; maxBodyBytes: number }>();
  readonly #server: Server;
  #inFlight = 0;
  #listening = false;

  constructor(options: ApiServerOptions) {
    this.socketPath = options.socketPath;
    this.#opts = options;
    this.#log = options.logger ?? silentLogger;
    this.#server = createServer(
      {
        headersTimeout: options.headersTimeoutMs ?? 5_000,
        requestTimeout: options.requestTimeoutMs ?? 30_000,
        keepAliveTimeout: options.keepAliveTimeoutMs ?? 5_000,
        maxHeaderSize: 8 * 1024,
      },
      (req, res) => {
        this.#handle(req, res).catch((err: unknown) => {
          this.#log.error("api handler crashed", { err });
          if (!res.headersSent) res.writeHead(500).end();
          else res.destroy();
        });
      },
    );
    this.#server.maxConnections = options.maxConnections ?? 64;
    // A connection that sends nothing for this long is closed (slow or stuck local clients).
    this.#server.setTimeout(options.requestTimeoutMs ?? 30_000);
  }

  /** Mounts a handler. Paths are exact (`/v1/messages`). @throws ERR_API_ROUTE_EXISTS */
  route(method: HttpMethod, path: string, handler: ApiHandler, options: RouteOptions = {}): void {
    const key = `${method} ${path}`;
    if (this.#routes.has(key)) {
      throw new M2mError("ERR_API_ROUTE_EXISTS", "permanent", `route ${key} is already registered`);
    }
    this.#routes.set(key, {
      handler,
      maxBodyBytes: options.maxBodyBytes ?? this.#opts.maxBodyBytes ?? 1024 * 1024,
    });
  }

  /**
   * Listens on the socket path. A stale socket file (nobody accepting) is removed first; a live one
   * means another agent runs: ERR_API_SOCKET_IN_USE.
   */
  async listen(): Promise<void> {
    await removeStaleSocket(this.socketPath);
    // Why: bind() creates the socket file with the process umask (0777 under `umask 000`), and a
    // chmod after it leaves a window in which any local user could connect. The socket is bound in
    // a fresh 0700 directory beside its final path, given its mode and group there, and only then
    // renamed into place (same filesystem: atomic), so it is never reachable with a wider mode.
    const staging = await mkdtemp(join(dirname(this.socketPath), ".s"));
    const bound = join(staging, "s");
    try {
      await new Promise<void>((resolve, reject) => {
        this.#server.once("error", reject);
        this.#server.listen(bound, () => {
          this.#server.off("error", reject);
          resolve();
        });
      });
      // Access control is the file mode: owner + group (0660 by default), never world.
      await chmod(bound, this.#opts.mode ?? 0o660);
      if (this.#opts.gid !== undefined) await chown(bound, process.getuid?.() ?? -1, this.#opts.gid);
      await rename(bound, this.socketPath);
    } catch (err) {
      await new Promise<void>((resolve) => this.#server.close(() => resolve()));
      throw err;
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
    this.#listening = true;
  }

  async close(): Promise<void> {
    if (!this.#listening) return;
    this.#listening = false;
    await new Promise<void>((resolve) => {
      this.#server.close(() => resolve());
      this.#server.closeAllConnections();
    });
    await unlink(this.socketPath).catch(() => undefined);
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * Counters for metrics and status: requests answered, and refusals by stable code (oversized,
   * malformed, slow, floods: the threat model wants abuse bounded, refused AND counted).
   */
  readonly counters: { requests: number; refused: Record<string, number> } = { requests: 0, refused: {} };

  #send(res: ServerResponse, r: ApiResponse): void {
    this.counters.requests++;
    if (r.status >= 400) {
      const code = (r.json as { error?: { code?: unknown } } | undefined)?.error?.code;
      const key = typeof code === "string" ? code : `HTTP_${r.status}`;
      this.counters.refused[key] = (this.counters.refused[key] ?? 0) + 1;
    }
    send(res, r);
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://agent");
    const route = this.#routes.get(`${req.method ?? ""} ${url.pathname}`);
    if (route === undefined) {
      const pending = this.#opts.notReady?.(req.method ?? "", url.pathname);
      if (pending !== undefined) {
        req.resume();
        return this.#send(res, { ...errorResponse(pending), headers: { "retry-after": "5" } });
      }
      const pathKnown = [...this.#routes.keys()].some((k) => k.endsWith(` ${url.pathname}`));
      req.resume();
      return this.#send(
        res,
        errorResponse(
          new M2mError(
            pathKnown ? "ERR_API_METHOD" : "ERR_API_NOT_FOUND",
            "permanent",
            pathKnown ? "method not allowed" : "not found",
          ),
        ),
      );
    }
    const maxConcurrent = this.#opts.maxConcurrentRequests ?? 32;
    if (this.#inFlight >= maxConcurrent) {
      req.resume();
      return this.#send(res, {
        ...errorResponse(new M2mError("ERR_API_BUSY", "transient", "too many concurrent requests")),
        headers: { "retry-after": "1" },
      });
    }
    this.#inFlight++;
    try {
      const apiReq: ApiRequest = {
        method: req.method as HttpMethod,
        path: url.pathname,
        query: url.searchParams,
        headers: req.headers,
        raw: req,
        body: () => readBody(req, route.maxBodyBytes, this.#opts.bodyIdleTimeoutMs ?? 10_000),
      };
      let response: ApiResponse;
      try {
        response = await route.handler(apiReq);
      } catch (err) {
        const e = asM2mError(err);
        if (statusForError(e) >= 500) this.#log.warn("api request failed", { path: url.pathname, err: e });
        response = errorResponse(e);
      }
      this.#send(res, response);
    } finally {
      this.#inFlight--;
    }
  }
}

/** The error body every route shares: `{ error: { code, retry, message, hint? } }`. */
export function errorResponse(err: M2mError): ApiResponse {
  const status = statusForError(err);
  const headers: Record<string, string> = {};
  const ra = err.details.retryAfterMs;
  if (typeof ra === "number") headers["retry-after"] = String(Math.max(1, Math.ceil(ra / 1000)));
  // The local error carries the code and hint only: no cause chain, no stack.
  return { status, json: { error: err.toJSON() }, headers };
}

function send(res: ServerResponse, r: ApiResponse): void {
  if (res.headersSent) return;
  let body: string | undefined;
  const headers: Record<string, string> = { ...(r.headers ?? {}) };
  if (r.json !== undefined) {
    body = JSON.stringify(r.json);
    headers["content-type"] = "application/json";
  } else if (r.text !== undefined) {
    body = r.text;
    headers["content-type"] ??= "text/plain; charset=utf-8";
  }
  if (body !== undefined) headers["content-length"] = String(Buffer.byteLength(body));
  res.writeHead(r.status, headers);
  res.end(body);
}

/** The route's whole-request limit, stated with its number (what a producer needs to split a batch). */
function bodyTooLarge(limit: number): M2mError {
  return new M2mError(
    "ERR_API_BODY_TOO_LARGE",
    "permanent",
    `request body larger than the per-request limit of ${limit} bytes`,
    { details: { limitBytes: limit }, hint: "send fewer messages per request (limits: docs/operations.md)" },
  );
}

function readBody(req: IncomingMessage, limit: number, idleMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers["content-length"] ?? Number.NaN);
    // Refuse early from the declared length: no need to read what we will not keep.
    if (Number.isFinite(declared) && declared > limit) {
      req.resume();
      reject(bodyTooLarge(limit));
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let timer: NodeJS.Timeout | undefined;
    const arm = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        cleanup();
        reject(new M2mError("ERR_API_BODY_TIMEOUT", "permanent", "request body too slow"));
        req.socket.destroy();
      }, idleMs);
    };
    const onData = (c: Buffer): void => {
      size += c.length;
      if (size > limit) {
        cleanup();
        req.resume();
        reject(bodyTooLarge(limit));
        return;
      }
      chunks.push(c);
      arm();
    };
    const onEnd = (): void => {
      cleanup();
      resolve(Buffer.concat(chunks, size));
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(new M2mError("ERR_API_BODY_TIMEOUT", "permanent", "request body aborted", { cause: err }));
    };
    const cleanup = (): void => {
      clearTimeout(timer);
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
    };
    req.on("data", onData);
    req.on("end", onEnd);
    req.on("error", onError);
    arm();
  });
}

async function removeStaleSocket(path: string): Promise<void> {
  const st = await lstat(path).catch(() => undefined);
  if (st === undefined) return;
  if (!st.isSocket()) {
    throw new M2mError("ERR_API_SOCKET_PATH", "permanent", `${path} exists and is not a socket`, {
      hint: "remove the file or configure another api.socket path",
    });
  }
  const live = await new Promise<boolean>((resolve) => {
    const s = connect(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
  if (live) {
    throw new M2mError("ERR_API_SOCKET_IN_USE", "permanent", `another process is serving ${path}`, {
      hint: "is another m2m-agent running?",
    });
  }
  await unlink(path);
}
