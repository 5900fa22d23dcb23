import { createPublicKey, verify as nodeVerify, randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { execa } from "execa";
import fc from "fast-check";
import { compactVerify, importJWK } from "jose";
import pkcs11js from "pkcs11js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, inspectKeyInNewProcess, type SoftHsmHandle } from "../../hw/softhsm.js";
import { M2mError } from "../../src/core/errors.js";
import { createLogger } from "../../src/core/log.js";
import { signCompactJws } from "../../src/keys/jws.js";
import type { KeyInfo } from "../../src/keys/key-provider.js";
import {
  finalizeModule,
  loadModule,
  Pkcs11KeyProvider,
  type Pkcs11KeyProviderConfig,
} from "../../src/keys/pkcs11/index.js";

const WRONG_PIN = "99887766";
const ERR_TOKEN = { label: "m2m-errors", pin: "24682468" };

let hsm: SoftHsmHandle;
let errToken: { tokenLabel: string; pinFile: string };
let removable: { tokenLabel: string; pinFile: string };
const providers: Pkcs11KeyProvider[] = [];

function provider(overrides: Partial<Pkcs11KeyProviderConfig> = {}): Pkcs11KeyProvider {
  const p = new Pkcs11KeyProvider({
    modulePath: hsm.modulePath,
    tokenLabel: hsm.tokenLabel,
    pin: { file: hsm.pinFile },
    ...overrides,
  });
  providers.push(p);
  return p;
}

function verifyEs256(info: KeyInfo, data: Uint8Array, sig: Uint8Array): boolean {
  return nodeVerify("sha256", data, { key: createPublicKey(info.spkiPem), dsaEncoding: "ieee-p1363" }, sig);
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<M2mError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(M2mError);
  const m = err as M2mError;
  expect(m.code).toBe(code);
  return m;
}

function slotOf(label: string): Buffer {
  const lib = loadModule(hsm.modulePath);
  const slot = lib.C_GetSlotList(true).find((s) => lib.C_GetTokenInfo(s).label.trimEnd() === label);
  if (slot === undefined) throw new Error(`token ${label} not found`);
  return slot;
}

beforeAll(async () => {
  hsm = await initSoftHsm({ label: "m2m-it" });
  // Every token must exist before the module is first initialised: SoftHSM builds its slot list then.
  errToken = await hsm.addToken(ERR_TOKEN.label, ERR_TOKEN.pin);
  removable = await hsm.addToken("m2m-removable");
  process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
});

afterAll(async () => {
  for (const p of providers) await p.close();
  finalizeModule(hsm.modulePath);
  await hsm.cleanup();
});

describe("Pkcs11KeyProvider on SoftHSM2: EC P-256 device key", () => {
  let p: Pkcs11KeyProvider;
  let info: KeyInfo;
  const logLines: string[] = [];

  beforeAll(async () => {
    p = provider({ logger: createLogger({ level: "debug", write: (l) => logLines.push(l) }) });
    info = await p.createOrOpen();
  });

  it("generates the key on the token and a new process finds the same public point", async () => {
    expect(info.created).toBe(true);
    expect(info.algorithm).toBe("ec-p256");
    const view = await inspectKeyInNewProcess(hsm, hsm, "m2m-device");
    expect(view.privateKeys).toBe(1);
    expect(view.publicKeys).toBe(1);
    const point = Buffer.from(view.ecPointHex ?? "", "hex");
    expect(point.length).toBe(65);
    expect(point.subarray(1, 33).toString("base64url")).toBe(info.publicJwk.x);
    expect(point.subarray(33).toString("base64url")).toBe(info.publicJwk.y);
    expect(view.thumbprint).toBe(info.thumbprint);
  });

  it("names the key with an RFC 7512 URI", () => {
    expect(info.ref).toMatch(/^pkcs11:token=m2m-it;object=m2m-device;id=(%[0-9A-F]{2}){16};type=private$/);
  });

  it("keeps the private key inside the token (sensitive, never extractable, sign-only)", async () => {
    const view = await inspectKeyInNewProcess(hsm, hsm, "m2m-device");
    expect(view.secretRead).toBe("CKR_ATTRIBUTE_SENSITIVE");
    expect(view.attributes).toEqual({
      CKA_LOCAL: true,
      CKA_NEVER_EXTRACTABLE: true,
      CKA_ALWAYS_SENSITIVE: true,
      CKA_EXTRACTABLE: false,
      CKA_SENSITIVE: true,
      CKA_PRIVATE: true,
      CKA_TOKEN: true,
      CKA_SIGN: true,
      CKA_DECRYPT: false,
      CKA_UNWRAP: false,
      CKA_DERIVE: false,
    });
    const ev = await p.evidence();
    expect(ev).toMatchObject({ kind: "pkcs11", local: true, extractable: false, selfAsserted: true });
  });

  it("createOrOpen is idempotent, also from concurrent instances: one key, never replaced", async () => {
    const others = [provider(), provider(), provider()];
    const infos = await Promise.all(others.map((o) => o.createOrOpen()));
    for (const i of infos) {
      expect(i.created).toBe(false);
      expect(i.thumbprint).toBe(info.thumbprint);
    }
    const view = await inspectKeyInNewProcess(hsm, hsm, "m2m-device");
    expect(view.privateKeys).toBe(1);
  });

  it("refuses to use or replace a key of the wrong type under the same label", async () => {
    await rejectsWith(provider({ algorithm: "rsa-2048" }).createOrOpen(), "ERR_KEY_MISMATCH");
    const view = await inspectKeyInNewProcess(hsm, hsm, "m2m-device");
    expect(view.privateKeys).toBe(1);
    expect(view.thumbprint).toBe(info.thumbprint);
  });

  it("signs ES256 compact JWS that jose verifies", async () => {
    const jws = await signCompactJws(p, info, { typ: "JWT", kid: info.thumbprint }, { sub: "dev-1" });
    const { payload } = await compactVerify(jws, await importJWK(info.publicJwk, "ES256"));
    expect(JSON.parse(new TextDecoder().decode(payload))).toEqual({ sub: "dev-1" });
    await rejectsWith(p.sign(new Uint8Array([1]), "PS256"), "ERR_KEY_ALG_UNSUPPORTED");
  });

  it("serves 50 concurrent signs through the async session pool, all valid", async () => {
    const asyncOnly = provider({ syncBudgetMs: 0, sessions: 4 });
    await asyncOnly.open();
    const msgs = Array.from({ length: 50 }, () => randomBytes(64));
    const sigs = await Promise.all(msgs.map((m) => asyncOnly.sign(m, "ES256")));
    sigs.forEach((s, i) => {
      expect(s.length).toBe(64);
      expect(verifyEs256(info, msgs[i] as Uint8Array, s)).toBe(true);
    });
  });

  it("keeps the event loop turning during a batch of 2000 signs (concurrent and sequential)", async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    try {
      const msgs = Array.from({ length: 2000 }, (_, i) => Buffer.from(`batch-${i}`));
      const sigs = await Promise.all(msgs.map((m) => p.sign(m)));
      expect(sigs.every((s, i) => verifyEs256(info, msgs[i] as Uint8Array, s))).toBe(true);
      expect(ticks).toBeGreaterThan(0);
      const before = ticks;
      for (const m of msgs) await p.sign(m);
      expect(ticks).toBeGreaterThan(before);
    } finally {
      clearInterval(timer);
    }
  });

  it("property: ES256 signatures of random messages verify with node crypto (ieee-p1363)", async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 1024 }), async (msg) => {
        const sig = await p.sign(msg, "ES256");
        return sig.length === 64 && verifyEs256(info, msg, sig);
      }),
      { numRuns: 2000 },
    );
  });

  it("close() with signs queued: in-flight ones finish, queued ones fail ERR_PKCS11_CLOSED; later calls reopen", async () => {
    const c = provider({ syncBudgetMs: 0, sessions: 2 });
    await c.open();
    const results = await Promise.allSettled(Array.from({ length: 20 }, () => c.sign(randomBytes(16))));
    const pending = Array.from({ length: 20 }, () => c.sign(randomBytes(16)));
    await c.close();
    const settled = await Promise.allSettled(pending);
    expect(results.every((r) => r.status === "fulfilled")).toBe(true);
    const rejected = settled.filter((r) => r.status === "rejected");
    expect(rejected.length).toBeGreaterThan(0);
    for (const r of rejected) expect((r.reason as M2mError).code).toBe("ERR_PKCS11_CLOSED");
    const data = randomBytes(8);
    expect(verifyEs256(info, data, await c.sign(data))).toBe(true);
  });

  it("reopens transparently when every session of the token was closed under it", async () => {
    const lib = loadModule(hsm.modulePath);
    const reopened = () =>
      logLines.filter((l) => JSON.parse(l).msg === "pkcs11 session lost; reopening").length;
    const before = reopened();
    lib.C_CloseAllSessions(slotOf(hsm.tokenLabel));
    const data = randomBytes(32);
    const sig = await p.sign(data);
    expect(verifyEs256(info, data, sig)).toBe(true);
    expect(reopened()).toBe(before + 1);
    lib.C_CloseAllSessions(slotOf(hsm.tokenLabel));
    expect(await p.health()).toMatchObject({ ok: true });
  });
});

