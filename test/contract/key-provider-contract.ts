import { createPublicKey, verify as nodeVerify, randomBytes } from "node:crypto";
import fc from "fast-check";
import { compactVerify, importJWK } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isM2mError } from "../../src/core/errors.js";
import { signCompactJws } from "../../src/keys/jws.js";
import type { KeyInfo, KeyProvider } from "../../src/keys/key-provider.js";

/**
 * What a backend must supply to run the shared KeyProvider contract.
 * Every provider (TPM on swtpm, PKCS#11 on SoftHSM, the fake) passes the same suite.
 */
export interface KeyProviderContractTarget {
  /** A fresh provider instance bound to the same backend storage (same TPM / token / fake store). */
  make(): Promise<KeyProvider>;
  /**
   * Opens the key from a different OS process (or, for the fake, a fresh instance) and returns its
   * RFC 7638 thumbprint: proves the key persists outside this process.
   */
  thumbprintFromNewProcess(): Promise<string>;
  /** Backend-specific proof that the private key cannot be read out. Must throw if it can. */
  assertNotExtractable(provider: KeyProvider, info: KeyInfo): Promise<void>;
  /** How many random messages the property test signs (thousands for fast backends). */
  readonly propertyRuns: number;
  teardown(): Promise<void>;
}

function verifyEs256(info: KeyInfo, data: Uint8Array, sig: Uint8Array): boolean {
  const key = createPublicKey(info.spkiPem);
  return nodeVerify("sha256", data, { key, dsaEncoding: "ieee-p1363" }, sig);
}

export function describeKeyProviderContract(
  name: string,
  setup: () => Promise<KeyProviderContractTarget>,
  options: { readonly propertyTimeoutMs?: number } = {},
): void {
  describe(`KeyProvider contract: ${name}`, () => {
    let target: KeyProviderContractTarget;
    let provider: KeyProvider;
    let info: KeyInfo;

    beforeAll(async () => {
      target = await setup();
      provider = await target.make();
      // A leftover key from an earlier run would make `created` meaningless: start from nothing.
      await provider.destroy();
      info = await provider.createOrOpen();
    });

    afterAll(async () => {
      await provider?.close();
      await target?.teardown();
    });

    it("creates the key once; a second createOrOpen finds the same key and never replaces it", async () => {
      expect(info.created).toBe(true);
      const again = await provider.createOrOpen();
      expect(again.created).toBe(false);
      expect(again.thumbprint).toBe(info.thumbprint);
      const other = await target.make();
      try {
        const reopened = await other.createOrOpen();
        expect(reopened.created).toBe(false);
        expect(reopened.thumbprint).toBe(info.thumbprint);
      } finally {
        await other.close();
      }
    });

    it("exposes the public key as JWK, SPKI PEM and RFC 7638 thumbprint, consistently", async () => {
      expect(info.algorithm).toBe("ec-p256");
      expect(info.jwsAlgorithms).toContain("ES256");
      expect(info.publicJwk).toMatchObject({ kty: "EC", crv: "P-256" });
      expect(info.publicJwk).not.toHaveProperty("d");
      expect(info.spkiPem).toMatch(/^-----BEGIN PUBLIC KEY-----/);
      const fromPem = createPublicKey(info.spkiPem).export({ format: "jwk" });
      expect(fromPem.x).toBe(info.publicJwk.x);
      expect(fromPem.y).toBe(info.publicJwk.y);
      expect(info.thumbprint).toMatch(/^[A-Za-z0-9_-]{43}$/);
      expect(info.ref.length).toBeGreaterThan(4);
      const opened = await provider.open();
      expect(opened.ref).toBe(info.ref);
    });

    it("persists the key outside this process", async () => {
      expect(await target.thumbprintFromNewProcess()).toBe(info.thumbprint);
    });

    it("signs compact JWS (ES256) that jose verifies", async () => {
      const jws = await signCompactJws(provider, info, { typ: "JWT" }, { sub: "device", n: 1 });
      const key = await importJWK(info.publicJwk, "ES256");
      const { payload, protectedHeader } = await compactVerify(jws, key);
      expect(protectedHeader.alg).toBe("ES256");
      expect(JSON.parse(new TextDecoder().decode(payload))).toEqual({ sub: "device", n: 1 });
    });

    it("returns exactly 64 bytes r‖s for ES256, and a tampered message does not verify", async () => {
      const data = randomBytes(100);
      const sig = await provider.sign(data, "ES256");
      expect(sig.length).toBe(64);
      expect(verifyEs256(info, data, sig)).toBe(true);
      data[0] = (data[0] ?? 0) ^ 1;
      expect(verifyEs256(info, data, sig)).toBe(false);
    });

    it("refuses an algorithm the key cannot do", async () => {
      await expect(provider.sign(new Uint8Array([1]), "RS256")).rejects.toSatisfy((e) =>
        isM2mError(e, "ERR_KEY_ALG_UNSUPPORTED"),
      );
    });

    it("keeps the private key inside the backend", async () => {
      await target.assertNotExtractable(provider, info);
    });

    it("serves 50 concurrent sign requests, all valid", async () => {
      const messages = Array.from({ length: 50 }, (_, i) =>
        new TextEncoder().encode(`msg-${i}-${Math.random()}`),
      );
      const sigs = await Promise.all(messages.map((m) => provider.sign(m, "ES256")));
      sigs.forEach((s, i) => {
        expect(verifyEs256(info, messages[i] as Uint8Array, s)).toBe(true);
      });
    });

    it(
      "property: every ES256 signature of a random message verifies",
      async () => {
        await fc.assert(
          fc.asyncProperty(fc.uint8Array({ minLength: 0, maxLength: 512 }), async (msg) => {
            const sig = await provider.sign(msg, "ES256");
            return sig.length === 64 && verifyEs256(info, msg, sig);
          }),
          { numRuns: target.propertyRuns },
        );
      },
      // Slow backends (a TPM signs in ~15 ms) need more than the default for thousands of signatures.
      options.propertyTimeoutMs ?? 60_000,
    );

    it("reports healthy while the key exists", async () => {
      const h = await provider.health();
      expect(h.ok).toBe(true);
    });

    it("destroy removes the key; open then fails with ERR_KEY_NOT_FOUND; destroy is idempotent", async () => {
      await provider.destroy();
      await expect(provider.open()).rejects.toSatisfy((e) => isM2mError(e, "ERR_KEY_NOT_FOUND"));
      const h = await provider.health();
      expect(h.ok).toBe(false);
      await provider.destroy();
      const fresh = await provider.createOrOpen();
      expect(fresh.created).toBe(true);
      expect(fresh.thumbprint).not.toBe(info.thumbprint);
    });
  });
}
