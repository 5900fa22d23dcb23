import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import { ApiServer } from "../../src/api/server.js";
import { register } from "../../src/cli/agent/token.js";
import { systemClock } from "../../src/core/clock.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { tokenRoutes } from "../../src/credentials/oauth/token-routes.js";
import { writeEnrolmentState } from "../../src/enroll/state.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { loadOrCreateSigningKey } from "../../src/registrar/oauth/signing-key.js";
import { oauthRoutes, TokenService } from "../../src/registrar/oauth/token-service.js";
import { makeTestPki, mountRoutes, startHttps, type TestPki } from "./oauth-fixtures.js";

/** Local use: `GET /v1/token` on the agent's Unix-socket API and `m2m-agent token`. */
describe("tokens for co-located programs", () => {
  let pki: TestPki;
  let dir: string;
  let hsm: SoftHsmHandle;
  let srv: Awaited<ReturnType<typeof startHttps>>;
  let svc: TokenService;
  let api: ApiServer;
  let client: OAuthClient;
  const directory = new InMemoryDeviceDirectory();

  beforeAll(async () => {
    pki = await makeTestPki();
    dir = await mkdtemp(join(tmpdir(), "m2m-oauth-local-"));
    hsm = await initSoftHsm({ label: "m2m-cli" });
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    const handler: { h?: ReturnType<typeof mountRoutes> } = {};
    srv = await startHttps(pki, (req, res) => handler.h?.(req, res));
    svc = new TokenService(
      {
        issuer: srv.origin,
        audiences: ["https://api.example"],
        scopes: { roles: { gw: ["telemetry:write", "status:read"] } },
      },
      { directory, signingKey: await loadOrCreateSigningKey(join(dir, "registrar")), clock: systemClock },
    );
    handler.h = mountRoutes(oauthRoutes({ tokenService: svc }));
    // The daemon side: an OAuthClient behind the local API.
    const keys = new FakeKeyProvider({ label: "api" });
    const info = await keys.createOrOpen();
    directory.put({
      deviceId: "api-1",
      status: "active",
      role: "gw",
      attributes: {},
      publicJwk: info.publicJwk,
      group: "g",
    });
    client = new OAuthClient(
      { clientId: "api-1", issuer: srv.origin, caPem: pki.caPem, dpop: true, scope: "telemetry:write" },
      { keys, clock: systemClock },
    );
    api = new ApiServer({ socketPath: join(dir, "api.sock") });
    const signer = await client.dpopSigner();
    for (const r of tokenRoutes(client, {
      allowScopes: ["telemetry:write", "status:read"],
      ...(signer === undefined ? {} : { dpop: signer }),
    })) {
      api.route(r.method, r.path, r.handler);
    }
    await api.listen();
  });
  afterAll(async () => {
    await api?.close();
    await client?.close();
    await srv?.close();
    await hsm?.cleanup();
    await pki?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  function get(path: string): Promise<{ status: number; body: Record<string, unknown> }> {
    return new Promise((resolve, reject) => {
      const req = request({ socketPath: join(dir, "api.sock"), path, method: "GET" }, (res) => {
        let data = "";
        res.on("data", (c: Buffer) => {
          data += c.toString();
        });
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(data) as Record<string, unknown> }),
        );
      });
      req.on("error", reject);
      req.end();
    });
  }

  it("GET /v1/token returns a DPoP-bound token and a proof the resource server accepts", async () => {
    const url = "https://api.example/v1/things";
    const r = await get(`/v1/token?scope=telemetry:write&htm=POST&htu=${encodeURIComponent(url)}`);
    expect(r.status).toBe(200);
    expect(r.body).toMatchObject({ token_type: "DPoP", scope: "telemetry:write" });
    const v = await svc.verifyAccessToken(String(r.body.access_token), {
      audience: "https://api.example",
      requiredScope: "telemetry:write",
      dpop: { proof: String(r.body.dpop_proof), method: "POST", url },
    });
    expect(v.sub).toBe("api-1");
    const denied = await get("/v1/token?scope=admin");
    expect(denied.status).toBe(403);
    expect(denied.body).toMatchObject({ error: { code: "ERR_API_TOKEN_SCOPE" } });
  });

  async function runCli(args: string[]): Promise<{ stdout: string; code: number | undefined }> {
    const program = new Command("m2m-agent").option("--config <file>").option("--json").exitOverride();
    register(program);
    let stdout = "";
    const spy = vi.spyOn(process.stdout, "write").mockImplementation((chunk: string | Uint8Array) => {
      stdout += chunk.toString();
      return true;
    });
    const errSpy = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    try {
      process.exitCode = undefined;
      await program.parseAsync(["node", "m2m-agent", ...args]);
      return { stdout, code: process.exitCode };
    } finally {
      spy.mockRestore();
      errSpy.mockRestore();
      process.exitCode = undefined;
    }
  }

  it("`m2m-agent token` asks the running agent over the socket", async () => {
    const cfg = join(dir, "agent-api.toml");
    await writeFile(
      cfg,
      `[agent]\nstate_dir = "${join(dir, "state-api")}"\n[api]\nsocket = "${join(dir, "api.sock")}"\n`,
    );
    const out = await runCli(["--config", cfg, "token", "--scope", "status:read"]);
    expect(out.code ?? 0).toBe(0);
    const jwt = out.stdout.trim().split("\n")[0] ?? "";
    expect(decodeJwt(jwt)).toMatchObject({ sub: "api-1", scope: "status:read" });
  });

  it("`m2m-agent token --direct --dpop --json` signs with the SoftHSM key itself (no agent running)", async () => {
    const keys = new Pkcs11KeyProvider({
      modulePath: hsm.modulePath,
      tokenLabel: hsm.tokenLabel,
      pin: { file: hsm.pinFile },
    });
    const info = await keys.createOrOpen();
    await keys.close();
    directory.put({
      deviceId: "cli-1",
      status: "active",
      role: "gw",
      attributes: {},
      publicJwk: info.publicJwk,
      group: "g",
    });
    const stateDir = join(dir, "state-cli");
    await writeEnrolmentState(stateDir, {
      v: 1,
      deviceId: "cli-1",
      method: "pkcs11",
      role: "gw",
      attributes: {},
      certificatePem: pki.caPem,
      caChainPem: [pki.caPem],
      endpoints: {
        registrar: srv.origin,
        token: `${srv.origin}/oauth2/token`,
        est: `${srv.origin}/.well-known/est`,
      },
      keyRef: info.ref,
      keyThumbprint: info.thumbprint,
      registrarUrl: srv.origin,
      enrolledAt: new Date().toISOString(),
    });
    const cfg = join(dir, "agent-cli.toml");
    await writeFile(
      cfg,
      [
        "[agent]",
        `state_dir = "${stateDir}"`,
        ...softHsmKeysToml(hsm),
        "[credentials.oauth]",
        `issuer = "${srv.origin}"`,
        'scopes = ["telemetry:write"]',
        "[api]",
        `socket = "${join(dir, "nobody-listens.sock")}"`,
        "",
      ].join("\n"),
    );
    const url = "https://api.example/v1/x";
    const out = await runCli([
      "--config",
      cfg,
      "--json",
      "token",
      "--direct",
      "--dpop",
      "--htm",
      "GET",
      "--htu",
      url,
    ]);
    expect(out.code ?? 0).toBe(0);
    const body = JSON.parse(out.stdout) as { access_token: string; token_type: string; dpop_proof: string };
    expect(body.token_type).toBe("DPoP");
    const v = await svc.verifyAccessToken(body.access_token, {
      audience: "https://api.example",
      dpop: { proof: body.dpop_proof, method: "GET", url },
    });
    expect(v.jkt).toBe(info.thumbprint);
    expect(v.sub).toBe("cli-1");
  });
});
