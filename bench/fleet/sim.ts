import { randomUUID } from "node:crypto";
import { Agent, request } from "undici";
import { type Clock, systemClock } from "../../src/core/clock.js";
import { asM2mError, M2mError } from "../../src/core/errors.js";
import { parseRetryAfter, type RetryPolicy, withRetry } from "../../src/core/retry.js";
import type { Secret } from "../../src/core/secret.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import type { AccessToken } from "../../src/credentials/oauth/token-source.js";
import { enrollPkcs11, enrollTpm, RegistrarClient } from "../../src/enroll/index.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import type { EnrolmentResult } from "../../src/wire/v1/index.js";
import type { TestEkCa } from "./ek-ca.js";
import { createSoftTpmDevice } from "./soft-tpm.js";

/**
 * The fleet simulator: thousands of SIMULATED devices speaking the real v1 wire protocol to a
 * registrar (or a load balancer in front of replicas) over real HTTPS, each on its own connections.
 * Each device runs the agent's own client code — `enrollTpm` / `enrollPkcs11` over `RegistrarClient`,
 * `OAuthClient` (private_key_jwt + DPoP), `EstClient` (simplereenroll with a DPoP-bound token) — and
 * posts one message to the ingest endpoint, every request through the one retry policy
 * (`withRetry`, which honours a capped Retry-After with jitter).
 *
 * What is simulated: the hardware. TPM devices are software keys dressed as TPM structures
 * (soft-tpm.ts; EK certificates from a test vendor CA, ek-ca.ts); PKCS#11-style devices hold a
 * software key and a real one-time bootstrap token. Nothing here is evidence of real hardware.
 */

export type FleetStep = "enrol" | "token" | "est" | "ingest";
export const ALL_STEPS: readonly FleetStep[] = ["enrol", "token", "est", "ingest"];

export interface FleetTarget {
  /** Registrar base URL (or the load balancer's). */
  readonly url: string;
  /** Fleet CA PEM: the registrar's TLS trust anchor. */
  readonly caPem: string;
  /** The same PEM as a file (RegistrarClient reads its trust anchor from a file, as the agent does). */
  readonly caFile: string;
}

export interface FleetOptions {
  readonly target: FleetTarget;
  /** Simulated TPM devices enrolling into `group` (EK certificates from `ekCa`). */
  readonly tpm?: { readonly count: number; readonly group: string; readonly ekCa: TestEkCa };
  /** PKCS#11-style devices: one per bootstrap token. */
  readonly pkcs11?: { readonly tokens: readonly Secret[] };
  /** Devices in progress at once (each has its own connections). */
  readonly concurrency: number;
  /**
   * At most this many devices have an attempt being worked on by the simulator at once (default
   * {@link DEFAULT_MAX_ACTIVE}); the limit in force adapts below it to the simulator's event-loop
   * delay (halved when the loop is more than 1 s behind, raised again when it keeps up). The simulator's one thread stands in for the CPUs of all its
   * devices: a real device's TLS handshake and signatures run on its own CPU, here they queue behind
   * every other device's. Unbounded, a storm of thousands queues so much client work in one event
   * loop that a request's deadline expires before the simulator even reads the registrar's answer;
   * each timed-out attempt reconnects (a fresh handshake on both sides) and times out again: a
   * livelock of the simulator, not of the registrar. A device waits for a slot before an attempt
   * (its request deadline starts when it has one) and gives it back when the attempt ends, so a
   * device waiting out a Retry-After or a backoff holds no slot. Devices waiting for a slot are
   * still powered on and counted in progress and in their step's latency.
   */
  readonly maxActive?: number;
  /** Steps each device runs, in order (a prefix of enrol → token → est → ingest). Default all. */
  readonly steps?: readonly FleetStep[];
  readonly retry?: RetryPolicy;
  /** Scope of the one token a device asks for (used for EST and ingest). */
  readonly scope?: string;
  /**
   * Tokens each device obtains in its token step (default 1). Above 1 the client drops its cached
   * token and asks again, each a full client-assertion + DPoP request: bench:fleet uses it so the
   * registrar CPU per token is measured over many tokens, not derived from one per enrolment.
   */
  readonly tokensPerDevice?: number;
  /** Called with every access token a device obtains (tests check that each is a new one). */
  readonly onToken?: (token: AccessToken) => void;
  readonly requestTimeoutMs?: number;
  readonly clock?: Clock;
  readonly signal?: AbortSignal;
  /** Called about every `progressEveryMs` with a snapshot. */
  readonly onProgress?: (r: FleetReport) => void;
  readonly progressEveryMs?: number;
  /** Hardware serials get this prefix (distinct runs against one registrar stay distinct). */
  readonly serialPrefix?: string;
}

