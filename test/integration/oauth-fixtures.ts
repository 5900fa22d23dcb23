import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import {
  peerCertificateOf,
  type Route,
  type RouteContext,
  type RouteResponse,
} from "../../src/registrar/http/router.js";
import { bundleEntry } from "./child-bundle.js";

/** A throwaway CA and a 127.0.0.1 server certificate made with the openssl CLI. */
export interface TestPki {
  readonly dir: string;
  readonly caPem: string;
  readonly caKeyFile: string;
  readonly caCertFile: string;
  readonly serverCertPem: string;
  readonly serverKeyPem: string;
  cleanup(): Promise<void>;
}

export async function makeTestPki(): Promise<TestPki> {
  const dir = await mkdtemp(join(tmpdir(), "m2m-oauth-pki-"));
  const run = (args: string[]) => execa("openssl", args, { cwd: dir, timeout: 20_000, stdin: "ignore" });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  await run([
    "req",
    "-x509",
    ...ec,
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
    "-days",
    "2",
    "-subj",
    "/CN=m2m test CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  await run(["req", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
  await writeFile(
    join(dir, "san.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
  );
  await run([
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "server.pem",
    "-days",
    "2",
    "-extfile",
    "san.ext",
  ]);
  return {
    dir,
    caPem: await readFile(join(dir, "ca.pem"), "utf8"),
    caKeyFile: join(dir, "ca.key"),
    caCertFile: join(dir, "ca.pem"),
    serverCertPem: await readFile(join(dir, "server.pem"), "utf8"),
    serverKeyPem: await readFile(join(dir, "server.key"), "utf8"),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

export async function startHttps(
  pki: Pick<TestPki, "serverCertPem" | "serverKeyPem" | "caPem">,
  handler: (req: IncomingMessage, res: ServerResponse) => void,
  extra: { requestCert?: boolean; ca?: string[] } = {},
): Promise<{ server: Server; origin: string; close(): Promise<void> }> {
  const server = createServer(
    {
      cert: pki.serverCertPem,
      key: pki.serverKeyPem,
      ...(extra.requestCert === true
        ? { requestCert: true, rejectUnauthorized: false, ca: extra.ca ?? [pki.caPem] }
        : {}),
    },
    handler,
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    origin: `https://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/**
 * Mounts registrar `Route`s on a bare server with the router's semantics (exact path, media type
 * check, size-limited body, 404/405/413/415), for tests that do not need the whole registrar.
 */
export function mountRoutes(routes: readonly Route[]): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    void (async () => {
      const url = new URL(req.url ?? "/", "http://registrar.invalid");
      const route = routes.find((r) => r.path === url.pathname && r.method === req.method);
      const reply = (r: RouteResponse): void => {
        const headers: Record<string, string> = { "cache-control": "no-store", ...(r.headers ?? {}) };
        let payload: Buffer;
        if ("json" in r) {
          payload = Buffer.from(JSON.stringify(r.json));
          headers["content-type"] = "application/json";
        } else {
          payload = Buffer.isBuffer(r.body) ? r.body : Buffer.from(r.body);
          headers["content-type"] = r.contentType;
        }
        res.writeHead(r.status, headers);
        res.end(payload);
      };
      if (route === undefined) {
        reply({
          status: routes.some((r) => r.path === url.pathname) ? 405 : 404,
          json: { error: "not_found" },
        });
        return;
      }
      const contentType = (req.headers["content-type"] ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
      let rawBody = Buffer.alloc(0);
      if (route.method !== "GET") {
        if (!(route.contentTypes ?? ["application/json"]).includes(contentType)) {
          reply({ status: 415, json: { error: "content_type" } });
          return;
        }
        const chunks: Buffer[] = [];
        let size = 0;
        for await (const c of req as AsyncIterable<Buffer>) {
          size += c.length;
          if (size > (route.maxBodyBytes ?? 65_536)) {
            reply({ status: 413, json: { error: "too_large" }, headers: { connection: "close" } });
            return;
          }
          chunks.push(c);
        }
        rawBody = Buffer.concat(chunks);
      }
      const ctx: RouteContext = {
        req,
        url,
        rawBody,
        contentType,
        remote: req.socket.remoteAddress ?? "",
        json: () => {
          throw new Error("json bodies are not used by these routes");
        },
        peerCertificateDer: () => peerCertificateOf(req),
        auditFields: () => undefined,
      };
      try {
        reply(await route.handle(ctx));
      } catch (err) {
        const status = (err as { status?: number }).status ?? 500;
        reply({ status, json: { error: { code: (err as { code?: string }).code ?? "ERR_INTERNAL" } } });
      }
    })();
  };
}

/** A child-process bundle of `entry` in the credentials tests' own cache folder. */
export function bundleForChild(entry: string, name: string): Promise<string> {
  return bundleEntry(entry, name, "m2m-credentials");
}
