import pkcs11js from "pkcs11js";
import { describe, expect, it } from "vitest";
import { ckrOf, isCkr } from "../../src/keys/pkcs11/module.js";

// pkcs11js reports failures in two shapes; the provider's classification must see both the same way.
describe("ckrOf: PKCS#11 error normalisation", () => {
  it("reads a Pkcs11Error (.code + CKR name as message)", () => {
    const e = new pkcs11js.Pkcs11Error("CKR_PIN_INCORRECT:160", 0, "C_Login");
    expect(ckrOf(e)).toEqual({ name: "CKR_PIN_INCORRECT", code: 160 });
    expect(isCkr(e, "CKR_PIN_INCORRECT")).toBe(true);
  });

  it("reads a plain Error whose message is CKR_X:code", () => {
    expect(ckrOf(new Error("CKR_SESSION_CLOSED:176"))).toEqual({ name: "CKR_SESSION_CLOSED", code: 176 });
  });

  it("maps a bare numeric code to its CKR name", () => {
    const e = Object.assign(new Error("something"), { code: pkcs11js.CKR_DEVICE_REMOVED });
    expect(ckrOf(e)?.name).toBe("CKR_DEVICE_REMOVED");
  });

  it("ignores errors that are not PKCS#11 return values", () => {
    expect(ckrOf(new Error("ENOENT: no such file"))).toBeUndefined();
    expect(ckrOf("CKR_PIN_INCORRECT:160")).toBeUndefined();
    expect(ckrOf(Object.assign(new Error("x"), { code: "ENOENT" }))).toBeUndefined();
  });
});
