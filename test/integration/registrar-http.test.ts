import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { RegistrarClient } from "../../src/enroll/index.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { startRegistrar } from "../../src/registrar/server.js";
import { ENROLL_PATHS, enrolmentResultSchema, WIRE_VERSION } from "../../src/wire/v1/index.js";
import { startTestRegistrar, type TestRegistrar } from "./registrar-harness.js";

async function pkcs11Body(token: string, label = "k"): Promise<Record<string, unknown>> {
  const p = new FakeKeyProvider({ label });
  const info = await p.createOrOpen();
  return {
    v: WIRE_VERSION,
    bootstrapToken: token,
    csr: Buffer.from(await createCsr(p, info, { commonName: "x" })).toString("base64url"),
    evidence: { local: true, neverExtractable: true, alwaysSensitive: true },
    hardwareSerial: `SN-${label}`,
  };
}

describe("registrar HTTP hardening and bootstrap-token races (real HTTPS on 127.0.0.1:0)", () => {
  let reg: TestRegistrar;
  const clock = new ManualClock(new Date());

  beforeAll(async () => {
    reg = await startTestRegistrar({
      clock,
      raw: { limits: { max_body_bytes: 4096, request_timeout_ms: 5000 } },
    });
    await addEnrolmentGroup(reg.store, { name: "sensors", role: "sensor", methods: ["pkcs11"] });
    await addEnrolmentGroup(reg.store, {
      name: "tpm-only",
      role: "gw",
      methods: ["tpm"],
      ekAllow: ["ab".repeat(32)],
    });
  });
  afterAll(async () => {
    await reg?.close();
  });

  it("refuses oversized, malformed, mistyped and schema-invalid bodies with stable codes and no echo", async () => {
    const big = await reg.post(ENROLL_PATHS.pkcs11, JSON.stringify({ pad: "x".repeat(10_000) }));
    expect(big).toMatchObject({ status: 413, json: { v: 1, error: { code: "ERR_BODY_TOO_LARGE" } } });
    // Chunked (no content-length): the cap applies while streaming.
    const chunked = await reg.post(ENROLL_PATHS.pkcs11, Buffer.alloc(50_000, 0x20));
    expect(chunked.status).toBe(413);
    expect(await reg.post(ENROLL_PATHS.pkcs11, "{not json")).toMatchObject({
      status: 400,
      json: { error: { code: "ERR_BAD_JSON" } },
    });
    expect(await reg.post(ENROLL_PATHS.pkcs11, "{}", "text/plain")).toMatchObject({
      status: 415,
      json: { error: { code: "ERR_CONTENT_TYPE" } },
    });
    const marker = "SECRET-MARKER-123456 with spaces";
    const bad = await reg.post(
      ENROLL_PATHS.pkcs11,
      JSON.stringify({ ...(await pkcs11Body("x".repeat(20))), bootstrapToken: marker }),
    );
    expect(bad).toMatchObject({
      status: 400,
      json: { error: { code: "ERR_SCHEMA", field: "bootstrapToken" } },
    });
    expect(JSON.stringify(bad.json)).not.toContain("SECRET-MARKER");
    const extra = await reg.post(
      ENROLL_PATHS.pkcs11,
      JSON.stringify({ ...(await pkcs11Body("y".repeat(20))), role: "admin" }),
    );
    expect(extra).toMatchObject({ status: 400, json: { error: { code: "ERR_SCHEMA" } } });
    const wrongVersion = await reg.post(ENROLL_PATHS.tpmBegin, JSON.stringify({ v: 2 }));
    expect(wrongVersion).toMatchObject({ status: 400, json: { error: { code: "ERR_SCHEMA", field: "v" } } });
    expect(await reg.post("/v1/nope", "{}")).toMatchObject({
      status: 404,
      json: { error: { code: "ERR_NOT_FOUND" } },
    });
    expect(await reg.store.listDevices()).toEqual([]);
  });

  it("a bootstrap token used twice concurrently: exactly one enrolment wins", async () => {
    const { token } = await createBootstrapToken(reg.store, "sensors", 3600, clock);
    const bodies = await Promise.all(["a", "b", "c"].map((l) => pkcs11Body(token.reveal(), l)));
    const results = await Promise.all(bodies.map((b) => reg.post(ENROLL_PATHS.pkcs11, JSON.stringify(b))));
    expect(results.map((r) => r.status).sort()).toEqual([200, 401, 401]);
    for (const r of results.filter((x) => x.status === 401)) {
      expect(r.json).toMatchObject({ error: { code: "ERR_TOKEN_USED" } });
    }
    expect(await reg.store.listDevices()).toHaveLength(1);
  });

  it("expired, unknown and wrong-group tokens are refused with their own codes; nothing is persisted", async () => {
    const before = (await reg.store.listDevices()).length;
    const { token } = await createBootstrapToken(reg.store, "sensors", 60, clock);
    await clock.advance(61_000);
    expect(
      await reg.post(ENROLL_PATHS.pkcs11, JSON.stringify(await pkcs11Body(token.reveal(), "e"))),
    ).toMatchObject({
      status: 401,
      json: { error: { code: "ERR_TOKEN_EXPIRED" } },
    });
    expect(
      await reg.post(ENROLL_PATHS.pkcs11, JSON.stringify(await pkcs11Body("m2mbt_unknown-token-value", "u"))),
    ).toMatchObject({
      status: 401,
      json: { error: { code: "ERR_TOKEN_INVALID" } },
    });
    const { token: tpmToken } = await createBootstrapToken(reg.store, "tpm-only", 60, clock);
    expect(
      await reg.post(ENROLL_PATHS.pkcs11, JSON.stringify(await pkcs11Body(tpmToken.reveal(), "t"))),
    ).toMatchObject({
      status: 403,
      json: { error: { code: "ERR_METHOD_NOT_PERMITTED" } },
    });
    // A CSR whose signature does not verify is refused and the token stays usable.
    const { token: fresh } = await createBootstrapToken(reg.store, "sensors", 60, clock);
    const body = await pkcs11Body(fresh.reveal(), "s");
    const csr = Buffer.from(String(body.csr), "base64url");
    csr[csr.length - 3] = (csr[csr.length - 3] ?? 0) ^ 0xff;
    const res = await reg.post(
      ENROLL_PATHS.pkcs11,
      JSON.stringify({ ...body, csr: csr.toString("base64url") }),
    );
    expect(res.status).toBeGreaterThanOrEqual(400);
    expect(res.status).toBeLessThan(500);
    expect((res.json as { error: { code: string } }).error.code).toMatch(/^ERR_CSR_(SIGNATURE|INVALID)$/);
    expect(await reg.store.listDevices()).toHaveLength(before);
    expect((await reg.post(ENROLL_PATHS.pkcs11, JSON.stringify(body))).status).toBe(200);
  });

  it("client side: plain http and an untrusted registrar certificate are refused", async () => {
    await expect(
      RegistrarClient.create({ baseUrl: reg.url.replace("https:", "http:") }),
    ).rejects.toMatchObject({
      code: "ERR_ENROLL_CONFIG",
    });
    const client = await RegistrarClient.create({ baseUrl: reg.url, timeoutMs: 3000 });
    try {
      // Reported as what it is (an untrusted certificate, naming the host), never as "unreachable".
      await expect(client.postJson(ENROLL_PATHS.pkcs11, {}, enrolmentResultSchema)).rejects.toMatchObject({
        code: "ERR_TLS_VERIFY",
        message: expect.stringContaining("127.0.0.1"),
      });
    } finally {
      await client.close();
    }
  });

  it("extraRoutes extend the router; duplicates are refused", async () => {
    const extra = await startRegistrar(reg.config, {
      store: reg.store,
      ca: reg.ca,
      extraRoutes: [
        {
          method: "POST",
          path: "/v1/echo-size",
          contentTypes: ["application/x-www-form-urlencoded"],
          handle: async (ctx) => ({ status: 200, json: { size: ctx.rawBody.length } }),
        },
      ],
    });
    try {
      const { Agent, request } = await import("undici");
      const { readFile } = await import("node:fs/promises");
      const agent = new Agent({ connect: { ca: await readFile(reg.caFile, "utf8") } });
      const res = await request(`${extra.url}/v1/echo-size`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: "a=b",
      });
      expect(await res.body.json()).toEqual({ size: 3 });
      await agent.close();
    } finally {
      await extra.close();
    }
    await expect(
      startRegistrar(reg.config, {
        store: reg.store,
        ca: reg.ca,
        extraRoutes: [
          { method: "POST", path: ENROLL_PATHS.pkcs11, handle: async () => ({ status: 200, json: {} }) },
        ],
      }),
    ).rejects.toThrow(/duplicate route/);
  });
});

