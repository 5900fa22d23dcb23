import type { Command } from "commander";

/**
 * The subcommand modules of `m2m-agent`, each exporting `register(program)`. Adding a command = one
 * file in src/cli/agent/ and one line here. Modules register lazily-imported actions, so listing a
 * command costs nothing at startup.
 */
export const COMMAND_MODULES: readonly (() => Promise<{ register(program: Command): void }>)[] = [
  () => import("./keys.js"),
  () => import("./enroll.js"),
  () => import("./run.js"),
  () => import("./status.js"),
  () => import("./doctor.js"),
  () => import("./send.js"),
  () => import("./token.js"),
];
