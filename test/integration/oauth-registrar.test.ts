import { chmod, mkdtemp, readFile, rm, stat } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decodeJwt, decodeProtectedHeader } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { isM2mError } from "../../src/core/errors.js";
import { OAuthClient, type OAuthClientConfig } from "../../src/credentials/oauth/client.js";
import { HardwareDpopSigner } from "../../src/credentials/oauth/dpop.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import type { KeyInfo } from "../../src/keys/key-provider.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { loadOrCreateSigningKey } from "../../src/registrar/oauth/signing-key.js";
import {
  oauthRoutes,
  TOKEN_MAX_BODY_BYTES,
  TokenService,
  type TokenServiceConfig,
} from "../../src/registrar/oauth/token-service.js";
import { makeTestPki, mountRoutes, startHttps, type TestPki } from "./oauth-fixtures.js";

const scopes: TokenServiceConfig["scopes"] = {
  roles: { "sensor-gateway": ["telemetry:write", "est", "status:read"], camera: ["video:write"] },
  rules: [{ scope: "site:{site}:write", roles: ["sensor-gateway"] }],
};

interface Rig {
  origin: string;
  svc: TokenService;
  directory: InMemoryDeviceDirectory;
  clock: ManualClock;
  requests: number;
  /** Answers the next N token requests with 503 Retry-After: 2. */
  fail503: number;
  close(): Promise<void>;
}

async function startRig(
  pki: TestPki,
  dataDir: string,
  extra: Partial<TokenServiceConfig> = {},
): Promise<Rig> {
  const clock = new ManualClock(new Date());
  const directory = new InMemoryDeviceDirectory();
  const signingKey = await loadOrCreateSigningKey(dataDir);
  // The issuer is only known once the port is; the service is created lazily on first request.
  const state: { svc?: TokenService; routes?: ReturnType<typeof mountRoutes> } = {};
  const rig = { requests: 0, fail503: 0 } as Rig;
  const handler = (req: IncomingMessage, res: ServerResponse): void => {
    if (req.url === "/oauth2/token") {
      rig.requests++;
      if (rig.fail503 > 0) {
        rig.fail503--;
        res.writeHead(503, { "retry-after": "2", "content-type": "application/json" });
        res.end('{"error":"temporarily_unavailable"}');
        return;
      }
    }
    state.routes?.(req, res);
  };
  const srv = await startHttps(pki, handler);
  const svc = new TokenService(
    // 600 s tokens (the registrar's default is 300 s): the refresh test below counts in fractions of this.
    { issuer: srv.origin, audiences: ["https://ingest.example"], scopes, accessTokenTtlSec: 600, ...extra },
    { directory, signingKey, clock },
  );
  state.svc = svc;
  state.routes = mountRoutes(oauthRoutes({ tokenService: svc }));
  return Object.assign(rig, { origin: srv.origin, svc, directory, clock, close: srv.close });
}

async function device(
  directory: InMemoryDeviceDirectory,
  id: string,
  role: string,
  attributes: Record<string, string>,
): Promise<{ keys: FakeKeyProvider; info: KeyInfo }> {
  const keys = new FakeKeyProvider({ label: id });
  const info = await keys.createOrOpen();
  directory.put({ deviceId: id, status: "active", role, attributes, publicJwk: info.publicJwk, group: "g1" });
  return { keys, info };
}

function client(rig: Rig, pki: TestPki, keys: FakeKeyProvider, cfg: Partial<OAuthClientConfig>): OAuthClient {
  return new OAuthClient(
    { clientId: "x", issuer: rig.origin, caPem: pki.caPem, ...cfg },
    { keys, clock: rig.clock, random: () => 0.5 },
  );
}

