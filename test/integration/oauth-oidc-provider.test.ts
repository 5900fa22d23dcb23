import { randomBytes } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { JWK } from "jose";
import { exportJWK, generateKeyPair } from "jose";
import Provider from "oidc-provider";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { systemClock } from "../../src/core/clock.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { DEVICE_CLIENT_METADATA } from "../kit/oidc-client.js";
import { makeTestPki, startHttps, type TestPki } from "./oauth-fixtures.js";

/**
 * The agent against an INDEPENDENT authorization server (oidc-provider): no code in the client is
 * specific to it; it is found through its OpenID discovery document, authenticates with
 * private_key_jwt signed by the device key, and binds the token with DPoP (server nonces required).
 */
describe("agent OAuthClient against oidc-provider (independent AS)", () => {
  let pki: TestPki;
  let srv: Awaited<ReturnType<typeof startHttps>>;
  let hsm: SoftHsmHandle;
  let tpm: SwtpmHandle;
  const fakeStore = new FakeKeyStore();
  const clients: { client_id: string; jwks: { keys: JWK[] } }[] = [];
  let provider: Provider | undefined;

  beforeAll(async () => {
    pki = await makeTestPki();
    hsm = await initSoftHsm({ label: "m2m-oauth" });
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    tpm = await startSwtpm();
  });
  afterAll(async () => {
    await srv?.close();
    await tpm?.stop();
    await hsm?.cleanup();
    await pki?.cleanup();
  });

  async function startProvider(): Promise<string> {
    let handler: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
    srv = await startHttps(pki, (req, res) => handler?.(req, res));
    const { privateKey } = await generateKeyPair("ES256", { extractable: true });
    provider = new Provider(srv.origin, {
      clients: clients.map((c) => ({
        ...c,
        ...DEVICE_CLIENT_METADATA,
        scope: "telemetry:write status:read",
      })),
      jwks: { keys: [{ ...(await exportJWK(privateKey)), alg: "ES256", use: "sig", kid: "as-1" }] },
      scopes: ["telemetry:write", "status:read"],
      features: {
        clientCredentials: { enabled: true },
        dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => true },
        devInteractions: { enabled: false },
      },
    });
    const cb = provider.callback();
    handler = (req, res) => void cb(req, res);
    return srv.origin;
  }

  const devices: { name: string; make: () => Promise<KeyProvider> }[] = [
    { name: "fake", make: async () => new FakeKeyProvider({ label: "oidc", store: fakeStore }) },
    {
      name: "pkcs11 (SoftHSM)",
      make: async () =>
        new Pkcs11KeyProvider({
          modulePath: hsm.modulePath,
          tokenLabel: hsm.tokenLabel,
          pin: { file: hsm.pinFile },
        }),
    },
    { name: "tpm (swtpm)", make: async () => new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 }) },
  ];
  const made = new Map<string, KeyProvider>();

  it("registers each device key as a private_key_jwt client and starts the provider", async () => {
    for (const d of devices) {
      const keys = await d.make();
      const info = await keys.createOrOpen();
      made.set(d.name, keys);
      clients.push({
        client_id: `gw-${d.name.split(" ")[0]}`,
        jwks: { keys: [{ ...info.publicJwk, alg: "ES256" }] },
      });
    }
    expect(await startProvider()).toMatch(/^https:\/\/127\.0\.0\.1:/);
  });

  for (const d of devices) {
    it(`obtains a DPoP-bound token with a ${d.name} key via OpenID discovery (nonce retry included)`, async () => {
      const keys = made.get(d.name);
      if (keys === undefined) throw new Error("provider not created");
      const c = new OAuthClient(
        {
          clientId: `gw-${d.name.split(" ")[0]}`,
          issuer: srv.origin,
          caPem: pki.caPem,
          dpop: true,
          scope: "telemetry:write",
        },
        { keys, clock: systemClock },
      );
      const t = await c.getToken();
      expect(t.tokenType).toBe("DPoP");
      expect(t.scope).toBe("telemetry:write");
      expect(t.token.length).toBeGreaterThan(20);
      // The token really is bound to the hardware key: introspect via the provider's own model.
      const at = await provider?.ClientCredentials.find(t.token.reveal());
      expect(at?.jkt).toBe((await keys.open()).thumbprint);
      expect(at?.clientId).toBe(`gw-${d.name.split(" ")[0]}`);
      await c.close();
      await keys.close();
    });
  }

  it("gets a Bearer token without DPoP, and is refused as a client with an unregistered key", async () => {
    const keys = new FakeKeyProvider({ label: "oidc", store: fakeStore });
    const c = new OAuthClient(
      { clientId: "gw-fake", issuer: srv.origin, caPem: pki.caPem, scope: "status:read" },
      { keys, clock: systemClock },
    );
    const t = await c.getToken();
    expect(t.tokenType).toBe("Bearer");
    const stranger = new FakeKeyProvider({ label: "stranger" });
    await stranger.createOrOpen();
    const bad = new OAuthClient(
      { clientId: "gw-fake", issuer: srv.origin, caPem: pki.caPem },
      { keys: stranger, clock: systemClock },
    );
    await expect(bad.getToken()).rejects.toMatchObject({
      code: "ERR_OAUTH_CLIENT_REVOKED",
      retry: "permanent",
    });
    expect(bad.health()).toMatchObject({ ok: false, code: "ERR_OAUTH_CLIENT_REVOKED" });
    await c.close();
    await bad.close();
  });
});
