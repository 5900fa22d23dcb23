import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { useTempDir } from "../kit/temp-dir.js";
import { assertBuilt, runCli } from "./daemon-cli-kit.js";

/** `m2m-agent keys …` against swtpm (with EK certificates from the kit's local CA). */
const dir = useTempDir("m2m-cli-tpm-");
let tpm: SwtpmHandle;
let config: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  assertBuilt();
  tpm = await startSwtpm();
  config = join(dir(), "agent.toml");
  await writeFile(
    config,
    `[agent]\nstate_dir = "${join(dir(), "state")}"\n[keys.tpm]\ntcti = "${tpm.tcti}"\nkey_handle = 0x81000010\n`,
  );
  env = { PATH: process.env.PATH, HOME: dir() };
});

afterAll(async () => {
  await tpm?.stop();
});

const cli = (...args: string[]) => runCli(["--config", config, ...args], env);

describe("m2m-agent keys (TPM provider on swtpm)", () => {
  let thumbprint: string;

  it("show before init fails with ERR_KEY_NOT_FOUND and a hint", async () => {
    const r = await cli("keys", "show");
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("code: ERR_KEY_NOT_FOUND");
    expect(r.stderr).toContain("hint:");
  });

  it("init creates the key at the configured handle; a second init keeps it", async () => {
    const first = JSON.parse((await cli("--json", "keys", "init")).stdout) as {
      ref: string;
      created: boolean;
      thumbprint: string;
    };
    expect(first.created).toBe(true);
    expect(first.ref).toBe(`tpm:tcti=${tpm.tcti};handle=0x81000010`);
    thumbprint = first.thumbprint;
    const second = JSON.parse((await cli("--json", "keys", "init")).stdout) as {
      created: boolean;
      thumbprint: string;
    };
    expect(second).toMatchObject({ created: false, thumbprint });
  });

  it("show prints reference, algorithm, thumbprint, TPM evidence and the EK certificate subject/issuer", async () => {
    const r = await cli("--json", "keys", "show");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as {
      thumbprint: string;
      algorithm: string;
      evidence: { kind: string; attributeNames: string[] };
      ekCertificates: { nvIndex: string; kind: string; subject: string; issuer: string }[];
    };
    expect(out.thumbprint).toBe(thumbprint);
    expect(out.algorithm).toBe("ec-p256");
    expect(out.evidence.kind).toBe("tpm");
    expect(out.evidence.attributeNames).toEqual(
      expect.arrayContaining(["fixedTPM", "sensitiveDataOrigin", "noDA"]),
    );
    const rsa = out.ekCertificates.find((c) => c.nvIndex === "0x01c00002");
    expect(rsa?.kind).toBe("rsa-2048");
    expect(rsa?.issuer).toMatch(/swtpm-localca/);
    const human = await cli("keys", "show");
    expect(human.stdout).toContain(`thumbprint: ${thumbprint}`);
    expect(human.stdout).toMatch(
      /EK certificate \(rsa-2048, NV 0x01c00002\):\n {2}subject: .*\n {2}issuer: {2}.*swtpm-localca/,
    );
  });

  it("test signs a random challenge and jose verifies it", async () => {
    const r = await cli("--json", "keys", "test");
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: true, alg: "ES256", thumbprint });
  });

  it("destroy without a TTY and without --yes refuses; with --yes the key is gone", async () => {
    const refused = await cli("--json", "keys", "destroy");
    expect(refused.code).toBe(1);
    expect((JSON.parse(refused.stdout) as { error: { code: string } }).error.code).toBe(
      "ERR_CONFIRMATION_REQUIRED",
    );
    expect((await cli("keys", "show")).code).toBe(0); // still there

    const done = await cli("--json", "keys", "destroy", "--yes");
    expect(done.code).toBe(0);
    expect(JSON.parse(done.stdout)).toMatchObject({ destroyed: true, thumbprint });
    const after = await cli("keys", "show");
    expect(after.stderr).toContain("ERR_KEY_NOT_FOUND");
  });
});