/** A device that never gives up while the registrar is shedding or failing over (until 30 min). */
export const FLEET_RETRY: RetryPolicy = {
  baseMs: 250,
  factor: 2,
  capMs: 15_000,
  deadlineMs: 30 * 60_000,
  maxAttempts: 100_000,
  maxRetryAfterMs: 60_000,
  retryAfterJitter: 0.5,
};

/** Default of {@link FleetOptions.maxActive}. */
export const DEFAULT_MAX_ACTIVE = 256;

/**
 * The simulator's attempt slots: a counting semaphore whose limit adapts to the simulator's own
 * event-loop delay (AIMD between {@link MIN_ACTIVE} and the configured maximum). On a shared machine
 * the CPU the simulator gets changes from minute to minute; a fixed limit that fits an idle machine
 * lets the loop fall tens of seconds behind on a busy one, and the devices' deadlines expire again.
 * Waiters with a higher priority go first, FIFO within one priority: a device further along (token
 * after enrol) is served before devices still waiting for their first attempt, as it would be if
 * each device had its own CPU.
 */
class Slots {
  #limit: number;
  readonly #max: number;
  #active = 0;
  readonly #waiting: (() => void)[][] = [];
  constructor(max: number) {
    this.#max = max;
    this.#limit = max;
  }
  get limit(): number {
    return this.#limit;
  }
  async acquire(priority: number): Promise<void> {
    if (this.#active < this.#limit) {
      this.#active++;
      return;
    }
    await new Promise<void>((resolve) => {
      const queue = this.#waiting[priority] ?? [];
      this.#waiting[priority] = queue;
      queue.push(resolve);
    });
  }
  release(): void {
    this.#active--;
    this.#wake();
  }
  /** Feeds one event-loop delay sample (ms): far behind halves the limit, keeping up raises it. */
  observeLoopDelay(delayMs: number): void {
    if (delayMs > LOOP_DELAY_HIGH_MS)
      this.#limit = Math.max(Math.min(MIN_ACTIVE, this.#max), Math.floor(this.#limit / 2));
    else if (delayMs < LOOP_DELAY_LOW_MS) this.#limit = Math.min(this.#max, this.#limit + 4);
    this.#wake();
  }
  #wake(): void {
    while (this.#active < this.#limit) {
      let next: (() => void) | undefined;
      for (let p = this.#waiting.length - 1; p >= 0 && next === undefined; p--)
        next = this.#waiting[p]?.shift();
      if (next === undefined) return;
      this.#active++;
      next();
    }
  }
}

/** Lower bound of the adaptive attempt limit. */
const MIN_ACTIVE = 16;
/** Event-loop delay above which the simulator takes on fewer devices at once, below which more. */
const LOOP_DELAY_HIGH_MS = 1000;
const LOOP_DELAY_LOW_MS = 100;
const LOOP_SAMPLE_MS = 500;

export type DevicePhase = "waiting" | FleetStep | "done" | "failed";

export interface DeviceOutcome {
  readonly index: number;
  readonly kind: "tpm" | "pkcs11";
  phase: DevicePhase;
  deviceId: string | undefined;
  /** Attempts over all steps (1 per step when nothing was retried). */
  attempts: number;
  error: { readonly step: FleetStep; readonly code: string; readonly status?: number } | undefined;
}

