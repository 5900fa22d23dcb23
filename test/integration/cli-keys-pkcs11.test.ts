import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { TOKEN_KEY_EVIDENCE } from "../kit/pkcs11-evidence.js";
import { useTempDir } from "../kit/temp-dir.js";
import { assertBuilt, runCli } from "./daemon-cli-kit.js";

/** `m2m-agent keys …` against a SoftHSM2 token, as an operator runs it (no TTY). */
const dir = useTempDir("m2m-cli-p11-");
let hsm: SoftHsmHandle;
let config: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  assertBuilt();
  hsm = await initSoftHsm({ label: "m2m-cli-keys" });
  config = join(dir(), "agent.toml");
  await writeFile(
    config,
    `[agent]\nstate_dir = "${join(dir(), "state")}"\n[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "${hsm.modulePath}"\ntoken_label = "${hsm.tokenLabel}"\npin = { env = "TEST_PIN" }\n`,
  );
  env = { PATH: process.env.PATH, HOME: dir(), ...hsm.env, TEST_PIN: hsm.pin.reveal() };
});

afterAll(async () => {
  await hsm?.cleanup();
});

const cli = (...args: string[]) => runCli(["--config", config, ...args], env);

describe("m2m-agent keys (PKCS#11 provider on SoftHSM2)", () => {
  it("init shows plain progress lines on a non-TTY stderr and the result on stdout", async () => {
    const r = await cli("keys", "init");
    expect(r.code).toBe(0);
    expect(r.stderr).toBe("... creating or opening the device key\nok  creating or opening the device key\n");
    expect(r.stdout).toMatch(
      /^created device key\nreference: {2}pkcs11:token=m2m-cli-keys;object=m2m-device;id=%[0-9A-F%]+;type=private\n/,
    );
  });

  it("show reports the token's own key attributes as evidence", async () => {
    const out = JSON.parse((await cli("--json", "keys", "show")).stdout) as {
      evidence: Record<string, unknown>;
    };
    expect(out.evidence).toEqual(TOKEN_KEY_EVIDENCE);
  });

  it("test verifies a token signature with jose", async () => {
    const r = await cli("keys", "test");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^ok: ES256 signature by pkcs11:.* verified with jose/);
  });

  it("a literal PIN in the config is refused with exit 2, naming file and key, without echoing it", async () => {
    const bad = join(dir(), "literal.toml");
    await writeFile(
      bad,
      `[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "${hsm.modulePath}"\ntoken_label = "x"\npin = "98765"\n`,
    );
    const r = await runCli(["--config", bad, "keys", "show"], env);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`${bad}: keys.pkcs11.pin: a literal secret value is not allowed`);
    expect(r.stderr).not.toContain("98765");
  });

  it("destroy --yes erases the key; a second destroy is a no-op", async () => {
    const r = await cli("--json", "keys", "destroy", "--yes");
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ destroyed: true });
    const again = await cli("--json", "keys", "destroy", "--yes");
    expect(JSON.parse(again.stdout)).toEqual({ destroyed: false, reason: "no key" });
  });

  it("unknown options are usage errors (exit 2)", async () => {
    const r = await cli("keys", "show", "--bogus");
    expect(r.code).toBe(2);
  });
});
