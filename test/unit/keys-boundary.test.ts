import { readdir, readFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { describe, expect, it } from "vitest";

/**
 * The device key has one owner (src/keys/): nothing outside it downcasts to a backend, imports a
 * backend module, or spells the rotation state file name. These are the regressions issue 11 fixed
 * (`instanceof TpmKeyProvider` in five places, the state file name written out three times).
 */
const root = join(import.meta.dirname, "..", "..");

async function sources(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await sources(p)));
    else if (e.name.endsWith(".ts")) out.push(p);
  }
  return out;
}

async function agentFilesOutsideKeys(): Promise<{ path: string; text: string }[]> {
  const files = (await sources(join(root, "src"))).filter((p) => {
    const r = relative(root, p);
    // The registrar is the other program (it shares neutral modules, never the agent's key owner).
    return !r.startsWith("src/keys/") && !r.startsWith("src/registrar/");
  });
  return Promise.all(
    files.map(async (path) => ({ path: relative(root, path), text: await readFile(path, "utf8") })),
  );
}

describe("device-key boundary", () => {
  it("no instanceof of a key backend outside src/keys/", async () => {
    const hits = (await agentFilesOutsideKeys()).filter((f) =>
      /instanceof\s+(Tpm|Pkcs11|Fake)\w*Provider/.test(f.text),
    );
    expect(hits.map((h) => h.path)).toEqual([]);
  });

  it("no agent module outside src/keys/ imports a key backend", async () => {
    const hits = (await agentFilesOutsideKeys()).filter((f) =>
      /from\s+"[./]*\/?keys\/(tpm|pkcs11|fake)\/|import\("[./]*\/?keys\/(tpm|pkcs11|fake)\//.test(f.text),
    );
    expect(hits.map((h) => h.path)).toEqual([]);
  });

  it("key backends are constructed in exactly one place (src/keys/from-config.ts)", async () => {
    const files = await sources(join(root, "src"));
    const hits: string[] = [];
    for (const p of files) {
      const r = relative(root, p);
      if (r.startsWith("src/registrar/")) continue;
      const text = await readFile(p, "utf8");
      if (/new\s+(TpmKeyProvider|Pkcs11KeyProvider)\s*\(/.test(text)) hits.push(r);
    }
    // keys/tpm/rotation.ts builds rotation slots on a provider it was handed (tests, tools).
    expect(hits.sort()).toEqual(["src/keys/from-config.ts", "src/keys/tpm/rotation.ts"]);
  });

  it("the rotation state file name is written out once, in its constant", async () => {
    const files = await sources(join(root, "src"));
    const hits: string[] = [];
    for (const p of files) {
      const text = await readFile(p, "utf8");
      const n = text.split('"key-rotation.json"').length - 1;
      for (let i = 0; i < n; i++) hits.push(relative(root, p));
    }
    expect(hits).toEqual(["src/keys/rotation.ts"]);
  });
});
