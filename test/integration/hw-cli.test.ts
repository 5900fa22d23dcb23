import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { assertBuilt, REPO, runCli } from "./daemon-cli-kit.js";

const HW = join(REPO, "dist", "hw", "cli.js");

interface Started {
  readonly child: ChildProcess;
  readonly line: { kind: string; toml: string; env: Record<string, string>; details: Record<string, string> };
}

/** Starts `m2m-hw <what> --json` and resolves with its one-line description once it is ready. */
function startHw(what: "swtpm" | "softhsm"): Promise<Started> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [HW, what, "--json"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`m2m-hw ${what} did not start: ${err}`)), 60_000);
    child.stderr.on("data", (c: Buffer) => {
      err += c.toString();
    });
    child.stdout.on("data", (c: Buffer) => {
      out += c.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) {
        clearTimeout(timer);
        resolve({ child, line: JSON.parse(out.slice(0, nl)) });
      }
    });
    child.once("exit", (code) => reject(new Error(`m2m-hw ${what} exited ${code}: ${err}`)));
  });
}

function stop(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve(child.exitCode);
    child.once("exit", (code) => resolve(code));
    child.kill("SIGTERM");
  });
}

describe("m2m-hw: simulated hardware for testers", () => {
  const cleanups: (() => Promise<unknown>)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  for (const what of ["swtpm", "softhsm"] as const) {
    it(`${what}: the printed config lines work as they are with m2m-agent, and Ctrl-C removes the state`, async () => {
      assertBuilt();
      const hw = await startHw(what);
      cleanups.push(() => stop(hw.child));
      const dir = await mkdtemp(join(tmpdir(), `m2m-hw-cli-${what}-`));
      cleanups.push(() => rm(dir, { recursive: true, force: true }));
      const config = join(dir, "agent.toml");
      // Exactly what the tool printed, plus a private state dir: what a tester would paste.
      await writeFile(
        config,
        `[agent]\nstate_dir = "${dir}/state"\nruntime_dir = "${dir}/run"\n\n${hw.line.toml}\n`,
      );
      const env = { ...process.env, ...hw.line.env };

      const init = await runCli(["--config", config, "--json", "keys", "init"], env);
      expect(init.stderr).not.toMatch(/ERR_/);
      expect(init.code).toBe(0);
      expect(JSON.parse(init.stdout)).toMatchObject({ algorithm: "ec-p256", created: true });

      const test = await runCli(["--config", config, "--json", "keys", "test"], env);
      expect(test.code).toBe(0);

      // The PIN is referenced by file and never printed.
      expect(JSON.stringify(hw.line)).not.toMatch(/"pin"\s*:\s*"\d+"/);
      const stateDir = hw.line.details.stateDir ?? hw.line.details.dir;
      expect(stateDir !== undefined && existsSync(stateDir)).toBe(true);
      expect(await stop(hw.child)).toBe(0);
      expect(existsSync(stateDir as string)).toBe(false);
    });
  }
});
