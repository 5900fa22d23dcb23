import { configKeys, loadConfig } from "../config/index.js";
import { asM2mError } from "../core/errors.js";
import { createLogger, type LogFormat, type Logger } from "../core/log.js";
import { lockStateDir } from "../core/state-lock.js";
import { type Agent, type AgentStage, startAgent } from "./compose.js";
import { LevelLogger } from "./level-logger.js";
import { describeState } from "./lifecycle.js";
import { SystemdNotifier, WatchdogHeartbeat } from "./notify.js";
import { agentVersion } from "./version.js";

/** sysexits.h EX_SOFTWARE: internal error. */
export const EXIT_SOFTWARE = 70;

export interface RunDaemonOptions {
  readonly configPath?: string;
  /** The path came from --config (a missing file is an error). */
  readonly explicit?: boolean;
  readonly env?: NodeJS.ProcessEnv;
  /** Test seam: stages instead of the default list. */
  readonly stages?: readonly AgentStage[];
  /** Test seam: base logger (default JSON lines on stderr). */
  readonly log?: Logger;
  /** Log line format on stderr when `log` is not given (default json). */
  readonly logFormat?: LogFormat;
  /** Called once the agent is up (tests, bench). */
  readonly onStarted?: (agent: Agent) => void;
}

/**
 * `m2m-agent run`: the daemon process. Loads config (ERR_CONFIG propagates: the CLI maps it to exit
 * code 2), starts the agent, speaks sd_notify, and handles signals:
 * - SIGHUP: RELOADING=1, reload config (live where possible, "restart required" logged otherwise), READY=1.
 * - SIGTERM / SIGINT: STOPPING=1, drain within agent.drain_timeout_ms, exit 0.
 * Resolves with the process exit code.
 */
export async function runDaemon(options: RunDaemonOptions = {}): Promise<number> {
  const env = options.env ?? process.env;
  const loadOpts = {
    ...(options.configPath === undefined ? {} : { path: options.configPath }),
    explicit: options.explicit ?? false,
    env,
  };
  const loaded = await loadConfig(loadOpts);
  const log = new LevelLogger(
    loaded.config.agent.log_level,
    options.log ?? createLogger({ level: "debug", format: options.logFormat ?? "json" }),
  );
  log.info("m2m-agent starting", {
    version: agentVersion(),
    pid: process.pid,
    configFiles: loaded.sources,
    envOverrides: loaded.envOverrides,
    // Keys only: values (paths, URLs, secret references) stay out of the journal.
    configKeys: configKeys(loaded.config),
  });
  // One agent per state directory: a second `run` (or an `enroll` / `keys destroy` / `decommission`
  // meanwhile) would share the outbox, the key and the enrolment state. Held until this process ends.
  const lock = await lockStateDir(loaded.config.agent.state_dir, "m2m-agent run");
  const notifier = new SystemdNotifier({ env, log });
  // A programming error must leave a coded line in the journal, then exit non-zero so that
  // Restart=on-failure brings a clean process back (continuing after one is unsafe).
  const fatal =
    (kind: string) =>
    (err: unknown): void => {
      log.error(`fatal ${kind}; exiting`, { error: asM2mError(err, "ERR_INTERNAL") });
      process.exit(EXIT_SOFTWARE);
    };
  process.once("uncaughtException", fatal("uncaught exception"));
  process.once("unhandledRejection", fatal("unhandled rejection"));

  // Handlers go in before the (possibly slow: TPM, enrolment) start, so that a SIGHUP from
  // `systemctl reload` cannot kill a starting agent and a SIGTERM is honoured once start returns.
  let agent: Agent | undefined;
  let earlyStop: NodeJS.Signals | undefined;
  let onSignal: (signal: NodeJS.Signals) => void = (signal) => {
    if (signal === "SIGHUP") log.warn("SIGHUP during start ignored (reload once running)");
    else earlyStop ??= signal;
  };
  const dispatch = (signal: NodeJS.Signals): void => onSignal(signal);
  process.on("SIGHUP", dispatch);
  process.on("SIGTERM", dispatch);
  process.on("SIGINT", dispatch);
  const detach = (): void => {
    process.off("SIGHUP", dispatch);
    process.off("SIGTERM", dispatch);
    process.off("SIGINT", dispatch);
  };
  try {
    agent = await startAgent(loaded.config, {
      log,
      env,
      notifier,
      setLogLevel: (level) => log.setLevel(level),
      ...(options.stages === undefined ? {} : { stages: options.stages }),
    });
  } catch (err) {
    detach();
    lock.release();
    throw err;
  }
  const running = agent;
  const heartbeat = new WatchdogHeartbeat(notifier, () => running.healthy(), log);
  const wdInterval = heartbeat.start();
  if (wdInterval !== undefined) log.info("systemd watchdog enabled", { intervalMs: wdInterval });
  await notifier.ready(describeState(running.lifecycle.state));
  options.onStarted?.(running);

  return await new Promise<number>((resolve) => {
    let reloading: Promise<void> | undefined;
    let stopping = false;

    const reload = async (): Promise<void> => {
      if (!running.lifecycle.tryDispatch({ type: "reload" })) {
        log.warn("SIGHUP ignored in this state", { state: running.lifecycle.state.name });
        return;
      }
      await notifier.reloading("reloading configuration");
      try {
        const next = await loadConfig(loadOpts);
        const report = await running.reload(next.config);
        log.info("configuration reloaded", { applied: report.applied });
        if (report.restartRequired.length > 0)
          log.warn("restart required for changed keys", { restartRequired: report.restartRequired });
      } catch (err) {
        // A broken edit must not take a running agent down: keep the running configuration.
        log.error("reload failed; keeping the running configuration", { error: asM2mError(err) });
      }
      running.lifecycle.dispatch({ type: "reloaded" });
      running.health.apply();
      await notifier.ready(describeState(running.lifecycle.state));
    };

    const stop = (signal: NodeJS.Signals): void => {
      if (stopping) {
        log.warn("second stop signal while draining; still draining", { signal });
        return;
      }
      stopping = true;
      void (async () => {
        await reloading?.catch(() => undefined);
        log.info("stopping", { signal, drainTimeoutMs: running.config.agent.drain_timeout_ms });
        await notifier.stopping(`stopping: ${signal}`);
        heartbeat.stop();
        const { drained } = await running.stop(signal);
        detach();
        lock.release();
        log.info("stopped", { drained });
        resolve(0);
      })();
    };

    onSignal = (signal) => {
      if (signal !== "SIGHUP") return stop(signal);
      if (stopping) return;
      reloading = (reloading ?? Promise.resolve()).then(reload).finally(() => {
        reloading = undefined;
      });
    };
    if (earlyStop !== undefined) stop(earlyStop);
  });
}
