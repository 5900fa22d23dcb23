import type { IncomingMessage, ServerResponse } from "node:http";
import { M2mError } from "../../core/errors.js";

/** A route as the registrar server mounts it (adapted to server.ts's Route when that lands). */
export interface HttpRoute {
  readonly method: "GET" | "POST";
  readonly path: string;
  readonly handler: (req: IncomingMessage, res: ServerResponse) => Promise<void>;
}

/**
 * Reads a request body up to `limit` bytes.
 * @throws ERR_HTTP_BODY_TOO_LARGE (→ 413) when the body is larger.
 */
export async function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"] ?? "0");
  if (declared > limit) {
    throw new M2mError("ERR_HTTP_BODY_TOO_LARGE", "permanent", "request body too large");
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) {
      req.destroy();
      throw new M2mError("ERR_HTTP_BODY_TOO_LARGE", "permanent", "request body too large");
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

export function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "cache-control": "no-store",
    "content-length": Buffer.byteLength(data),
    ...headers,
  });
  res.end(data);
}

/** The media type without parameters, lower case. */
export function mediaType(req: IncomingMessage): string {
  return (req.headers["content-type"] ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
}

/** Mounts routes on a bare node:http(s) server (tests, benchmarks) until the registrar server lands. */
export function routeHandler(routes: readonly HttpRoute[]) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    const path = (req.url ?? "/").split("?")[0];
    const route = routes.find((r) => r.path === path && r.method === req.method);
    if (route === undefined) {
      sendJson(res, routes.some((r) => r.path === path) ? 405 : 404, { error: "not_found" });
      return;
    }
    route.handler(req, res).catch(() => {
      if (!res.headersSent) sendJson(res, 500, { error: "server_error" });
      else res.destroy();
    });
  };
}