export interface LatencySummary {
  readonly n: number;
  readonly p50: number;
  readonly p99: number;
  readonly max: number;
}

export interface FleetReport {
  readonly devices: number;
  readonly done: number;
  readonly failed: number;
  /** Devices neither done nor failed (only non-zero in a snapshot, or after an abort). */
  readonly inProgress: number;
  /** Attempt outcomes per step, keyed "step status" ("enrol 200", "token 429", "est ERR_EST_UNREACHABLE"). */
  readonly outcomes: Readonly<Record<string, number>>;
  /** Responses with a 5xx status, over all steps. */
  readonly serverErrors: number;
  readonly retries: number;
  /** Per step, from its first attempt to its success (retries and waits included), ms. */
  readonly latencyMs: Readonly<Partial<Record<FleetStep, LatencySummary>>>;
  /** Completed steps per second of the run. */
  readonly ratePerSec: Readonly<Partial<Record<FleetStep, number>>>;
  readonly elapsedMs: number;
  /** Distinct device ids handed out (equals `done` when nobody got another's identity). */
  readonly distinctDeviceIds: number;
  /** Up to 20 final failures, for the log. */
  readonly failures: readonly DeviceOutcome[];
  /** Time spent provisioning the simulated hardware of the devices that start at once (before elapsedMs). */
  readonly provisionMs?: number;
  /** The simulator's current attempt limit (snapshots only; see {@link FleetOptions.maxActive}). */
  readonly activeLimit?: number;
}

interface Hardware {
  readonly provider: KeyProvider;
  readonly enrol: (client: RegistrarClient) => Promise<{ result: EnrolmentResult }>;
}

interface Running {
  started: number;
  readonly outcomes: Map<string, number>;
  readonly latencies: Map<FleetStep, number[]>;
  readonly completedSteps: Map<FleetStep, number>;
  readonly devices: DeviceOutcome[];
  readonly ids: Set<string>;
  retries: number;
  serverErrors: number;
}

function statusOf(err: unknown): number | undefined {
  if (err instanceof M2mError) {
    const s = err.details.status;
    if (typeof s === "number") return s;
  }
  return undefined;
}

/** A network failure's underlying cause ("UND_ERR_CONNECT_TIMEOUT", "TimeoutError", "ECONNRESET"), for the outcome counts. */
function causeOf(err: M2mError): string | undefined {
  if (err.retry !== "transient" || statusOf(err) !== undefined) return undefined;
  const c = err.cause;
  if (c === null || typeof c !== "object") return undefined;
  const code = (c as { code?: unknown }).code;
  if (typeof code === "string") return code;
  const name = (c as { name?: unknown }).name;
  return typeof name === "string" ? name : undefined;
}

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] ?? 0;
}

function summarise(run: Running, clock: Clock): FleetReport {
  const elapsedMs = clock.monotonicMs() - run.started;
  const latencyMs: Partial<Record<FleetStep, LatencySummary>> = {};
  const ratePerSec: Partial<Record<FleetStep, number>> = {};
  for (const [step, xs] of run.latencies) {
    const s = [...xs].sort((a, b) => a - b);
    latencyMs[step] = {
      n: s.length,
      p50: Math.round(percentile(s, 0.5)),
      p99: Math.round(percentile(s, 0.99)),
      max: Math.round(s[s.length - 1] ?? 0),
    };
    ratePerSec[step] =
      Math.round(((run.completedSteps.get(step) ?? 0) / Math.max(1, elapsedMs)) * 10_000) / 10;
  }
  let done = 0;
  let failed = 0;
  const failures: DeviceOutcome[] = [];
  for (const d of run.devices) {
    if (d.phase === "done") done++;
    else if (d.phase === "failed") {
      failed++;
      if (failures.length < 20) failures.push({ ...d });
    }
  }
  return {
    devices: run.devices.length,
    done,
    failed,
    inProgress: run.devices.length - done - failed,
    outcomes: Object.fromEntries([...run.outcomes].sort(([a], [b]) => a.localeCompare(b))),
    serverErrors: run.serverErrors,
    retries: run.retries,
    latencyMs,
    ratePerSec,
    elapsedMs: Math.round(elapsedMs),
    distinctDeviceIds: run.ids.size,
    failures,
  };
}

