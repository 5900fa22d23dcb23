import { describe, expect, it } from "vitest";
import {
  build,
  ISSUE_15_CASES,
  ISSUE_15_CONTROLS,
  joseVerdict,
  type Recipe,
  registrarVerdict,
} from "../fuzz/jose-diff-kit.js";

/**
 * Issue 15: the registrar's own JOSE verification accepted three kinds of token that jose v6 refuses.
 * Each is now refused with its own code; jose is asked too, so each case is proven to be one jose
 * refuses (and each control one both accept: the new checks are not over-broad).
 */
const refusedWith = async (recipe: Recipe, code: string): Promise<void> => {
  const token = build(recipe);
  await expect(registrarVerdict(recipe, token)).resolves.toEqual({ ok: false, code });
  await expect(joseVerdict(recipe, token)).resolves.toMatchObject({ ok: false });
};
const cases = (prefix: string) => ISSUE_15_CASES.filter((c) => c.code.startsWith(prefix));

describe("issue 15 regressions", () => {
  it("invalid UTF-8 in header or payload is refused (ERR_ASSERTION_UTF8, ERR_DPOP_UTF8)", async () => {
    const utf8 = ISSUE_15_CASES.filter((c) => c.code.endsWith("_UTF8"));
    expect(utf8.length).toBe(24);
    for (const c of utf8) await refusedWith(c.recipe, c.code);
  });

  it("DPoP proof with exp in the past is refused (ERR_DPOP_EXPIRED, ERR_DPOP_EXP)", async () => {
    const exp = [...cases("ERR_DPOP_EXPIRED"), ...cases("ERR_DPOP_EXP")];
    expect(exp.length).toBeGreaterThanOrEqual(3);
    for (const c of exp) await refusedWith(c.recipe, c.code);
  });

  it("DPoP proof with nbf in the future is refused (ERR_DPOP_NBF)", async () => {
    const nbf = cases("ERR_DPOP_NBF");
    expect(nbf.length).toBe(3);
    for (const c of nbf) await refusedWith(c.recipe, c.code);
  });

  it("DPoP jwk whose metadata forbids signing is refused (ERR_DPOP_JWK_USE, _ALG, _KEY_OPS)", async () => {
    const meta = cases("ERR_DPOP_JWK");
    expect(new Set(meta.map((c) => c.code))).toEqual(
      new Set(["ERR_DPOP_JWK_USE", "ERR_DPOP_JWK_ALG", "ERR_DPOP_JWK_KEY_OPS", "ERR_DPOP_JWK"]),
    );
    for (const c of meta) await refusedWith(c.recipe, c.code);
  });

  it("DPoP htu with userinfo is refused (ERR_DPOP_HTU): only query and fragment are ignored", async () => {
    for (const c of cases("ERR_DPOP_HTU")) await refusedWith(c.recipe, c.code);
  });

  it("near-misses of each case are accepted by both the registrar and jose", async () => {
    for (const c of ISSUE_15_CONTROLS) {
      const token = build(c.recipe);
      expect([c.name, await registrarVerdict(c.recipe, token)]).toEqual([c.name, { ok: true }]);
      expect([c.name, await joseVerdict(c.recipe, token)]).toEqual([c.name, { ok: true }]);
    }
  });
});