describe("agent OAuth client against the registrar token service (https on 127.0.0.1)", () => {
  let pki: TestPki;
  let dataDir: string;
  let rig: Rig;

  beforeAll(async () => {
    pki = await makeTestPki();
    dataDir = await mkdtemp(join(tmpdir(), "m2m-oauth-data-"));
    rig = await startRig(pki, dataDir);
  });
  afterAll(async () => {
    await rig?.close();
    await pki?.cleanup();
    await rm(dataDir, { recursive: true, force: true });
  });

  it("discovers the token endpoint (RFC 8414) and gets an RFC 9068 token with role+attribute scopes", async () => {
    const { keys } = await device(rig.directory, "dev-a", "sensor-gateway", { site: "plant-7" });
    const c = client(rig, pki, keys, {
      clientId: "dev-a",
      scope: "telemetry:write site:plant-7:write site:plant-8:write video:write",
    });
    const t = await c.getToken();
    expect(t.tokenType).toBe("Bearer");
    // requested ∩ allowed: plant-8 (other site) and video:write (other role) are dropped.
    expect(t.scope).toBe("site:plant-7:write telemetry:write");
    const jwt = t.token.reveal();
    expect(decodeProtectedHeader(jwt)).toMatchObject({
      typ: "at+jwt",
      alg: "ES256",
      kid: expect.any(String),
    });
    const claims = decodeJwt(jwt);
    expect(claims).toMatchObject({
      iss: rig.origin,
      sub: "dev-a",
      client_id: "dev-a",
      aud: "https://ingest.example",
    });
    expect(claims.cnf).toBeUndefined();
    const v = await rig.svc.verifyAccessToken(jwt, {
      audience: "https://ingest.example",
      requiredScope: "telemetry:write",
    });
    expect(v.sub).toBe("dev-a");
    await expect(
      rig.svc.verifyAccessToken(jwt, { audience: "https://ingest.example", requiredScope: "video:write" }),
    ).rejects.toMatchObject({ code: "ERR_ACCESS_TOKEN_SCOPE" });
    // A camera gets only its own role's scopes.
    const cam = await device(rig.directory, "cam-1", "camera", { site: "plant-7" });
    const tc = await client(rig, pki, cam.keys, { clientId: "cam-1" }).getToken();
    expect(tc.scope).toBe("video:write");
    await c.close();
  });

  it("caches, refreshes at ~80% of lifetime (manual clock), and shares one request between concurrent callers", async () => {
    const { keys } = await device(rig.directory, "dev-b", "sensor-gateway", { site: "plant-1" });
    const c = client(rig, pki, keys, { clientId: "dev-b", scope: "telemetry:write" });
    const before = rig.requests;
    const all = await Promise.all([c.getToken(), c.getToken(), c.getToken(), c.getToken()]);
    expect(rig.requests - before).toBe(1);
    expect(new Set(all.map((t) => t.token.reveal())).size).toBe(1);
    const first = all[0]?.token.reveal();
    await rig.clock.advance(400_000); // 67% of 600 s: still fresh
    expect((await c.getToken()).token.reveal()).toBe(first);
    expect(rig.requests - before).toBe(1);
    await rig.clock.advance(90_000); // 82%: refresh due, token not yet expired
    const second = await c.getToken();
    expect(second.token.reveal()).not.toBe(first);
    expect(rig.requests - before).toBe(2);
    expect(second.expiresAt.getTime()).toBeGreaterThan(rig.clock.now().getTime() + 500_000);
    expect(c.health()).toMatchObject({ ok: true });
    await c.close();
  });

  it("binds tokens with DPoP: token_type DPoP, cnf.jkt = hardware key thumbprint, resource proof verified", async () => {
    const { keys, info } = await device(rig.directory, "dev-c", "sensor-gateway", { site: "plant-2" });
    const c = client(rig, pki, keys, { clientId: "dev-c", scope: "telemetry:write", dpop: true });
    const t = await c.getToken();
    expect(t.tokenType).toBe("DPoP");
    const claims = decodeJwt(t.token.reveal());
    expect((claims.cnf as { jkt: string }).jkt).toBe(info.thumbprint);
    const signer = await c.dpopSigner();
    if (signer === undefined) throw new Error("dpop signer expected");
    const url = "https://ingest.example/v1/telemetry?batch=1";
    const proof = await signer.proof("POST", url, t.token);
    const v = await rig.svc.verifyAccessToken(t.token.reveal(), {
      audience: "https://ingest.example",
      requiredScope: "telemetry:write",
      dpop: { proof, method: "POST", url },
    });
    expect(v.jkt).toBe(info.thumbprint);
    // Without a proof, or with a proof by another key, the bound token is refused.
    await expect(
      rig.svc.verifyAccessToken(t.token.reveal(), { audience: "https://ingest.example" }),
    ).rejects.toMatchObject({ code: "ERR_ACCESS_TOKEN_DPOP_REQUIRED" });
    const other = new FakeKeyProvider({ label: "thief" });
    const otherInfo = await other.createOrOpen();
    const stolen = await new HardwareDpopSigner(other, otherInfo, rig.clock).proof("POST", url, t.token);
    await expect(
      rig.svc.verifyAccessToken(t.token.reveal(), {
        audience: "https://ingest.example",
        dpop: { proof: stolen, method: "POST", url },
      }),
    ).rejects.toMatchObject({ code: "ERR_DPOP_KEY_MISMATCH" });
    // Replaying the legitimate proof fails too.
    await expect(
      rig.svc.verifyAccessToken(t.token.reveal(), {
        audience: "https://ingest.example",
        dpop: { proof, method: "POST", url },
      }),
    ).rejects.toMatchObject({ code: "ERR_DPOP_REPLAY" });
    await c.close();
  });

  it("an RSA-2048 device key works too (RS256 assertion and DPoP proof)", async () => {
    const keys = new FakeKeyProvider({ label: "rsa-dev", algorithm: "rsa-2048" });
    const info = await keys.createOrOpen();
    rig.directory.put({
      deviceId: "dev-rsa",
      status: "active",
      role: "sensor-gateway",
      attributes: {},
      publicJwk: info.publicJwk,
      group: "g1",
    });
    const c = client(rig, pki, keys, { clientId: "dev-rsa", scope: "telemetry:write", dpop: true });
    const t = await c.getToken();
    expect(t.tokenType).toBe("DPoP");
    expect((decodeJwt(t.token.reveal()).cnf as { jkt: string }).jkt).toBe(info.thumbprint);
    await c.close();
  });

  it("refuses a revoked device with a permanent ERR_OAUTH_CLIENT_REVOKED surfaced in health()", async () => {
    const { keys } = await device(rig.directory, "dev-d", "sensor-gateway", {});
    const c = client(rig, pki, keys, { clientId: "dev-d", scope: "telemetry:write" });
    await c.getToken();
    rig.directory.revoke("dev-d");
    c.invalidate();
    const before = rig.requests;
    const err = await c.getToken().catch((e: unknown) => e);
    expect(isM2mError(err, "ERR_OAUTH_CLIENT_REVOKED")).toBe(true);
    expect((err as { retry: string }).retry).toBe("permanent");
    expect(rig.requests - before).toBe(1); // not retried
    expect(c.health()).toMatchObject({ ok: false, code: "ERR_OAUTH_CLIENT_REVOKED" });
    await c.close();
  });

  it("keeps tokens on disk only when configured: 0600 file, reused by a restarted client without a request", async () => {
    const { keys } = await device(rig.directory, "dev-f", "sensor-gateway", {});
    const cacheFile = join(dataDir, "agent", "tokens.json");
    const before = rig.requests;
    const a = client(rig, pki, keys, { clientId: "dev-f", scope: "telemetry:write", cacheFile });
    const t1 = await a.getToken();
    await a.close();
    expect((await stat(cacheFile)).mode & 0o777).toBe(0o600);
    const b = client(rig, pki, keys, { clientId: "dev-f", scope: "telemetry:write", cacheFile });
    expect((await b.getToken()).token.reveal()).toBe(t1.token.reveal());
    expect(rig.requests - before).toBe(1);
    await b.close();
    // Without cacheFile nothing is written anywhere near it.
    const c = client(rig, pki, keys, { clientId: "dev-f", scope: "status:read" });
    await c.getToken();
    expect(JSON.parse(await readFile(cacheFile, "utf8"))).not.toHaveProperty("status:read");
    await c.close();
  });

  it("persists the registrar signing key 0600 (same kid after reload) and refuses a group-readable one", async () => {
    const file = join(dataDir, "oauth-signing-key.pem");
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    const again = await loadOrCreateSigningKey(dataDir);
    expect(again.kid).toBe(rig.svc.jwks().keys[0] && (rig.svc.jwks().keys[0] as { kid: string }).kid);
    await chmod(file, 0o640);
    await expect(loadOrCreateSigningKey(dataDir)).rejects.toMatchObject({ code: "ERR_OAUTH_SIGNING_KEY" });
    await chmod(file, 0o600);
  });

  it("retries a 503 after the server's Retry-After (manual clock)", async () => {
    const { keys } = await device(rig.directory, "dev-e", "sensor-gateway", {});
    const c = client(rig, pki, keys, { clientId: "dev-e", scope: "status:read" });
    rig.fail503 = 1;
    const before = rig.requests;
    const p = c.getToken();
    while (rig.clock.pendingSleepers === 0) await new Promise((r) => setTimeout(r, 5));
    await rig.clock.advance(1999); // not before the server's Retry-After
    expect(rig.requests - before).toBe(1);
    await rig.clock.advance(1001); // Retry-After plus at most 50 % jitter (retry policy)
    expect((await p).scope).toBe("status:read");
    expect(rig.requests - before).toBe(2);
    await c.close();
  });

  it("answers errors per RFC 6749 §5.2 with generic descriptions", async () => {
    const res = await fetchInsecure(
      pki,
      `${rig.origin}/oauth2/token`,
      "grant_type=client_credentials&client_id=dev-a",
    );
    expect(res.status).toBe(401);
    expect(res.body).toEqual({ error: "invalid_client", error_description: "client authentication failed" });
    const res2 = await fetchInsecure(pki, `${rig.origin}/oauth2/token`, "grant_type=password");
    expect(res2.body).toMatchObject({ error: "unsupported_grant_type" });
    const big = await fetchInsecure(
      pki,
      `${rig.origin}/oauth2/token`,
      // The cap leaves room for a quote and a measured-boot event log (docs/attestation.md).
      `grant_type=client_credentials&x=${"a".repeat(TOKEN_MAX_BODY_BYTES + 1)}`,
    );
    expect(big.status).toBe(413); // the router refuses oversized bodies before the token service sees them
    const meta = await getJson(pki, `${rig.origin}/.well-known/oauth-authorization-server`);
    expect(meta).toMatchObject({
      issuer: rig.origin,
      token_endpoint: `${rig.origin}/oauth2/token`,
      token_endpoint_auth_methods_supported: ["private_key_jwt"],
      dpop_signing_alg_values_supported: ["ES256", "RS256", "PS256"],
    });
    const jwks = (await getJson(pki, `${rig.origin}/jwks`)) as { keys: { kid: string; d?: string }[] };
    expect(jwks.keys).toHaveLength(1);
    expect(jwks.keys[0]?.d).toBeUndefined();
  });
});

