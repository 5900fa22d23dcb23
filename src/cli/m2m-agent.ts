#!/usr/bin/env node
import { Command, CommanderError } from "commander";
import { agentVersion } from "../daemon/version.js";
import { COMMAND_MODULES, commandName } from "./agent/commands.js";
import { EXIT } from "./agent/common.js";

/** `m2m-agent`: the device agent's CLI. Subcommands live in src/cli/agent/<cmd>.ts. */
export async function buildProgram(args: readonly string[] = []): Promise<Command> {
  const program = new Command("m2m-agent")
    .description("hardware-backed device identity agent (TPM 2.0 / PKCS#11)")
    .version(agentVersion())
    .option("--config <file>", "agent config file (default /etc/m2m-agent/agent.toml, plus agent.d/*.toml)")
    .option("--json", "machine-readable output on stdout")
    .showHelpAfterError()
    .exitOverride();
  const name = commandName(args);
  const only = name === undefined ? undefined : COMMAND_MODULES[name];
  // Only the invoked command's module is loaded; help and unknown commands load them all.
  const loaders = only === undefined ? Object.values(COMMAND_MODULES) : [only];
  for (const load of loaders) (await load()).register(program);
  return program;
}

async function main(argv: readonly string[]): Promise<void> {
  const program = await buildProgram(argv.slice(2));
  try {
    await program.parseAsync([...argv]);
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help / --version exit 0; unknown options, missing arguments → usage error.
      process.exitCode = err.exitCode === 0 ? EXIT.ok : EXIT.usage;
      return;
    }
    throw err;
  }
}

await main(process.argv);
