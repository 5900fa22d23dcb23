import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { registrarIngestSchema, registrarOauthSchema } from "../../src/registrar/app.js";
import { registrarFileSchema } from "../../src/registrar/config.js";
import { rotationPolicySchema } from "../../src/registrar/rotation/policy.js";

/**
 * docs/registrar.md's config block documents exactly the keys the registrar accepts: every key of the
 * schemas (the file schema, and the [oauth] / [ingest] / [rotation] sections parsed by `serve`), and
 * no key the schemas would refuse.
 */
const REPO = resolve(import.meta.dirname, "..", "..");

type Def = { type: string; innerType?: Node; in?: Node; shape?: Record<string, Node>; element?: Node };
type Node = { _zod: { def: Def } };

function unwrap(n: Node): Node {
  let s = n;
  for (;;) {
    const d = s._zod.def;
    const inner = d.innerType ?? (d.type === "pipe" ? d.in : undefined);
    if (inner === undefined) return s;
    s = inner;
  }
}

/** Leaf key paths; a record is a leaf (free-form names), an array of objects is walked. */
function leaves(schema: Node, prefix = ""): string[] {
  let s = unwrap(schema);
  if (s._zod.def.type === "array" && s._zod.def.element !== undefined) {
    const el = unwrap(s._zod.def.element);
    if (el._zod.def.type !== "object") return prefix === "" ? [] : [prefix];
    s = el;
  }
  if (s._zod.def.type !== "object") return prefix === "" ? [] : [prefix];
  return Object.entries(s._zod.def.shape ?? {}).flatMap(([k, v]) =>
    leaves(v, prefix === "" ? k : `${prefix}.${k}`),
  );
}

function schemaKeys(): Set<string> {
  const out = new Set<string>();
  for (const k of leaves(registrarFileSchema as unknown as Node)) {
    // These three are records in the file schema, validated by their own schemas below.
    if (k === "oauth" || k === "ingest" || k === "rotation") continue;
    out.add(k);
  }
  for (const [section, schema] of [
    ["oauth", registrarOauthSchema],
    ["ingest", registrarIngestSchema],
    ["rotation", rotationPolicySchema],
  ] as const)
    for (const k of leaves(schema as unknown as Node, section)) out.add(k);
  return out;
}

/** Keys of the first ```toml block under "## Registrar config", commented ones included. */
function documentedKeys(): Set<string> {
  const md = readFileSync(join(REPO, "docs", "registrar.md"), "utf8");
  const at = md.indexOf("## Registrar config");
  const start = md.indexOf("```toml", at);
  const end = md.indexOf("```", start + 7);
  const keys = new Set<string>();
  let section = "";
  for (const raw of md.slice(start + 7, end).split("\n")) {
    const line = raw.trim();
    const sec = /^#?\s*\[\[?([a-z_.]+)\]\]?/.exec(line);
    if (sec !== null) {
      section = sec[1] ?? "";
      // A table header documents that key too (`[oauth.roles]`, `[rotation.groups]`).
      keys.add(section);
      continue;
    }
    const key = /^#?\s*([a-z0-9_]+)\s*=/.exec(line);
    if (key !== null) keys.add(section === "" ? (key[1] ?? "") : `${section}.${key[1]}`);
  }
  return keys;
}

describe("docs/registrar.md documents the registrar's config schema", () => {
  it("every accepted key is documented, and every documented key is accepted", () => {
    const schema = schemaKeys();
    const documented = documentedKeys();
    // Free-form tables: their entries are names chosen by the operator, not keys.
    const freeForm = (k: string): boolean =>
      /^oauth\.roles\.|^rotation\.groups\.|^oauth\.rules\.require\./.test(k);
    expect([...schema].filter((k) => !documented.has(k)).sort()).toEqual([]);
    const isSection = (k: string): boolean => [...schema].some((s) => s.startsWith(`${k}.`));
    expect([...documented].filter((k) => !schema.has(k) && !freeForm(k) && !isSection(k)).sort()).toEqual([]);
    expect(schema.size).toBeGreaterThan(40);
  });

  it("describes nothing as 'not wired'", () => {
    for (const f of ["docs/registrar.md", "README.md"]) {
      expect(readFileSync(join(REPO, f), "utf8"), f).not.toMatch(/not (yet )?wired/i);
    }
  });
});
