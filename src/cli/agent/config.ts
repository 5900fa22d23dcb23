import type { Command } from "commander";
import { M2mError } from "../../core/errors.js";
import { action, globalOptions, loadCliConfig, output } from "./common.js";

/**
 * Host names RFC 2606 reserves for documentation: the shipped /etc/m2m-agent/agent.toml uses them as
 * placeholders, so a config still naming one has not been configured for a real fleet yet.
 */
const PLACEHOLDER_HOST = /(^|\.)(example\.(com|net|org)|example)$/i;

/** Every string leaf of the validated config, with its dotted key path. */
function stringLeaves(value: unknown, path: string[] = []): [string, string][] {
  if (typeof value === "string") return [[path.join("."), value]];
  if (Array.isArray(value)) return value.flatMap((v, i) => stringLeaves(v, [...path, String(i)]));
  if (value !== null && typeof value === "object")
    return Object.entries(value).flatMap(([k, v]) => stringLeaves(v, [...path, k]));
  return [];
}

/** Keys whose value is a URL on a documentation placeholder host (e.g. registrar.example.com). */
export function placeholderKeys(config: unknown): string[] {
  const out: string[] = [];
  for (const [key, v] of stringLeaves(config)) {
    let host: string;
    try {
      host = new URL(v).hostname;
    } catch {
      continue;
    }
    if (PLACEHOLDER_HOST.test(host)) out.push(`${key} = "${v}"`);
  }
  return out;
}

/**
 * `m2m-agent config check`: validates agent.toml + agent.d/*.toml + M2M_AGENT_* exactly as the
 * daemon loads them, and refuses the shipped placeholders. The unit runs it as ExecStartPre=, so an
 * unconfigured or invalid config leaves the service stopped with the reason in the journal.
 */
export function register(program: Command): void {
  const config = program.command("config").description("agent configuration");
  config
    .command("check")
    .description(
      "validate the configuration the daemon would load (files, drop-ins, environment); exit 2 if it is invalid or still has the shipped placeholders",
    )
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const loaded = await loadCliConfig(opts);
        const placeholders = placeholderKeys(loaded.config);
        if (placeholders.length > 0)
          // Why: starting with a placeholder registrar would send enrolment attempts (and later data)
          // to a host nobody in the fleet controls.
          throw new M2mError(
            "ERR_CONFIG",
            "permanent",
            `not configured yet: ${placeholders.join(", ")} is the shipped placeholder (${loaded.sources.join(", ") || "built-in defaults"})`,
            { hint: "edit /etc/m2m-agent/agent.toml for this fleet, then `systemctl restart m2m-agent`" },
          );
        output(opts, { ok: true, sources: loaded.sources, envOverrides: loaded.envOverrides }, () =>
          [
            `config ok: ${loaded.sources.length === 0 ? "built-in defaults" : loaded.sources.join(", ")}`,
            ...(loaded.envOverrides.length === 0
              ? []
              : [`environment overrides: ${loaded.envOverrides.join(", ")}`]),
          ].join("\n"),
        );
        return undefined;
      }),
    );
}
