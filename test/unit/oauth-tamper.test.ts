import { createHmac, generateKeyPairSync, type KeyObject, sign as nodeSign } from "node:crypto";
import { base64url, calculateJwkThumbprint, type JWK } from "jose";
import { beforeEach, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { verifyClientAssertion } from "../../src/registrar/oauth/client-assertion.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { oauthErrorOf } from "../../src/registrar/oauth/errors.js";
import { ReplayCache } from "../../src/registrar/oauth/replay-cache.js";
import { signingKeyFromPem } from "../../src/registrar/oauth/signing-key.js";
import { TokenService } from "../../src/registrar/oauth/token-service.js";

const ISSUER = "https://registrar.test";
const TOKEN_URL = `${ISSUER}/oauth2/token`;

type Signer = KeyObject | "none" | { hmac: Buffer };

/** Builds any compact JWS, including ones a correct library would refuse to make. */
function jws(header: Record<string, unknown>, payload: Record<string, unknown>, key: Signer): string {
  const input = `${base64url.encode(JSON.stringify(header))}.${base64url.encode(JSON.stringify(payload))}`;
  if (key === "none") return `${input}.`;
  if ("hmac" in key)
    return `${input}.${base64url.encode(createHmac("sha256", key.hmac).update(input).digest())}`;
  const sig =
    key.asymmetricKeyType === "ec"
      ? nodeSign("sha256", Buffer.from(input), { key, dsaEncoding: "ieee-p1363" })
      : nodeSign("sha256", Buffer.from(input), key);
  return `${input}.${base64url.encode(sig)}`;
}

function ecPair() {
  const pair = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const full = pair.publicKey.export({ format: "jwk" }) as JWK;
  return { ...pair, jwk: { kty: "EC", crv: "P-256", x: full.x, y: full.y } as JWK };
}

const device = ecPair();
const attacker = ecPair();

describe("client assertion tamper table (RFC 7523, server side)", () => {
  let clock: ManualClock;
  let directory: InMemoryDeviceDirectory;
  let replay: ReplayCache;
  let now: number;
  let n = 0;

  beforeEach(() => {
    clock = new ManualClock(new Date("2026-03-01T12:00:00Z"));
    now = clock.nowSeconds();
    directory = new InMemoryDeviceDirectory();
    directory.put({
      deviceId: "dev-1",
      status: "active",
      role: "r",
      attributes: {},
      publicJwk: device.jwk,
      group: "g",
    });
    directory.put({
      deviceId: "dev-rev",
      status: "revoked",
      role: "r",
      attributes: {},
      publicJwk: device.jwk,
      group: "g",
    });
    replay = new ReplayCache();
  });

  const claims = (over: Record<string, unknown> = {}): Record<string, unknown> => ({
    iss: "dev-1",
    sub: "dev-1",
    aud: TOKEN_URL,
    jti: `jti-${++n}-${Math.random()}`,
    iat: now,
    exp: now + 60,
    ...over,
  });
  const verify = (assertion: string, clientId: string | undefined = "dev-1") =>
    verifyClientAssertion(assertion, clientId, {
      directory,
      replay,
      clock,
      policy: { audiences: [TOKEN_URL, ISSUER], maxLifetimeSec: 300, skewSec: 30 },
    });
  const without = (k: string) => {
    const c = claims();
    delete c[k];
    return c;
  };

  it("accepts a valid assertion (aud = token endpoint, issuer, or an array containing one)", async () => {
    await expect(verify(jws({ alg: "ES256" }, claims(), device.privateKey))).resolves.toMatchObject({
      deviceId: "dev-1",
    });
    await expect(
      verify(jws({ alg: "ES256" }, claims({ aud: ISSUER }), device.privateKey)),
    ).resolves.toBeTruthy();
    await expect(
      verify(jws({ alg: "ES256" }, claims({ aud: ["x", TOKEN_URL] }), device.privateKey)),
    ).resolves.toBeTruthy();
  });

  const pem = device.publicKey.export({ format: "pem", type: "spki" }) as string;
  const cases: [string, () => string, string, string?][] = [
    ["alg none", () => jws({ alg: "none" }, claims(), "none"), "ERR_ASSERTION_ALG"],
    [
      "HS256 keyed with the public key PEM",
      () => jws({ alg: "HS256" }, claims(), { hmac: Buffer.from(pem) }),
      "ERR_ASSERTION_ALG",
    ],
    [
      "ES384 (not allowlisted)",
      () => jws({ alg: "ES384" }, claims(), device.privateKey),
      "ERR_ASSERTION_ALG",
    ],
    [
      "RS256 against an EC registered key",
      () => jws({ alg: "RS256" }, claims(), device.privateKey),
      "ERR_ASSERTION_ALG",
    ],
    [
      "jwk smuggled in header",
      () => jws({ alg: "ES256", jwk: attacker.jwk }, claims(), attacker.privateKey),
      "ERR_ASSERTION_HEADER_KEY",
    ],
    [
      "jku in header",
      () => jws({ alg: "ES256", jku: "https://evil/jwks" }, claims(), attacker.privateKey),
      "ERR_ASSERTION_HEADER_KEY",
    ],
    [
      "x5c in header",
      () => jws({ alg: "ES256", x5c: ["MIIB"] }, claims(), attacker.privateKey),
      "ERR_ASSERTION_HEADER_KEY",
    ],
    [
      "x5u in header",
      () => jws({ alg: "ES256", x5u: "https://evil/c" }, claims(), attacker.privateKey),
      "ERR_ASSERTION_HEADER_KEY",
    ],
    [
      "typ dpop+jwt (a proof as assertion)",
      () => jws({ alg: "ES256", typ: "dpop+jwt" }, claims(), device.privateKey),
      "ERR_ASSERTION_TYP",
    ],
    [
      "signed by another key",
      () => jws({ alg: "ES256" }, claims(), attacker.privateKey),
      "ERR_ASSERTION_SIGNATURE",
    ],
    [
      "signature bytes flipped",
      () => {
        const t = jws({ alg: "ES256" }, claims(), device.privateKey);
        return `${t.slice(0, -4)}${t.slice(-4) === "AAAA" ? "BBBB" : "AAAA"}`;
      },
      "ERR_ASSERTION_SIGNATURE",
    ],
    ["sub missing", () => jws({ alg: "ES256" }, without("sub"), device.privateKey), "ERR_ASSERTION_SUB"],
    ["iss missing", () => jws({ alg: "ES256" }, without("iss"), device.privateKey), "ERR_ASSERTION_ISS"],
    [
      "iss ≠ sub",
      () => jws({ alg: "ES256" }, claims({ iss: "dev-2" }), device.privateKey),
      "ERR_ASSERTION_ISS",
    ],
    [
      "client_id form parameter ≠ sub",
      () => jws({ alg: "ES256" }, claims(), device.privateKey),
      "ERR_ASSERTION_CLIENT_ID",
      "dev-2",
    ],
    [
      "unknown client",
      () => jws({ alg: "ES256" }, claims({ iss: "ghost", sub: "ghost" }), device.privateKey),
      "ERR_ASSERTION_UNKNOWN_CLIENT",
      "ghost",
    ],
    [
      "revoked device",
      () => jws({ alg: "ES256" }, claims({ iss: "dev-rev", sub: "dev-rev" }), device.privateKey),
      "ERR_DEVICE_REVOKED",
      "dev-rev",
    ],
    ["aud missing", () => jws({ alg: "ES256" }, without("aud"), device.privateKey), "ERR_ASSERTION_AUD"],
    [
      "aud another server",
      () => jws({ alg: "ES256" }, claims({ aud: "https://other.example/token" }), device.privateKey),
      "ERR_ASSERTION_AUD",
    ],
    ["exp missing", () => jws({ alg: "ES256" }, without("exp"), device.privateKey), "ERR_ASSERTION_EXP"],
    [
      "exp as string",
      () => jws({ alg: "ES256" }, claims({ exp: String(now + 60) }), device.privateKey),
      "ERR_ASSERTION_EXP",
    ],
    [
      "expired",
      () => jws({ alg: "ES256" }, claims({ iat: now - 200, exp: now - 31 }), device.privateKey),
      "ERR_ASSERTION_EXPIRED",
    ],
    [
      "lifetime too long",
      () => jws({ alg: "ES256" }, claims({ exp: now + 3600 }), device.privateKey),
      "ERR_ASSERTION_EXP_TOO_LONG",
    ],
    ["iat missing", () => jws({ alg: "ES256" }, without("iat"), device.privateKey), "ERR_ASSERTION_IAT"],
    [
      "iat in the future",
      () => jws({ alg: "ES256" }, claims({ iat: now + 120, exp: now + 150 }), device.privateKey),
      "ERR_ASSERTION_IAT",
    ],
    [
      "iat long before exp",
      () => jws({ alg: "ES256" }, claims({ iat: now - 400, exp: now + 60 }), device.privateKey),
      "ERR_ASSERTION_IAT",
    ],
    [
      "nbf in the future",
      () => jws({ alg: "ES256" }, claims({ nbf: now + 120 }), device.privateKey),
      "ERR_ASSERTION_NBF",
    ],
    ["jti missing", () => jws({ alg: "ES256" }, without("jti"), device.privateKey), "ERR_ASSERTION_JTI"],
    ["not a JWS", () => "abc.def", "ERR_ASSERTION_MALFORMED"],
    [
      "header not JSON",
      () => `${base64url.encode("{")}.${base64url.encode("{}")}.AA`,
      "ERR_ASSERTION_MALFORMED",
    ],
  ];
  it.each(cases)("refuses %s", async (_name, make, code, clientId) => {
    const err = await verify(make(), clientId ?? "dev-1").catch((e: unknown) => e);
    expect(err).toMatchObject({ code });
    expect(oauthErrorOf(err)).toBe(code.endsWith("MALFORMED") ? "invalid_request" : "invalid_client");
  });

  it("refuses a replayed assertion, also when both copies arrive concurrently", async () => {
    const a = jws({ alg: "ES256" }, claims(), device.privateKey);
    await verify(a);
    await expect(verify(a)).rejects.toMatchObject({ code: "ERR_ASSERTION_REPLAY" });
    const b = jws({ alg: "ES256" }, claims(), device.privateKey);
    const results = await Promise.allSettled([verify(b), verify(b), verify(b)]);
    expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
  });

  it("accepts an RSA device key with RS256 and PS256", async () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
    const j = rsa.publicKey.export({ format: "jwk" }) as JWK;
    directory.put({
      deviceId: "dev-rsa",
      status: "active",
      role: "r",
      attributes: {},
      publicJwk: { kty: "RSA", n: j.n, e: j.e },
      group: "g",
    });
    const c = claims({ iss: "dev-rsa", sub: "dev-rsa" });
    await expect(verify(jws({ alg: "RS256" }, c, rsa.privateKey), "dev-rsa")).resolves.toBeTruthy();
    await expect(
      verify(jws({ alg: "ES256" }, claims({ iss: "dev-rsa", sub: "dev-rsa" }), device.privateKey), "dev-rsa"),
    ).rejects.toMatchObject({ code: "ERR_ASSERTION_ALG" });
  });
});

