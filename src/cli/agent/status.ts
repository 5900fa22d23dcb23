import type { Command } from "commander";
import { M2mError } from "../../core/errors.js";
import {
  type AgentStatus,
  agentStatusSchema,
  attestationStatusSchema,
  STATUS_PATH,
} from "../../wire/v1/local-api.js";
import type { Progress } from "../progress.js";
import { action, EXIT, globalOptions, loadCliConfig, output, progressFor, usageError } from "./common.js";
import { answerOf, callAgent } from "./local-api.js";

/** GET /v1/status from the running daemon over the local API socket. */
export async function fetchStatus(socketPath: string, timeoutMs = 5_000): Promise<AgentStatus> {
  const answer = await callAgent({ socketPath, method: "GET", path: STATUS_PATH, timeoutMs }).catch(
    (err: NodeJS.ErrnoException) => {
      throw err.code === "EACCES"
        ? new M2mError("ERR_AGENT_ACCESS", "permanent", `permission denied on ${socketPath}`, {
            cause: err,
            hint: "run as the agent user, root, or a member of the group set in api.group",
          })
        : new M2mError("ERR_AGENT_NOT_RUNNING", "transient", `cannot reach the agent at ${socketPath}`, {
            cause: err,
            hint: "is it running? `systemctl status m2m-agent`; is api.socket the same in this config?",
            details: { errno: String(err.code ?? "") },
          });
    },
  );
  return answerOf(answer, agentStatusSchema, "ERR_AGENT_STATUS");
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
  const att = attestationLine(s);
  if (att !== undefined) lines.push(`attestation: ${att}`);
  for (const [c, r] of Object.entries(s.reasons)) lines.push(`problem:    ${c}: ${r}`);
  for (const a of s.anomalies)
    lines.push(`anomaly:    ${a.kind} on ${a.channel} since ${a.since}: ${a.detail}`);
  for (const [name, st] of Object.entries(s.stages)) {
    if (st === null || typeof st !== "object") lines.push(`stage:      ${name}: ${scalar(st)}`);
    else lines.push(`stage:      ${name}`, ...nested(st, "              "));
  }
  if (s.metrics !== undefined) lines.push(`metrics:    ${s.metrics}`);
  return lines.join("\n");
}

/** The latest TPM quote (continuous attestation) in one line, when the credentials stage reports one. */
export function attestationLine(s: AgentStatus): string | undefined {
  const creds = s.stages.credentials as { attestation?: unknown } | undefined;
  if (creds === undefined || !("attestation" in creds)) return undefined;
  if (creds.attestation === null) return "no quote requested yet";
  const a = attestationStatusSchema.safeParse(creds.attestation);
  if (!a.success) return undefined;
  const q = a.data;
  const why = q.code === undefined ? "" : ` (${q.code}${q.detail === undefined ? "" : `: ${q.detail}`})`;
  const verified =
    q.result === "verified" ? "" : `; last verified ${q.lastVerifiedAt ?? "never since start"}`;
  return `last quote ${q.lastQuoteAt} over ${q.selection}: ${q.result}${why}${verified}`;
}

function scalar(v: unknown): string {
  if (v === null || v === undefined) return "-";
  if (typeof v === "string") return v;
  if (Array.isArray(v)) return v.length === 0 ? "none" : v.map(scalar).join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** A stage's status object as indented `key: value` lines (no JSON blobs for a person to decode). */
function nested(o: object, indent: string, depth = 0): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    if (v === undefined) continue;
    const isObject = v !== null && typeof v === "object" && !Array.isArray(v);
    if (isObject && depth < 3) {
      const inner = nested(v as object, `${indent}  `, depth + 1);
      out.push(inner.length === 0 ? `${indent}${k}: -` : `${indent}${k}:`, ...inner);
    } else if (Array.isArray(v) && v.some((x) => x !== null && typeof x === "object") && depth < 3) {
      out.push(`${indent}${k}:`);
      for (const [i, x] of v.entries()) {
        if (x !== null && typeof x === "object")
          out.push(`${indent}  [${i}]`, ...nested(x as object, `${indent}    `, depth + 2));
        else out.push(`${indent}  - ${scalar(x)}`);
      }
    } else out.push(`${indent}${k}: ${scalar(v)}`);
  }
  return out;
}