describe("registrar request deadline", () => {
  it("a client that stops sending mid-body gets 408 and the connection is closed", async () => {
    const reg = await startTestRegistrar({
      raw: { limits: { max_body_bytes: 65536, request_timeout_ms: 300 } },
    });
    try {
      const { connect } = await import("node:tls");
      const { readFile } = await import("node:fs/promises");
      const ca = await readFile(reg.caFile, "utf8");
      const received = await new Promise<string>((resolve, reject) => {
        const sock = connect(
          { host: "127.0.0.1", port: reg.running.port, ca, servername: "localhost" },
          () => {
            sock.write(
              `POST ${ENROLL_PATHS.pkcs11} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"v":1,`,
            );
          },
        );
        let data = "";
        sock.on("data", (d: Buffer) => {
          data += d.toString();
        });
        sock.on("close", () => resolve(data));
        sock.on("error", reject);
      });
      expect(received).toMatch(/^HTTP\/1\.1 408/);
      expect(await reg.store.listDevices()).toEqual([]);
      // The abandoned request is settled and audited (nothing keeps waiting for the rest of the body).
      for (let i = 0; i < 100 && (await reg.store.listAudit(10)).length === 0; i++)
        await new Promise((r) => setTimeout(r, 20));
      expect(await reg.store.listAudit(10)).toEqual([
        expect.objectContaining({ event: "enroll.pkcs11", outcome: "failure" }),
      ]);
    } finally {
      await reg.close();
    }
  });
});

