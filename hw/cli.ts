#!/usr/bin/env node
import { Command } from "commander";
import { asM2mError } from "../src/core/errors.js";
import { agentVersion } from "../src/core/version.js";
import { initSoftHsm } from "./softhsm.js";
import { startSwtpm } from "./swtpm.js";

/**
 * `m2m-hw`: simulated hardware for testers. Starts a swtpm (EK certificates from a private local CA) or
 * initialises a SoftHSM2 token, prints the agent config lines (and environment) to use it, and keeps it
 * until Ctrl-C / SIGTERM, then shuts it down cleanly (`tpm2_shutdown` first, so no DA counter is
 * bumped) and removes its temp dir.
 */

interface Printed {
  readonly toml: string;
  readonly env: Readonly<Record<string, string>>;
  readonly notes: readonly string[];
  readonly details: Readonly<Record<string, string>>;
}

function show(json: boolean, what: string, p: Printed): void {
  if (json) {
    process.stdout.write(`${JSON.stringify({ kind: what, ...p })}\n`);
    return;
  }
  const env = Object.entries(p.env).map(([k, v]) => `export ${k}=${v}`);
  process.stdout.write(
    [
      `# ${what} is running. Add to your agent config (agent.toml):`,
      p.toml,
      ...(env.length > 0 ? ["", "# and in the agent's environment:", ...env] : []),
      ...(p.notes.length > 0 ? ["", ...p.notes.map((n) => `# ${n}`)] : []),
      "",
      "# Ctrl-C stops it and removes its state.",
      "",
    ].join("\n"),
  );
}

function untilSignal(): Promise<void> {
  // A pending promise alone does not keep Node alive: with nothing else to wait for (SoftHSM has no
  // process of its own) the CLI would exit at once and skip its cleanup. The timer holds the loop open.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  return new Promise((resolve) => {
    const done = (): void => {
      clearInterval(keepAlive);
      resolve();
    };
    process.once("SIGINT", done);
    process.once("SIGTERM", done);
  });
}

export function buildHwProgram(): Command {
  const program = new Command("m2m-hw")
    .description("simulated TPM / HSM for testing m2m-agent")
    .version(agentVersion());
  program
    .command("swtpm")
    .description("start a swtpm with EK certificates and print the [keys.tpm] config to use it")
    .option("--json", "print one JSON line instead of TOML")
    .action(async (opts: { json?: boolean }) => {
      const tpm = await startSwtpm();
      try {
        show(opts.json === true, "swtpm", {
          toml: ["[keys]", 'provider = "tpm"', "", "[keys.tpm]", `tcti = "${tpm.tcti}"`].join("\n"),
          env: { TPM2TOOLS_TCTI: tpm.tcti },
          notes: [
            `EK certificate CA (trust store for the registrar's enrolment group): ${tpm.caDir}`,
            `  root: ${tpm.rootCaPemPath}`,
            `  intermediate: ${tpm.intermediateCaPemPath}`,
          ],
          details: { tcti: tpm.tcti, caDir: tpm.caDir, stateDir: tpm.dir },
        });
        await untilSignal();
      } finally {
        await tpm.stop();
      }
    });
  program
    .command("softhsm")
    .description("initialise a SoftHSM2 token and print the [keys.pkcs11] config to use it")
    .option("--label <label>", "token label", "m2m")
    .option("--json", "print one JSON line instead of TOML")
    .action(async (opts: { label: string; json?: boolean }) => {
      const hsm = await initSoftHsm({ label: opts.label });
      try {
        show(opts.json === true, "softhsm", {
          toml: [
            "[keys]",
            'provider = "pkcs11"',
            "",
            "[keys.pkcs11]",
            `module = "${hsm.modulePath}"`,
            `token_label = "${hsm.tokenLabel}"`,
            `pin = { file = "${hsm.pinFile}" }`,
          ].join("\n"),
          env: { ...hsm.env },
          notes: ["the PIN is in the 0600 file named above; it is never printed"],
          details: {
            modulePath: hsm.modulePath,
            tokenLabel: hsm.tokenLabel,
            pinFile: hsm.pinFile,
            dir: hsm.dir,
          },
        });
        await untilSignal();
      } finally {
        await hsm.cleanup();
      }
    });
  return program;
}

buildHwProgram()
  .parseAsync(process.argv)
  .catch((err: unknown) => {
    const e = asM2mError(err);
    process.stderr.write(
      `m2m-hw: ${e.message}\n${e.hint === undefined ? "" : `  hint: ${e.hint}\n`}  code: ${e.code}\n`,
    );
    process.exitCode = 1;
  });
