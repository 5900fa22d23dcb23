import { mkdtemp, rm } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll } from "vitest";
import { createTestCa, type TestCa } from "../../hw/mosquitto.js";
import { ingestRoutes } from "../../src/registrar/ingest/routes.js";
import { createSoftwareDpop, createTokenIssuer, startRouteHost, TestTokenSource } from "./relay-helpers.js";

/** The audience of the rig's ingest endpoint. */
export const INGEST_AUD = "https://ingest.test";

/** What `useIngestRig` started for the enclosing `describe`. */
export interface IngestRig {
  readonly ca: TestCa;
  /** A temp dir for the test's own files (outboxes). */
  readonly dir: string;
  readonly issuer: Awaited<ReturnType<typeof createTokenIssuer>>;
  readonly dpop: Awaited<ReturnType<typeof createSoftwareDpop>>;
  readonly ingest: ReturnType<typeof ingestRoutes>;
  readonly host: Awaited<ReturnType<typeof startRouteHost>>;
  /** Access tokens bound to `dpop` (default: sub device-a, scope telemetry:write, aud INGEST_AUD). */
  tokens(o?: { readonly scope?: string; readonly aud?: string; readonly sub?: string }): TestTokenSource;
}

/**
 * The registrar's ingest routes on a local HTTPS host (throwaway CA), with a test token issuer and a
 * software DPoP key, for HTTPS sink tests: started in `beforeAll`, closed in `afterAll`. `pre` sees
 * every request first and answers it itself by returning true (fault injection).
 */
export function useIngestRig(
  prefix: string,
  pre?: (req: IncomingMessage, res: ServerResponse) => boolean,
): () => IngestRig {
  let rig: IngestRig | undefined;
  beforeAll(async () => {
    const ca = await createTestCa();
    const dir = await mkdtemp(join(tmpdir(), prefix));
    const issuer = await createTokenIssuer();
    const dpop = await createSoftwareDpop();
    let publicUrl = "";
    const ingest = ingestRoutes({
      verifyAccessToken: (t) => issuer.verify(t),
      audience: INGEST_AUD,
      publicUrl: () => publicUrl,
    });
    const host = await startRouteHost(ca, ingest.routes, pre);
    publicUrl = host.url;
    const tokens: IngestRig["tokens"] = (o = {}) =>
      new TestTokenSource(async () => ({
        token: await issuer.issue({
          sub: o.sub ?? "device-a",
          scope: o.scope ?? "telemetry:write",
          aud: o.aud ?? INGEST_AUD,
          jkt: dpop.jkt,
          ttlSec: 300,
        }),
        expiresAt: new Date(Date.now() + 300_000),
      }));
    rig = { ca, dir, issuer, dpop, ingest, host, tokens };
  });
  afterAll(async () => {
    if (rig === undefined) return;
    await rig.host.close();
    await rm(rig.dir, { recursive: true, force: true });
    await rm(rig.ca.dir, { recursive: true, force: true });
  });
  return () => {
    if (rig === undefined) throw new Error("ingest rig used before beforeAll started it");
    return rig;
  };
}
