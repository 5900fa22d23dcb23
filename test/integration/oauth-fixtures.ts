import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";

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
  pki: TestPki,
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
