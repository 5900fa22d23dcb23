import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import ts from "typescript";
import { describe, expect, it } from "vitest";
import type { z } from "zod";
import { agentConfigSchema } from "../../src/config/schema.js";

/**
 * Every hint names real config keys: the hints (`hint:` of an error, the error catalogue's `action`,
 * doctor's fix hints) are read from the sources, each dotted key they mention is resolved against the
 * agent's config schema. A hint that says `keys.pkcs11.modulePath` when the key is `module` sends an
 * operator looking for a setting that does not exist.
 */
const REPO = resolve(import.meta.dirname, "..", "..");
const AGENT_DIRS = [
  "src/api",
  "src/cli/agent",
  "src/config",
  "src/credentials",
  "src/daemon",
  "src/enroll",
  "src/keys",
  "src/relay",
];
const CATALOGUE = "src/core/error-codes.ts";

/** All key paths the schema accepts, e.g. `keys.pkcs11.module`, plus each section (`relay.mqtt`). */
function schemaPaths(schema: z.ZodType, prefix = ""): string[] {
  let s = schema as unknown as { _zod: { def: Record<string, unknown> } };
  for (;;) {
    const def = s._zod.def;
    const inner = (def.innerType ?? (def.type === "pipe" ? def.in : undefined)) as typeof s | undefined;
    if (inner === undefined) break;
    s = inner;
  }
  const def = s._zod.def;
  if (def.type !== "object") return [];
  const out: string[] = [];
  for (const [k, v] of Object.entries(def.shape as Record<string, z.ZodType>)) {
    const p = prefix === "" ? k : `${prefix}.${k}`;
    out.push(p, ...schemaPaths(v, p));
  }
  return out;
}

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

function literalText(n: ts.Node): string | undefined {
  if (ts.isStringLiteral(n) || ts.isNoSubstitutionTemplateLiteral(n)) return n.text;
  if (ts.isTemplateExpression(n))
    return [n.head.text, ...n.templateSpans.map((s) => s.literal.text)].join(" ");
  if (ts.isBinaryExpression(n) && n.operatorToken.kind === ts.SyntaxKind.PlusToken) {
    return [literalText(n.left), literalText(n.right)].filter((x) => x !== undefined).join("");
  }
  if (ts.isConditionalExpression(n)) return [literalText(n.whenTrue), literalText(n.whenFalse)].join(" ");
  return undefined;
}

/** Hint texts of a file: `hint: …`, `action: …` and the last argument of doctor's warn()/fail(). */
function hints(file: string): string[] {
  const src = ts.createSourceFile(file, readFileSync(file, "utf8"), ts.ScriptTarget.ES2022, true);
  const out: string[] = [];
  const visit = (n: ts.Node): void => {
    if (
      ts.isPropertyAssignment(n) &&
      ts.isIdentifier(n.name) &&
      (n.name.text === "hint" || n.name.text === "action")
    ) {
      const t = literalText(n.initializer);
      if (t !== undefined) out.push(t);
    }
    if (
      ts.isCallExpression(n) &&
      ts.isIdentifier(n.expression) &&
      ["warn", "fail"].includes(n.expression.text)
    ) {
      const last = n.arguments[n.arguments.length - 1];
      const t = last === undefined || n.arguments.length < 3 ? undefined : literalText(last);
      if (t !== undefined) out.push(t);
    }
    ts.forEachChild(n, visit);
  };
  visit(src);
  return out;
}

const SECTIONS = ["agent", "keys", "enroll", "credentials", "relay", "api", "metrics"];
/** Sub-sections that only exist below a section: `oauth.issuer` must be spelled `credentials.oauth.issuer`. */
const PARTIAL = ["oauth", "est", "tpm", "pkcs11", "mqtt", "https", "outbox", "sources"];
const KEY_RE = new RegExp(
  `(?<![\\w./-])((?:${[...SECTIONS, ...PARTIAL].join("|")})(?:\\.[A-Za-z_][A-Za-z0-9_]*)+)`,
  "g",
);

describe("hints name real config keys", () => {
  const known = new Set(schemaPaths(agentConfigSchema));

  it("the schema walker sees the keys (sanity)", () => {
    expect(known.has("keys.pkcs11.module")).toBe(true);
    expect(known.has("relay.outbox.max_bytes")).toBe(true);
    expect(known.has("keys.pkcs11.modulePath")).toBe(false);
  });

  it("every dotted key in an agent-side hint exists in the agent config schema", () => {
    const sources = [...AGENT_DIRS.flatMap((d) => files(join(REPO, d))), join(REPO, CATALOGUE)];
    const bad: string[] = [];
    let checked = 0;
    for (const f of sources) {
      // The catalogue also holds the registrar's codes: those hints name registrar keys.
      const registrarCode = (t: string): boolean =>
        f.endsWith(CATALOGUE) && /registrar|\[store\]|m2m-registrar/.test(t);
      for (const text of hints(f)) {
        if (registrarCode(text)) continue;
        for (const m of text.matchAll(KEY_RE)) {
          const key = (m[1] ?? "").replace(/\.(js|ts|md|toml|db|sock|pem|d)$/, "");
          if (!key.includes(".")) continue;
          checked++;
          if (!known.has(key)) bad.push(`${relative(REPO, f)}: "${key}" in: ${text}`);
        }
      }
    }
    expect(checked).toBeGreaterThan(20);
    expect(bad).toEqual([]);
  });
});