describe("DPoP server nonce (RFC 9449 §8)", () => {
  it("the client retries once with the DPoP-Nonce the server sent", async () => {
    const pki = await makeTestPki();
    const dataDir = await mkdtemp(join(tmpdir(), "m2m-oauth-data-"));
    const rig = await startRig(pki, dataDir, { requireDpopNonce: true, requireDpop: true });
    try {
      const { keys } = await device(rig.directory, "dev-n", "sensor-gateway", {});
      const c = client(rig, pki, keys, { clientId: "dev-n", dpop: true, scope: "telemetry:write" });
      const t = await c.getToken();
      expect(t.tokenType).toBe("DPoP");
      expect(rig.requests).toBe(2); // first refused with use_dpop_nonce, second with the nonce
      c.invalidate();
      await c.getToken(); // remembered nonce: one request
      expect(rig.requests).toBe(3);
      // A Bearer request is refused when DPoP is required.
      const bearer = client(rig, pki, keys, { clientId: "dev-n", scope: "telemetry:write" });
      await expect(bearer.getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_DPOP" });
      await c.close();
      await bearer.close();
    } finally {
      await rig.close();
      await pki.cleanup();
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});

async function fetchInsecure(
  pki: TestPki,
  url: string,
  body: string,
): Promise<{ status: number; body: unknown }> {
  const { Agent, fetch } = await import("undici");
  const dispatcher = new Agent({ connect: { ca: pki.caPem } });
  const r = await fetch(url, {
    method: "POST",
    body,
    headers: { "content-type": "application/x-www-form-urlencoded" },
    dispatcher,
  });
  const out = { status: r.status, body: await r.json() };
  await dispatcher.close();
  return out;
}

async function getJson(pki: TestPki, url: string): Promise<unknown> {
  const { Agent, fetch } = await import("undici");
  const dispatcher = new Agent({ connect: { ca: pki.caPem } });
  const r = await fetch(url, { dispatcher });
  const out = await r.json();
  await dispatcher.close();
  return out;
}
