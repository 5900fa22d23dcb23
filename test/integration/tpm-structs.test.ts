import fc from "fast-check";
import { describe, expect, test } from "vitest";
import { isM2mError } from "../../src/core/errors.js";
import { buildCertifyCommand, parseCertifyResponse } from "../../src/keys/tpm/endorsement.js";
import { parseResponse } from "../../src/keys/tpm/runner.js";
import { ecdsaTpmtToRaw, parseTpmtPublic } from "../../src/keys/tpm/tpmt.js";

// Pure checks of the byte layouts the TPM backend builds and parses (no TPM needed).

function tpmtSig(r: Uint8Array, s: Uint8Array): Uint8Array {
  return Uint8Array.from([0x00, 0x18, 0x00, 0x0b, 0, r.length, ...r, 0, s.length, ...s]);
}

describe("TPMT_SIGNATURE → JWS r‖s", () => {
  test("short r and s are left-padded to 32 bytes", () => {
    const r = Uint8Array.from({ length: 31 }, (_, i) => i + 1);
    const s = Uint8Array.from({ length: 30 }, (_, i) => 200 - i);
    const raw = ecdsaTpmtToRaw(tpmtSig(r, s));
    expect(raw.length).toBe(64);
    expect(raw[0]).toBe(0);
    expect(Buffer.from(raw.subarray(1, 32))).toEqual(Buffer.from(r));
    expect(Buffer.from(raw.subarray(32, 34))).toEqual(Buffer.from([0, 0]));
    expect(Buffer.from(raw.subarray(34))).toEqual(Buffer.from(s));
  });

  test("property: any r, s of 1..32 bytes round-trip as integers", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 1, maxLength: 32 }),
        fc.uint8Array({ minLength: 1, maxLength: 32 }),
        (r, s) => {
          const raw = ecdsaTpmtToRaw(tpmtSig(r, s));
          const big = (b: Uint8Array) => BigInt(`0x${Buffer.from(b).toString("hex") || "0"}`);
          return raw.length === 64 && big(raw.subarray(0, 32)) === big(r) && big(raw.subarray(32)) === big(s);
        },
      ),
      { numRuns: 500 },
    );
  });

  test.each([
    ["not ECDSA", Uint8Array.from([0x00, 0x14, 0x00, 0x0b, 0, 1, 1, 0, 1, 1])],
    ["r too long", tpmtSig(new Uint8Array(33), new Uint8Array(32))],
    ["trailing byte", Uint8Array.from([...tpmtSig(new Uint8Array(32), new Uint8Array(32)), 0])],
    ["truncated", tpmtSig(new Uint8Array(32), new Uint8Array(32)).subarray(0, 40)],
  ])("refuses %s", (_n, bytes) => {
    expect(() => ecdsaTpmtToRaw(bytes)).toThrow(
      expect.objectContaining({ code: "ERR_TPM_SIGNATURE_FORMAT" }),
    );
  });
});

describe("raw TPM2_Certify", () => {
  test("command layout: header, two handles, two password sessions, nonce, NULL scheme", () => {
    const nonce = Uint8Array.from([1, 2, 3, 4]);
    const cmd = Buffer.from(buildCertifyCommand(0x81000002, 0x81000003, nonce));
    expect(cmd.readUInt16BE(0)).toBe(0x8002);
    expect(cmd.readUInt32BE(2)).toBe(cmd.length);
    expect(cmd.readUInt32BE(6)).toBe(0x148);
    expect(cmd.readUInt32BE(10)).toBe(0x81000002);
    expect(cmd.readUInt32BE(14)).toBe(0x81000003);
    expect(cmd.readUInt32BE(18)).toBe(18);
    expect(cmd.readUInt32BE(22)).toBe(0x40000009);
    expect(cmd.readUInt32BE(31)).toBe(0x40000009);
    expect(cmd.readUInt16BE(40)).toBe(4);
    expect(Buffer.from(cmd.subarray(42, 46))).toEqual(Buffer.from(nonce));
    expect(cmd.readUInt16BE(46)).toBe(0x0010);
    expect(cmd.length).toBe(48);
  });

  test("response parsing honours parameterSize and refuses overruns", () => {
    const attest = Uint8Array.from([0xff, 0x54, 0x43, 0x47, 0x80, 0x17]);
    const sig = tpmtSig(new Uint8Array(32).fill(1), new Uint8Array(32).fill(2));
    const params = Buffer.concat([Buffer.from([0, attest.length]), attest, sig]);
    const sessions = Buffer.from([0, 0, 1, 0, 0, 0, 0, 1, 0, 0]);
    const body = Buffer.concat([Buffer.alloc(4), params, sessions]);
    body.writeUInt32BE(params.length, 0);
    const parsed = parseCertifyResponse(body);
    expect(Buffer.from(parsed.attest)).toEqual(Buffer.from(attest));
    expect(Buffer.from(parsed.signature)).toEqual(Buffer.from(sig));
    const overrun = Buffer.from(body);
    overrun.writeUInt32BE(body.length, 0);
    expect(() => parseCertifyResponse(overrun)).toThrow(
      expect.objectContaining({ code: "ERR_TPM_RESPONSE" }),
    );
    const bigAttest = Buffer.from(body);
    bigAttest.writeUInt16BE(0xffff, 4);
    expect(() => parseCertifyResponse(bigAttest)).toThrow(
      expect.objectContaining({ code: "ERR_TPM_RESPONSE" }),
    );
    expect(() => parseCertifyResponse(body.subarray(0, 3))).toThrow(
      expect.objectContaining({ code: "ERR_TPM_RESPONSE" }),
    );
  });

  test("response header: size must equal the byte count", () => {
    expect(parseResponse(Uint8Array.from([0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x22])).rc).toBe(0x922);
    expect(() => parseResponse(Uint8Array.from([0x80, 0x01, 0, 0, 0, 11, 0, 0, 0, 0]))).toThrow(
      expect.objectContaining({ code: "ERR_TPM_RESPONSE" }),
    );
  });
});

describe("TPMT_PUBLIC parsing", () => {
  // The P-256 SRK template as swtpm returns it (x, y shortened to 2 bytes for the fixture).
  const srk = Uint8Array.from([
    0x00, 0x23, 0x00, 0x0b, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x00, 0x43, 0x00,
    0x10, 0x00, 0x03, 0x00, 0x10, 0x00, 0x02, 0xaa, 0xbb, 0x00, 0x02, 0xcc, 0xdd,
  ]);
  test("reads type, attributes, symmetric, curve and unique", () => {
    const p = parseTpmtPublic(srk);
    expect(p.objectAttributes).toBe(0x30472);
    expect(p.symmetric).toEqual({ algorithm: 0x0006, keyBits: 128, mode: 0x0043 });
    expect(p.curveId).toBe(3);
    expect(p.unique.map((u) => Buffer.from(u).toString("hex"))).toEqual(["aabb", "ccdd"]);
  });
  test("property: every truncation or extension is refused with a typed error", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: srk.length - 1 }),
        fc.uint8Array({ minLength: 1, maxLength: 4 }),
        (cut, extra) => {
          for (const bad of [srk.subarray(0, cut), Uint8Array.from([...srk, ...extra])]) {
            try {
              parseTpmtPublic(bad);
              return false;
            } catch (err) {
              if (!isM2mError(err, "ERR_TPM_STRUCT_MALFORMED")) return false;
            }
          }
          return true;
        },
      ),
      { numRuns: 200 },
    );
  });
});