describe("Pkcs11KeyProvider on SoftHSM2: RSA-2048", () => {
  it("signs RS256 and PS256 that jose verifies", async () => {
    const r = provider({ algorithm: "rsa-2048", keyLabel: "rsa-device" });
    const info = await r.createOrOpen();
    expect(info.algorithm).toBe("rsa-2048");
    expect(info.jwsAlgorithms).toEqual(["RS256", "PS256"]);
    for (const alg of ["RS256", "PS256"] as const) {
      const jws = await signCompactJws(r, info, {}, { alg_test: alg }, alg);
      const { protectedHeader } = await compactVerify(jws, await importJWK(info.publicJwk, alg));
      expect(protectedHeader.alg).toBe(alg);
    }
    await rejectsWith(r.sign(new Uint8Array([1]), "ES256"), "ERR_KEY_ALG_UNSUPPORTED");
    const view = await inspectKeyInNewProcess(hsm, hsm, "rsa-device");
    expect(view.thumbprint).toBe(info.thumbprint);
    expect(view.secretRead).toBe("CKR_ATTRIBUTE_SENSITIVE");
  });
});

/** Makes a key pair with raw pkcs11js, bypassing the provider's templates (unfit keys on purpose). */
function rawKeyPair(label: string, priv: { extractable: boolean; sensitive: boolean }, ec = true): void {
  const lib = loadModule(hsm.modulePath);
  const s = lib.C_OpenSession(slotOf(hsm.tokenLabel), pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
  try {
    const id = randomBytes(4);
    const common = [
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_LABEL, value: label },
      { type: pkcs11js.CKA_ID, value: id },
    ];
    lib.C_GenerateKeyPair(
      s,
      { mechanism: ec ? pkcs11js.CKM_EC_KEY_PAIR_GEN : pkcs11js.CKM_RSA_PKCS_KEY_PAIR_GEN },
      ec
        ? [...common, { type: pkcs11js.CKA_EC_PARAMS, value: Buffer.from("06082a8648ce3d030107", "hex") }]
        : [...common, { type: pkcs11js.CKA_MODULUS_BITS, value: 1024 }],
      [
        ...common,
        { type: pkcs11js.CKA_PRIVATE, value: true },
        { type: pkcs11js.CKA_SIGN, value: true },
        { type: pkcs11js.CKA_EXTRACTABLE, value: priv.extractable },
        { type: pkcs11js.CKA_SENSITIVE, value: priv.sensitive },
      ],
    );
  } finally {
    lib.C_CloseSession(s);
  }
}

