import type { IncomingMessage, ServerResponse } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { systemClock } from "../../src/core/clock.js";
import { OAuthClient, type OAuthClientConfig } from "../../src/credentials/oauth/client.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { makeTestPki, startHttps, type TestPki } from "./oauth-fixtures.js";

/**
 * The agent's OAuth client against a hostile or broken authorization server: every misbehaviour is
 * refused with a coded error, credentials never follow a redirect, responses are size-capped, and
 * nothing retries forever.
 */
describe("OAuthClient against a hostile authorization server", () => {
  let pki: TestPki;
  let srv: Awaited<ReturnType<typeof startHttps>>;
  let behaviour: (req: IncomingMessage, res: ServerResponse, body: string) => void = () => undefined;
  const seen: { path: string; body: string }[] = [];
  const keys = new FakeKeyProvider({ label: "hostile" });
  // Real clock: the retry policy below waits at most 1 ms between attempts.
  const clock = systemClock;

  beforeAll(async () => {
    pki = await makeTestPki();
    await keys.createOrOpen();
    srv = await startHttps(pki, (req, res) => {
      let body = "";
      req.on("data", (c: Buffer) => {
        body += c.toString();
      });
      req.on("end", () => {
        seen.push({ path: req.url ?? "", body });
        behaviour(req, res, body);
      });
    });
  });
  afterAll(async () => {
    await srv?.close();
    await pki?.cleanup();
  });

  const json = (res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) => {
    res.writeHead(status, { "content-type": "application/json", ...headers });
    res.end(JSON.stringify(body));
  };
  const client = (cfg: Partial<OAuthClientConfig> = {}) =>
    new OAuthClient(
      { clientId: "dev", tokenEndpoint: `${srv.origin}/token`, caPem: pki.caPem, ...cfg },
      {
        keys,
        clock,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 10_000, maxAttempts: 3, maxRetryAfterMs: 1 },
      },
    );

  it("sends a well-formed RFC 7523 assertion (iss = sub = client_id, aud = token endpoint, exp ≤ 60 s, jti)", async () => {
    behaviour = (_req, res) => json(res, 200, { access_token: "at", token_type: "Bearer", expires_in: 60 });
    seen.length = 0;
    await client().getToken();
    const form = new URLSearchParams(seen[0]?.body ?? "");
    expect(form.get("grant_type")).toBe("client_credentials");
    expect(form.get("client_assertion_type")).toBe("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    const [h, p] = (form.get("client_assertion") ?? "").split(".");
    const header = JSON.parse(Buffer.from(h ?? "", "base64url").toString()) as Record<string, unknown>;
    const claims = JSON.parse(Buffer.from(p ?? "", "base64url").toString()) as Record<
      string,
      number | string
    >;
    expect(header.alg).toBe("ES256");
    expect(header.jwk).toBeUndefined();
    expect(claims).toMatchObject({ iss: "dev", sub: "dev", aud: `${srv.origin}/token` });
    expect(Number(claims.exp) - Number(claims.iat)).toBeLessThanOrEqual(60);
    expect(String(claims.jti).length).toBeGreaterThanOrEqual(16);
  });

  it("does not follow a redirect (credentials never go to another origin)", async () => {
    behaviour = (_req, res) => {
      res.writeHead(307, { location: "https://evil.example/token" });
      res.end();
    };
    seen.length = 0;
    await expect(client().getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_TOKEN_RESPONSE" });
    expect(seen.every((s) => s.path === "/token")).toBe(true);
  });

  it("caps the response size", async () => {
    behaviour = (_req, res) => json(res, 200, { access_token: "x".repeat(200_000), token_type: "Bearer" });
    await expect(client().getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_RESPONSE_TOO_LARGE" });
  });

  it("refuses a Bearer token when it asked for DPoP (binding silently dropped)", async () => {
    behaviour = (_req, res) => json(res, 200, { access_token: "at", token_type: "Bearer", expires_in: 60 });
    await expect(client({ dpop: true }).getToken()).rejects.toMatchObject({
      code: "ERR_OAUTH_DPOP_NOT_BOUND",
    });
  });

  it("retries use_dpop_nonce exactly once, then gives up with a coded error", async () => {
    seen.length = 0;
    behaviour = (_req, res) =>
      json(res, 400, { error: "use_dpop_nonce" }, { "dpop-nonce": `n-${seen.length}` });
    await expect(client({ dpop: true }).getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_DPOP" });
    expect(seen).toHaveLength(2);
  });

  it("gives up on persistent 5xx after the policy's attempts, and reports it in health", async () => {
    seen.length = 0;
    behaviour = (_req, res) => json(res, 503, { error: "temporarily_unavailable" });
    const c = client();
    await expect(c.getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_TOKEN", retry: "transient" });
    expect(seen).toHaveLength(3);
    expect(c.health()).toMatchObject({ ok: false, code: "ERR_OAUTH_TOKEN" });
  });

  it("refuses discovery metadata whose issuer is not the configured one", async () => {
    behaviour = (req, res) => {
      if (req.url?.startsWith("/.well-known/"))
        json(res, 200, { issuer: "https://evil.example", token_endpoint: `${srv.origin}/token` });
      else json(res, 200, { access_token: "at", token_type: "Bearer" });
    };
    const c = new OAuthClient({ clientId: "dev", issuer: srv.origin, caPem: pki.caPem }, { keys, clock });
    await expect(c.getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_DISCOVERY", retry: "permanent" });
  });

  it("refuses a server whose TLS certificate does not chain to the configured anchor", async () => {
    const other = await makeTestPki();
    try {
      behaviour = (_req, res) => json(res, 200, { access_token: "at", token_type: "Bearer" });
      seen.length = 0;
      // Named as a TLS verification failure with the host, never "token endpoint unreachable" (issue 12).
      const err = await client({ caPem: other.caPem })
        .getToken()
        .then(
          () => undefined,
          (e: unknown) => e as { code: string; message: string },
        );
      expect(err).toMatchObject({ code: "ERR_TLS_VERIFY" });
      expect(err?.message).toMatch(
        /^TLS verification of 127\.0\.0\.1:\d+ failed: .*trusted: the configured CA$/,
      );
      expect(seen).toHaveLength(0);
    } finally {
      await other.cleanup();
    }
  });
});
