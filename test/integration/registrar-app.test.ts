import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { revokeAtRegistrar } from "../../src/cli/agent/decommission.js";
import { systemClock } from "../../src/core/clock.js";
import { defaultRetryPolicy } from "../../src/core/retry.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { type EnrolmentState, runEnroll } from "../../src/enroll/index.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { signCompactJws } from "../../src/keys/jws.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import {
  APP_PATHS,
  appSettingsFrom,
  type RunningRegistrarApp,
  startRegistrarApp,
} from "../../src/registrar/app.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { type RegistrarConfig, registrarConfigFrom } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";

/**
 * `m2m-registrar serve`'s composition (src/registrar/app.ts) in process: late-bound issuer on
 * port 0, what enrolment tells devices, RBAC/ABAC from config, and the self-revocation route under
 * attack (another device's key, wrong audience, expired, replayed, unauthenticated).
 */
describe("registrar app: token service + EST + ingest + self-revocation from config", () => {
  let dir: string;
  let store: SqliteRegistrarStore;
  let app: RunningRegistrarApp;
  let caPem: string;
  let dispatcher: Agent;
  const devices: { keys: FakeKeyProvider; state: EnrolmentState }[] = [];

  const raw = (
    extra: Record<string, unknown>,
    paths: { serverCert: string; serverKey: string; dir: string },
  ) => ({
    listen: { host: "127.0.0.1", port: 0 },
    tls: { cert: paths.serverCert, key: paths.serverKey },
    data_dir: join(dir, "data"),
    ca_dir: paths.dir,
    ...extra,
  });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-registrar-app-"));
    const paths = await initCa({ dir: join(dir, "ca") });
    const config = registrarConfigFrom(
      raw(
        {
          oauth: {
            access_token_ttl: "2m",
            roles: { sensor: ["telemetry:write"] },
            rules: [{ scope: "site:{site}:read", roles: ["sensor"], require: { tier: "gold" } }],
          },
          ingest: { audience: "urn:test:ingest" },
        },
        paths,
      ),
      dir,
      "registrar.toml",
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir) });
    caPem = await readFile(caPaths(paths.dir).caCert, "utf8");
    dispatcher = new Agent({ connect: { ca: caPem } });
    await addEnrolmentGroup(store, {
      name: "gold",
      role: "sensor",
      attributes: { site: "s7", tier: "gold" },
      methods: ["pkcs11"],
    });
    await addEnrolmentGroup(store, {
      name: "plain",
      role: "sensor",
      attributes: { site: "s8" },
      methods: ["pkcs11"],
    });
    for (const group of ["gold", "plain", "gold"]) {
      const keys = new FakeKeyProvider({ label: `dev-${devices.length}` });
      await keys.createOrOpen();
      const { token } = await createBootstrapToken(store, group, 600);
      const out = await runEnroll(
        {
          registrarUrl: app.url,
          registrarCaFile: caPaths(paths.dir).caCert,
          method: "pkcs11",
          bootstrapToken: { env: "T" },
          stateDir: join(dir, `state-${devices.length}`),
        },
        { keyProvider: keys, env: { T: token.reveal() } },
      );
      devices.push({ keys, state: out.state });
    }
  });

  afterAll(async () => {
    await dispatcher?.close();
    await app?.close();
    await store?.close();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const post = async (path: string, form: Record<string, string>) => {
    const res = await fetch(`${app.issuer}${path}`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams(form).toString(),
      dispatcher,
    });
    return { status: res.status, json: (await res.json()) as Record<string, unknown> };
  };
  const assertion = async (
    signer: FakeKeyProvider,
    claims: { sub: string; aud: string; exp?: number; iat?: number },
  ): Promise<string> => {
    const now = Math.floor(Date.now() / 1000);
    return signCompactJws(
      signer,
      await signer.open(),
      { typ: "JWT" },
      {
        iss: claims.sub,
        sub: claims.sub,
        aud: claims.aud,
        jti: randomBytes(12).toString("hex"),
        iat: claims.iat ?? now,
        exp: claims.exp ?? now + 60,
      },
    );
  };
  const revokeForm = (clientId: string, jwt: string) => ({
    client_id: clientId,
    client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    client_assertion: jwt,
  });
  const tokenFor = (d: { keys: FakeKeyProvider; state: EnrolmentState }) =>
    new OAuthClient(
      { clientId: d.state.deviceId, issuer: app.issuer, scope: "", dpop: true, caPem },
      { keys: d.keys, clock: systemClock, retry: { ...defaultRetryPolicy, maxAttempts: 1 } },
    );

  it("binds the issuer after listening (port 0) and tells enrolled devices where every service is", async () => {
    expect(app.issuer).toBe(app.url);
    const ep = devices[0]?.state.endpoints;
    expect(ep).toEqual({
      registrar: app.url,
      token: `${app.url}${APP_PATHS.token}`,
      est: `${app.url}/.well-known/est`,
      ingest: `${app.url}${APP_PATHS.ingest}`,
    });
    const meta = await (
      await fetch(`${app.issuer}/.well-known/oauth-authorization-server`, { dispatcher })
    ).json();
    expect(meta).toMatchObject({
      issuer: app.issuer,
      token_endpoint: ep?.token,
      jwks_uri: `${app.issuer}/jwks`,
    });
  });

  it("issues least-privilege scopes from config (RBAC + ABAC) via discovery, DPoP-bound, for the configured audiences", async () => {
    const [gold, plain] = devices;
    if (gold === undefined || plain === undefined) throw new Error("setup");
    const g = await tokenFor(gold).getToken();
    const p = await tokenFor(plain).getToken();
    expect(g.tokenType).toBe("DPoP");
    expect(g.scope.split(" ").sort()).toEqual(["site:s7:read", "telemetry:write"]);
    expect(p.scope).toBe("telemetry:write");
    const claims = JSON.parse(Buffer.from(g.token.reveal().split(".")[1] ?? "", "base64url").toString()) as {
      aud: string[];
      exp: number;
      iat: number;
    };
    expect(claims.aud).toEqual(["urn:test:ingest", "urn:m2m:est"]);
    expect(claims.exp - claims.iat).toBe(120);
  });

  it("self-revocation refuses another device's key, a wrong audience, an expired or missing assertion; nothing changes", async () => {
    const [victim, attacker] = devices;
    if (victim === undefined || attacker === undefined) throw new Error("setup");
    const url = `${app.issuer}${APP_PATHS.selfRevoke}`;
    const id = victim.state.deviceId;
    const cases: [string, Record<string, string>][] = [
      ["another device's key", revokeForm(id, await assertion(attacker.keys, { sub: id, aud: url }))],
      [
        "token endpoint audience",
        revokeForm(id, await assertion(victim.keys, { sub: id, aud: `${app.issuer}/oauth2/token` })),
      ],
      [
        "expired",
        revokeForm(id, await assertion(victim.keys, { sub: id, aud: url, iat: 1_000_000, exp: 1_000_060 })),
      ],
      ["no assertion", { client_id: id }],
      [
        "client_id of someone else",
        revokeForm(attacker.state.deviceId, await assertion(victim.keys, { sub: id, aud: url })),
      ],
    ];
    for (const [name, form] of cases) {
      const r = await post(APP_PATHS.selfRevoke, form);
      expect(r.status, name).toBe(401);
      expect(r.json, name).toEqual({
        v: 1,
        error: { code: "ERR_UNAUTHENTICATED", message: expect.any(String) },
      });
    }
    expect((await store.getDevice(id))?.status).toBe("active");
    expect((await store.getDevice(attacker.state.deviceId))?.status).toBe("active");
  });

  it("a device revokes itself with its own key; afterwards its token requests get invalid_client and a replay is refused", async () => {
    const d = devices[2];
    if (d === undefined) throw new Error("setup");
    const url = `${app.issuer}${APP_PATHS.selfRevoke}`;
    const jwt = await assertion(d.keys, { sub: d.state.deviceId, aud: url });
    const ok = await post(APP_PATHS.selfRevoke, revokeForm(d.state.deviceId, jwt));
    expect(ok.status).toBe(200);
    expect(ok.json).toMatchObject({ deviceId: d.state.deviceId, status: "revoked" });
    // The answer comes after the CRL lists the device's certificate (docs/revocation.md).
    const serial = (await store.getDevice(d.state.deviceId))?.certSerial ?? "";
    expect(app.crl.current?.serials).toContain(serial);
    expect((await post(APP_PATHS.selfRevoke, revokeForm(d.state.deviceId, jwt))).status).toBe(401);
    await expect(tokenFor(d).getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_CLIENT_REVOKED" });
    // The CLI's client path (decommission) against a revoked device: a coded refusal.
    await expect(revokeAtRegistrar(d.state, d.keys, caPem)).rejects.toMatchObject({
      code: "ERR_DECOMMISSION_REFUSED",
    });
    // The others are untouched.
    expect((await store.getDevice(devices[0]?.state.deviceId ?? ""))?.status).toBe("active");
  });

  it("config errors name the file and key, never the value", async () => {
    const bad = (sections: Record<string, unknown>) => () =>
      appSettingsFrom({
        dataDir: dir,
        publicUrl: undefined,
        sections: { file: "registrar.toml", ...sections },
      } as unknown as RegistrarConfig);
    expect(bad({ oauth: { access_token_ttl: "3d" } })).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        details: { file: "registrar.toml", key: "oauth.access_token_ttl" },
      }),
    );
    expect(bad({ oauth: { rolez: {} } })).toThrow(expect.objectContaining({ code: "ERR_CONFIG_INVALID" }));
    expect(bad({ oauth: { roles: { gw: ["bad scope"] } } })).toThrow(
      expect.objectContaining({ details: { file: "registrar.toml", key: "oauth.roles.gw.0" } }),
    );
    expect(bad({ ingest: { require_dpop: "yes-please" } })).toThrow(
      expect.objectContaining({ details: { file: "registrar.toml", key: "ingest.require_dpop" } }),
    );
    expect(bad({ ingest: { audience: "" } })).toThrow(/'ingest\.audience'/);
  });
});
