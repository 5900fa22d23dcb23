import { existsSync, statSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { freeLoopbackPortPair, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { isM2mError } from "../../src/core/errors.js";
import { classifyToolFailure, parseTpmRc } from "../../src/keys/tpm/errors.js";
import { parseLockoutInfo, type TpmLatencySample, TpmRunner } from "../../src/keys/tpm/runner.js";
import { rejectionOf } from "../kit/m2m-error.js";

describe("TpmRunner against swtpm", () => {
  let tpm: SwtpmHandle;
  let runner: TpmRunner;
  const samples: TpmLatencySample[] = [];

  beforeAll(async () => {
    tpm = await startSwtpm();
    runner = new TpmRunner({ tcti: tpm.tcti, timeoutMs: 5_000, onLatency: (s) => samples.push(s) });
  });
  afterAll(async () => {
    await runner?.close();
    await tpm?.stop();
  });

  test("runs a tool and records latency", async () => {
    const res = await runner.run("tpm2_getcap", ["properties-fixed"], { op: "getcap" });
    expect(res.text).toContain("TPM2_PT_FAMILY_INDICATOR");
    expect(samples.some((s) => s.op === "getcap" && s.ok)).toBe(true);
  });

  test("sendRaw: TPM2_GetRandom(16) returns a parsed response", async () => {
    // tag 8001 (no sessions), size 12, cc 0x17B GetRandom, bytesRequested 16
    const cmd = Uint8Array.from([0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16]);
    const resp = await runner.sendRaw(cmd);
    expect(resp.rc).toBe(0);
    expect(resp.tag).toBe(0x8001);
    expect(resp.body.length).toBe(2 + 16);
  });

  test("sendRaw: a TPM error rc maps to a typed error", async () => {
    // ReadPublic (0x173) of a missing persistent handle 0x81000099
    const cmd = Uint8Array.from([0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x73, 0x81, 0x00, 0x00, 0x99]);
    const err = await rejectionOf(runner.sendRaw(cmd));
    expect(err.code).toBe("ERR_TPM_HANDLE_MISSING");
  });

  test("missing handle → ERR_TPM_HANDLE_MISSING (permanent)", async () => {
    const err = await rejectionOf(runner.run("tpm2_readpublic", ["-c", "0x81000077"]));
    expect(err.code).toBe("ERR_TPM_HANDLE_MISSING");
    expect(err.retry).toBe("permanent");
    expect(err.details.rc).toBe("0x18b");
  });

  test("missing tool → ERR_TPM_TOOLS_MISSING with an install hint", async () => {
    const err = await rejectionOf(runner.run("tpm2_no_such_tool", []));
    expect(err.code).toBe("ERR_TPM_TOOLS_MISSING");
    expect(err.hint).toContain("apt-get install tpm2-tools");
  });

  test("scratch files live in a private 0700 dir and are removed after the op", async () => {
    let secretPath = "";
    await runner.exclusive(async (tx) => {
      secretPath = await tx.writeSecret("auth", "s3cret");
      expect(statSync(secretPath).mode & 0o777).toBe(0o600);
      expect(statSync(runner.privateDir).mode & 0o777).toBe(0o700);
    });
    expect(existsSync(secretPath)).toBe(false);
  });

  test("unreachable TCTI (unused port) → ERR_TPM_UNREACHABLE (transient)", async () => {
    const port = await freeLoopbackPortPair();
    const r = new TpmRunner({ tcti: `swtpm:host=127.0.0.1,port=${port}`, timeoutMs: 5_000 });
    const err = await rejectionOf(r.run("tpm2_getcap", ["properties-fixed"]));
    expect(err.code).toBe("ERR_TPM_UNREACHABLE");
    expect(err.retry).toBe("transient");
    await r.close();
  });

  test("a TPM that accepts but never answers → ERR_TPM_TIMEOUT", async () => {
    const port = await freeLoopbackPortPair();
    const sockets: Socket[] = [];
    const servers: Server[] = [port, port + 1].map((p) => {
      const s = createServer((c) => sockets.push(c));
      s.listen(p, "127.0.0.1");
      return s;
    });
    const r = new TpmRunner({ tcti: `swtpm:host=127.0.0.1,port=${port}`, timeoutMs: 800 });
    try {
      const err = await rejectionOf(r.run("tpm2_getcap", ["properties-fixed"]));
      expect(err.code).toBe("ERR_TPM_TIMEOUT");
      expect(err.retry).toBe("transient");
    } finally {
      for (const c of sockets) c.destroy();
      for (const s of servers) s.close();
      await r.close();
    }
  });
});

describe("TpmRunner retry policy (scripted stand-in tool)", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-fake-tpm2-"));
  });
  afterAll(async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  /** A tool that fails with `rc` the first `failures` times (counted in a file), then succeeds. */
  async function fakeTool(name: string, rc: string, failures: number): Promise<string> {
    const path = join(dir, name);
    const counter = join(dir, `${name}.count`);
    await writeFile(
      path,
      `#!/bin/sh
n=$(cat ${counter} 2>/dev/null || echo 0)
echo $((n+1)) > ${counter}
if [ "$n" -lt ${failures} ]; then
  echo "ERROR:esys:x() Esys Finish ErrorCode (0x00000${rc})" >&2
  echo "ERROR: Esys_Sign(0x${rc}) - tpm:warn" >&2
  exit 1
fi
echo ok
`,
      { mode: 0o700 },
    );
    return path;
  }
  const fast = {
    baseMs: 1,
    factor: 2,
    capMs: 5,
    deadlineMs: 5_000,
    maxAttempts: 4,
    maxRetryAfterMs: 5,
    retryOn: (e: unknown) => isM2mError(e, "ERR_TPM_BUSY"),
  };

  test("TPM_RC_RETRY (0x922) is retried and then succeeds", async () => {
    const samples: TpmLatencySample[] = [];
    const r = new TpmRunner({ tcti: "none", busyRetry: fast, onLatency: (s) => samples.push(s) });
    const res = await r.run(await fakeTool("busy2", "922", 2), []);
    expect(res.text.trim()).toBe("ok");
    expect(samples.map((s) => s.code ?? "ok")).toEqual(["ERR_TPM_BUSY", "ERR_TPM_BUSY", "ok"]);
    await r.close();
  });

  test("busy retries are bounded: ERR_TPM_BUSY after maxAttempts", async () => {
    const samples: TpmLatencySample[] = [];
    const r = new TpmRunner({ tcti: "none", busyRetry: fast, onLatency: (s) => samples.push(s) });
    const err = await rejectionOf(r.run(await fakeTool("busy9", "902", 9), []));
    expect(err.code).toBe("ERR_TPM_BUSY");
    expect(samples).toHaveLength(4);
    await r.close();
  });

  test("an authorization failure is never retried", async () => {
    const samples: TpmLatencySample[] = [];
    const r = new TpmRunner({ tcti: "none", busyRetry: fast, onLatency: (s) => samples.push(s) });
    const err = await rejectionOf(r.run(await fakeTool("auth", "98e", 5), []));
    expect(err.code).toBe("ERR_TPM_AUTH");
    expect(samples).toHaveLength(1);
    await r.close();
  });
});

