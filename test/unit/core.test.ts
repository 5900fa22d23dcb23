import { mkdtemp, readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import { writeFileAtomic } from "../../src/core/atomic-file.js";
import { ManualClock } from "../../src/core/clock.js";
import { M2mError } from "../../src/core/errors.js";
import { createLogger } from "../../src/core/log.js";
import { backoffDelay, defaultRetryPolicy, withRetry } from "../../src/core/retry.js";
import { Secret } from "../../src/core/secret.js";
import { useTempDir } from "../kit/temp-dir.js";

describe("Secret", () => {
  it("never prints its value", () => {
    const s = new Secret("hunter2-pin");
    const shown = [String(s), `${s}`, JSON.stringify({ s }), inspect(s), inspect({ nested: { s } })];
    for (const text of shown) expect(text).not.toContain("hunter2");
    expect(s.reveal()).toBe("hunter2-pin");
  });

  it("is redacted by the logger even inside nested fields", () => {
    const lines: string[] = [];
    const log = createLogger({ write: (l) => lines.push(l) });
    log.info("login", { pin: new Secret("1234-secret"), deep: { token: new Secret("tok-abc") } });
    expect(lines.join("\n")).not.toMatch(/1234-secret|tok-abc/);
    expect(JSON.parse(lines[0] ?? "{}").pin).toBe("<redacted>");
  });
});

describe("withRetry", () => {
  it("retries transient errors with capped jitter and stops on permanent ones", async () => {
    const clock = new ManualClock();
    let calls = 0;
    const p = withRetry(
      defaultRetryPolicy,
      async () => {
        calls++;
        if (calls < 3) throw new M2mError("ERR_TPM_BUSY", "transient", "busy");
        return "ok";
      },
      { clock, random: () => 0.5 },
    );
    while (calls < 3) await clock.advance(1000);
    await expect(p).resolves.toBe("ok");

    let permanentCalls = 0;
    await expect(
      withRetry(
        defaultRetryPolicy,
        async () => {
          permanentCalls++;
          throw new M2mError("ERR_TPM_AUTH", "fatal", "no");
        },
        { clock },
      ),
    ).rejects.toMatchObject({ code: "ERR_TPM_AUTH" });
    expect(permanentCalls).toBe(1);
  });

  it("honours Retry-After but clamps it", async () => {
    const clock = new ManualClock();
    const delays: number[] = [];
    let calls = 0;
    const p = withRetry(
      { ...defaultRetryPolicy, maxRetryAfterMs: 5000, deadlineMs: 1e9 },
      async () => {
        calls++;
        if (calls === 1)
          throw new M2mError("ERR_HTTPS_RATE_LIMITED", "transient", "slow down", {
            details: { retryAfterMs: 1e8 },
          });
        return calls;
      },
      { clock, random: () => 0, onRetry: (i) => delays.push(i.delayMs) },
    );
    while (clock.pendingSleepers === 0) await new Promise((r) => setImmediate(r));
    await clock.advance(5000);
    await expect(p).resolves.toBe(2);
    expect(delays).toEqual([5000]);
  });

  it("full jitter never exceeds the cap", () => {
    for (let n = 1; n < 40; n++)
      expect(backoffDelay(defaultRetryPolicy, n, () => 0.999999)).toBeLessThan(defaultRetryPolicy.capMs);
  });
});

describe("writeFileAtomic", () => {
  const base = useTempDir("m2m-atomic-");
  it("writes 0600 and replaces without leaving temp files", async () => {
    const dir = await mkdtemp(join(base(), "case-"));
    const path = join(dir, "state.json");
    await writeFile(path, "old");
    await writeFileAtomic(path, "new");
    expect(await readFile(path, "utf8")).toBe("new");
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(await readdir(dir)).toEqual(["state.json"]);
  });

  it("fails with a stable code and leaves the old file intact", async () => {
    const dir = await mkdtemp(join(base(), "case-"));
    await expect(
      writeFileAtomic(join(dir, "missing-parent-is-a-file", "x"), "y").then(async () => {
        await writeFile(join(dir, "f"), "z");
        return writeFileAtomic(join(dir, "f", "child"), "y");
      }),
    ).rejects.toMatchObject({ code: "ERR_STATE_WRITE" });
  });
});

describe("log records (issue 12)", () => {
  it("a field never replaces the record's ts, level or msg; it is kept as field_<name>", async () => {
    const { createLogger } = await import("../../src/core/log.js");
    const lines: string[] = [];
    const log = createLogger({ write: (l) => lines.push(l), base: { msg: "base" } });
    log.info("delivery failed; backing off", { level: 3, ts: "x", code: "ERR_X" });
    const rec = JSON.parse(lines[0] ?? "{}") as Record<string, unknown>;
    expect(rec).toMatchObject({
      level: "info",
      msg: "delivery failed; backing off",
      field_level: 3,
      field_ts: "x",
      field_msg: "base",
      code: "ERR_X",
    });
    expect(rec.ts).not.toBe("x");
  });

  it("human format: `level: msg (k=v …)`, secrets redacted", async () => {
    const { createLogger } = await import("../../src/core/log.js");
    const { Secret } = await import("../../src/core/secret.js");
    const lines: string[] = [];
    const log = createLogger({ write: (l) => lines.push(l), format: "human", level: "warn" });
    log.info("dropped");
    log.warn("token refresh failed", {
      code: "ERR_OAUTH_TOKEN",
      pin: new Secret("1234"),
      detail: "two words",
    });
    expect(lines).toEqual([
      'warn: token refresh failed (code=ERR_OAUTH_TOKEN pin=<redacted> detail="two words")',
    ]);
  });
});