/** A directory holding the active gateway dev-1 (with `attributes`), and a fresh registrar signing key. */
async function gatewayDirectory(attributes: Record<string, string>) {
  const directory = new InMemoryDeviceDirectory();
  directory.put({
    deviceId: "dev-1",
    status: "active",
    role: "gw",
    attributes,
    publicJwk: device.jwk,
    group: "g",
  });
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const signingKey = await signingKeyFromPem(privateKey.export({ format: "pem", type: "pkcs8" }).toString());
  return { directory, signingKey };
}

describe("token endpoint maps refusals to RFC 6749 errors and never grants more than allowed", () => {
  it("invalid_scope when nothing requested is allowed; grant ∩ allowed otherwise", async () => {
    const clock = new ManualClock(new Date("2026-03-01T12:00:00Z"));
    const { directory, signingKey } = await gatewayDirectory({ site: "a b" });
    const svc = new TokenService(
      {
        issuer: ISSUER,
        audiences: ["api"],
        scopes: { roles: { gw: ["t:w"] }, rules: [{ scope: "site:{site}:w" }] },
      },
      { directory, signingKey, clock },
    );
    const now = clock.nowSeconds();
    const form = (scope: string) =>
      new URLSearchParams({
        grant_type: "client_credentials",
        client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion: jws(
          { alg: "ES256" },
          { iss: "dev-1", sub: "dev-1", aud: TOKEN_URL, jti: `j-${Math.random()}`, iat: now, exp: now + 30 },
          device.privateKey,
        ),
        scope,
      });
    // "a b" is not a safe attribute value: the ABAC rule produces nothing (no scope injection).
    const err = await svc.token({ form: form("site:a:w") }).catch((e: unknown) => e);
    expect(oauthErrorOf(err)).toBe("invalid_scope");
    const ok = await svc.token({ form: form("t:w site:a:w") });
    expect(ok.body.scope).toBe("t:w");
    const dup = form("t:w");
    dup.append("grant_type", "client_credentials");
    expect(oauthErrorOf(await svc.token({ form: dup }).catch((e: unknown) => e))).toBe("invalid_request");
    expect(await calculateJwkThumbprint(device.jwk)).toBeTypeOf("string");
  });
});

