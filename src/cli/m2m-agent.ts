#!/usr/bin/env node
import { CommanderError } from "commander";
import { EXIT } from "./agent/common.js";
import { buildProgram } from "./agent/program.js";

// `m2m-agent`: the device agent's CLI (command tree: src/cli/agent/program.ts, one module per subcommand).

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