describe("Pkcs11KeyProvider refuses keys unfit to be a device identity", () => {
  it("an extractable or non-sensitive key under the label: ERR_KEY_UNPROTECTED, not used", async () => {
    rawKeyPair("exportable", { extractable: true, sensitive: true });
    await rejectsWith(provider({ keyLabel: "exportable" }).createOrOpen(), "ERR_KEY_UNPROTECTED");
    rawKeyPair("readable", { extractable: false, sensitive: false });
    await rejectsWith(provider({ keyLabel: "readable" }).open(), "ERR_KEY_UNPROTECTED");
  });

  it("two private keys with the label: ERR_KEY_AMBIGUOUS (a keyId picks one)", async () => {
    rawKeyPair("twice", { extractable: false, sensitive: true });
    rawKeyPair("twice", { extractable: false, sensitive: true });
    const e = await rejectsWith(provider({ keyLabel: "twice" }).createOrOpen(), "ERR_KEY_AMBIGUOUS");
    expect(e.hint).toMatch(/keys\.pkcs11\.key_id/);
    expect((await inspectKeyInNewProcess(hsm, hsm, "twice")).privateKeys).toBe(2);
  });

  it("RSA-1024 under an rsa-2048 config: ERR_KEY_MISMATCH", async () => {
    rawKeyPair("small-rsa", { extractable: false, sensitive: true }, false);
    await rejectsWith(provider({ keyLabel: "small-rsa", algorithm: "rsa-2048" }).open(), "ERR_KEY_MISMATCH");
  });

  it("a leftover public key without its private half: ERR_KEY_MISMATCH, nothing generated; destroy clears it", async () => {
    const d = provider({ keyLabel: "half" });
    await d.createOrOpen();
    const lib = loadModule(hsm.modulePath);
    const s = lib.C_OpenSession(
      slotOf(hsm.tokenLabel),
      pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION,
    );
    lib.C_FindObjectsInit(s, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY },
      { type: pkcs11js.CKA_LABEL, value: "half" },
    ]);
    const [priv] = lib.C_FindObjects(s, 2);
    lib.C_FindObjectsFinal(s);
    if (priv === undefined) throw new Error("private key not found");
    lib.C_DestroyObject(s, priv);
    lib.C_CloseSession(s);
    const again = provider({ keyLabel: "half" });
    await rejectsWith(again.createOrOpen(), "ERR_KEY_MISMATCH");
    expect(await inspectKeyInNewProcess(hsm, hsm, "half")).toMatchObject({ privateKeys: 0, publicKeys: 1 });
    await again.destroy();
    expect((await again.createOrOpen()).created).toBe(true);
  });
});

