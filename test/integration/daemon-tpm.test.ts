import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { useTempDir } from "../kit/temp-dir.js";
import { assertBuilt, type Daemon, runCli, startDaemon } from "./daemon-cli-kit.js";
import { bindNotifyListener, type NotifyListener } from "./notify-listener.js";

/**
 * The daemon on the TPM provider (swtpm): identity survives a TPM power cycle and an agent restart;
 * a TPM that is gone at boot makes the agent READY but degraded, and it recovers by itself when the
 * TPM comes back (no restart, no operator).
 */
const dir = useTempDir("m2m-daemon-tpm-");
let tpm: SwtpmHandle;
let listener: NotifyListener;
let config: string;
let env: NodeJS.ProcessEnv;
const daemons: Daemon[] = [];

beforeAll(async () => {
  assertBuilt();
  await mkdir(join(dir(), "state"), { mode: 0o700 });
  tpm = await startSwtpm();
  listener = await bindNotifyListener(join(dir(), "notify.sock"));
  config = join(dir(), "agent.toml");
  await writeFile(
    config,
    `[agent]\nstate_dir = "${join(dir(), "state")}"\n[keys.tpm]\ntcti = "${tpm.tcti}"\ntimeout_ms = 3000\n[api]\nsocket = "${join(dir(), "api.sock")}"\n`,
  );
  env = { PATH: process.env.PATH, HOME: dir(), NOTIFY_SOCKET: listener.path };
});

afterAll(async () => {
  for (const d of daemons) d.kill();
  listener?.close();
  await tpm?.stop();
});

async function runUntilReady(): Promise<{ d: Daemon; ready: string; from: number }> {
  const from = listener.messages.length;
  const d = startDaemon(["--config", config, "run"], env);
  daemons.push(d);
  const ready = await listener.waitFor((m) => m.startsWith("READY=1"), from, 30_000);
  return { d, ready, from };
}

async function stop(d: Daemon): Promise<void> {
  d.child.kill("SIGTERM");
  expect(await d.exited).toBe(0);
}

describe("m2m-agent run on the TPM provider (swtpm)", () => {
  let thumbprint: string;

  it("the identity survives an agent restart and a TPM power cycle", async () => {
    const init = await runCli(["--config", config, "--json", "keys", "init"], {
      PATH: process.env.PATH,
      HOME: dir(),
    });
    expect(init.code).toBe(0);
    thumbprint = (JSON.parse(init.stdout) as { thumbprint: string }).thumbprint;

    const first = await runUntilReady();
    expect(first.ready).toBe("READY=1\nSTATUS=running");
    expect((await fetchStatus(join(dir(), "api.sock"))).key).toMatchObject({ provider: "tpm", thumbprint });
    await stop(first.d);

    await tpm.restart(); // orderly TPM2_Shutdown, process stop, start on the same state
    const second = await runUntilReady();
    expect((await fetchStatus(join(dir(), "api.sock"))).key?.thumbprint).toBe(thumbprint);
    await stop(second.d);
  });

  it("TPM gone at start: READY=1 degraded with the reason, then running once the TPM is back", async () => {
    await tpm.kill();
    const { d, ready, from } = await runUntilReady();
    expect(ready).toMatch(/^READY=1\nSTATUS=degraded: key: ERR_TPM_/);
    const degraded = await fetchStatus(join(dir(), "api.sock"));
    expect(degraded.state).toBe("degraded");
    expect(degraded.reasons.key).toMatch(/^ERR_TPM_/);
    await d.waitLog((r) => r.msg === "device key unavailable; retrying");

    await tpm.restart();
    await tpm.resetDictionaryLockout();
    expect(await listener.waitFor((m) => m === "STATUS=running", from, 60_000)).toBe("STATUS=running");
    const status = await fetchStatus(join(dir(), "api.sock"));
    expect(status).toMatchObject({ state: "running", reasons: {} });
    expect(status.key?.thumbprint).toBe(thumbprint);
    await stop(d);
  });

  it("doctor reports DA lockout as a warning with a fix hint (the noDA device key keeps working)", async () => {
    const doctor = async () => {
      const r = await runCli(["--config", config, "--json", "doctor"], {
        PATH: process.env.PATH,
        HOME: dir(),
      });
      const out = JSON.parse(r.stdout) as {
        overall: string;
        checks: { name: string; status: string; detail: string; hint?: string }[];
      };
      return {
        code: r.code,
        overall: out.overall,
        check: (n: string) => out.checks.find((c) => c.name === n),
      };
    };
    const before = await doctor();
    expect(before.check("tpm-reachable")?.status).toBe("ok");
    expect(before.check("tpm-lockout")).toMatchObject({
      status: "ok",
      detail: expect.stringMatching(/^not in lockout \(DA counter 0\/3\)/),
    });

    // A DA-protected object with a password, and three wrong attempts: swtpm's MAX_AUTH_FAIL is 3.
    // (Persisted: a transient context file goes stale between tool runs on a TCTI without a resource manager.)
    await tpm.tpm("tpm2_createprimary", [
      "-C",
      "o",
      "-g",
      "sha256",
      "-G",
      "ecc",
      "-c",
      join(tpm.dir, "da.ctx"),
      "-p",
      "right",
    ]);
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", join(tpm.dir, "da.ctx"), "0x81000020"]);
    for (let i = 0; i < 3; i++) {
      await expect(
        tpm.tpm("tpm2_create", [
          "-C",
          "0x81000020",
          "-P",
          "wrong",
          "-G",
          "ecc",
          "-u",
          join(tpm.dir, "k.pub"),
          "-r",
          join(tpm.dir, "k.priv"),
        ]),
      ).rejects.toMatchObject({ stderr: expect.stringContaining("0x98E") });
    }
    const locked = await doctor();
    expect(locked.check("tpm-lockout")).toMatchObject({
      status: "warn",
      hint: expect.stringContaining("tpm2_dictionarylockout -c"),
    });
    expect(locked.check("tpm-lockout")?.detail).toMatch(
      /^TPM in dictionary-attack lockout \(DA counter 3\/3/,
    );
    expect(locked.check("key-present")?.status).toBe("ok");
    expect(locked.overall).toBe("warn");
    expect(locked.code).toBe(0);
    await tpm.resetDictionaryLockout();
  });
});
