import { configKeys, loadConfig } from "../config/index.js";
import { asM2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { type Agent, type AgentStage, startAgent } from "./compose.js";
import { LevelLogger } from "./level-logger.js";
import { describeState } from "./lifecycle.js";
import { SystemdNotifier, WatchdogHeartbeat } from "./notify.js";
import { agentVersion } from "./version.js";

export interface RunDaemonOptions {
  readonly configPath?: string;
  /** The path came from --config (a missing file is an error). */
  readonly explicit?: boolean;
  readonly env?: NodeJS.ProcessEnv;
  /** Test seam: stages instead of the default list. */
  readonly stages?: readonly AgentStage[];
  /** Test seam: base logger (default JSON lines on stderr). */
  readonly log?: Logger;
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
  const log = new LevelLogger(loaded.config.agent.log_level, options.log);
  log.info("m2m-agent starting", {
    version: agentVersion(),
    pid: process.pid,
    configFiles: loaded.sources,
    envOverrides: loaded.envOverrides,
    // Keys only: values (paths, URLs, secret references) stay out of the journal.
    configKeys: configKeys(loaded.config),
  });
  const notifier = new SystemdNotifier({ env, log });
  const agent = await startAgent(loaded.config, {
    log,
    env,
    notifier,
    setLogLevel: (level) => log.setLevel(level),
    ...(options.stages === undefined ? {} : { stages: options.stages }),
  });
  const heartbeat = new WatchdogHeartbeat(notifier, () => agent.healthy(), log);
  const wdInterval = heartbeat.start();
  if (wdInterval !== undefined) log.info("systemd watchdog enabled", { intervalMs: wdInterval });
  await notifier.ready(describeState(agent.lifecycle.state));
  options.onStarted?.(agent);

  return await new Promise<number>((resolve) => {
    let reloading: Promise<void> | undefined;
    let stopping = false;

    const reload = async (): Promise<void> => {
      if (!agent.lifecycle.tryDispatch({ type: "reload" })) {
        log.warn("SIGHUP ignored in this state", { state: agent.lifecycle.state.name });
        return;
      }
      await notifier.reloading("reloading configuration");
      try {
        const next = await loadConfig(loadOpts);
        const report = await agent.reload(next.config);
        log.info("configuration reloaded", { applied: report.applied });
        if (report.restartRequired.length > 0)
          log.warn("restart required for changed keys", { restartRequired: report.restartRequired });
      } catch (err) {
        // A broken edit must not take a running agent down: keep the running configuration.
        log.error("reload failed; keeping the running configuration", { error: asM2mError(err) });
      }
      agent.lifecycle.dispatch({ type: "reloaded" });
      agent.health.apply();
      await notifier.ready(describeState(agent.lifecycle.state));
    };

    const onHup = (): void => {
      if (stopping) return;
      reloading = (reloading ?? Promise.resolve()).then(reload).finally(() => {
        reloading = undefined;
      });
    };
    const onTerm = (signal: NodeJS.Signals): void => {
      if (stopping) {
        log.warn("second stop signal while draining; still draining", { signal });
        return;
      }
      stopping = true;
      void (async () => {
        await reloading?.catch(() => undefined);
        log.info("stopping", { signal, drainTimeoutMs: agent.config.agent.drain_timeout_ms });
        await notifier.stopping(`stopping: ${signal}`);
        heartbeat.stop();
        const { drained } = await agent.stop(signal);
        process.off("SIGHUP", onHup);
        process.off("SIGTERM", onTerm);
        process.off("SIGINT", onTerm);
        log.info("stopped", { drained });
        resolve(0);
      })();
    };
    process.on("SIGHUP", onHup);
    process.on("SIGTERM", onTerm);
    process.on("SIGINT", onTerm);
  });
}