describe("Pkcs11KeyProvider destroy", () => {
  it("removes private and public objects; open then fails; destroy is idempotent", async () => {
    const d = provider({ keyLabel: "to-destroy", keyId: "0a0b0c" });
    const info = await d.createOrOpen();
    expect(info.ref).toBe("pkcs11:token=m2m-it;object=to-destroy;id=%0A%0B%0C;type=private");
    expect((await inspectKeyInNewProcess(hsm, hsm, "to-destroy")).privateKeys).toBe(1);
    await d.destroy();
    const view = await inspectKeyInNewProcess(hsm, hsm, "to-destroy");
    expect(view).toMatchObject({ found: false, privateKeys: 0, publicKeys: 0 });
    await rejectsWith(d.open(), "ERR_KEY_NOT_FOUND");
    expect(await d.health()).toMatchObject({ ok: false, code: "ERR_KEY_NOT_FOUND" });
    await d.destroy();
  });
});

describe("Pkcs11KeyProvider error paths", () => {
  it("wrong PIN: ERR_PKCS11_PIN (fatal), tried once, PIN never printed; the token is not locked", async () => {
    const wrongFile = join(hsm.dir, "wrong.pin");
    await writeFile(wrongFile, `${WRONG_PIN}\n`, { mode: 0o600 });
    const lines: string[] = [];
    const logger = createLogger({ level: "debug", write: (l) => lines.push(l) });
    const bad = provider({ tokenLabel: errToken.tokenLabel, pin: { file: wrongFile }, logger });
    const e1 = await rejectsWith(bad.createOrOpen(), "ERR_PKCS11_PIN");
    expect(e1.retry).toBe("fatal");
    expect(e1.hint).toMatch(/fix the PIN/);
    // A second call must not offer the same refused PIN again (each try counts towards locking).
    const e2 = await rejectsWith(bad.sign(new Uint8Array([1])), "ERR_PKCS11_PIN");
    expect(e2.details.reason).toBe("known-wrong");
    expect(lines.filter((l) => JSON.parse(l).msg === "pkcs11 login")).toHaveLength(1);
    for (const text of [...lines, JSON.stringify(e1), String(e1.stack), JSON.stringify(e2)]) {
      expect(text).not.toContain(WRONG_PIN);
    }
    const flags = loadModule(hsm.modulePath).C_GetTokenInfo(slotOf(errToken.tokenLabel)).flags;
    expect(flags & pkcs11js.CKF_USER_PIN_LOCKED).toBe(0);
    const good = provider({ tokenLabel: errToken.tokenLabel, pin: { file: errToken.pinFile } });
    expect((await good.createOrOpen()).created).toBe(true);
  });

  it("token removed while in use: ERR_PKCS11_TOKEN_NOT_FOUND (transient), health says so, nothing crashes", async () => {
    const r = provider({ tokenLabel: removable.tokenLabel, pin: { file: removable.pinFile } });
    await r.createOrOpen();
    await r.sign(new Uint8Array([1]));
    await execa("softhsm2-util", ["--delete-token", "--token", removable.tokenLabel], {
      env: hsm.env,
      timeout: 30_000,
    });
    const e = await rejectsWith(r.sign(new Uint8Array([2])), "ERR_PKCS11_TOKEN_NOT_FOUND");
    expect(e.retry).toBe("transient");
    expect(e.details.reason).toBe("removed");
    expect(e.hint).toMatch(/plug it back/);
    expect(await r.health()).toMatchObject({ ok: false, code: "ERR_PKCS11_TOKEN_NOT_FOUND" });
  });

  it("missing module: ERR_PKCS11_MODULE (permanent) with an install hint", async () => {
    const e = await rejectsWith(
      provider({ modulePath: "/nonexistent/libpkcs11.so" }).open(),
      "ERR_PKCS11_MODULE",
    );
    expect(e.retry).toBe("permanent");
    expect(e.hint).toMatch(/install/);
  });

  it("a file that is not a PKCS#11 module: ERR_PKCS11_MODULE", async () => {
    await rejectsWith(provider({ modulePath: hsm.conf }).open(), "ERR_PKCS11_MODULE");
  });

  it("unknown token label: ERR_PKCS11_TOKEN_NOT_FOUND listing the labels present", async () => {
    const e = await rejectsWith(
      provider({ tokenLabel: "no-such-token" }).open(),
      "ERR_PKCS11_TOKEN_NOT_FOUND",
    );
    expect(String(e.details.labelsFound)).toContain("m2m-it");
    expect(e.hint).toMatch(/keys\.pkcs11\.token_label/);
  });

  it("PIN file readable by group/others (0644): ERR_PIN_FILE_PERMISSIONS, nothing tried", async () => {
    const f = join(hsm.dir, "loose.pin");
    await writeFile(f, "1234\n", { mode: 0o644 });
    const e = await rejectsWith(provider({ pin: { file: f } }).open(), "ERR_PIN_FILE_PERMISSIONS");
    expect(e.hint).toMatch(/chmod 600/);
  });

  it("PIN env var missing: ERR_PIN_ENV_MISSING; present: works", async () => {
    const e = await rejectsWith(
      provider({ tokenLabel: errToken.tokenLabel, pin: { env: "M2M_TEST_PIN" }, env: {} }).open(),
      "ERR_PIN_ENV_MISSING",
    );
    expect(e.hint).toMatch(/M2M_TEST_PIN/);
    const ok = provider({
      tokenLabel: errToken.tokenLabel,
      pin: { env: "M2M_TEST_PIN" },
      env: { M2M_TEST_PIN: ERR_TOKEN.pin },
    });
    expect((await ok.open()).algorithm).toBe("ec-p256");
  });

  it("an unusable key-id config is refused up front", () => {
    expect(() => provider({ keyId: "xyz" })).toThrow(
      expect.objectContaining({ code: "ERR_PKCS11_CONFIG" }) as unknown as Error,
    );
  });

  it("health never throws and names the failure", async () => {
    const h = await provider({ tokenLabel: "no-such-token" }).health();
    expect(h).toMatchObject({ ok: false, code: "ERR_PKCS11_TOKEN_NOT_FOUND" });
  });
});