describe("tpm2-tools failure classification (pure)", () => {
  const cases: [string, number, string, string][] = [
    ["lockout", 0x921, "ERR_TPM_LOCKOUT", "fatal"],
    ["retry", 0x922, "ERR_TPM_BUSY", "transient"],
    ["nv rate", 0x920, "ERR_TPM_BUSY", "transient"],
    ["nv unavailable", 0x923, "ERR_TPM_BUSY", "transient"],
    ["yielded", 0x908, "ERR_TPM_BUSY", "transient"],
    ["canceled", 0x909, "ERR_TPM_BUSY", "transient"],
    ["object memory", 0x902, "ERR_TPM_BUSY", "transient"],
    ["session memory", 0x903, "ERR_TPM_BUSY", "transient"],
    ["auth fail (session 1)", 0x98e, "ERR_TPM_AUTH", "fatal"],
    ["bad auth (session 1)", 0x9a2, "ERR_TPM_AUTH", "fatal"],
    ["policy fail", 0x99d, "ERR_TPM_AUTH", "fatal"],
    ["handle 1", 0x18b, "ERR_TPM_HANDLE_MISSING", "permanent"],
    ["value on handle 1", 0x184, "ERR_TPM_HANDLE_MISSING", "permanent"],
    ["value on parameter 1", 0x1c4, "ERR_TPM_COMMAND", "permanent"],
    ["tcti io error", 0xa000a, "ERR_TPM_UNREACHABLE", "transient"],
  ];
  test.each(cases)("%s (0x%s)", (_name, rc, code, retry) => {
    const stderr = `WARNING:esys:foo() Received TPM Error\nERROR:esys:bar() Error ErrorCode (0x${rc.toString(16).padStart(8, "0")})\nERROR: Esys_Sign(0x${rc.toString(16).toUpperCase()}) - tpm:something\nERROR: Unable to run tpm2_sign`;
    const err = classifyToolFailure({ tool: "tpm2_sign", exitCode: 1, stderr });
    expect(err.code).toBe(code);
    expect(err.retry).toBe(retry);
  });

  test("a TPM-layer code wins over the ESYS wrapper code", () => {
    expect(parseTpmRc("ErrorCode (0x00070001)\nErrorCode (0x0000018b)\nEsys_TR_FromTPMPublic(0x18B)")).toBe(
      0x18b,
    );
  });

  test("TCTI load failure without a code → ERR_TPM_UNREACHABLE", () => {
    const err = classifyToolFailure({
      tool: "tpm2_getcap",
      exitCode: 1,
      stderr: 'ERROR: Could not load tcti, got: "device:/dev/tpmrm9"',
    });
    expect(err.code).toBe("ERR_TPM_UNREACHABLE");
  });

  test("parses DA counters from getcap output", () => {
    const info = parseLockoutInfo(
      "  inLockout:                 1\nTPM2_PT_LOCKOUT_COUNTER: 0x3\nTPM2_PT_MAX_AUTH_FAIL: 0x3\nTPM2_PT_LOCKOUT_INTERVAL: 0x3E8\nTPM2_PT_LOCKOUT_RECOVERY: 0x3E8",
    );
    expect(info).toEqual({
      inLockout: true,
      lockoutCounter: 3,
      maxAuthFail: 3,
      lockoutIntervalSeconds: 1000,
      lockoutRecoverySeconds: 1000,
    });
  });
});
