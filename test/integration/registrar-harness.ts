import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, request } from "undici";
import { expect } from "vitest";
import type { Clock } from "../../src/core/clock.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { type RegistrarConfig, registrarConfigFrom } from "../../src/registrar/config.js";
import { type RunningRegistrar, startRegistrar } from "../../src/registrar/server.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";

/** A real registrar on 127.0.0.1:0 over HTTPS with a fresh CA and a fresh SQLite registry. */
export interface TestRegistrar {
  readonly dir: string;
  readonly caFile: string;
  readonly config: RegistrarConfig;
  readonly store: SqliteRegistrarStore;
  readonly ca: FleetCa;
  readonly running: RunningRegistrar;
  readonly url: string;
  /** Raw POST (for malformed / oversized bodies). */
  post(path: string, body: string | Buffer, contentType?: string): Promise<{ status: number; json: unknown }>;
  close(): Promise<void>;
}

export async function startTestRegistrar(
  options: { clock?: Clock; raw?: Record<string, unknown> } = {},
): Promise<TestRegistrar> {
  const dir = await mkdtemp(join(tmpdir(), "m2m-registrar-"));
  const paths = await initCa({ dir: join(dir, "ca") });
  const config = registrarConfigFrom(
    {
      listen: { host: "127.0.0.1", port: 0 },
      tls: { cert: paths.serverCert, key: paths.serverKey },
      data_dir: join(dir, "data"),
      ca_dir: paths.dir,
      session_ttl: "60s",
      cert_lifetime: "7d",
      ...(options.raw ?? {}),
    },
    dir,
  );
  const store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
  const ca = await FleetCa.load(paths.dir, options.clock);
  const running = await startRegistrar(config, {
    store,
    ca,
    ...(options.clock ? { clock: options.clock } : {}),
  });
  const caFile = caPaths(paths.dir).caCert;
  const { readFile } = await import("node:fs/promises");
  const agent = new Agent({ connect: { ca: await readFile(caFile, "utf8") } });
  return {
    dir,
    caFile,
    config,
    store,
    ca,
    running,
    url: running.url,
    async post(path, body, contentType = "application/json") {
      const res = await request(`${running.url}${path}`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": contentType },
        body,
      });
      const text = await res.body.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = text;
      }
      return { status: res.statusCode, json };
    },
    async close() {
      await agent.close();
      await running.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Tamper table: POSTs each case's body to `path` and expects a 4xx with the case's own error code in
 * a v1 error body; `each` runs further checks after every refusal (nothing stored, nothing echoed).
 */
export async function expectRefusals(
  reg: Pick<TestRegistrar, "post">,
  path: string,
  cases: readonly (readonly [name: string, body: unknown, code: string])[],
  each?: (res: { status: number; json: unknown }) => Promise<void> | void,
): Promise<void> {
  for (const [name, body, code] of cases) {
    const res = await reg.post(path, JSON.stringify(body));
    expect({ name, refused: res.status >= 400 && res.status < 500, json: res.json }).toMatchObject({
      name,
      refused: true,
      json: { v: 1, error: { code } },
    });
    await each?.(res);
  }
}
