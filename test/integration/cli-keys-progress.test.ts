import { describe, expect, it } from "vitest";
import { commandName } from "../../src/cli/agent/commands.js";
import { createProgress, withStep } from "../../src/cli/progress.js";

/** The progress display used by `keys init/destroy` (and enrolment), and the CLI's command dispatch. */
function sink(isTTY: boolean): { stream: { write(s: string): boolean; isTTY: boolean }; out: () => string } {
  let buf = "";
  return {
    stream: {
      isTTY,
      write: (s: string) => {
        buf += s;
        return true;
      },
    },
    out: () => buf,
  };
}

describe("progress display", () => {
  it("on a TTY: one spinner line rewritten in place, then a check mark", async () => {
    const s = sink(true);
    const p = createProgress({ stream: s.stream });
    await withStep(p, "creating the device key", async () => undefined);
    expect(s.out()).toBe("\r\x1b[2K⠋ creating the device key\r\x1b[2K✓ creating the device key\n");
  });

  it("otherwise: plain lines, failure marked and rethrown", async () => {
    const s = sink(false);
    const p = createProgress({ stream: s.stream });
    await expect(
      withStep(p, "enrolling", async () => {
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    expect(s.out()).toBe("... enrolling\nFAIL enrolling\n");
  });

  it("quiet (--json) writes nothing", async () => {
    const s = sink(true);
    await withStep(createProgress({ stream: s.stream, quiet: true }), "x", async () => 1);
    expect(s.out()).toBe("");
  });
});

describe("command dispatch", () => {
  it("finds the subcommand after global options (and their values)", () => {
    expect(commandName(["--config", "/etc/x.toml", "--json", "keys", "show"])).toBe("keys");
    expect(commandName(["--config=/x.toml", "run"])).toBe("run");
    expect(commandName(["--json"])).toBeUndefined();
    expect(commandName(["--config", "run"])).toBeUndefined(); // "run" is the config path here
  });
});