/**
 * Runs the simulated fleet to completion: every device runs its steps, retrying through the one
 * retry policy; a device whose policy gives up is `failed` with its last error.
 */
export async function runFleet(options: FleetOptions): Promise<FleetReport> {
  const clock = options.clock ?? systemClock;
  const steps = options.steps ?? ALL_STEPS;
  const tokensPerDevice = Math.max(1, Math.floor(options.tokensPerDevice ?? 1));
  const policy = options.retry ?? FLEET_RETRY;
  const scope = options.scope ?? "telemetry:write est";
  const timeoutMs = options.requestTimeoutMs ?? 30_000;
  const tpmCount = options.tpm?.count ?? 0;
  const tokens = options.pkcs11?.tokens ?? [];
  const total = tpmCount + tokens.length;
  const run: Running = {
    started: clock.monotonicMs(),
    outcomes: new Map(),
    latencies: new Map(),
    completedSteps: new Map(),
    devices: [],
    ids: new Set(),
    retries: 0,
    serverErrors: 0,
  };
  // Interleave the two kinds so both load the registrar throughout the run.
  for (let i = 0; i < total; i++) {
    const kind: "tpm" | "pkcs11" =
      tokens.length === 0
        ? "tpm"
        : tpmCount === 0
          ? "pkcs11"
          : i % Math.max(2, Math.round(total / tokens.length)) === 1 &&
              run.devices.filter((d) => d.kind === "pkcs11").length < tokens.length
            ? "pkcs11"
            : run.devices.filter((d) => d.kind === "tpm").length < tpmCount
              ? "tpm"
              : "pkcs11";
    run.devices.push({
      index: i,
      kind,
      phase: "waiting",
      deviceId: undefined,
      attempts: 0,
      error: undefined,
    });
  }
  let nextToken = 0;
  const tokenFor = new Map<number, Secret>();
  for (const d of run.devices) if (d.kind === "pkcs11") tokenFor.set(d.index, tokens[nextToken++] as Secret);

  const slots = new Slots(Math.max(1, options.maxActive ?? DEFAULT_MAX_ACTIVE));
  const count = (key: string) => run.outcomes.set(key, (run.outcomes.get(key) ?? 0) + 1);
  const attemptStep = async <T>(d: DeviceOutcome, step: FleetStep, fn: () => Promise<T>): Promise<T> => {
    d.phase = step;
    const t0 = clock.monotonicMs();
    const value = await withRetry(
      policy,
      async () => {
        await slots.acquire(ALL_STEPS.indexOf(step));
        d.attempts++;
        try {
          const v = await fn();
          count(`${step} 200`);
          return v;
        } catch (err) {
          const e = asM2mError(err);
          const status = statusOf(e);
          if (status !== undefined && status >= 500) run.serverErrors++;
          const cause = causeOf(e);
          count(`${step} ${status ?? e.code}${cause === undefined ? "" : `/${cause}`}`);
          throw e;
        } finally {
          slots.release();
        }
      },
      {
        clock,
        ...(options.signal === undefined ? {} : { signal: options.signal }),
        onRetry: () => {
          run.retries++;
        },
      },
    );
    const xs = run.latencies.get(step) ?? [];
    xs.push(clock.monotonicMs() - t0);
    run.latencies.set(step, xs);
    run.completedSteps.set(step, (run.completedSteps.get(step) ?? 0) + 1);
    return value;
  };

  const serial = options.serialPrefix ?? `SIM-${randomUUID().slice(0, 8)}`;
  /**
   * "Factory provisioning": the simulated hardware (keys, EK certificate from the vendor CA). Done
   * before a device powers on (in a real fleet this happens at the factory), so the storm measures
   * the protocol, not the simulator's key generation.
   */
  const provision = async (d: DeviceOutcome): Promise<Hardware> => {
    const hardwareSerial = `${serial}-${d.kind}-${d.index}`;
    if (d.kind === "tpm") {
      const tpm = options.tpm;
      if (tpm === undefined) throw new Error("unreachable: tpm device without tpm options");
      const dev = await createSoftTpmDevice(tpm.ekCa, hardwareSerial);
      const provider = dev.provider;
      return {
        provider,
        enrol: (client) => enrollTpm({ client, provider, tpm: dev.ops, group: tpm.group, hardwareSerial }),
      };
    }
    const provider = new FakeKeyProvider({ store: new FakeKeyStore(), label: hardwareSerial });
    await provider.createOrOpen();
    const bootstrapToken = tokenFor.get(d.index) as Secret;
    return {
      provider,
      enrol: (client) => enrollPkcs11({ client, provider, bootstrapToken, hardwareSerial }),
    };
  };
  // Devices that start at once are provisioned before the clock starts; later ones while earlier
  // ones run (bounded memory for 100,000 devices).
  const workers = Math.max(1, Math.min(options.concurrency, total));
  const hardware = new Map<number, Hardware>();
  const provisionStarted = clock.monotonicMs();
  for (const d of run.devices.slice(0, workers)) {
    hardware.set(d.index, await provision(d));
    // Yield now and then: progress timers and the caller stay responsive.
    if (hardware.size % 200 === 0) await new Promise((r) => setImmediate(r));
  }
  const provisionMs = clock.monotonicMs() - provisionStarted;
  run.started = clock.monotonicMs();

  const runDevice = async (d: DeviceOutcome): Promise<void> => {
    const closers: (() => Promise<void>)[] = [];
    let current: FleetStep = "enrol";
    try {
      const hw = hardware.get(d.index) ?? (await provision(d));
      hardware.delete(d.index);
      const provider: KeyProvider = hw.provider;
      const enrol = hw.enrol;
      const client = await RegistrarClient.create({
        baseUrl: options.target.url,
        caFile: options.target.caFile,
        timeoutMs,
      });
      closers.push(() => client.close());
      const { result } = await attemptStep(d, "enrol", () => enrol(client));
      d.deviceId = result.deviceId;
      run.ids.add(result.deviceId);
      if (!steps.includes("token")) {
        d.phase = "done";
        return;
      }
      current = "token";
      const oauth = new OAuthClient(
        {
          clientId: result.deviceId,
          tokenEndpoint: result.endpoints.token,
          dpop: true,
          scope,
          caPem: options.target.caPem,
          requestTimeoutMs: timeoutMs,
        },
        // The outer withRetry retries (so every attempt's status is counted); the client tries once.
        { keys: provider, clock, retry: { ...policy, maxAttempts: 1 } },
      );
      closers.push(() => oauth.close());
      const first = await attemptStep(d, "token", async () => {
        const t = await oauth.getToken();
        // Security: the simulator insists on what a real agent insists on: a DPoP-bound token.
        if (t.tokenType !== "DPoP")
          throw new M2mError("ERR_SIM_NOT_DPOP", "permanent", "token is not DPoP-bound");
        return t;
      });
      options.onToken?.(first);
      for (let i = 1; i < tokensPerDevice; i++) {
        oauth.invalidate();
        options.onToken?.(await attemptStep(d, "token", () => oauth.getToken()));
      }
      const signer = await oauth.dpopSigner();
      if (signer === undefined) throw new M2mError("ERR_SIM", "permanent", "no DPoP signer");
      if (steps.includes("est")) {
        current = "est";
        const est = new EstClient(
          {
            baseUrl: result.endpoints.est.replace(/\/\.well-known\/est\/?$/, ""),
            caPem: options.target.caPem,
            timeoutMs,
          },
          { kind: "token", tokens: oauth, dpop: signer, scope },
          clock,
        );
        const key = await provider.open();
        // EST: the CSR subject CN must name the device (RFC 7030 re-enrolment of the same identity).
        const csr = await createCsr(provider, key, { commonName: result.deviceId });
        const certs = await attemptStep(d, "est", () => est.simplereenroll(csr));
        if (certs.length === 0) throw new M2mError("ERR_SIM_EST", "permanent", "EST returned no certificate");
      }
      if (steps.includes("ingest")) {
        current = "ingest";
        const url = result.endpoints.ingest;
        if (url === undefined) throw new M2mError("ERR_SIM_INGEST", "permanent", "no ingest endpoint");
        const agent = new Agent({ connect: { ca: options.target.caPem }, connections: 1 });
        closers.push(() => agent.close());
        const message = {
          id: randomUUID(),
          topic: `devices/${result.deviceId}/telemetry`,
          channel: "telemetry",
          ts: clock.now().getTime(),
          content_type: "application/json",
          payload: { seq: 1, temperature_c: 21.5 },
        };
        await attemptStep(d, "ingest", async () => {
          // Fresh token (cached unless near expiry) and a fresh proof per attempt (jti is single-use).
          const t = await oauth.getToken();
          const res = await request(url, {
            method: "POST",
            dispatcher: agent,
            headers: {
              "content-type": "application/json",
              authorization: `DPoP ${t.token.reveal()}`,
              dpop: await signer.proof("POST", url, t.token),
            },
            body: JSON.stringify({ messages: [message] }),
            signal: AbortSignal.timeout(timeoutMs),
          }).catch((err: unknown) => {
            throw new M2mError("ERR_SIM_INGEST_UNREACHABLE", "transient", "ingest unreachable", {
              cause: err,
            });
          });
          const text = await res.body.text();
          if (res.statusCode !== 200) {
            const ra = res.headers["retry-after"];
            const retryAfterMs = parseRetryAfter(Array.isArray(ra) ? ra[0] : ra, clock.now().getTime());
            const transient = res.statusCode === 429 || res.statusCode >= 500;
            throw new M2mError(
              "ERR_SIM_INGEST",
              transient ? "transient" : "permanent",
              `ingest ${res.statusCode}`,
              {
                details: { status: res.statusCode, ...(retryAfterMs === undefined ? {} : { retryAfterMs }) },
              },
            );
          }
          const body = JSON.parse(text) as { accepted?: number; duplicates?: number };
          // A retried post whose first answer was lost counts as a duplicate: still stored once.
          if ((body.accepted ?? 0) + (body.duplicates ?? 0) !== 1)
            throw new M2mError("ERR_SIM_INGEST", "permanent", "message not accepted");
        });
      }
      d.phase = "done";
    } catch (err) {
      const e = asM2mError(err);
      const status = statusOf(e);
      d.error = { step: current, code: e.code, ...(status === undefined ? {} : { status }) };
      d.phase = "failed";
    } finally {
      for (const c of closers) await c().catch(() => undefined);
    }
  };

  let next = 0;
  const worker = async (): Promise<void> => {
    for (;;) {
      if (options.signal?.aborted) return;
      const d = run.devices[next++];
      if (d === undefined) return;
      await runDevice(d);
    }
  };
  // The simulator's own lateness: how late a 500 ms timer fires is how far its loop is behind.
  let expected = performance.now() + LOOP_SAMPLE_MS;
  const sampler = setInterval(() => {
    const now = performance.now();
    slots.observeLoopDelay(now - expected);
    expected = now + LOOP_SAMPLE_MS;
  }, LOOP_SAMPLE_MS);
  const timer =
    options.onProgress === undefined
      ? undefined
      : setInterval(
          () => options.onProgress?.({ ...summarise(run, clock), activeLimit: slots.limit }),
          options.progressEveryMs ?? 5000,
        );
  try {
    await Promise.all(Array.from({ length: workers }, worker));
  } finally {
    clearInterval(sampler);
    if (timer !== undefined) clearInterval(timer);
  }
  return { ...summarise(run, clock), provisionMs: Math.round(provisionMs) };
}
