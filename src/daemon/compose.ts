import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import type { ApiServer } from "../api/server.js";
import { type AgentConfig, auditLogPath, configKeys } from "../config/index.js";
import { type Clock, systemClock } from "../core/clock.js";
import { asM2mError, isM2mError, M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { backoffDelay, defaultRetryPolicy } from "../core/retry.js";
import { currentEkSha256, reprovisionError, reprovisionReason } from "../enroll/reprovision.js";
import type { EnrolmentState } from "../enroll/state.js";
import type { DeviceKeyOwner } from "../keys/device-key.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import { type AgentStatus, STATUS_PATH } from "../wire/v1/local-api.js";
import { AnomalyDetector as Anomalies, AuditLog, type AuditSink } from "./audit.js";
import { ClockSanity } from "./clock-sanity.js";
import { HealthBoard, healthReasonOf, instrumentKeyProvider, OperationWatch } from "./health.js";
import { describeState, Lifecycle, STATE_NAMES } from "./lifecycle.js";
import { AgentMetrics, type MetricsServer, startMetricsServer } from "./metrics.js";
import type { SystemdNotifier } from "./notify.js";
import type { AgentStage, StageHandle, StagePipeline, StageRunner } from "./stage-types.js";
import { credentialsStage } from "./stages/credentials.js";
import { relayStage } from "./stages/relay.js";
import { agentVersion } from "./version.js";

/**
 * The ONE composition root of the agent: config → KeyProvider → enrolment state → stages
 * (credentials, relay, …) → local API, plus lifecycle, metrics, audit and clock sanity. Nothing else
 * constructs backends. Heavy modules (pkcs11js, tpm2 runner, mqtt, sqlite, x509) are imported
 * dynamically and only when configured, which keeps `start → READY=1` short.
 *
 * Adding a capability = writing an `AgentStage` and appending it to `STAGES` below.
 */

export type { AgentStage, StageContext, StageHandle, StageReload } from "./stage-types.js";

/**
 * Stages in start order (stopped in reverse), each fed what the earlier ones provide: the
 * credentials stage's token source and DPoP signer are what the relay stage declares it needs.
 * Enrolment runs before them (see `#bringUp`).
 */
export const STAGES: StagePipeline = async (run) => {
  const credentials = await run(credentialsStage, undefined);
  await run(relayStage, { tokens: credentials?.tokens, dpop: credentials?.dpop });
};

export interface AgentDeps {
  readonly log: Logger;
  readonly clock?: Clock;
  readonly env?: NodeJS.ProcessEnv;
  readonly notifier?: SystemdNotifier;
  /** Test seam: use this provider instead of the configured one. */
  readonly keyProvider?: KeyProvider;
  /** Test seam: replaces `STAGES` with stages that need nothing from each other. */
  readonly stages?: readonly AgentStage<void, unknown>[];
  /** Called when the log level changes on reload. */
  readonly setLogLevel?: (level: AgentConfig["agent"]["log_level"]) => void;
}

/** The `GET /v1/status` body: the wire type shared with `m2m-agent status`. */
export type { AgentStatus } from "../wire/v1/local-api.js";

export interface ReloadReport {
  readonly applied: readonly string[];
  readonly restartRequired: readonly string[];
}

/** Leaf key paths whose values differ between two configs (paths only: values are never logged). */
export function changedKeys(a: AgentConfig, b: AgentConfig): string[] {
  const get = (o: unknown, path: string): unknown =>
    path
      .split(".")
      .reduce<unknown>(
        (cur, k) =>
          cur !== null && typeof cur === "object" ? (cur as Record<string, unknown>)[k] : undefined,
        o,
      );
  const keys = new Set([...configKeys(a), ...configKeys(b)]);
  return [...keys].filter((k) => JSON.stringify(get(a, k)) !== JSON.stringify(get(b, k))).sort();
}

/** Looks a group name up in /etc/group (Node has no getgrnam). */
export function groupId(name: string): number | undefined {
  if (/^\d+$/.test(name)) return Number(name);
  try {
    for (const line of readFileSync("/etc/group", "utf8").split("\n")) {
      const [gname, , gid] = line.split(":");
      if (gname === name && gid !== undefined) return Number(gid);
    }
  } catch {
    // no /etc/group: fall through
  }
  return undefined;
}

/** A running agent. */
export class Agent {
  readonly lifecycle: Lifecycle;
  readonly metrics: AgentMetrics;
  readonly health: HealthBoard;
  readonly clockSanity: ClockSanity;
  readonly anomalies: Anomalies;
  readonly watch: OperationWatch;
  #config: AgentConfig;
  readonly #deps: AgentDeps;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #env: NodeJS.ProcessEnv;
  readonly #stages: StagePipeline;
  readonly #handles: { stage: { name: string; sections: readonly string[] }; handle: StageHandle }[] = [];
  readonly #startedMono: number;
  #since: string;
  #audit: AuditSink = { record: async () => undefined };
  #auditLog: AuditLog | undefined;
  #api: ApiServer | undefined;
  #metricsServer: MetricsServer | undefined;
  #keys: DeviceKeyOwner | undefined;
  #keyInfo: KeyInfo | undefined;
  #enrolment: EnrolmentState | undefined;
  #certNotAfter: Date | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #clockTimer: NodeJS.Timeout | undefined;

  constructor(config: AgentConfig, deps: AgentDeps) {
    this.#config = config;
    this.#deps = deps;
    this.#log = deps.log;
    this.#clock = deps.clock ?? systemClock;
    this.#env = deps.env ?? process.env;
    const only = deps.stages;
    this.#stages =
      only === undefined
        ? STAGES
        : async (run) => {
            for (const stage of only) await run(stage, undefined);
          };
    this.#startedMono = this.#clock.monotonicMs();
    this.#since = this.#clock.now().toISOString();
    this.lifecycle = new Lifecycle(this.#log.child({ component: "lifecycle" }));
    this.metrics = new AgentMetrics(agentVersion());
    this.health = new HealthBoard(this.lifecycle);
    this.watch = new OperationWatch(this.#clock, Math.max(30_000, 3 * config.keys.tpm.timeout_ms));
    this.clockSanity = new ClockSanity({
      clock: this.#clock,
      stateDir: config.agent.state_dir,
      log: this.#log,
    });
    this.anomalies = new Anomalies({
      clock: this.#clock,
      onFlag: (flag) => {
        this.metrics.anomalies.inc({ kind: flag.kind });
        this.#log.warn("anomaly flagged", { kind: flag.kind, channel: flag.channel, detail: flag.detail });
        this.#audit.record("anomaly", { ...flag }).catch(() => undefined);
      },
    });
    this.metrics.setState("starting", STATE_NAMES);
    this.lifecycle.onTransition(({ from, to }) => {
      this.#since = this.#clock.now().toISOString();
      this.metrics.setState(to.name, STATE_NAMES);
      this.metrics.transitions.inc({ from: from.name, to: to.name });
      if (to.name !== "stopping" && to.name !== "stopped" && to.name !== "reloading")
        void this.#deps.notifier?.status(describeState(to));
    });
  }

  get config(): AgentConfig {
    return this.#config;
  }

  get keyInfo(): KeyInfo | undefined {
    return this.#keyInfo;
  }

  /** Watchdog predicate: false while a hardware call is stuck past its deadline. */
  healthy(): boolean {
    const hung = this.watch.hung();
    if (hung !== undefined) {
      this.health.set(
        "hang",
        `ERR_OPERATION_HUNG: ${hung.op} pending for ${Math.round(hung.pendingMs / 1000)} s`,
      );
      return false;
    }
    this.health.set("hang", undefined);
    return true;
  }

  /** Starts everything; resolves once the agent is running, degraded or unprovisioned. */
  async start(): Promise<void> {
    const c = this.#config;
    await this.clockSanity.load();
    this.#checkClock();
    try {
      this.#auditLog = await AuditLog.open(auditLogPath(c), { clock: this.#clock, log: this.#log });
      this.#audit = this.#auditLog;
      this.health.set("audit", undefined);
    } catch (err) {
      this.health.set("audit", healthReasonOf(err));
    }
    await this.#startApi();
    await this.#startMetrics();
    await this.#bringUp();
    if (this.lifecycle.state.name === "starting") this.lifecycle.dispatch({ type: "ready" });
    this.health.apply();
    // The verdict is re-checked every 2 s (a comparison: a corrected clock clears the reason within
    // seconds); the floor is persisted once a minute (a write). setInterval runs on the monotonic
    // clock, so a wall-clock step (years forward or back) never bunches these ticks.
    let ticks = 0;
    this.clockSanity.noteStep();
    this.#clockTimer = setInterval(() => {
      const step = this.clockSanity.noteStep();
      // A step is logged (operators correlate it with expiry/renewal decisions); timers are monotonic.
      if (step !== undefined) this.#log.warn("wall clock stepped", { stepS: Math.round(step / 1000) });
      this.#checkClock();
      if (++ticks % 30 !== 0) return;
      this.clockSanity
        .persist()
        .catch((err: unknown) => this.#log.warn("could not persist clock floor", { error: err }));
    }, 2_000);
    this.#clockTimer.unref();
  }

  #checkClock(): void {
    const v = this.clockSanity.check();
    this.metrics.clockTrusted.set(v.trusted ? 1 : 0);
    // Stable text (no timestamps): the board re-applies only when the reason itself changes.
    this.health.set(
      "clock",
      v.trusted
        ? undefined
        : `ERR_CLOCK_UNTRUSTED: the clock is before the ${v.floorSource} time floor ${v.floor}`,
    );
  }

  async #startApi(): Promise<void> {
    const c = this.#config.api;
    try {
      const { ApiServer } = await import("../api/server.js");
      const gid = c.group === undefined ? undefined : groupId(c.group);
      if (c.group !== undefined && gid === undefined)
        this.#log.warn("api.group not found; socket keeps the agent's group", { group: c.group });
      const api = new ApiServer({
        socketPath: c.socket,
        mode: c.mode,
        ...(gid === undefined ? {} : { gid }),
        logger: this.#log.child({ component: "api" }),
        notReady: (method, path) => this.#notReady(method, path),
      });
      api.route("GET", STATUS_PATH, async () => ({ status: 200, json: this.status() }));
      await api.listen();
      this.#api = api;
      this.health.set("api", undefined);
      this.#log.info("local API listening", { socket: c.socket });
    } catch (err) {
      this.health.set("api", healthReasonOf(err, "local API unavailable: "));
      this.#log.error("local API could not start", { error: err });
    }
  }

  /**
   * A configured feature whose route is not mounted (yet): the agent is degraded, unprovisioned or
   * enrolling. The caller learns the state and its reason (503, retry later), not "not found".
   */
  #notReady(method: string, path: string): M2mError | undefined {
    const c = this.#config;
    const configured =
      (method === "POST" &&
        path === "/v1/messages" &&
        (c.relay.mqtt !== undefined || c.relay.https !== undefined)) ||
      (method === "GET" && path === "/v1/token" && (c.credentials.oauth !== undefined || c.enroll.enabled));
    if (!configured) return undefined;
    const s = this.lifecycle.state;
    const why = this.health.summary ?? ("reason" in s && typeof s.reason === "string" ? s.reason : undefined);
    return new M2mError(
      "ERR_AGENT_NOT_READY",
      "transient",
      `the agent is ${s.name}${why === undefined ? "" : ` (${why})`}: ${path} is not available yet`,
      { hint: "see `m2m-agent status` and `m2m-agent doctor`", details: { state: s.name } },
    );
  }

  async #startMetrics(): Promise<void> {
    const m = this.#config.metrics;
    if (!m.enabled) return;
    try {
      this.#metricsServer = await startMetricsServer(
        this.metrics.registry,
        m.listen,
        this.#log.child({ component: "metrics" }),
      );
      this.health.set("metrics", undefined);
    } catch (err) {
      this.health.set("metrics", healthReasonOf(err));
    }
  }

  /** Key → enrolment state → stages. Transient key failures are retried in the background. */
  async #bringUp(attempt = 1): Promise<void> {
    const c = this.#config;
    try {
      if (this.#keys === undefined) {
        const wrap = (p: KeyProvider): KeyProvider =>
          instrumentKeyProvider(p, this.metrics, this.watch, this.#clock);
        const { DeviceKeyOwner } = await import("../keys/device-key.js");
        this.#keys =
          this.#deps.keyProvider === undefined
            ? await (await import("../keys/from-config.js")).deviceKeyFromConfig(c, {
                log: this.#log,
                clock: this.#clock,
                env: this.#env,
                wrap,
              })
            : DeviceKeyOwner.fixed(this.#deps.keyProvider, { wrap, clock: this.#clock, log: this.#log });
        this.#keys.subscribe(({ current }) => {
          this.#keyInfo = current;
        });
      }
      const key = this.#keys.current;
      // With an enrolled identity on disk (or a state file that cannot be read) the key is only
      // opened: a missing key is re-provisioning, never a silently created replacement.
      const { readEnrolmentState } = await import("../enroll/state.js");
      const stored = await readEnrolmentState(c.agent.state_dir).then(
        (state) => ({ readable: true as const, state }),
        () => ({ readable: false as const, state: undefined }),
      );
      // Enrolment creates the key on first start; without enrolment the key is made by `keys init`.
      const mayCreate = c.enroll.enabled && stored.readable && stored.state === undefined;
      try {
        this.#keyInfo = mayCreate ? await key.createOrOpen() : await key.open();
      } catch (err) {
        if (stored.state !== undefined && isM2mError(err, "ERR_KEY_NOT_FOUND"))
          return this.#reprovision(stored.state, reprovisionReason(stored.state, { present: false }) ?? "");
        throw err;
      }
      if (stored.state !== undefined) {
        const info = this.#keyInfo;
        // The EK is read only when the state recorded one (TPM enrolments): another TPM is another device.
        const ek = stored.state.ekSha256 === undefined ? undefined : await currentEkSha256(key);
        const reason = reprovisionReason(stored.state, { present: true, info }, ek);
        if (reason !== undefined) return this.#reprovision(stored.state, reason);
      }
      if (this.#keyInfo.created)
        await this.#audit.record("key_created", {
          ref: this.#keyInfo.ref,
          thumbprint: this.#keyInfo.thumbprint,
        });
      this.health.set("key", undefined);
      this.#log.info("device key open", { ref: this.#keyInfo.ref, thumbprint: this.#keyInfo.thumbprint });
    } catch (err) {
      const e = asM2mError(err);
      if (isM2mError(err, "ERR_KEY_NOT_FOUND")) {
        this.lifecycle.dispatch({
          type: "unprovisioned",
          reason: "no device key: run `m2m-agent keys init` or enable [enroll]",
        });
        return;
      }
      this.health.set("key", `${e.code}: ${e.message}`);
      if (this.lifecycle.state.name === "starting")
        this.lifecycle.dispatch({ type: "degrade", reason: this.health.summary ?? e.code });
      if (e.retry === "transient") {
        const delay = Math.max(
          1000,
          backoffDelay({ ...defaultRetryPolicy, baseMs: 2000, capMs: 60_000 }, attempt),
        );
        this.#log.warn("device key unavailable; retrying", { code: e.code, delayMs: delay });
        this.#retryTimer = setTimeout(() => void this.#bringUp(attempt + 1), delay);
      } else {
        this.#log.error("device key unusable; not retrying", { error: e });
      }
      return;
    }
    await this.#afterKey(attempt);
  }

  /** Enrolment state → enrolment (when configured and needed) → stages. */
  async #afterKey(attempt: number): Promise<void> {
    await this.#loadEnrolment();
    if (this.#config.enroll.enabled && this.#enrolment === undefined) {
      if (this.#heldByClock(() => void this.#afterKey(attempt))) return;
      if (!(await this.#enroll(attempt))) return;
    }
    await this.#startStages();
    this.health.apply();
  }

  /**
   * Enrolment signs (JWTs, a CSR) and opens TLS: below the time floor nothing is attempted, no audit
   * record written and no backoff grown. True when held: `resume` runs once the clock is trusted
   * (re-checked every second, a comparison), so a corrected clock enrols within about a second.
   */
  #heldByClock(resume: () => void): boolean {
    const e = this.clockSanity.untrusted();
    if (e === undefined) return false;
    this.health.set("enrolment", `${e.code}: enrolment waits for a trusted clock`);
    this.lifecycle.tryDispatch({ type: "degrade", reason: this.health.summary ?? e.code });
    this.health.apply();
    this.#retryTimer = setTimeout(() => {
      if (this.lifecycle.state.name === "stopping" || this.lifecycle.state.name === "stopped") return;
      if (!this.#heldByClock(resume)) resume();
    }, 1_000);
    return true;
  }

  /**
   * The enrolled identity cannot be used with the key/TPM present: enter `reprovision-required`,
   * say why once (log, audit, health, status, STATUS=), start nothing and wait for the operator.
   * No retry timer: nothing here heals by itself.
   */
  async #reprovision(state: EnrolmentState, reason: string): Promise<void> {
    const e = reprovisionError(state, reason);
    this.#enrolment = undefined;
    this.#keyInfo = undefined;
    this.health.set("enrolment", `${e.code}: ${reason}`);
    this.lifecycle.dispatch({ type: "reprovision", reason });
    this.#log.error("re-provisioning required; not starting credentials or relay", { error: e });
    await this.#audit.record("reprovision_required", { deviceId: state.deviceId }).catch(() => undefined);
  }

  /**
   * Enrols with the registrar (`[enroll]`, the same flow as `m2m-agent enroll`). False when it
   * failed: transient failures retry `#bringUp` in the background, permanent ones leave the agent
   * degraded with the reason.
   */
  async #enroll(attempt: number): Promise<boolean> {
    if (this.#keys === undefined) return false;
    this.lifecycle.tryDispatch({ type: "enroll" });
    try {
      const out = await this.#runEnroll(this.#keys.current, false);
      await this.#audit.record("enrolled", { deviceId: out.state.deviceId, method: out.state.method });
      await this.#loadEnrolment();
      if (this.lifecycle.state.name === "enrolling") this.lifecycle.dispatch({ type: "ready" });
      return true;
    } catch (err) {
      const e = asM2mError(err);
      this.health.set("enrolment", healthReasonOf(e, "enrolment failed: "));
      this.lifecycle.tryDispatch({ type: "degrade", reason: this.health.summary ?? e.code });
      await this.#audit.record("enroll_failed", { code: e.code }).catch(() => undefined);
      if (e.retry === "transient") {
        const delay = Math.max(
          1000,
          backoffDelay({ ...defaultRetryPolicy, baseMs: 5000, capMs: 300_000 }, attempt),
        );
        this.#log.warn("enrolment failed; retrying", { code: e.code, delayMs: delay });
        this.#retryTimer = setTimeout(() => void this.#bringUp(attempt + 1), delay);
      } else {
        this.#log.error("enrolment failed; not retrying", { error: e });
      }
      return false;
    }
  }

  /** Re-runs enrolment with `force` (TPM re-attestation); handed to stages as `reenroll`. */
  async reenroll(): Promise<EnrolmentState> {
    if (this.#keys === undefined)
      throw new M2mError("ERR_KEY_NOT_FOUND", "transient", "the device key is not open");
    // The CURRENT key: after an in-process rotation that is the rotated one.
    const out = await this.#runEnroll(this.#keys.current, true);
    await this.#audit.record("enrolled", { deviceId: out.state.deviceId, reattested: true });
    await this.#loadEnrolment();
    return out.state;
  }

  /**
   * The enrolment flow of `[enroll]` on `key`: TPM attestation through the key's own serial TPM
   * queue, or PKCS#11 with the bootstrap token. Idempotent unless `force`.
   * @throws ERR_ENROLL_CONFIG, ERR_SECRET_UNAVAILABLE, the registrar's codes, ERR_KEY_* / ERR_TPM_*.
   */
  async #runEnroll(key: KeyProvider, force: boolean): Promise<{ state: EnrolmentState }> {
    // Why: enrolment opens TLS and judges certificate validity; below the time floor nothing is sent.
    this.clockSanity.assertTrusted();
    const { enrollFromConfig } = await import("../enroll/from-config.js");
    const log = this.#log.child({ component: "enroll" });
    const outcome = await enrollFromConfig(this.#config, key, {
      force,
      clock: this.#clock,
      env: this.#env,
      onProgress: (p) => log.info("enrolment step", { step: p.step, status: p.status, detail: p.detail }),
    });
    if (outcome.status === "enrolled")
      log.info("device enrolled", {
        deviceId: outcome.state.deviceId,
        method: outcome.state.method,
        role: outcome.state.role,
      });
    return outcome;
  }

  async #loadEnrolment(): Promise<void> {
    try {
      const { readEnrolmentState } = await import("../enroll/state.js");
      this.#enrolment = await readEnrolmentState(this.#config.agent.state_dir);
    } catch (err) {
      this.health.set("enrolment", healthReasonOf(err));
      return;
    }
    const e = this.#enrolment;
    if (e === undefined) return;
    // Security: an identity issued to another key must not be used with this one.
    const stale =
      this.#keyInfo === undefined ? undefined : reprovisionReason(e, { present: true, info: this.#keyInfo });
    if (stale !== undefined) {
      this.health.set("enrolment", `ERR_REPROVISION_REQUIRED: ${stale}`);
      return;
    }
    try {
      const cert = new X509Certificate(e.certificatePem);
      this.#certNotAfter = new Date(cert.validTo);
      this.metrics.certExpiry.set(Math.floor(this.#certNotAfter.getTime() / 1000));
      this.clockSanity.setCertificateNotBefore(new Date(cert.validFrom));
      this.#checkClock();
    } catch (err) {
      this.health.set("enrolment", healthReasonOf(err, "certificate unreadable: "));
      return;
    }
    this.health.set("enrolment", undefined);
  }

  async #startStages(): Promise<void> {
    const keys = this.#keys;
    const info = this.#keyInfo;
    if (keys === undefined || info === undefined) return;
    const run: StageRunner = async (stage, needs) => {
      if (!stage.enabled(this.#config)) return undefined;
      try {
        const started = await stage.start(
          {
            config: this.#config,
            log: this.#log.child({ component: stage.name }),
            clock: this.#clock,
            env: this.#env,
            metrics: this.metrics,
            health: this.health,
            lifecycle: this.lifecycle,
            audit: this.#audit,
            anomalies: this.anomalies,
            clockSanity: this.clockSanity,
            api: this.#api,
            keys,
            key: { provider: keys.current, info },
            enrolment: this.#enrolment,
            reenroll: () => this.reenroll(),
          },
          needs,
        );
        this.#handles.push({ stage, handle: started });
        this.health.set(`stage.${stage.name}`, undefined);
        return started.provides;
      } catch (err) {
        this.health.set(`stage.${stage.name}`, healthReasonOf(err, "failed to start: "));
        this.#log.error("stage failed to start", { stage: stage.name, error: err });
        return undefined;
      }
    };
    await this.#stages(run);
  }

  status(): AgentStatus {
    const s = this.lifecycle.state;
    const stages: Record<string, unknown> = {};
    for (const { stage, handle } of this.#handles) stages[stage.name] = handle.status?.() ?? "started";
    return {
      state: s.name,
      status: describeState(s),
      reasons: this.health.reasons,
      since: this.#since,
      version: agentVersion(),
      pid: process.pid,
      uptimeS: Math.round((this.#clock.monotonicMs() - this.#startedMono) / 1000),
      ...(this.#keyInfo === undefined || this.#keys === undefined
        ? {}
        : {
            key: {
              provider: this.#keys.kind,
              ref: this.#keyInfo.ref,
              algorithm: this.#keyInfo.algorithm,
              thumbprint: this.#keyInfo.thumbprint,
            },
          }),
      enrolment:
        this.#enrolment === undefined
          ? { enrolled: false }
          : {
              enrolled: true,
              deviceId: this.#enrolment.deviceId,
              ...(this.#certNotAfter === undefined
                ? {}
                : { certificateNotAfter: this.#certNotAfter.toISOString() }),
            },
      clock: this.clockSanity.check(),
      anomalies: this.anomalies.flags(),
      stages,
      ...(this.#metricsServer === undefined ? {} : { metrics: this.#metricsServer.address }),
    };
  }

  /**
   * Applies a new config: log level and metrics live, stages through their `reload()`; everything
   * else is reported as restart-required (logged by key path, never by value).
   */
  async reload(next: AgentConfig): Promise<ReloadReport> {
    const changed = changedKeys(this.#config, next);
    const applied: string[] = [];
    const restart: string[] = [];
    this.#config = next;
    for (const key of changed) {
      if (key === "agent.log_level") {
        this.#deps.setLogLevel?.(next.agent.log_level);
        applied.push(key);
      } else if (key.startsWith("metrics.")) {
        applied.push(key);
      } else if (!this.#handles.some((h) => h.stage.sections.some((s) => key.startsWith(`${s}.`)))) {
        restart.push(key);
      }
    }
    if (changed.some((k) => k.startsWith("metrics."))) {
      await this.#metricsServer?.close();
      this.#metricsServer = undefined;
      this.health.set("metrics", undefined);
      await this.#startMetrics();
    }
    for (const { stage, handle } of this.#handles) {
      if (!changed.some((k) => stage.sections.some((s) => k.startsWith(`${s}.`)))) continue;
      if (handle.reload === undefined) {
        restart.push(...changed.filter((k) => stage.sections.some((s) => k.startsWith(`${s}.`))));
        continue;
      }
      try {
        const r = await handle.reload(next);
        applied.push(...r.applied);
        restart.push(...r.restartRequired);
      } catch (err) {
        this.#log.error("stage reload failed", { stage: stage.name, error: err });
      }
    }
    return { applied: applied.sort(), restartRequired: [...new Set(restart)].sort() };
  }

  /**
   * Drains stages (reverse order) within `deadlineMs`, then closes the API, metrics, the key
   * provider and the audit log. Never throws.
   */
  async stop(
    reason: string,
    deadlineMs = this.#config.agent.drain_timeout_ms,
  ): Promise<{ drained: boolean }> {
    if (this.lifecycle.state.name === "stopping" || this.lifecycle.state.name === "stopped")
      return { drained: true };
    this.lifecycle.dispatch({ type: "stop", reason });
    clearTimeout(this.#retryTimer);
    clearInterval(this.#clockTimer);
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new M2mError("ERR_DRAIN_TIMEOUT", "transient", "drain deadline")),
      deadlineMs,
    );
    let drained = true;
    const stops = [...this.#handles].reverse().map(async ({ stage, handle }) => {
      try {
        await handle.stop(controller.signal);
      } catch (err) {
        this.#log.warn("stage stop failed", { stage: stage.name, error: err });
      }
    });
    const deadline = new Promise<"deadline">((resolve) =>
      controller.signal.addEventListener("abort", () => resolve("deadline"), { once: true }),
    );
    if ((await Promise.race([Promise.all(stops).then(() => "done" as const), deadline])) === "deadline") {
      drained = false;
      this.#log.warn("drain deadline reached; exiting with work still in flight", { deadlineMs });
    }
    clearTimeout(timer);
    await this.#api?.close().catch(() => undefined);
    await this.#metricsServer?.close().catch(() => undefined);
    await this.#keys?.close().catch(() => undefined);
    await this.clockSanity.persist().catch(() => false);
    await this.#auditLog?.close().catch(() => undefined);
    this.lifecycle.dispatch({ type: "stopped" });
    return { drained };
  }
}

/** Builds and starts the agent. Never throws for runtime faults (they degrade); config errors do. */
export async function startAgent(config: AgentConfig, deps: AgentDeps): Promise<Agent> {
  const agent = new Agent(config, deps);
  await agent.start();
  return agent;
}
