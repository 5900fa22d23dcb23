import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { JWK } from "jose";
import { decodeJwt, exportJWK, generateKeyPair } from "jose";
import Provider, { errors } from "oidc-provider";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import { DEVICE_CLIENT_METADATA } from "../kit/oidc-client.js";
import { assertBuilt, runCli } from "./daemon-cli-kit.js";
import { makeTestPki, startHttps, type TestPki } from "./oauth-fixtures.js";

/**
 * A third-party authorization server (oidc-provider) configured only through agent.toml, driven by
 * the BUILT `m2m-agent token`: its own CA (`credentials.oauth.ca_file`), RFC 8707 resource indicators
 * (`credentials.oauth.resource`; the AS refuses unknown resources and puts the resource in `aud`),
 * DPoP with server nonces required, private_key_jwt signed in SoftHSM.
 */
const RESOURCE = "https://api.example.com/";
let dir: string;
let hsm: SoftHsmHandle;
let pki: TestPki;
let srv: Awaited<ReturnType<typeof startHttps>>;
let env: NodeJS.ProcessEnv;
let thumbprint: string;

function agentToml(extra: string): string {
  return `[agent]
state_dir = "${join(dir, "state")}"
${softHsmKeysToml(hsm).join("\n")}
[api]
socket = "${join(dir, "api.sock")}"
[credentials.oauth]
issuer = "${srv?.origin ?? "https://127.0.0.1:1"}"
client_id = "gw-3p"
scopes = ["telemetry:write"]
dpop = true
${extra}`;
}

beforeAll(async () => {
  assertBuilt();
  dir = await mkdtemp(join(tmpdir(), "m2m-3p-as-"));
  await mkdir(join(dir, "state"), { mode: 0o700 });
  hsm = await initSoftHsm({ label: "m2m-3p-as" });
  pki = await makeTestPki();
  env = { PATH: process.env.PATH, HOME: dir, ...hsm.env };
  const boot = join(dir, "boot.toml");
  await writeFile(boot, agentToml(""));
  const init = JSON.parse((await runCli(["--config", boot, "--json", "keys", "init"], env)).stdout) as {
    thumbprint: string;
  };
  thumbprint = init.thumbprint;
  const show = JSON.parse((await runCli(["--config", boot, "--json", "keys", "show"], env)).stdout) as {
    publicJwk: JWK;
  };
  let handler: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
  srv = await startHttps(pki, (req, res) => handler?.(req, res));
  const { privateKey } = await generateKeyPair("ES256", { extractable: true });
  const provider = new Provider(srv.origin, {
    clients: [
      {
        client_id: "gw-3p",
        jwks: { keys: [{ ...show.publicJwk, alg: "ES256" }] },
        ...DEVICE_CLIENT_METADATA,
        scope: "telemetry:write",
      },
    ],
    jwks: { keys: [{ ...(await exportJWK(privateKey)), alg: "ES256", use: "sig", kid: "as-1" }] },
    scopes: ["telemetry:write"],
    features: {
      clientCredentials: { enabled: true },
      dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => false,
        getResourceServerInfo: (_ctx, resource) => {
          // Only the one API is known; anything else is refused with invalid_target.
          if (resource !== RESOURCE) throw new errors.InvalidTarget();
          return {
            scope: "telemetry:write",
            audience: RESOURCE,
            accessTokenFormat: "jwt",
            jwt: { sign: { alg: "ES256" } },
          };
        },
      },
    },
  });
  const cb = provider.callback();
  handler = (req, res) => void cb(req, res);
}, 120_000);

afterAll(async () => {
  await srv?.close();
  await hsm?.cleanup();
  await pki?.cleanup();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("m2m-agent token against a third-party AS (oidc-provider), configured through agent.toml", () => {
  it("ca_file + resource: a DPoP-bound JWT whose aud is the resource, nonce challenge answered", async () => {
    const cfg = join(dir, "ok.toml");
    await writeFile(cfg, agentToml(`ca_file = "${pki.caCertFile}"\nresource = ["${RESOURCE}"]\n`));
    const r = await runCli(["--config", cfg, "--json", "token", "--direct"], env);
    expect(r.code, r.stderr).toBe(0);
    const body = JSON.parse(r.stdout) as { access_token: string; token_type: string };
    expect(body.token_type).toBe("DPoP");
    const claims = decodeJwt(body.access_token);
    expect(claims.aud).toBe(RESOURCE);
    expect(claims.client_id).toBe("gw-3p");
    expect((claims.cnf as { jkt?: string } | undefined)?.jkt).toBe(thumbprint);
  });

  it("a resource the AS does not serve is refused (invalid_target), with the AS's code", async () => {
    const cfg = join(dir, "bad-resource.toml");
    await writeFile(
      cfg,
      agentToml(`ca_file = "${pki.caCertFile}"\nresource = ["https://other.example.com/"]\n`),
    );
    const r = await runCli(["--config", cfg, "token", "--direct"], env);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("invalid_target");
  });

  it("without ca_file the AS's private CA is not trusted: ERR_TLS_VERIFY naming the system store, not 'unreachable'", async () => {
    const cfg = join(dir, "no-ca.toml");
    await writeFile(cfg, agentToml(`resource = ["${RESOURCE}"]\n`));
    const r = await runCli(["--config", cfg, "token", "--direct"], env);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("code: ERR_TLS_VERIFY");
    expect(r.stderr).toContain("the system CA store");
    expect(r.stderr).toContain("credentials.oauth.ca_file");
  });
});
