import { existsSync, statSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ProcInfo, stillRunning } from "../../hw/demo-kit.js";
import { type CliResult, REPO, runScript } from "./daemon-cli-kit.js";

/**
 * README command one, as a user runs it: the BUILT demo (`node dist/hw/demo.js --quick`) with real
 * swtpm, SoftHSM2, mosquitto, the registrar and two agent daemons. It must exit 0 with a summary that
 * says attestation verified, readings relayed with none lost, the outage survived — and leave no
 * process it started running.
 */

const DEMO = join(REPO, "dist", "hw", "demo.js");

interface Summary {
  ok: boolean;
  failures: string[];
  notAvailable: string[];
  attestation: { verified: boolean; deviceId?: string };
  devices: {
    name: string;
    method: string;
    sink: string;
    deviceId?: string;
    certNotAfter?: string;
    lost: number;
  }[];
  messages: { sent: number; acked: number; delivered: number; lost: number; duplicates: number };
  outage: { durationMs: number; maxBacklog: number; drainMs?: number; survived: boolean };
  pids: ProcInfo[];
  leftover: ProcInfo[];
}

function runDemo(args: readonly string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<CliResult> {
  // SIGTERM first: the demo's own handler then stops everything it started.
  return runScript(DEMO, args, env, { timeoutMs, killSignal: "SIGTERM" });
}

let dir: string;

beforeAll(async () => {
  if (!existsSync(DEMO)) throw new Error(`${DEMO} is missing: run \`npm run build\` first`);
  for (const rel of ["hw/demo.ts", "hw/demo-kit.ts"]) {
    const out = join(REPO, "dist", rel.replace(/\.ts$/, ".js"));
    if (statSync(out).mtimeMs < statSync(join(REPO, rel)).mtimeMs)
      throw new Error(`${out} is older than ${rel}: run \`npm run build\` first`);
  }
  dir = await mkdtemp(join(tmpdir(), "m2m-demo-test-"));
});

afterAll(async () => {
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("the one-command demo (dist/hw/demo.js)", () => {
  it("--quick runs the whole story, exits 0, and leaves nothing running", async () => {
    const summaryFile = join(dir, "summary.json");
    const r = await runDemo(
      ["--quick", "--summary-json", summaryFile],
      { PATH: process.env.PATH, HOME: dir, TMPDIR: dir },
      200_000,
    );
    const out = `${r.stdout}\n${r.stderr}`;
    expect(r.code, out).toBe(0);
    // Not a TTY: plain lines, no colour escapes, no JSON log spam on the screen.
    expect(r.stdout.includes(String.fromCharCode(27))).toBe(false);
    expect(r.stdout.split("\n").filter((l) => l.trimStart().startsWith("{"))).toEqual([]);
    expect(r.stdout).toContain("attestation verified");
    expect(r.stdout).toContain("demo succeeded");

    const s = JSON.parse(await readFile(summaryFile, "utf8")) as Summary;
    expect(s.ok).toBe(true);
    expect(s.failures).toEqual([]);
    expect(s.notAvailable).toEqual([]);
    expect(s.attestation.verified).toBe(true);
    expect(s.devices.map((d) => `${d.method}/${d.sink}`)).toEqual(["tpm/https", "pkcs11/mqtt"]);
    for (const d of s.devices) {
      expect(d.deviceId).toMatch(/^dev-/);
      expect(Date.parse(d.certNotAfter ?? "")).toBeGreaterThan(Date.now());
      expect(d.lost).toBe(0);
    }
    expect(s.attestation.deviceId).toBe(s.devices[0]?.deviceId);
    expect(s.messages.delivered).toBeGreaterThan(0);
    expect(s.messages.acked).toBe(s.messages.delivered);
    expect(s.messages.lost).toBe(0);
    expect(s.outage.survived).toBe(true);
    expect(s.outage.maxBacklog).toBeGreaterThan(0);

    // Every long-lived process it started was seen, and none is left (checked by pid + command line).
    const cmds = s.pids.map((p) => p.cmd).join("\n");
    for (const name of ["swtpm socket", "mosquitto -c", "m2m-registrar.js serve", "m2m-agent.js run"])
      expect(cmds).toContain(name);
    expect(s.pids.filter((p) => p.cmd.includes("m2m-agent.js run"))).toHaveLength(2);
    expect(s.leftover).toEqual([]);
    expect(s.pids.filter(stillRunning)).toEqual([]);

    // The work dir (keys, tokens, PIN files, databases) is gone without --keep.
    const wd = /work directory (\S+)/.exec(r.stdout)?.[1];
    expect(wd).toBeDefined();
    expect(existsSync(wd ?? "/")).toBe(false);
  }, 240_000);

  it("--quick --tpm-mqtt: the TPM gateway publishes over MQTT mTLS with its attested key, nothing lost or left running", async () => {
    const summaryFile = join(dir, "summary-tpm-mqtt.json");
    const r = await runDemo(
      ["--quick", "--tpm-mqtt", "--summary-json", summaryFile],
      { PATH: process.env.PATH, HOME: dir, TMPDIR: dir },
      200_000,
    );
    const out = `${r.stdout}\n${r.stderr}`;
    expect(r.code, out).toBe(0);
    expect(r.stdout).toContain("MQTT mTLS with the attested TPM key");
    const s = JSON.parse(await readFile(summaryFile, "utf8")) as Summary;
    expect(s.ok).toBe(true);
    expect(s.failures).toEqual([]);
    expect(s.attestation.verified).toBe(true);
    expect(s.devices.map((d) => `${d.method}/${d.sink}`)).toEqual(["tpm/mqtt", "pkcs11/mqtt"]);
    for (const d of s.devices) expect(d.lost).toBe(0);
    expect(s.messages.delivered).toBeGreaterThan(0);
    expect(s.messages.acked).toBe(s.messages.delivered);
    expect(s.outage.survived).toBe(true);
    expect(s.leftover).toEqual([]);
    expect(s.pids.filter(stillRunning)).toEqual([]);
  }, 240_000);

  it("names the Debian package to install when a tool is missing, and exits 1", async () => {
    // Only node itself is reachable (absolute path): swtpm, tpm2-tools, softhsm2-util, openssl are not.
    const r = await runDemo(["--quick"], { PATH: join(dir, "empty-bin"), HOME: dir, TMPDIR: dir }, 30_000);
    expect(r.code).toBe(1);
    expect(r.stdout).toContain("install the Debian package swtpm");
    expect(r.stdout).toContain("install the Debian package tpm2-tools");
    expect(r.stdout).toContain("install the Debian package softhsm2");
    expect(r.stdout).toMatch(/demo FAILED/);
  });
});
