import { request } from "node:http";
import type { Command } from "commander";
import { M2mError } from "../../core/errors.js";
import type { AgentStatus } from "../../daemon/compose.js";
import { action, EXIT, globalOptions, loadCliConfig, output } from "./common.js";

/** GET /v1/status from the running daemon over the local API socket. */
export function fetchStatus(socketPath: string, timeoutMs = 5_000): Promise<AgentStatus> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: "/v1/status", method: "GET", timeout: timeoutMs }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => {
        if (body.length < 1_000_000) body += c;
      });
      res.on("end", () => {
        try {
          if (res.statusCode !== 200) throw new Error(`HTTP ${res.statusCode}`);
          resolve(JSON.parse(body) as AgentStatus);
        } catch (err) {
          reject(
            new M2mError("ERR_AGENT_STATUS", "transient", "the agent answered with an unreadable status", {
              cause: err,
            }),
          );
        }
      });
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", (err: NodeJS.ErrnoException) =>
      reject(
        err.code === "EACCES"
          ? new M2mError("ERR_AGENT_ACCESS", "permanent", `permission denied on ${socketPath}`, {
              cause: err,
              hint: "run as the agent user, root, or a member of the group set in api.group",
            })
          : new M2mError("ERR_AGENT_NOT_RUNNING", "transient", `cannot reach the agent at ${socketPath}`, {
              cause: err,
              hint: "is it running? `systemctl status m2m-agent`; is api.socket the same in this config?",
              details: { errno: String(err.code ?? "") },
            }),
      ),
    );
    req.end();
  });
}

export function humanStatus(s: AgentStatus): string {
  const lines = [
    `state:      ${s.status}`,
    `since:      ${s.since} (pid ${s.pid}, up ${s.uptimeS} s, version ${s.version})`,
  ];
  if (s.key !== undefined) lines.push(`key:        ${s.key.ref} (${s.key.algorithm}) ${s.key.thumbprint}`);
  lines.push(
    `enrolment:  ${s.enrolment.enrolled ? `enrolled as ${s.enrolment.deviceId ?? "?"}${s.enrolment.certificateNotAfter === undefined ? "" : `, certificate valid until ${s.enrolment.certificateNotAfter}`}` : "not enrolled"}`,
  );
  lines.push(`clock:      ${s.clock.trusted ? "trusted" : (s.clock.reason ?? "untrusted")}`);
  for (const [c, r] of Object.entries(s.reasons)) lines.push(`problem:    ${c}: ${r}`);
  for (const a of s.anomalies)
    lines.push(`anomaly:    ${a.kind} on ${a.channel} since ${a.since}: ${a.detail}`);
  for (const [name, st] of Object.entries(s.stages))
    lines.push(`stage:      ${name}: ${typeof st === "string" ? st : JSON.stringify(st)}`);
  if (s.metrics !== undefined) lines.push(`metrics:    ${s.metrics}`);
  return lines.join("\n");
}

/** `m2m-agent status [--json]`: exit 0 when running, 3 when reachable but not running, 1 when unreachable. */
export function register(program: Command): void {
  program
    .command("status")
    .description("show the running agent's state (from the local API socket)")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const { config } = await loadCliConfig(opts);
        const status = await fetchStatus(config.api.socket);
        output(opts, status, () => humanStatus(status));
        return status.state === "running" ? EXIT.ok : EXIT.unhealthy;
      }),
    );
}
