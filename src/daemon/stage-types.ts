import type { ApiServer } from "../api/server.js";
import type { AgentConfig } from "../config/index.js";
import type { Clock } from "../core/clock.js";
import type { Logger } from "../core/log.js";
import type { EnrolmentState } from "../enroll/state.js";
import type { DeviceKeyOwner } from "../keys/device-key.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import type { AnomalyDetector, AuditSink } from "./audit.js";
import type { ClockSanity } from "./clock-sanity.js";
import type { HealthBoard } from "./health.js";
import type { Lifecycle } from "./lifecycle.js";
import type { AgentMetrics } from "./metrics.js";

/**
 * The contract between the composition root (compose.ts) and its stages (stages/*). Its own module so
 * stages never import compose (no import cycle). A stage declares what it NEEDS from earlier stages
 * and returns what it PROVIDES; compose.ts wires outputs to inputs with the compiler checking them.
 */

/** What every stage gets from the composition root. */
export interface StageContext {
  readonly config: AgentConfig;
  readonly log: Logger;
  readonly clock: Clock;
  readonly env: NodeJS.ProcessEnv;
  readonly metrics: AgentMetrics;
  readonly health: HealthBoard;
  readonly lifecycle: Lifecycle;
  readonly audit: AuditSink;
  readonly anomalies: AnomalyDetector;
  readonly clockSanity: ClockSanity;
  /** The local API (undefined when it could not be started: the agent runs degraded). */
  readonly api: ApiServer | undefined;
  /** The device key's owner: ask it for the current key (it changes on rotation) and subscribe. */
  readonly keys: DeviceKeyOwner;
  /** The key current at stage start (for stages that only need its public facts). */
  readonly key: { readonly provider: KeyProvider; readonly info: KeyInfo };
  readonly enrolment: EnrolmentState | undefined;
  /** Re-runs enrolment with `force` on the current key (TPM re-attestation). */
  readonly reenroll: () => Promise<EnrolmentState>;
}

export interface StageReload {
  /** Key paths applied live. */
  readonly applied: readonly string[];
  /** Key paths that need a restart to take effect. */
  readonly restartRequired: readonly string[];
}

export interface StageHandle {
  /** Shown under `stages.<name>` in status. */
  status?(): unknown;
  /** Apply a new config; keys this stage does not handle live are reported as restart-required. */
  reload?(next: AgentConfig): Promise<StageReload>;
  /** Drain in-flight work; `signal` fires at the drain deadline. */
  stop(signal: AbortSignal): Promise<void>;
}

/** A started stage: its handle plus what it provides to later stages. */
export type StageStarted<Provides> = StageHandle & { readonly provides?: Provides };

export interface AgentStage<Needs = void, Provides = void> {
  readonly name: string;
  /** Config sections this stage owns (for "restart required" attribution on reload). */
  readonly sections: readonly string[];
  /** False → the stage is skipped and its modules are never imported. */
  enabled(config: AgentConfig): boolean;
  start(ctx: StageContext, needs: Needs): Promise<StageStarted<Provides>>;
}

/**
 * Starts one stage (or skips it) and returns what it provides; undefined when skipped or failed
 * (the failure is recorded in health by the runner).
 */
export type StageRunner = <Needs, Provides>(
  stage: AgentStage<Needs, Provides>,
  needs: Needs,
) => Promise<Provides | undefined>;

/** The order stages start in and how their outputs feed each other (stopped in reverse). */
export type StagePipeline = (run: StageRunner) => Promise<void>;
