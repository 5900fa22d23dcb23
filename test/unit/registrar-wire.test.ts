import { describe, expect, it } from "vitest";
import { parseDurationSeconds, registrarConfigFrom } from "../../src/registrar/config.js";
import {
  enrolmentResultSchema,
  errorBodySchema,
  pkcs11EnrollRequestSchema,
  tpmBeginRequestSchema,
  tpmFinishRequestSchema,
} from "../../src/wire/v1/index.js";

const beginOk = {
  v: 1,
  ekPublic: "AAEC",
  akPublic: "AAEC",
  devicePublic: "AAEC",
  hardwareSerial: "SN-1",
};

describe("wire v1 schemas", () => {
  it("are strict, versioned, base64url-only and bounded", () => {
    expect(tpmBeginRequestSchema.parse(beginOk).requestedAttributes).toEqual({});
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, extra: 1 }).success).toBe(false);
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, v: 2 }).success).toBe(false);
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, akPublic: "AA==" }).success).toBe(false);
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, akPublic: "A".repeat(2049) }).success).toBe(false);
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, hardwareSerial: "has space" }).success).toBe(false);
    const many = Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, "v"]));
    expect(tpmBeginRequestSchema.safeParse({ ...beginOk, requestedAttributes: many }).success).toBe(false);
    expect(
      tpmFinishRequestSchema.safeParse({
        v: 1,
        sessionId: "s",
        secret: "AA",
        attest: "AA",
        signature: "AA",
        csr: "AA",
      }).success,
    ).toBe(true);
    expect(
      pkcs11EnrollRequestSchema.safeParse({
        v: 1,
        bootstrapToken: "short",
        csr: "AA",
        evidence: { local: true, neverExtractable: true, alwaysSensitive: true },
        hardwareSerial: "x",
      }).success,
    ).toBe(false);
    expect(
      enrolmentResultSchema.safeParse({
        v: 1,
        deviceId: "dev-1",
        role: "r",
        attributes: {},
        certificatePem: "x",
        caChainPem: [],
        endpoints: { registrar: "https://a", token: "https://a/t", est: "https://a/e" },
        method: "tpm",
      }).success,
    ).toBe(false);
    expect(errorBodySchema.safeParse({ v: 1, error: { code: "nope", message: "m" } }).success).toBe(false);
  });
});

describe("registrar config", () => {
  it("parses durations and resolves paths; errors name the key, never the value", () => {
    expect(parseDurationSeconds("24h")).toBe(86_400);
    expect(parseDurationSeconds("7d")).toBe(604_800);
    expect(parseDurationSeconds(90)).toBe(90);
    expect(() => parseDurationSeconds("soon")).toThrow();
    const c = registrarConfigFrom({ data_dir: "data", tls: { cert: "c.pem", key: "k.pem" } }, "/etc/m2m");
    expect(c).toMatchObject({
      dataDir: "/etc/m2m/data",
      caDir: "/etc/m2m/data/ca",
      tls: { kind: "https", certFile: "/etc/m2m/c.pem" },
      sessionTtlSeconds: 120,
      maxActivationAttempts: 3,
      certLifetimeSeconds: 86_400, // 24 h since revocation bounds (docs/revocation.md)
      maxBodyBytes: 65_536,
    });
    expect(() => registrarConfigFrom({ data_dir: "d" }, "/")).toThrow(
      expect.objectContaining({ code: "ERR_CONFIG_INVALID" }),
    );
    try {
      registrarConfigFrom(
        { data_dir: "d", tls: { insecure_http: true }, session_ttl: "secret-value" },
        "/",
        "r.toml",
      );
      expect.unreachable();
    } catch (err) {
      expect(err).toMatchObject({
        code: "ERR_CONFIG_INVALID",
        details: { file: "r.toml", key: "session_ttl" },
      });
      expect(String((err as Error).message)).not.toContain("secret-value");
    }
    expect(() => registrarConfigFrom({ data_dir: "d", tls: { insecure_http: true }, typo: 1 }, "/")).toThrow(
      expect.objectContaining({ code: "ERR_CONFIG_INVALID" }),
    );
  });
});

describe("schema error paths", () => {
  it("name schema fields but never echo request-chosen keys", async () => {
    const { parseJsonBody } = await import("../../src/registrar/http/router.js");
    const field = (body: unknown): string | undefined => {
      try {
        parseJsonBody(Buffer.from(JSON.stringify(body)), tpmBeginRequestSchema);
      } catch (err) {
        return (err as { field?: string }).field;
      }
      return undefined;
    };
    expect(field({ ...beginOk, akPublic: 5 })).toBe("akPublic");
    expect(field({ ...beginOk, ekChainDer: ["AA", "!!"] })).toBe("ekChainDer.1");
    expect(field({ ...beginOk, requestedAttributes: { "evil<script>": 5 } })).toBe("requestedAttributes.*");
    expect(field({ ...beginOk, "secret-key-name": 1 })).toBe("");
  });
});
