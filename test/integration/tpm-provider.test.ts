import { createHash, randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { compactVerify, importJWK } from "jose";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { freeLoopbackPortPair, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import type { M2mError } from "../../src/core/errors.js";
import { signCompactJws } from "../../src/keys/jws.js";
import type { JwsAlgorithm } from "../../src/keys/key-provider.js";
import { type TpmLatencySample, TpmRunner } from "../../src/keys/tpm/runner.js";
import { DEVICE_KEY_ATTRIBUTES, parseTpmKeyRef, TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { ATTR } from "../../src/keys/tpm/tpmt.js";
import { rejectionOf } from "../kit/m2m-error.js";

/** Persists an ECC signing key with the given attributes at `handle` (flushing the transients it leaves). */
async function persistForeignKey(tpm: SwtpmHandle, handle: string, attrs: string, authFile?: string) {
  const before = (await tpm.tpm("tpm2_getcap", ["handles-transient"])).stdout;
  const ctx = `${tpm.dir}/foreign-${handle}.ctx`;
  await tpm.tpm("tpm2_create", [
    "-C",
    "0x81000001",
    "-G",
    "ecc256:ecdsa-sha256",
    "-a",
    attrs,
    ...(authFile === undefined ? [] : ["-p", `file:${authFile}`]),
    "-c",
    ctx,
  ]);
  await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", ctx, handle]);
  const after = (await tpm.tpm("tpm2_getcap", ["handles-transient"])).stdout;
  for (const h of after.match(/0x[0-9a-fA-F]+/g) ?? []) {
    if (!before.includes(h)) await tpm.tpm("tpm2_flushcontext", [h]);
  }
}

describe("TpmKeyProvider on swtpm", () => {
  let tpm: SwtpmHandle;
  let provider: TpmKeyProvider;

  beforeAll(async () => {
    tpm = await startSwtpm();
    provider = new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 });
    await provider.createOrOpen();
  });
  afterAll(async () => {
    await provider?.close();
    await tpm?.stop();
  });

  test("the key has fixedTPM, fixedParent, sensitiveDataOrigin, noDA; Name = 000b‖SHA-256(TPMT_PUBLIC)", async () => {
    const ev = await provider.evidence();
    if (ev.kind !== "tpm") throw new Error("expected tpm evidence");
    expect(ev.objectAttributes).toBe(DEVICE_KEY_ATTRIBUTES);
    expect(ev.attributeNames).toEqual(
      expect.arrayContaining([
        "fixedTPM",
        "fixedParent",
        "sensitiveDataOrigin",
        "noDA",
        "sign",
        "userWithAuth",
      ]),
    );
    expect(ev.objectAttributes & ATTR.restricted).toBe(0);
    const name = `000b${createHash("sha256").update(Buffer.from(ev.tpmtPublicHex, "hex")).digest("hex")}`;
    expect(ev.nameHex).toBe(name);
    // The TPM's own view of the name agrees.
    const rp = await tpm.tpm("tpm2_readpublic", ["-c", "0x81000002"]);
    expect(rp.stdout).toContain(`name: ${name}`);
  });

  test("the key survives a TPM restart; a brand-new provider opens the same key; the old one still signs", async () => {
    const before = await provider.open();
    await tpm.restart();
    const fresh = new TpmKeyProvider({ tcti: tpm.tcti });
    try {
      const after = await fresh.open();
      expect(after.thumbprint).toBe(before.thumbprint);
      expect(after.created).toBe(false);
      const again = await fresh.createOrOpen();
      expect(again.created).toBe(false);
      expect(again.thumbprint).toBe(before.thumbprint);
      const jws = await signCompactJws(fresh, after, { typ: "JWT" }, { sub: "after-restart" });
      await compactVerify(jws, await importJWK(after.publicJwk, "ES256"));
    } finally {
      await fresh.close();
    }
    // restart() reuses the ports, so the provider created before the power cycle keeps working.
    expect(provider.tcti).toBe(tpm.tcti);
    const sig = await provider.sign(new TextEncoder().encode("x"), "ES256");
    expect(sig.length).toBe(64);
  });

  test("ES256 compact JWS verifies with jose", async () => {
    const info = await provider.open();
    const jws = await signCompactJws(provider, info, { typ: "JWT", kid: info.thumbprint }, { iss: "dev-1" });
    const { protectedHeader } = await compactVerify(jws, await importJWK(info.publicJwk, "ES256"));
    expect(protectedHeader.alg).toBe("ES256");
    expect(info.ref).toBe(`tpm:tcti=${tpm.tcti};handle=0x81000002`);
    expect(parseTpmKeyRef(info.ref)).toEqual({ tcti: tpm.tcti, keyHandle: 0x81000002 });
    expect(() => parseTpmKeyRef("tpm:tcti=x;handle=0x81010001")).toThrow(/owner persistent handle/);
    expect(() => parseTpmKeyRef("pkcs11:token=a")).toThrow(/not a TPM key reference/);
  });

  test("RSA-2048 key signs RS256 and PS256 that jose verifies; ES256 refused", async () => {
    const rsa = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x81000004, algorithm: "rsa-2048" });
    try {
      const info = await rsa.createOrOpen();
      expect(info.algorithm).toBe("rsa-2048");
      for (const alg of ["RS256", "PS256"] as JwsAlgorithm[]) {
        const jws = await signCompactJws(rsa, info, { typ: "JWT" }, { alg_test: alg }, alg);
        const { protectedHeader } = await compactVerify(jws, await importJWK(info.publicJwk, alg));
        expect(protectedHeader.alg).toBe(alg);
      }
      expect((await rejectionOf(rsa.sign(new Uint8Array([1]), "ES256"))).code).toBe(
        "ERR_KEY_ALG_UNSUPPORTED",
      );
      // An ECC provider pointed at the RSA key refuses to adopt it.
      const wrongAlg = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x81000004, algorithm: "ec-p256" });
      expect((await rejectionOf(wrongAlg.createOrOpen())).code).toBe("ERR_KEY_MISMATCH");
      await wrongAlg.close();
      await rsa.destroy();
    } finally {
      await rsa.close();
    }
  });

  test("a foreign object at the key handle → ERR_KEY_MISMATCH; it is neither replaced nor evicted", async () => {
    // Same curve and scheme, but DA-protected (no noDA): not the template this agent creates.
    await persistForeignKey(tpm, "0x81000005", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign");
    const p = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x81000005 });
    try {
      const err = await rejectionOf(p.createOrOpen());
      expect(err.code).toBe("ERR_KEY_MISMATCH");
      expect(err.retry).toBe("permanent");
      expect((await rejectionOf(p.open())).code).toBe("ERR_KEY_MISMATCH");
      expect((await rejectionOf(p.destroy())).code).toBe("ERR_KEY_MISMATCH");
      const h = await p.health();
      expect(h).toMatchObject({ ok: false, code: "ERR_KEY_MISMATCH" });
      const still = await tpm.tpm("tpm2_getcap", ["handles-persistent"]);
      expect(still.stdout).toContain("0x81000005");
    } finally {
      await p.close();
      await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81000005"]);
    }
  });

  test("a non-storage object at the SRK handle → ERR_KEY_MISMATCH", async () => {
    const p = new TpmKeyProvider({
      tcti: tpm.tcti,
      srkHandle: 0x81000002,
      keyHandle: 0x81000007,
      akHandle: 0x81000008,
    });
    try {
      expect((await rejectionOf(p.createOrOpen())).code).toBe("ERR_KEY_MISMATCH");
    } finally {
      await p.close();
    }
  });

  test("two providers with separate queues racing to create the same key end with one key", async () => {
    // Two TCTI spellings of the same TPM get two queues: the closest in-process stand-in for two agents.
    const port = tpm.port;
    const a = new TpmKeyProvider({ tcti: `swtpm:host=127.0.0.1,port=${port}`, keyHandle: 0x8100000d });
    const b = new TpmKeyProvider({ tcti: `swtpm:port=${port},host=127.0.0.1`, keyHandle: 0x8100000d });
    try {
      const [ia, ib] = await Promise.all([a.createOrOpen(), b.createOrOpen()]);
      expect(ia.thumbprint).toBe(ib.thumbprint);
      expect([ia.created, ib.created].filter(Boolean).length).toBe(1);
      await a.destroy();
    } finally {
      await a.close();
      await b.close();
    }
  });

  test("handles outside the owner range and duplicates are refused at construction", () => {
    expect(() => new TpmKeyProvider({ keyHandle: 0x81010001 })).toThrow(/owner persistent handle/);
    expect(() => new TpmKeyProvider({ keyHandle: "0x81000001" })).toThrow(/must differ/);
    expect(new TpmKeyProvider({ keyHandle: "0x8100000a" }).keyHandle).toBe(0x8100000a);
  });

  test("sign / open on an empty handle → ERR_KEY_NOT_FOUND; health reports it", async () => {
    const p = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x81000009 });
    try {
      expect((await rejectionOf(p.open())).code).toBe("ERR_KEY_NOT_FOUND");
      expect((await rejectionOf(p.sign(new Uint8Array([1])))).code).toBe("ERR_KEY_NOT_FOUND");
      expect(await p.health()).toMatchObject({ ok: false, code: "ERR_KEY_NOT_FOUND" });
      await p.destroy(); // idempotent on an empty handle
    } finally {
      await p.close();
    }
  });

  test("a replaced key at the handle is detected: signatures are checked against the opened key", async () => {
    const p = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x8100000b });
    const q = new TpmKeyProvider({ tcti: tpm.tcti, keyHandle: 0x8100000b });
    try {
      await p.createOrOpen();
      await q.destroy();
      await q.createOrOpen(); // another key of the same template now sits at the handle
      expect((await rejectionOf(p.sign(new Uint8Array([1, 2, 3])))).code).toBe("ERR_KEY_MISMATCH");
    } finally {
      await q.destroy();
      await p.close();
      await q.close();
    }
  });

  test("DA lockout: wrong auth → ERR_TPM_AUTH (never retried) … then ERR_TPM_LOCKOUT with recovery info; noDA key unaffected", async () => {
    const samples: TpmLatencySample[] = [];
    const runner = new TpmRunner({ tcti: tpm.tcti, onLatency: (s) => samples.push(s) });
    try {
      // Test-kit side: the auth value of the DA-protected key, in a 0600 file inside the swtpm temp dir.
      const goodFile = `${tpm.dir}/good-auth`;
      await writeFile(goodFile, "correct horse", { mode: 0o600 });
      await persistForeignKey(
        tpm,
        "0x8100000c",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        goodFile,
      );
      const signWith = (auth: string) =>
        runner.exclusive(async (tx) => {
          const authFile = await tx.writeSecret("auth", auth);
          return tx.run(
            "tpm2_sign",
            [
              "-c",
              "0x8100000c",
              "-p",
              `file:${authFile}`,
              "-g",
              "sha256",
              "-s",
              "ecdsa",
              "-d",
              "-o",
              tx.path("s"),
            ],
            { input: randomBytes(32), op: "da-sign" },
          );
        });
      await signWith("correct horse"); // the DA key works with the right auth
      const codes: string[] = [];
      let lockout: M2mError | undefined;
      for (let i = 0; i < 6 && lockout === undefined; i++) {
        const callsBefore = samples.filter((s) => s.op === "da-sign").length;
        const err = await rejectionOf(signWith("wrong"));
        // Each failed call is exactly one tool run: authorization failures are never retried.
        expect(samples.filter((s) => s.op === "da-sign").length).toBe(callsBefore + 1);
        codes.push(err.code);
        if (err.code === "ERR_TPM_LOCKOUT") lockout = err;
        else {
          expect(err.code).toBe("ERR_TPM_AUTH");
          expect(err.retry).toBe("fatal");
        }
      }
      expect(codes[0]).toBe("ERR_TPM_AUTH");
      expect(lockout?.retry).toBe("fatal");
      expect(lockout?.details).toMatchObject({ rc: "0x921", maxAuthFail: 3, lockoutIntervalSeconds: 1000 });
      expect(lockout?.details.recoveryAfterMs).toBe(1_000_000);
      expect(lockout?.hint).toContain("1000 s");
      // Even the right auth is refused while locked out…
      expect((await rejectionOf(signWith("correct horse"))).code).toBe("ERR_TPM_LOCKOUT");
      // …but the device key is noDA and keeps working; health says so.
      expect((await provider.sign(new Uint8Array([9]))).length).toBe(64);
      const h = await provider.health();
      expect(h.ok).toBe(true);
      expect(h.detail).toContain("lockout");
      await tpm.resetDictionaryLockout();
      await signWith("correct horse");
    } finally {
      await tpm.resetDictionaryLockout();
      await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x8100000c"]).catch(() => undefined);
      await runner.close();
    }
  });

  test("unreachable TPM (unused port) → ERR_TPM_UNREACHABLE (transient); health reports it", async () => {
    const port = await freeLoopbackPortPair();
    const p = new TpmKeyProvider({ tcti: `swtpm:host=127.0.0.1,port=${port}`, timeoutMs: 5_000 });
    try {
      const err = await rejectionOf(p.createOrOpen());
      expect(err.code).toBe("ERR_TPM_UNREACHABLE");
      expect(err.retry).toBe("transient");
      expect((await rejectionOf(p.sign(new Uint8Array([1])))).code).toBe("ERR_TPM_UNREACHABLE");
      expect(await p.health()).toMatchObject({ ok: false, code: "ERR_TPM_UNREACHABLE" });
    } finally {
      await p.close();
    }
  });

  test("a stopped swtpm → ERR_TPM_UNREACHABLE; signing works again after it comes back", async () => {
    const other = await startSwtpm();
    const p = new TpmKeyProvider({ tcti: other.tcti, timeoutMs: 5_000 });
    try {
      await p.createOrOpen();
      await other.kill();
      expect((await rejectionOf(p.sign(new Uint8Array([1])))).code).toBe("ERR_TPM_UNREACHABLE");
      await other.restart();
      expect(other.tcti).toBe(p.tcti);
      expect((await p.sign(new Uint8Array([1]))).length).toBe(64);
    } finally {
      await p.close();
      await other.stop();
    }
  });
});
