import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { exampleDescriptions, GENERATED_DIR, generate, REPO, schemaKeys } from "../../packaging/gen-docs.js";

/**
 * The packaged man pages and bash completions are generated from the commander definitions and the
 * config schema (packaging/gen-docs.ts) and committed under packaging/generated/. Regenerating must
 * give the committed bytes: a CLI option or config key added without `npm run gen:docs` fails here.
 */
describe("packaging/generated (man pages, bash completion)", () => {
  it("regenerating gives exactly the committed files", async () => {
    const files = await generate();
    expect([...files.keys()].sort()).toEqual([
      "agent.toml.5",
      "completions/m2m-agent",
      "completions/m2m-registrar",
      "m2m-agent.8",
      "m2m-registrar.8",
    ]);
    for (const [rel, text] of files) {
      const committed = await readFile(join(GENERATED_DIR, rel), "utf8");
      expect(committed, `${rel} is stale: run \`npm run gen:docs\``).toBe(text);
    }
  });

  it("the man page and the completion name every subcommand and option the CLI has", async () => {
    const files = await generate();
    const man = files.get("m2m-agent.8") ?? "";
    const completion = files.get("completions/m2m-agent") ?? "";
    for (const word of [
      "config check",
      "keys destroy",
      "decommission",
      "\\-\\-wait\\-drain",
      "\\-\\-offline",
    ])
      expect(man).toContain(word);
    expect(completion).toContain('"config") words="check --help"');
    expect(completion).toContain("--wait-drain");
    expect(files.get("m2m-registrar.8")).toContain("enrollment token create");
  });

  it("every schema key is documented in the shipped agent.toml and every key there exists", async () => {
    const example = exampleDescriptions(await readFile(join(REPO, "service", "agent.toml.example"), "utf8"));
    const keys = schemaKeys().map((k) => k.key);
    expect(keys).toContain("keys.pkcs11.pin");
    expect(keys).toContain("relay.outbox.thread");
    // requested_attributes is a table of strings: its keys are free-form, the table itself is the key.
    const inExample = [...example.keys()].filter((k) => !k.startsWith("enroll.requested_attributes."));
    expect(keys.filter((k) => !example.has(k))).toEqual([]);
    expect(inExample.filter((k) => !keys.includes(k))).toEqual([]);
  });

  it("the completion script is valid bash and completes subcommands", () => {
    const script = join(GENERATED_DIR, "completions", "m2m-agent");
    const out = execFileSync(
      "bash",
      [
        "-c",
        `source ${script}; COMP_WORDS=(m2m-agent config ""); COMP_CWORD=2; _m2m_agent; echo "\${COMPREPLY[*]}"`,
      ],
      { encoding: "utf8" },
    );
    expect(out.trim()).toBe("check --help");
  });
});
