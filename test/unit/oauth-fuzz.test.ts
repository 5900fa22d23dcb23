import { generateKeyPairSync } from "node:crypto";
import fc from "fast-check";
import { base64url, type JWK } from "jose";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { isM2mError } from "../../src/core/errors.js";
import { verifyAccessToken } from "../../src/registrar/oauth/access-token.js";
import { verifyClientAssertion } from "../../src/registrar/oauth/client-assertion.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { verifyDpopProof } from "../../src/registrar/oauth/dpop-verify.js";
import { ReplayCache } from "../../src/registrar/oauth/replay-cache.js";
import { parseScope } from "../../src/registrar/oauth/scope-policy.js";

/**
 * Hostile bytes at the token-path parsers: whatever arrives, the answer is a coded refusal (never a
 * crash, never an acceptance), within a time cap.
 */
const clock = new ManualClock(new Date("2026-03-01T12:00:00Z"));
const pub = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ format: "jwk" }) as JWK;
const directory = new InMemoryDeviceDirectory();
directory.put({
  deviceId: "dev-1",
  status: "active",
  role: "r",
  attributes: {},
  publicJwk: { kty: "EC", crv: "P-256", x: pub.x, y: pub.y },
  group: "g",
});

const jsonish = fc.oneof(
  fc.json(),
  fc
    .record({
      alg: fc.constantFrom("ES256", "RS256", "PS256", "none", "HS256", "ES384", ""),
      typ: fc.option(fc.constantFrom("dpop+jwt", "JWT", "at+jwt"), { nil: undefined }),
      jwk: fc.option(fc.object(), { nil: undefined }),
    })
    .map((o) => JSON.stringify(o)),
);
const compact = fc.oneof(
  fc.string(),
  fc
    .tuple(jsonish, jsonish, fc.uint8Array({ maxLength: 80 }))
    .map(([h, p, s]) => `${base64url.encode(h)}.${base64url.encode(p)}.${base64url.encode(s)}`),
  fc.tuple(fc.base64String(), fc.base64String(), fc.base64String()).map((a) => a.join(".")),
);

const refused = (err: unknown): boolean => isM2mError(err) && /^ERR_[A-Z0-9_]+$/.test(err.code);

describe("token-path parsers under random input", () => {
  it("client assertions: always a coded refusal", async () => {
    await fc.assert(
      fc.asyncProperty(compact, fc.option(fc.string(), { nil: undefined }), async (jws, clientId) => {
        const err = await verifyClientAssertion(jws, clientId, {
          directory,
          replay: new ReplayCache(),
          clock,
          policy: { audiences: ["https://r/token"], maxLifetimeSec: 300, skewSec: 30 },
        }).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(refused(err)).toBe(true);
      }),
      { numRuns: 300, interruptAfterTimeLimit: 10_000 },
    );
  });

  it("DPoP proofs: always a coded refusal", async () => {
    await fc.assert(
      fc.asyncProperty(compact, async (jws) => {
        const err = await verifyDpopProof(
          jws,
          { method: "POST", url: "https://r/token" },
          { replay: new ReplayCache(), clock },
        ).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(refused(err)).toBe(true);
      }),
      { numRuns: 300, interruptAfterTimeLimit: 10_000 },
    );
  });

  it("access tokens: always a coded refusal", async () => {
    const { publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    await fc.assert(
      fc.asyncProperty(compact, async (jwt) => {
        const err = await verifyAccessToken(jwt, {
          issuer: "https://r",
          keys: publicKey,
          clock,
          audience: "api",
        }).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(refused(err)).toBe(true);
      }),
      { numRuns: 300, interruptAfterTimeLimit: 10_000 },
    );
  });

  it("scope strings: parsed tokens are never empty and never contain separators or quotes", () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 300 }), (s) => {
        const parts = parseScope(s);
        if (parts !== undefined) for (const p of parts) expect(p).toMatch(/^[\x21\x23-\x5B\x5D-\x7E]+$/);
      }),
      { numRuns: 1000 },
    );
  });
});