describe("registrar under random bodies (fast-check, time-capped)", () => {
  it("any JSON to any enrolment endpoint: a 4xx with a stable code, never a 5xx, nothing registered", async () => {
    const fc = await import("fast-check");
    const reg = await startTestRegistrar();
    await addEnrolmentGroup(reg.store, { name: "sensors", role: "sensor", methods: ["pkcs11"] });
    const { token } = await createBootstrapToken(reg.store, "sensors", 3600);
    const valid = await pkcs11Body(token.reveal(), "fuzz");
    const paths = [ENROLL_PATHS.pkcs11, ENROLL_PATHS.tpmBegin, ENROLL_PATHS.tpmFinish];
    const b64ish = fc.stringMatching(/^[A-Za-z0-9_-]{1,64}$/);
    const mutatedValid = fc
      .tuple(
        fc.constantFrom(...Object.keys(valid), "evidence.local", "evidence"),
        fc.oneof(fc.jsonValue(), b64ish),
      )
      .map(([k, v]) => {
        const copy: Record<string, unknown> = structuredClone(valid);
        if (k === "evidence.local") copy.evidence = { ...(copy.evidence as object), local: v };
        else copy[k] = v;
        // The one valid token must never be spent by a mutation that keeps everything else valid.
        if (k !== "bootstrapToken") copy.bootstrapToken = "m2mbt_not-a-real-token-000";
        return JSON.stringify(copy);
      });
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.constantFrom(...paths),
          fc.oneof(fc.json(), mutatedValid, fc.string({ maxLength: 200 })),
          async (path, body) => {
            const res = await reg.post(path, body);
            expect(res.status).toBeGreaterThanOrEqual(400);
            expect(res.status).toBeLessThan(500);
            expect(res.json).toMatchObject({
              v: 1,
              error: { code: expect.stringMatching(/^ERR_[A-Z0-9_]+$/) },
            });
          },
        ),
        { numRuns: 150, interruptAfterTimeLimit: 20_000 },
      );
      expect(await reg.store.listDevices()).toEqual([]);
    } finally {
      await reg.close();
    }
  });
});