/** Outbox depth from a status answer (undefined when the relay is not configured). */
export function outboxDepth(status: AgentStatus): number | undefined {
  const relay = status.stages.relay as { outbox?: { depth?: unknown } | null } | undefined;
  const depth = relay?.outbox?.depth;
  return typeof depth === "number" ? depth : undefined;
}

/**
 * Follows the backlog drain (after an outage, before maintenance): polls the daemon's status and shows
 * the outbox depth and drain rate until it reaches zero.
 * @throws ERR_DRAIN_TIMEOUT when messages are still queued after `timeoutMs`; ERR_AGENT_* when unreachable.
 */
export async function waitForDrain(
  socketPath: string,
  options: { progress: Progress; intervalMs?: number; timeoutMs: number },
): Promise<AgentStatus> {
  const interval = options.intervalMs ?? 500;
  const started = performance.now();
  let last: { depth: number; at: number } | undefined;
  for (;;) {
    const status = await fetchStatus(socketPath);
    const depth = outboxDepth(status);
    if (depth === undefined) {
      throw new M2mError("ERR_NO_RELAY", "permanent", "the agent has no relay outbox to drain", {
        hint: "configure [relay.mqtt] or [relay.https] in the agent config",
      });
    }
    const now = performance.now();
    if (depth === 0) {
      options.progress.done("backlog drained: outbox empty");
      return status;
    }
    const rate =
      last === undefined || now <= last.at ? undefined : ((last.depth - depth) * 1000) / (now - last.at);
    options.progress.step(
      `backlog: ${depth} message(s) queued${rate === undefined ? "" : ` (draining at ${Math.max(0, Math.round(rate))} msg/s)`}`,
    );
    last = { depth, at: now };
    if (now - started > options.timeoutMs) {
      options.progress.fail(`backlog: ${depth} message(s) still queued`);
      throw new M2mError("ERR_DRAIN_TIMEOUT", "transient", `${depth} message(s) still queued`, {
        hint: "check `m2m-agent status` for the sinks' errors (broker or ingest unreachable?)",
        details: { depth },
      });
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * `m2m-agent status [--json]`: exit 0 when running, 3 when reachable but not running, 1 when
 * unreachable. With `--wait-drain`: 0 once the backlog drained (whatever the state), 1 on timeout.
 */
export function register(program: Command): void {
  program
    .command("status")
    .description("show the running agent's state (from the local API socket)")
    .option("--wait-drain", "follow the outbox backlog until it is delivered (progress on stderr)")
    .option("--timeout <seconds>", "with --wait-drain: give up after this many seconds", "600")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const { config } = await loadCliConfig(opts);
        const local = cmd.opts<{ waitDrain?: boolean; timeout: string }>();
        if (local.waitDrain === true) {
          const seconds = Number(local.timeout);
          if (!Number.isFinite(seconds) || seconds <= 0)
            throw usageError("--timeout takes a positive number of seconds");
          const drained = await waitForDrain(config.api.socket, {
            progress: progressFor(opts),
            timeoutMs: seconds * 1000,
          });
          output(opts, drained, () => humanStatus(drained));
          // What was asked is done: the backlog is delivered. (A state that is not `running` just
          // after an outage, e.g. a sink's health timer not yet cleared, is shown, not an error.)
          return EXIT.ok;
        }
        const status = await fetchStatus(config.api.socket);
        output(opts, status, () => humanStatus(status));
        return status.state === "running" ? EXIT.ok : EXIT.unhealthy;
      }),
    );
}
