import { createHash, createHmac, generateKeyPairSync, sign as nodeSign } from "node:crypto";
import { base64url, type JWK } from "jose";
import { beforeEach, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { HardwareDpopSigner } from "../../src/credentials/oauth/dpop.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { DpopNonceIssuer, verifyDpopProof } from "../../src/registrar/oauth/dpop-verify.js";
import { oauthErrorOf } from "../../src/registrar/oauth/errors.js";
import { ReplayCache } from "../../src/registrar/oauth/replay-cache.js";

const URL_ = "https://registrar.test/oauth2/token";
const key = generateKeyPairSync("ec", { namedCurve: "P-256" });
const other = generateKeyPairSync("ec", { namedCurve: "P-256" });
const full = key.publicKey.export({ format: "jwk" }) as JWK;
const jwk: JWK = { kty: "EC", crv: "P-256", x: full.x, y: full.y };

function proof(
  header: Record<string, unknown>,
  payload: Record<string, unknown>,
  signWith = key.privateKey,
  alg = "ES256",
) {
  const input = `${base64url.encode(JSON.stringify({ alg, ...header }))}.${base64url.encode(JSON.stringify(payload))}`;
  if (alg === "none") return `${input}.`;
  if (alg === "HS256") {
    const secret = Buffer.from(JSON.stringify(jwk));
    return `${input}.${base64url.encode(createHmac("sha256", secret).update(input).digest())}`;
  }
  return `${input}.${base64url.encode(nodeSign("sha256", Buffer.from(input), { key: signWith, dsaEncoding: "ieee-p1363" }))}`;
}

describe("DPoP proof tamper table (RFC 9449 §4.3, server side)", () => {
  let clock: ManualClock;
  let replay: ReplayCache;
  let now: number;
  beforeEach(() => {
    clock = new ManualClock(new Date("2026-03-01T12:00:00Z"));
    now = clock.nowSeconds();
    replay = new ReplayCache();
  });
  const hdr = (over: Record<string, unknown> = {}) => ({ typ: "dpop+jwt", jwk, ...over });
  const claims = (over: Record<string, unknown> = {}) => ({
    jti: `j-${Math.random()}`,
    htm: "POST",
    htu: URL_,
    iat: now,
    ...over,
  });
  const verify = (p: string, check: Partial<Parameters<typeof verifyDpopProof>[1]> = {}) =>
    verifyDpopProof(p, { method: "POST", url: URL_, ...check }, { replay, clock });
  const drop = (k: string) => {
    const c: Record<string, unknown> = claims();
    delete c[k];
    return c;
  };

  it("accepts a valid proof; htu compared without query/fragment", async () => {
    await expect(verify(proof(hdr(), claims()))).resolves.toMatchObject({ jkt: expect.any(String) });
    await expect(verify(proof(hdr(), claims()), { url: `${URL_}?a=1#f` })).resolves.toBeTruthy();
  });

  const cases: [string, () => string, string, Partial<Parameters<typeof verifyDpopProof>[1]>?][] = [
    ["typ missing", () => proof({ jwk }, claims()), "ERR_DPOP_TYP"],
    ["typ JWT", () => proof(hdr({ typ: "JWT" }), claims()), "ERR_DPOP_TYP"],
    ["alg none", () => proof(hdr(), claims(), key.privateKey, "none"), "ERR_DPOP_ALG"],
    [
      "HS256 with the public JWK as secret",
      () => proof(hdr(), claims(), key.privateKey, "HS256"),
      "ERR_DPOP_ALG",
    ],
    ["jwk missing", () => proof({ typ: "dpop+jwt" }, claims()), "ERR_DPOP_JWK"],
    ["jwk with private part", () => proof(hdr({ jwk: { ...jwk, d: "AAAA" } }), claims()), "ERR_DPOP_JWK"],
    ["symmetric jwk", () => proof(hdr({ jwk: { kty: "oct", k: "AAAA" } }), claims()), "ERR_DPOP_JWK"],
    ["jku in header", () => proof(hdr({ jku: "https://evil/jwks" }), claims()), "ERR_DPOP_HEADER_KEY"],
    ["x5c in header", () => proof(hdr({ x5c: ["MIIB"] }), claims()), "ERR_DPOP_HEADER_KEY"],
    ["signed by a key other than jwk", () => proof(hdr(), claims(), other.privateKey), "ERR_DPOP_SIGNATURE"],
    ["another method", () => proof(hdr(), claims({ htm: "GET" })), "ERR_DPOP_HTM"],
    ["htm missing", () => proof(hdr(), drop("htm")), "ERR_DPOP_HTM"],
    ["another URL", () => proof(hdr(), claims({ htu: "https://registrar.test/v1/other" })), "ERR_DPOP_HTU"],
    ["another origin", () => proof(hdr(), claims({ htu: "https://evil.test/oauth2/token" })), "ERR_DPOP_HTU"],
    ["htu missing", () => proof(hdr(), drop("htu")), "ERR_DPOP_HTU"],
    ["htu not a URL", () => proof(hdr(), claims({ htu: "::" })), "ERR_DPOP_HTU"],
    ["iat missing", () => proof(hdr(), drop("iat")), "ERR_DPOP_IAT"],
    ["iat too old", () => proof(hdr(), claims({ iat: now - 120 })), "ERR_DPOP_IAT"],
    ["iat in the future", () => proof(hdr(), claims({ iat: now + 120 })), "ERR_DPOP_IAT"],
    ["jti missing", () => proof(hdr(), drop("jti")), "ERR_DPOP_JTI"],
    [
      "ath missing on a resource request",
      () => proof(hdr(), claims()),
      "ERR_DPOP_ATH",
      { accessToken: "at-1" },
    ],
    [
      "ath for another token",
      () => proof(hdr(), claims({ ath: base64url.encode(createHash("sha256").update("at-2").digest()) })),
      "ERR_DPOP_ATH",
      { accessToken: "at-1" },
    ],
    ["not a JWS", () => "a.b", "ERR_DPOP_MALFORMED"],
  ];
  it.each(cases)("refuses %s", async (_name, make, code, check) => {
    const err = await verify(make(), check ?? {}).catch((e: unknown) => e);
    expect(err).toMatchObject({ code });
  });

  it("refuses a replayed proof", async () => {
    const p = proof(hdr(), claims());
    await verify(p);
    await expect(verify(p)).rejects.toMatchObject({ code: "ERR_DPOP_REPLAY" });
  });

  it("server nonces: missing or stale → use_dpop_nonce; current and previous window accepted", async () => {
    const nonces = new DpopNonceIssuer(clock, 300);
    const missing = await verify(proof(hdr(), claims()), { nonces }).catch((e: unknown) => e);
    expect(missing).toMatchObject({ code: "ERR_DPOP_NONCE" });
    expect(oauthErrorOf(missing)).toBe("use_dpop_nonce");
    const n = nonces.current();
    await expect(verify(proof(hdr(), claims({ nonce: n })), { nonces })).resolves.toBeTruthy();
    await clock.advance(300_000);
    now = clock.nowSeconds();
    await expect(verify(proof(hdr(), claims({ nonce: n })), { nonces })).resolves.toBeTruthy();
    await clock.advance(300_000);
    now = clock.nowSeconds();
    await expect(verify(proof(hdr(), claims({ nonce: n })), { nonces })).rejects.toMatchObject({
      code: "ERR_DPOP_NONCE",
    });
  });

  it("the agent's HardwareDpopSigner output passes, with ath and the remembered nonce", async () => {
    const keys = new FakeKeyProvider();
    const info = await keys.createOrOpen();
    const signer = new HardwareDpopSigner(keys, info, clock);
    const nonces = new DpopNonceIssuer(clock);
    signer.rememberNonce("https://registrar.test/anything", nonces.current());
    const p = await signer.proof("post", "https://registrar.test/oauth2/token?x=1#y", "at-1");
    const r = await verify(p, { accessToken: "at-1", nonces });
    expect(r.jkt).toBe(info.thumbprint);
    const [h] = p.split(".");
    expect(JSON.parse(Buffer.from(h ?? "", "base64url").toString())).toEqual({
      typ: "dpop+jwt",
      jwk: info.publicJwk,
      alg: "ES256",
    });
  });
});
