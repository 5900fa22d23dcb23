import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { useTempDir } from "../kit/temp-dir.js";
import { REPO, runScript } from "./daemon-cli-kit.js";

/**
 * Operator commands of the BUILT `m2m-registrar` (SQLite registry in a temp data dir): group remove,
 * bootstrap token list / revoke, header rows, and `--version` on every CLI.
 */
const REGISTRAR = join(REPO, "dist", "src", "cli", "m2m-registrar.js");
const AGENT = join(REPO, "dist", "src", "cli", "m2m-agent.js");
const HW = join(REPO, "dist", "hw", "cli.js");
const dir = useTempDir("m2m-reg-ops-");
const env = (): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, HOME: dir() });
const reg = (...args: string[]) => runScript(REGISTRAR, args, env(), { timeoutMs: 30_000 });

describe("m2m-registrar operator commands", () => {
  it("--version on every CLI prints the package version", async () => {
    const version = (JSON.parse(await readFile(join(REPO, "package.json"), "utf8")) as { version: string })
      .version;
    for (const cli of [REGISTRAR, AGENT, HW]) {
      const r = await runScript(cli, ["--version"], env(), { timeoutMs: 30_000 });
      expect(r.code, cli).toBe(0);
      expect(r.stdout.trim(), cli).toBe(version);
    }
  });

  it("group list / token list / devices list have a header row", async () => {
    expect(
      (
        await reg(
          "enrollment",
          "group",
          "add",
          "hsm",
          "--role",
          "gw",
          "--methods",
          "pkcs11",
          "--data-dir",
          dir(),
        )
      ).code,
    ).toBe(0);
    const groups = await reg("enrollment", "group", "list", "--data-dir", dir());
    expect(groups.stdout.trim().split("\n")).toEqual(["GROUP\tROLE\tMETHODS", "hsm\tgw\tpkcs11"]);
    const devices = await reg("devices", "list", "--data-dir", dir());
    expect(devices.stdout.trim()).toBe("DEVICE\tSTATUS\tMETHOD\tGROUP\tROLE\tHARDWARE SERIAL");
  });

  it("token list shows ids and states (never the token); token revoke marks it revoked; unknown and ambiguous ids are refused", async () => {
    const created = await reg(
      "--json",
      "enrollment",
      "token",
      "create",
      "--group",
      "hsm",
      "--data-dir",
      dir(),
    );
    const token = (JSON.parse(created.stdout) as { token: string }).token;
    await reg("enrollment", "token", "create", "--group", "hsm", "--data-dir", dir());
    const list = JSON.parse(
      (await reg("--json", "enrollment", "token", "list", "--data-dir", dir())).stdout,
    ) as {
      id: string;
      state: string;
    }[];
    expect(list).toHaveLength(2);
    expect(list.every((t) => t.state === "unused" && /^[0-9a-f]{16}$/.test(t.id))).toBe(true);
    const human = await reg("enrollment", "token", "list", "--data-dir", dir());
    expect(human.stdout.split("\n")[0]).toBe("ID\tGROUP\tSTATE\tEXPIRES\tUSED BY");
    expect(human.stdout).not.toContain(token);
    const target = list[0]?.id ?? "";
    const revoked = await reg("enrollment", "token", "revoke", target, "--data-dir", dir());
    expect(revoked.code).toBe(0);
    expect(revoked.stdout).toContain(`bootstrap token ${target} (group hsm) revoked`);
    const after = JSON.parse(
      (await reg("--json", "enrollment", "token", "list", "--data-dir", dir())).stdout,
    ) as {
      id: string;
      state: string;
    }[];
    expect(after.find((t) => t.id === target)?.state).toBe("revoked");
    const unknown = await reg("enrollment", "token", "revoke", "00000000deadbeef", "--data-dir", dir());
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain("ERR_TOKEN_INVALID");
  });

  it("group remove deletes the group and its tokens; an unknown group is refused", async () => {
    const r = await reg("enrollment", "group", "remove", "hsm", "--data-dir", dir());
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe("group hsm removed (2 bootstrap token(s) removed)");
    expect((await reg("enrollment", "group", "list", "--data-dir", dir())).stdout.trim()).toBe(
      "GROUP\tROLE\tMETHODS",
    );
    expect((await reg("enrollment", "token", "list", "--data-dir", dir())).stdout.trim()).toBe(
      "ID\tGROUP\tSTATE\tEXPIRES\tUSED BY",
    );
    const again = await reg("enrollment", "group", "remove", "hsm", "--data-dir", dir());
    expect(again.code).toBe(2);
    expect(again.stderr).toContain("ERR_GROUP_UNKNOWN");
  });
});
