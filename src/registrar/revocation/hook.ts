import { execa } from "execa";
import type { Clock } from "../../core/clock.js";
import type { Logger } from "../../core/log.js";

/**
 * The revocation hook: an operator-configured command (`[revocation] hook`, an argv array) that the
 * registrar runs when a device is revoked and whenever it writes a new CRL, so that a broker can
 * reload the CRL and drop the revoked device's live session (example for mosquitto:
 * `service/hooks/mosquitto-revoke`, docs/revocation.md).
 *
 * Contract with the command:
 * - it is run without a shell (`execa(file, args)`), in its own process group, with a timeout after
 *   which the whole group is killed; one run at a time, in event order;
 * - it gets a minimal environment: `PATH`, `LANG`, and the event in `M2M_*` variables (never a
 *   secret: device ids, serials and the CRL path are public information);
 * - exit 0 = done; anything else is logged and audited as a failure (the CRL stays published).
 */

export type HookEvent =
  | {
      readonly kind: "revoked";
      readonly deviceId: string;
      /** Hex serials of the device's unexpired certificates (all on the CRL now). */
      readonly serials: readonly string[];
      readonly revokedAt: Date;
      readonly crlFile: string;
      readonly crlNumber: bigint;
    }
  | {
      readonly kind: "crl-updated";
      readonly crlFile: string;
      readonly crlNumber: bigint;
    };

export interface HookResult {
  readonly ok: boolean;
  readonly exitCode: number | undefined;
  readonly timedOut: boolean;
  readonly durationMs: number;
}

export interface HookConfig {
  /** argv; the first element is an absolute path to the executable. */
  readonly command: readonly string[];
  readonly timeoutMs: number;
}

/** The environment a hook sees (documented in docs/revocation.md). */
export function hookEnvironment(event: HookEvent): Record<string, string> {
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    LANG: "C.UTF-8",
    M2M_EVENT: event.kind,
    M2M_CRL_FILE: event.crlFile,
    M2M_CRL_NUMBER: event.crlNumber.toString(),
  };
  if (event.kind === "revoked") {
    env.M2M_DEVICE_ID = event.deviceId;
    env.M2M_CERT_SERIALS = event.serials.join(",");
    env.M2M_REVOKED_AT = event.revokedAt.toISOString();
  }
  return env;
}

/** Runs hook commands one at a time, in the order events arrive. */
export class RevocationHook {
  readonly #config: HookConfig;
  readonly #clock: Clock;
  readonly #log: Logger;
  #tail: Promise<unknown> = Promise.resolve();

  constructor(config: HookConfig, deps: { clock: Clock; log: Logger }) {
    this.#config = config;
    this.#clock = deps.clock;
    this.#log = deps.log;
  }

  /** Queues one run; resolves when it has finished (never rejects). */
  run(event: HookEvent): Promise<HookResult> {
    const next = this.#tail.then(() => this.#runOnce(event));
    this.#tail = next;
    return next;
  }

  /** Resolves when every queued run has finished. */
  async idle(): Promise<void> {
    await this.#tail;
  }

  async #runOnce(event: HookEvent): Promise<HookResult> {
    const [file, ...args] = this.#config.command;
    const started = this.#clock.monotonicMs();
    if (file === undefined) return { ok: false, exitCode: undefined, timedOut: false, durationMs: 0 };
    const child = execa(file, args, {
      env: hookEnvironment(event),
      // Why: the registrar's own environment may hold secrets (database URL, credentials paths).
      extendEnv: false,
      // Own process group, so a timeout kills everything the hook started.
      detached: true,
      stdin: "ignore",
      reject: false,
      maxBuffer: 64 * 1024,
    });
    let timedOut = false;
    // Our own timer, not execa's `timeout`: that kills only the direct child, and a grandchild
    // holding stdout open would keep the run (and every later one) waiting.
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // The group is already gone.
      }
    }, this.#config.timeoutMs);
    const res = await child;
    clearTimeout(timer);
    const durationMs = Math.round(this.#clock.monotonicMs() - started);
    const ok = !timedOut && !res.failed && res.exitCode === 0;
    const fields = {
      event: event.kind,
      deviceId: event.kind === "revoked" ? event.deviceId : undefined,
      exitCode: res.exitCode,
      timedOut,
      durationMs,
    };
    if (ok) this.#log.info("revocation hook ran", fields);
    else {
      // The hook's stderr tail helps the operator; hooks get no secrets, so it carries none of ours.
      const stderr = typeof res.stderr === "string" ? res.stderr.slice(-500) : "";
      this.#log.warn("revocation hook failed", { ...fields, stderr });
    }
    return { ok, exitCode: res.exitCode, timedOut, durationMs };
  }
}
