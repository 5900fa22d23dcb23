import type { Command } from "commander";
import { action, globalOptions } from "./common.js";

/** `m2m-agent run`: the daemon (systemd `Type=notify`; works without systemd too). */
export function register(program: Command): void {
  program
    .command("run")
    .description("run the agent daemon in the foreground (systemd Type=notify)")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const { runDaemon } = await import("../../daemon/run.js");
        return runDaemon({
          // The daemon's default is JSON lines (journald MESSAGE, jq); --log-format human for a terminal.
          ...(opts.logFormat === undefined ? {} : { logFormat: opts.logFormat }),
          ...(opts.config === undefined ? {} : { configPath: opts.config }),
          explicit: opts.config !== undefined,
        });
      }),
    );
}