describe("replay cache cannot be filled by unauthenticated requests", () => {
  it("a flood of valid self-signed DPoP proofs with bad client auth leaves room for real clients", async () => {
    const clock = new ManualClock(new Date("2026-03-01T12:00:00Z"));
    const now = clock.nowSeconds();
    const { directory, signingKey } = await gatewayDirectory({});
    const svc = new TokenService(
      { issuer: ISSUER, audiences: ["api"], scopes: { roles: { gw: ["t:w"] } }, replayCacheEntries: 4 },
      { directory, signingKey, clock },
    );
    const proof = (key: typeof attacker) =>
      jws(
        { typ: "dpop+jwt", alg: "ES256", jwk: key.jwk },
        { jti: `p-${Math.random()}`, htm: "POST", htu: TOKEN_URL, iat: now },
        key.privateKey,
      );
    const form = (assertion: string) =>
      new URLSearchParams({
        grant_type: "client_credentials",
        client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion: assertion,
      });
    for (let i = 0; i < 10; i++) {
      const bad = jws(
        { alg: "ES256" },
        {
          iss: "dev-1",
          sub: "dev-1",
          aud: TOKEN_URL,
          jti: `x-${i}-${Math.random()}`,
          iat: now,
          exp: now + 30,
        },
        attacker.privateKey,
      );
      const err = await svc.token({ form: form(bad), dpop: proof(attacker) }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "ERR_ASSERTION_SIGNATURE" });
    }
    const good = jws(
      { alg: "ES256" },
      { iss: "dev-1", sub: "dev-1", aud: TOKEN_URL, jti: `g-${Math.random()}`, iat: now, exp: now + 30 },
      device.privateKey,
    );
    const ok = await svc.token({ form: form(good), dpop: proof(device) });
    expect(ok.body.token_type).toBe("DPoP");
  });
});
