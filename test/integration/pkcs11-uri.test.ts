import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { formatPkcs11Uri, parsePkcs11Uri, pctEncodePathValue } from "../../src/keys/pkcs11/uri.js";

// RFC 7512 URIs name the device key for the OpenSSL pkcs11 engine and in KeyInfo.ref.
describe("RFC 7512 pkcs11 URI encoding", () => {
  it("leaves unreserved and pk11-res-avail characters literal", () => {
    expect(pctEncodePathValue("AZaz09-._~:[]@!$'()*+,=")).toBe("AZaz09-._~:[]@!$'()*+,=");
  });

  it("percent-encodes delimiters, space, percent and non-ASCII (UTF-8, upper-case hex)", () => {
    expect(pctEncodePathValue("a;b/c?d&e#f%g h")).toBe("a%3Bb%2Fc%3Fd%26e%23f%25g%20h");
    expect(pctEncodePathValue("Gerät")).toBe("Ger%C3%A4t");
    expect(pctEncodePathValue('"<>\\^`{|}')).toBe("%22%3C%3E%5C%5E%60%7B%7C%7D");
  });

  it("matches the RFC 7512 §3 example shape", () => {
    const uri = formatPkcs11Uri({
      token: "The Software PKCS#11 Softtoken",
      object: "my-certificate",
      id: Uint8Array.from([0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91]),
      type: "private",
    });
    expect(uri).toBe(
      "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;object=my-certificate;id=%69%95%3E%5C%F4%BD%EC%91;type=private",
    );
  });

  it("omits absent attributes and an empty id", () => {
    expect(formatPkcs11Uri({ token: "t", id: new Uint8Array() })).toBe("pkcs11:token=t");
  });

  it("round-trips arbitrary labels and ids through parse", () => {
    fc.assert(
      fc.property(
        fc.string({ unit: "grapheme", maxLength: 32 }),
        fc.uint8Array({ maxLength: 20 }),
        (label, id) => {
          const uri = formatPkcs11Uri({ token: label, object: label, id, type: "private" });
          // The path never contains a raw attribute delimiter or query start from the value.
          expect(uri.split(";")).toHaveLength(id.length > 0 ? 4 : 3);
          expect(uri).not.toContain("?");
          const parsed = parsePkcs11Uri(uri);
          expect(parsed.token).toBe(label);
          expect(parsed.object).toBe(label);
          expect(Buffer.from(parsed.id ?? new Uint8Array()).equals(Buffer.from(id))).toBe(true);
          expect(parsed.type).toBe("private");
        },
      ),
      { numRuns: 500 },
    );
  });

  it("parse refuses malformed input", () => {
    expect(() => parsePkcs11Uri("http://x")).toThrow();
    expect(() => parsePkcs11Uri("pkcs11:token=%zz")).toThrow();
    expect(() => parsePkcs11Uri("pkcs11:token=a;token=b")).toThrow();
    expect(() => parsePkcs11Uri("pkcs11:novalue")).toThrow();
    expect(parsePkcs11Uri("pkcs11:token=a?pin-source=file:/x").token).toBe("a");
  });
});
