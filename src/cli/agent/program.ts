import { Command, Option } from "commander";
import { agentVersion } from "../../daemon/version.js";
import { COMMAND_MODULES, commandName } from "./commands.js";

/**
 * The `m2m-agent` command tree. Separate from the entry point so the packaging generators
 * (man page, bash completion: packaging/gen-docs.ts) read the same definitions the CLI runs.
 */
export async function buildProgram(args: readonly string[] = []): Promise<Command> {
  const program = new Command("m2m-agent")
    .description("hardware-backed device identity agent (TPM 2.0 / PKCS#11)")
    .version(agentVersion())
    .option("--config <file>", "agent config file (default /etc/m2m-agent/agent.toml, plus agent.d/*.toml)")
    .option("--json", "machine-readable output on stdout")
    .addOption(
      new Option(
        "--log-format <format>",
        "log lines on stderr: human (default) or json (default for run)",
      ).choices(["human", "json"]),
    )
    .showHelpAfterError()
    .exitOverride();
  const name = commandName(args);
  const only = name === undefined ? undefined : COMMAND_MODULES[name];
  // Only the invoked command's module is loaded; help and unknown commands load them all.
  const loaders = only === undefined ? Object.values(COMMAND_MODULES) : [only];
  for (const load of loaders) (await load()).register(program);
  return program;
}
