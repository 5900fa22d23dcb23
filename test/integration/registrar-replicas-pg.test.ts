import { randomUUID } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SignJWT } from "jose";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type PostgresHandle, startPostgres } from "../../hw/postgres.js";
import { type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { generateSigningKeyPem, writeNewKeyFile } from "../../src/registrar/oauth/signing-key.js";
import { openRegistrarStore, type RegistrarStore } from "../../src/registrar/store/index.js";
import { type DevicePrivateKey, registerTokenDevice } from "../kit/registered-device.js";

/**
 * Two registrar replicas (full app, HTTPS on loopback) on one real PostgreSQL, sharing the fleet CA
 * and the token signing keys from files, caught in the middle of a signing-key rollover: a jti used at
 * one is refused at the other, both publish the same key set and hand out the same DPoP nonce, a token
 * signed by either verifies at both, and a revocation made by the operator is honoured by the replica
 * that had the device cached within its 1 s bound.
 */
describe("registrar replicas on PostgreSQL", () => {
  let dir: string;
  let pgh: PostgresHandle;
  const replicas: { app: RunningRegistrarApp; store: RegistrarStore }[] = [];
  let operator: RegistrarStore;
  let dispatcher: Agent;
  let privateKey: DevicePrivateKey;
  const deviceId = "dev-replica-1";

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-replicas-"));
    pgh = await startPostgres({ durable: false });
    const paths = await initCa({ dir: join(dir, "ca") });
    // Mid-rollover: replica 0 signs with key 1, replica 1 already with key 2; both publish both.
    const keyFiles = [join(dir, "signing-1.pem"), join(dir, "signing-2.pem")];
    for (const f of keyFiles) await writeNewKeyFile(f, generateSigningKeyPem());
    for (const i of [0, 1]) {
      const config = registrarConfigFrom(
        {
          listen: { host: "127.0.0.1", port: 0 },
          tls: { cert: paths.serverCert, key: paths.serverKey },
          data_dir: join(dir, `data-${i}`),
          ca_dir: paths.dir,
          // One issuer for the fleet (what a load balancer in front would be).
          public_url: "https://registrar.test",
          store: { url: pgh.url },
          keys: { signing_key: keyFiles[i], published_keys: [keyFiles[1 - i]] },
          oauth: { require_dpop_nonce: true },
        },
        dir,
        "registrar.toml",
      );
      const store = await openRegistrarStore(config);
      const app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir) });
      replicas.push({ app, store });
    }
    operator = await openRegistrarStore(
      registrarConfigFrom(
        { data_dir: join(dir, "op"), tls: { insecure_http: true }, store: { url: pgh.url } },
        dir,
      ),
    );
    dispatcher = new Agent({ connect: { ca: await readFile(caPaths(paths.dir).caCert, "utf8") } });
    await operator.addGroup({
      name: "gw",
      role: "gateway",
      attributes: {},
      methods: ["pkcs11"],
      ekAllow: [],
      createdAt: new Date(),
    });
    privateKey = await registerTokenDevice(operator, {
      deviceId,
      group: "gw",
      role: "gateway",
      hardwareSerial: "SN-R",
    });
  });

  afterAll(async () => {
    for (const r of replicas) {
      await r.app.close();
      await r.store.close();
    }
    await operator?.close();
    await dispatcher?.close();
    await pgh?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const assertion = (): Promise<string> =>
    new SignJWT({})
      .setProtectedHeader({ alg: "ES256", typ: "JWT" })
      .setIssuer(deviceId)
      .setSubject(deviceId)
      .setAudience("https://registrar.test/oauth2/token")
      .setIssuedAt()
      .setExpirationTime("60s")
      .setJti(randomUUID())
      .sign(privateKey);

  const token = async (i: number, jwt: string) => {
    const res = await fetch(`${replicas[i]?.app.url}/oauth2/token`, {
      method: "POST",
      dispatcher,
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "client_credentials",
        client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion: jwt,
      }).toString(),
    });
    return {
      status: res.status,
      nonce: res.headers.get("dpop-nonce"),
      body: (await res.json()) as Record<string, unknown>,
    };
  };

  it("one assertion is accepted once across replicas; same JWKS key set and DPoP nonces at both; tokens verify across the rollover", async () => {
    const captured = await assertion();
    const a = await token(0, captured);
    expect(a.status, JSON.stringify(a.body)).toBe(200);
    const b = await token(1, captured);
    expect(b.status).toBe(401);
    expect(b.body.error).toBe("invalid_client");
    // A nonce minted by either replica is accepted by both (one shared HMAC key in the store).
    expect(a.nonce).not.toBeNull();
    expect(b.nonce).toBe(a.nonce);
    const jwks = await Promise.all(
      [0, 1].map(async (i) => (await fetch(`${replicas[i]?.app.url}/jwks`, { dispatcher })).json()),
    );
    const kids = (j: unknown) => (j as { keys: { kid: string }[] }).keys.map((k) => k.kid).sort();
    expect(kids(jwks[0])).toHaveLength(2);
    expect(kids(jwks[1])).toEqual(kids(jwks[0]));
    const fromB = await token(1, await assertion());
    expect(fromB.status).toBe(200);
    const accessA = String(a.body.access_token);
    const accessB = String(fromB.body.access_token);
    const header = (t: string) =>
      JSON.parse(Buffer.from(t.split(".")[0] ?? "", "base64url").toString()) as { kid: string };
    expect(header(accessA).kid).not.toBe(header(accessB).kid);
    // Each replica accepts the other's token (signed by the other key of the set).
    for (const [i, t] of [
      [0, accessB],
      [1, accessA],
    ] as const) {
      const v = await replicas[i]?.app.tokenService.verifyAccessToken(t, { audience: "urn:m2m:est" });
      expect(v?.sub).toBe(deviceId);
    }
  });

  it("an operator revocation is honoured by a replica holding the device in its cache within 1 s", async () => {
    // Replica 1 looked the device up moments ago (cached); the operator revokes through the database.
    expect((await token(1, await assertion())).status).toBe(200);
    await operator.revokeDevice(deviceId, new Date());
    const t0 = performance.now();
    let refusedAfter: number | undefined;
    while (performance.now() - t0 < 2000) {
      if ((await token(1, await assertion())).status === 401) {
        refusedAfter = performance.now() - t0;
        break;
      }
    }
    expect(refusedAfter).toBeDefined();
    expect(refusedAfter ?? Number.POSITIVE_INFINITY).toBeLessThan(1000);
    // The other replica too, within the same bound (its notification may land a moment later).
    let refusedAtOther = false;
    while (!refusedAtOther && performance.now() - t0 < 1000) {
      refusedAtOther = (await token(0, await assertion())).status === 401;
    }
    expect(refusedAtOther).toBe(true);
  });
});
