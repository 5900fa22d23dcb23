import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { describe, expect, it } from "vitest";

/**
 * Two programs, one tree: the registrar and the agent share only `core`, `wire` and `tpm`, so either
 * side can be read, packaged and scaled alone. These checks read the import graph of the sources.
 */
const ROOT = resolve(import.meta.dirname, "../..");
const SRC = join(ROOT, "src");

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? tsFiles(p) : p.endsWith(".ts") ? [p] : [];
  });
}

/** Relative imports (static, `export … from` and dynamic) of a file, as paths under src/. */
function importsOf(file: string): string[] {
  const text = readFileSync(file, "utf8");
  const out: string[] = [];
  for (const m of text.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)"(\.{1,2}\/[^"]+)"/g)) {
    out.push(relative(SRC, resolve(dirname(file), m[1] as string)));
  }
  return out;
}

/** The top-level area of a path under src/ (`registrar`, `core`, …; `cli/agent` for the CLIs). */
function area(pathUnderSrc: string): string {
  const parts = pathUnderSrc.split("/");
  if (parts[0] === "cli") return /^m2m-registrar\.(ts|js)$/.test(parts[1] ?? "") ? "registrar" : "cli-agent";
  return parts[0] ?? "";
}

const SHARED = new Set(["core", "wire", "tpm"]);
const files = tsFiles(SRC).map((f) => ({ file: relative(SRC, f), imports: importsOf(f) }));

describe("import boundaries", () => {
  it("the import scanner sees the imports (sanity: it finds known edges)", () => {
    const complete = files.find((f) => f.file === "registrar/enrolment/complete.ts");
    expect(complete?.imports).toContain("core/public-key.js");
    const compose = files.find((f) => f.file === "daemon/compose.ts");
    expect(compose?.imports.length).toBeGreaterThan(3);
  });

  it("the registrar imports only core, wire, tpm and itself", () => {
    const bad = files
      .filter((f) => area(f.file) === "registrar")
      .flatMap((f) =>
        f.imports
          .filter((i) => !SHARED.has(area(i)) && area(i) !== "registrar")
          .map((i) => `${f.file} → ${i}`),
      );
    expect(bad).toEqual([]);
  });

  it("the registrar never imports the agent's device-key module src/keys/ (shared needs live in core)", () => {
    const bad = files
      .filter((f) => area(f.file) === "registrar")
      .flatMap((f) => f.imports.filter((i) => area(i) === "keys").map((i) => `${f.file} → ${i}`));
    expect(bad).toEqual([]);
  });

  it("local API clients and server share the wire module for the local API", () => {
    for (const f of [
      "cli/agent/send.ts",
      "cli/agent/status.ts",
      "cli/agent/token.ts",
      "relay/sources/api/parse.ts",
      "daemon/compose.ts",
    ]) {
      expect(files.find((x) => x.file === f)?.imports, f).toContain("wire/v1/local-api.js");
    }
  });

  it("the agent side never imports the registrar", () => {
    const bad = files
      .filter((f) => area(f.file) !== "registrar")
      .flatMap((f) => f.imports.filter((i) => area(i) === "registrar").map((i) => `${f.file} → ${i}`));
    expect(bad).toEqual([]);
  });

  it("core, wire and tpm import nothing but each other", () => {
    const bad = files
      .filter((f) => SHARED.has(area(f.file)))
      .flatMap((f) => f.imports.filter((i) => !SHARED.has(area(i))).map((i) => `${f.file} → ${i}`));
    expect(bad).toEqual([]);
  });
});
