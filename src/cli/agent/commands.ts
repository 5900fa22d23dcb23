import type { Command } from "commander";

export type CommandModule = { register(program: Command): void };

/**
 * The subcommand modules of `m2m-agent` by command name, each exporting `register(program)`.
 * Adding a command = one file in src/cli/agent/ and one line here. The entry point loads only the
 * module of the command being run (all of them for help), so a heavy import in one command never
 * slows down or bloats another (notably the daemon, `run`).
 */
export const COMMAND_MODULES: Readonly<Record<string, () => Promise<CommandModule>>> = {
  keys: () => import("./keys.js"),
  enroll: () => import("./enroll.js"),
  run: () => import("./run.js"),
  status: () => import("./status.js"),
  doctor: () => import("./doctor.js"),
  send: () => import("./send.js"),
  token: () => import("./token.js"),
  decommission: () => import("./decommission.js"),
  config: () => import("./config.js"),
};

/** Global options that take a value (their value is not the command name). */
const VALUE_OPTIONS = new Set(["--config", "--log-format"]);

/** The subcommand named on the command line, if any (skips global options and their values). */
export function commandName(argv: readonly string[]): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] ?? "";
    if (VALUE_OPTIONS.has(a)) {
      i++;
      continue;
    }
    if (a === "--") return argv[i + 1];
    if (!a.startsWith("-")) return a;
  }
  return undefined;
}
