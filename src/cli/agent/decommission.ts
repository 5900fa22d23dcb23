import { randomBytes } from "node:crypto";
import { readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { createInterface } from "node:readline/promises";
import type { Command } from "commander";
import { auditLogPath } from "../../config/index.js";
import { systemClock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { EnrolmentState } from "../../enroll/state.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import { withStep } from "../progress.js";
import { action, cliLogger, EXIT, globalOptions, loadCliConfig, output, progressFor } from "./common.js";
import { fetchStatus } from "./status.js";

/** The registrar route a device uses to revoke itself (src/registrar/app.ts). */
export const SELF_REVOKE_PATH = "/v1/devices/self/revoke";

interface DecommissionOptions {
  readonly yes?: boolean;
  /** Go on (destroy keys, wipe state) even when the registrar could not be told. */
  readonly offline?: boolean;
}

/**
 * Tells the registrar that this device is revoked, authenticated with a private_key_jwt assertion
 * (RFC 7523) signed by the device key with `aud` = the revocation URL.
 * @throws ERR_DECOMMISSION_REFUSED (the registrar did not accept), ERR_REGISTRAR_UNREACHABLE
 */
export async function revokeAtRegistrar(
  state: EnrolmentState,
  keys: KeyProvider,
  caPem: string,
  timeoutMs = 15_000,
): Promise<void> {
  const { signCompactJws } = await import("../../keys/jws.js");
  const { Agent, fetch } = await import("undici");
  const info = await keys.open();
  const base = (state.endpoints.registrar ?? state.registrarUrl).replace(/\/+$/, "");
  const url = `${base}${SELF_REVOKE_PATH}`;
  const now = systemClock.nowSeconds();
  const assertion = await signCompactJws(
    keys,
    info,
    { typ: "JWT" },
    {
      iss: state.deviceId,
      sub: state.deviceId,
      aud: url,
      jti: randomBytes(18).toString("base64url"),
      iat: now,
      exp: now + 60,
    },
  );
  const form = new URLSearchParams({
    client_id: state.deviceId,
    client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    client_assertion: assertion,
  });
  const dispatcher = new Agent({ connect: { ca: caPem } });
  try {
    let res: Awaited<ReturnType<typeof fetch>>;
    try {
      res = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: form.toString(),
        redirect: "manual",
        dispatcher,
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw new M2mError("ERR_REGISTRAR_UNREACHABLE", "transient", "the registrar could not be reached", {
        cause: err,
        hint: "retry when the registrar is reachable, or pass --offline and revoke the device on the registrar",
      });
    }
    const text = (await res.text()).slice(0, 4096);
    if (res.status !== 200) {
      let code = `HTTP_${res.status}`;
      try {
        code = (JSON.parse(text) as { error?: { code?: string } }).error?.code ?? code;
      } catch {
        // not JSON: keep the status
      }
      throw new M2mError(
        "ERR_DECOMMISSION_REFUSED",
        "permanent",
        `the registrar refused the revocation (${code})`,
        {
          details: { status: res.status, serverCode: code },
          hint: "the device may already be revoked; pass --offline to wipe it anyway",
        },
      );
    }
  } finally {
    await dispatcher.close();
  }
}

/** Removes every file in the state directory except the audit log (the record of what happened). */
async function wipeState(stateDir: string, keep: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(stateDir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const path = join(stateDir, name);
    if (path === keep) continue;
    await rm(path, { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

async function confirm(deviceId: string): Promise<void> {
  if (process.stdin.isTTY !== true) {
    throw new M2mError(
      "ERR_CONFIRMATION_REQUIRED",
      "permanent",
      "refusing to decommission without confirmation",
      {
        hint: "run on a terminal to confirm interactively, or pass --yes",
      },
    );
  }
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(
      `This revokes device ${deviceId} at the registrar, destroys its hardware key and wipes its state.\nType the device id to continue: `,
    );
    if (answer.trim() !== deviceId)
      throw new M2mError("ERR_CONFIRMATION_REQUIRED", "permanent", "not confirmed; nothing was changed");
  } finally {
    rl.close();
  }
}

/**
 * `m2m-agent decommission [--yes] [--offline]`: revokes the device at the registrar, destroys the
 * hardware key (and the TPM AK), wipes the state directory (the audit log stays). The agent must
 * be stopped first: it holds the key.
 */
export function register(program: Command): void {
  program
    .command("decommission")
    .description("revoke this device at the registrar, destroy its hardware keys and wipe its state")
    .option("--yes", "do not ask for confirmation")
    .option("--offline", "continue when the registrar cannot be told (revoke it there by hand)")
    .action(
      action(async (cmd: Command) => {
        const g = globalOptions(cmd);
        const o = cmd.opts<DecommissionOptions>();
        const { config } = await loadCliConfig(g);
        // Refuses (ERR_STATE_LOCKED, naming the PID) while an agent or another command uses the state.
        const { lockStateDir } = await import("../../core/state-lock.js");
        const lock = await lockStateDir(config.agent.state_dir, "m2m-agent decommission");
        process.once("exit", () => lock.release());
        const progress = progressFor(g);
        const running = await fetchStatus(config.api.socket, 2_000).then(
          () => true,
          () => false,
        );
        if (running) {
          throw new M2mError(
            "ERR_AGENT_RUNNING",
            "permanent",
            "the agent is running and holds the device key",
            {
              hint: "stop it first: systemctl stop m2m-agent",
            },
          );
        }
        const { readEnrolmentState } = await import("../../enroll/state.js");
        const state = await readEnrolmentState(config.agent.state_dir);
        if (state === undefined && o.offline !== true) {
          throw new M2mError(
            "ERR_NOT_ENROLLED",
            "permanent",
            "this device is not enrolled: nothing to revoke",
            {
              hint: "pass --offline to destroy the key and wipe the state anyway",
            },
          );
        }
        if (o.yes !== true) await confirm(state?.deviceId ?? "(not enrolled)");

        const log = cliLogger(g);
        const { deviceKeyFromConfig } = await import("../../keys/from-config.js");
        const owner = await deviceKeyFromConfig(config, { log });
        const keys = owner.current;
        let revoked = false;
        try {
          if (state !== undefined) {
            const caParts = [...state.caChainPem];
            if (config.enroll.registrar_ca_file !== undefined)
              caParts.push(await readFile(config.enroll.registrar_ca_file, "utf8"));
            try {
              // Why: the revocation request is a JWT signed on our clock; below the floor it is not sent
              // (ERR_CLOCK_UNTRUSTED; with --offline the device is wiped anyway).
              const { assertClockTrustedForCli } = await import("../../daemon/clock-sanity.js");
              await assertClockTrustedForCli({
                clock: systemClock,
                stateDir: config.agent.state_dir,
                log,
                certificatePem: state.certificatePem,
              });
              await withStep(progress, `revoking ${state.deviceId} at the registrar`, () =>
                revokeAtRegistrar(state, keys, caParts.join("\n")),
              );
              revoked = true;
            } catch (err) {
              // Without the registrar's acknowledgement the key is the only proof left: keep it.
              if (o.offline !== true) throw err;
              log.warn("registrar not told; continuing (--offline)", {
                code: err instanceof M2mError ? err.code : "ERR_INTERNAL",
              });
            }
          }
          await withStep(progress, "destroying the device key", async () => {
            await keys.destroy();
            // The AK identified this TPM to the registrar: it goes with the device key.
            await keys.attestation?.evictAk();
          });
        } finally {
          await owner.close().catch(() => undefined);
        }
        const auditPath = auditLogPath(config);
        try {
          const { AuditLog } = await import("../../daemon/audit.js");
          const audit = await AuditLog.open(auditPath, { clock: systemClock, log });
          await audit.record("decommissioned", { deviceId: state?.deviceId, registrarTold: revoked });
          await audit.close();
        } catch {
          // The audit log is best effort here: the registrar holds the authoritative record.
        }
        const removed = await withStep(progress, "wiping the agent state", () =>
          wipeState(config.agent.state_dir, auditPath),
        );
        output(
          g,
          { decommissioned: true, deviceId: state?.deviceId, registrarTold: revoked, removed },
          () =>
            `device ${state?.deviceId ?? "(not enrolled)"} decommissioned${revoked ? " (revoked at the registrar)" : " (registrar NOT told)"}`,
        );
        return EXIT.ok;
      }),
    );
}
