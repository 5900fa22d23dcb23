import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ERROR_CODES, type ErrorCode, isErrorCode, toErrorCode } from "../../src/core/error-codes.js";
import { ERROR_CODES_DOC, renderErrorCodesDoc } from "../../src/core/error-docs.js";
import { M2mError, m2mError } from "../../src/core/errors.js";

const ROOT = join(import.meta.dirname, "../..");
const codes = Object.keys(ERROR_CODES) as ErrorCode[];

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? tsFiles(p) : p.endsWith(".ts") ? [p] : [];
  });
}

/** Every quoted code (`"ERR_…"`, and `` `ERR_…` `` / `` `ERR_…: `` in templates and doc comments) in src/ and hw/. */
function literalsInCode(): Map<string, string> {
  const seen = new Map<string, string>();
  for (const f of [...tsFiles(join(ROOT, "src")), ...tsFiles(join(ROOT, "hw"))]) {
    if (f.endsWith("error-codes.ts")) continue;
    for (const m of readFileSync(f, "utf8").matchAll(/["`](ERR_[A-Z0-9_]+)(?=["`:])/g))
      seen.set(m[1] as string, f.slice(ROOT.length + 1));
  }
  return seen;
}

describe("error code catalogue", () => {
  it("the committed operator doc is exactly what `npm run docs:errors` generates", () => {
    const committed = readFileSync(join(ROOT, ERROR_CODES_DOC), "utf8");
    // If this fails: run `npm run docs:errors` and commit docs/error-codes.md.
    expect(committed).toBe(renderErrorCodesDoc());
    for (const c of codes) expect(committed).toContain(`\`${c}\``);
  });

  it("one naming scheme: ERR_<AREA>_<WHAT> in upper snake case, no protocol numbers in names", () => {
    for (const c of codes) {
      expect(c).toMatch(/^ERR_[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$/);
      expect(c).not.toMatch(/0X[0-9A-F]+|_[0-9]{3}$/);
    }
  });

  it("is sorted (one line per code, so parallel additions merge cleanly) and every action is one line", () => {
    expect(codes).toEqual([...codes].sort());
    const src = readFileSync(join(ROOT, "src/core/error-codes.ts"), "utf8");
    for (const c of codes)
      expect(src).toMatch(new RegExp(`^  ${c}: \\{ retry: "[a-z]+", action: ".+" \\},$`, "m"));
    for (const c of codes) {
      const { retry, action } = ERROR_CODES[c];
      expect(["transient", "permanent", "fatal"]).toContain(retry);
      expect(action.length).toBeGreaterThan(10);
      expect(action.length).toBeLessThanOrEqual(200);
      expect(action).not.toMatch(/\n/);
    }
  });

  it("every code literal in src/ and hw/ is catalogued, and every catalogued code is used there", () => {
    const used = literalsInCode();
    const unknown = [...used].filter(([c]) => !isErrorCode(c)).map(([c, f]) => `${c} (${f})`);
    expect(unknown).toEqual([]);
    const unused = codes.filter((c) => !used.has(c));
    expect(unused).toEqual([]);
  });

  it("codes from outside (wire, worker) are narrowed, never trusted as is", () => {
    expect(isErrorCode("ERR_TPM_BUSY")).toBe(true);
    expect(isErrorCode("ERR_NOT_A_CODE")).toBe(false);
    expect(isErrorCode("toString")).toBe(false);
    expect(isErrorCode(42)).toBe(false);
    expect(toErrorCode("ERR_FROM_THE_FUTURE", "ERR_REGISTRAR_RESPONSE")).toBe("ERR_REGISTRAR_RESPONSE");
    expect(toErrorCode("ERR_TPM_LOCKOUT", "ERR_INTERNAL")).toBe("ERR_TPM_LOCKOUT");
  });

  it("m2mError takes the catalogue's default retry class; the constructor may override it", () => {
    expect(m2mError("ERR_TPM_LOCKOUT", "locked").retry).toBe("fatal");
    expect(m2mError("ERR_TPM_BUSY", "busy").retry).toBe("transient");
    expect(new M2mError("ERR_TPM_BUSY", "permanent", "x").retry).toBe("permanent");
  });
});
