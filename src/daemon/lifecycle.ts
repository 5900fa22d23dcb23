import { M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { agentStateNameSchema } from "../wire/v1/local-api.js";

/**
 * The agent's lifecycle as an explicit state machine (after rust-keylime's push-agent state machine):
 *
 *   starting → unprovisioned | enrolling | running
 *   unprovisioned → enrolling | running
 *   enrolling → running | degraded(reason)
 *   running ⇄ degraded(reason)
 *   starting | degraded | enrolling → reprovision-required(reason)
 *   running | degraded | unprovisioned | reprovision-required → reloading → (the state it came from)
 *   any live state → stopping → stopped
 *
 * `transition()` is pure; `Lifecycle` holds the current state, logs each change and tells listeners
 * (metrics, sd_notify STATUS=, the status API).
 */
export type State =
  | { readonly name: "starting" }
  | { readonly name: "unprovisioned"; readonly reason: string }
  | { readonly name: "enrolling" }
  | { readonly name: "running" }
  | { readonly name: "degraded"; readonly reason: string }
  /**
   * Enrolment state exists but the enrolled key is gone or different (TPM cleared or replaced, token
   * reset, state directory copied from another device). Nothing is sent and no key is created until
   * an operator re-provisions (docs/operations.md): terminal until `enroll --force` and a restart.
   */
  | { readonly name: "reprovision-required"; readonly reason: string }
  | { readonly name: "reloading"; readonly resume: ResumableState }
  | { readonly name: "stopping"; readonly reason: string }
  | { readonly name: "stopped" };

/** States a reload returns to. */
export type ResumableState = Extract<
  State,
  { name: "running" | "degraded" | "unprovisioned" | "reprovision-required" }
>;

export type StateName = State["name"];
/**
 * Every state name, as `GET /v1/status` reports it: the wire enum is the one list. Assigning it here
 * fails to compile when the wire names a state the union lacks; the check below, the other way round.
 */
export const STATE_NAMES: readonly StateName[] = agentStateNameSchema.options;
true satisfies [Exclude<StateName, (typeof agentStateNameSchema.options)[number]>] extends [never]
  ? true
  : never;

export type LifecycleEvent =
  /** No usable identity and enrolment not enabled: waits for an operator. */
  | { readonly type: "unprovisioned"; readonly reason: string }
  | { readonly type: "enroll" }
  /** Everything configured is up. */
  | { readonly type: "ready" }
  /** Something is wrong but the agent keeps serving what it can (reason is shown in status). */
  | { readonly type: "degrade"; readonly reason: string }
  | { readonly type: "recover" }
  /** The enrolled identity cannot be used with the key/TPM present (see the state). */
  | { readonly type: "reprovision"; readonly reason: string }
  | { readonly type: "reload" }
  | { readonly type: "reloaded" }
  | { readonly type: "stop"; readonly reason: string }
  | { readonly type: "stopped" };

function illegal(state: State, event: LifecycleEvent): never {
  throw new M2mError(
    "ERR_LIFECYCLE",
    "permanent",
    `illegal lifecycle transition: ${event.type} in ${state.name}`,
    {
      details: { state: state.name, event: event.type },
    },
  );
}

function assertNever(x: never): never {
  throw new M2mError("ERR_LIFECYCLE", "permanent", `unhandled lifecycle case ${JSON.stringify(x)}`);
}

/**
 * The one transition function. @throws ERR_LIFECYCLE for an event that is illegal in `state`.
 */
export function transition(state: State, event: LifecycleEvent): State {
  // Stop is legal from every live state (a signal can arrive at any time).
  if (event.type === "stop") {
    if (state.name === "stopping" || state.name === "stopped") return illegal(state, event);
    return { name: "stopping", reason: event.reason };
  }
  switch (state.name) {
    case "starting":
      switch (event.type) {
        case "unprovisioned":
          return { name: "unprovisioned", reason: event.reason };
        case "enroll":
          return { name: "enrolling" };
        case "ready":
          return { name: "running" };
        case "degrade":
          return { name: "degraded", reason: event.reason };
        case "reprovision":
          return { name: "reprovision-required", reason: event.reason };
        default:
          return illegal(state, event);
      }
    case "unprovisioned":
      switch (event.type) {
        case "enroll":
          return { name: "enrolling" };
        case "ready":
          return { name: "running" };
        case "reload":
          return { name: "reloading", resume: state };
        case "unprovisioned":
          return { name: "unprovisioned", reason: event.reason };
        default:
          return illegal(state, event);
      }
    case "enrolling":
      switch (event.type) {
        case "ready":
          return { name: "running" };
        case "degrade":
          return { name: "degraded", reason: event.reason };
        case "unprovisioned":
          return { name: "unprovisioned", reason: event.reason };
        case "reprovision":
          return { name: "reprovision-required", reason: event.reason };
        default:
          return illegal(state, event);
      }
    case "running":
      switch (event.type) {
        case "degrade":
          return { name: "degraded", reason: event.reason };
        case "reload":
          return { name: "reloading", resume: state };
        case "ready":
        case "recover":
          return state;
        default:
          return illegal(state, event);
      }
    case "degraded":
      switch (event.type) {
        case "degrade":
          return { name: "degraded", reason: event.reason };
        case "recover":
        case "ready":
          return { name: "running" };
        case "enroll":
          return { name: "enrolling" };
        case "reprovision":
          return { name: "reprovision-required", reason: event.reason };
        case "reload":
          return { name: "reloading", resume: state };
        default:
          return illegal(state, event);
      }
    case "reprovision-required":
      switch (event.type) {
        case "reload":
          return { name: "reloading", resume: state };
        // Health changes (clock, API) do not leave this state: only a re-provisioned restart does.
        case "degrade":
        case "recover":
        case "ready":
          return state;
        default:
          return illegal(state, event);
      }
    case "reloading":
      switch (event.type) {
        case "reloaded":
          return state.resume;
        case "degrade":
          if (state.resume.name === "reprovision-required") return state;
          return { name: "reloading", resume: { name: "degraded", reason: event.reason } };
        case "recover":
          return state.resume.name === "degraded"
            ? { name: "reloading", resume: { name: "running" } }
            : state;
        default:
          return illegal(state, event);
      }
    case "stopping":
      switch (event.type) {
        case "stopped":
          return { name: "stopped" };
        default:
          return illegal(state, event);
      }
    case "stopped":
      return illegal(state, event);
    default:
      return assertNever(state);
  }
}

/** One-line description for logs and sd_notify STATUS=. */
export function describeState(state: State): string {
  switch (state.name) {
    case "degraded":
    case "unprovisioned":
    case "stopping":
      return `${state.name}: ${state.reason}`;
    case "reprovision-required":
      return `re-provisioning required: ${state.reason}`;
    case "reloading":
      return "reloading configuration";
    case "starting":
    case "enrolling":
    case "running":
    case "stopped":
      return state.name;
    default:
      return assertNever(state);
  }
}

export type TransitionListener = (change: {
  readonly from: State;
  readonly to: State;
  readonly event: LifecycleEvent;
}) => void;

/** Holds the current state; every change is logged and observable. */
export class Lifecycle {
  #state: State = { name: "starting" };
  readonly #listeners = new Set<TransitionListener>();
  readonly #log: Logger;

  constructor(log: Logger) {
    this.#log = log;
  }

  get state(): State {
    return this.#state;
  }

  /** Applies an event. @throws ERR_LIFECYCLE when illegal (state unchanged). */
  dispatch(event: LifecycleEvent): State {
    const from = this.#state;
    const to = transition(from, event);
    this.#state = to;
    if (from !== to) {
      this.#log.info("lifecycle transition", {
        from: from.name,
        to: to.name,
        event: event.type,
        status: describeState(to),
      });
      for (const l of this.#listeners) {
        try {
          l({ from, to, event });
        } catch (err) {
          this.#log.warn("lifecycle listener failed", { error: err });
        }
      }
    }
    return to;
  }

  /** Applies an event only if legal; returns whether it was applied. */
  tryDispatch(event: LifecycleEvent): boolean {
    try {
      this.dispatch(event);
      return true;
    } catch {
      return false;
    }
  }

  onTransition(listener: TransitionListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}
