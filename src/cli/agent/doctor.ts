import type { Command } from "commander";
import { action, EXIT, globalOptions, output } from "./common.js";

const MARK = { ok: "ok  ", warn: "WARN", fail: "FAIL", skip: "skip" } as const;

/** `m2m-agent doctor [--json]`: exit 0 when nothing failed (warnings allowed), 3 otherwise. */
export function register(program: Command): void {
  program
    .command("doctor")
    .description(
      "run named health checks (config, permissions, TPM/token, key, certificate, network, clock, disk)",
    )
    .option("--timeout <ms>", "connect timeout for reachability checks", "3000")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const timeout = Number((cmd.opts() as { timeout: string }).timeout);
        const { overall, runDoctor } = await import("../../daemon/doctor.js");
        const results = await runDoctor({
          ...(opts.config === undefined ? {} : { configPath: opts.config }),
          explicit: opts.config !== undefined,
          connectTimeoutMs: Number.isFinite(timeout) && timeout > 0 ? timeout : 3000,
        });
        const verdict = overall(results);
        output(opts, { overall: verdict, checks: results }, () =>
          [
            ...results.flatMap((r) => [
              `[${MARK[r.status]}] ${r.name}: ${r.detail}`,
              ...(r.hint === undefined || r.status === "ok" || r.status === "skip"
                ? []
                : [`       fix: ${r.hint}`]),
            ]),
            `overall: ${verdict}`,
          ].join("\n"),
        );
        return verdict === "fail" ? EXIT.unhealthy : EXIT.ok;
      }),
    );
}
