import { mkdtempSync, rmSync } from "node:fs";
import { open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { type Clock, systemClock } from "../../core/clock.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import { type RetryPolicy, withRetry } from "../../core/retry.js";
import type { Secret } from "../../core/secret.js";
import { classifyToolFailure, classifyTpmRc, rcBase, rcHex } from "./errors.js";

/**
 * Runs tpm2-tools against one TPM: argv arrays (never a shell), `TPM2TOOLS_TCTI` in the child's
 * environment, a timeout on every call that kills the child's whole process group, one serial queue
 * per TCTI per process (swtpm and direct `/dev/tpm0` have no resource manager: 3 object / 3 session
 * slots), a private 0700 scratch dir for intermediate files and secrets, and typed errors (see
 * ./errors.ts). TPM_RC_RETRY-style busy codes are retried here with a small bounded policy.
 */

export interface TpmLatencySample {
  /** Logical operation (e.g. "sign", "readpublic"). */
  readonly op: string;
  readonly tool: string;
  readonly ms: number;
  readonly ok: boolean;
  readonly code?: string;
}

export interface TpmRunnerOptions {
  /** TCTI for tpm2-tools, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`. */
  readonly tcti: string;
  /** Timeout of each tool call (ms). Default 10 s. */
  readonly timeoutMs?: number;
  readonly clock?: Clock;
  /** Retry policy for ERR_TPM_BUSY. Default: 6 attempts, 20 ms base, 1 s cap, 5 s deadline. */
  readonly busyRetry?: RetryPolicy;
  /** Parent of the private scratch dir. Default `$RUNTIME_DIRECTORY` (systemd tmpfs) or os.tmpdir(). */
  readonly runtimeDir?: string;
  /** Called once per tool invocation (metrics). Must not throw. */
  readonly onLatency?: (sample: TpmLatencySample) => void;
  /**
   * The owner hierarchy's auth value (`keys.tpm.owner_auth`), read on every use so a rotated file or
   * credential is picked up. Unset: the owner auth is empty (the TPM default).
   */
  readonly ownerAuth?: () => Promise<Secret>;
}

export interface RunOptions {
  /** Bytes or text for the child's stdin (digests, raw commands). Never put secrets on argv. */
  readonly input?: Uint8Array | string;
  /** Logical operation name for latency samples. */
  readonly op?: string;
  readonly timeoutMs?: number;
  /** Retry ERR_TPM_BUSY with the busy policy (default true). */
  readonly retryBusy?: boolean;
}

export interface RunResult {
  readonly stdout: Uint8Array;
  readonly stderr: string;
  /** stdout decoded as UTF-8. */
  readonly text: string;
}

export interface RawResponse {
  readonly tag: number;
  readonly size: number;
  readonly rc: number;
  /** Everything after the 10-byte header. */
  readonly body: Uint8Array;
}

/** Operations available while holding the TPM queue (see `TpmRunner.exclusive`). */
export interface TpmTx {
  run(tool: string, args: readonly string[], opts?: RunOptions): Promise<RunResult>;
  sendRaw(command: Uint8Array, opts?: { op?: string; timeoutMs?: number }): Promise<RawResponse>;
  /** Path of a scratch file in the private dir; removed when the exclusive block ends. */
  path(name: string): string;
  /**
   * Writes a secret to a 0600 scratch file (created with O_EXCL, mode set at creation) and returns its
   * path; tpm2-tools reads auth values as `file:PATH`. Removed when the exclusive block ends.
   */
  writeSecret(name: string, value: Uint8Array | string): Promise<string>;
  /**
   * Arguments authorizing the owner hierarchy for one tool call: `[flag, "file:<0600 scratch file>"]`
   * when an owner auth is configured, else `[]`. Never the value on argv (visible in /proc).
   */
  ownerAuthArgs(flag?: string): Promise<string[]>;
}

const defaultBusyRetry: RetryPolicy = {
  baseMs: 20,
  factor: 2,
  capMs: 1_000,
  deadlineMs: 5_000,
  maxAttempts: 6,
  maxRetryAfterMs: 1_000,
  retryOn: (err) => err instanceof M2mError && err.code === "ERR_TPM_BUSY",
};

/** One queue per TCTI in this process: every TPM call, from every runner, goes through it. */
const queues = new Map<string, Promise<unknown>>();

function enqueue<T>(key: string, fn: () => Promise<T>): Promise<T> {
  const prev = queues.get(key) ?? Promise.resolve();
  const next = prev.then(fn, fn);
  const tail = next.then(
    () => undefined,
    () => undefined,
  );
  queues.set(key, tail);
  void tail.then(() => {
    if (queues.get(key) === tail) queues.delete(key);
  });
  return next;
}

/** Child process groups alive right now; killed if this process exits (detached children survive otherwise). */
const liveGroups = new Set<number>();
let exitHookInstalled = false;
function trackGroup(pid: number): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once("exit", () => {
      for (const g of liveGroups) killGroup(g);
    });
  }
  liveGroups.add(pid);
}
function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    // already gone
  }
}

export class TpmRunner {
  readonly tcti: string;
  readonly #timeoutMs: number;
  readonly #clock: Clock;
  readonly #busyRetry: RetryPolicy;
  readonly #runtimeDir: string;
  readonly #onLatency: ((s: TpmLatencySample) => void) | undefined;
  readonly #ownerAuth: (() => Promise<Secret>) | undefined;
  #dir: string | undefined;
  #closed = false;

  constructor(options: TpmRunnerOptions) {
    this.tcti = options.tcti;
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#clock = options.clock ?? systemClock;
    this.#busyRetry = options.busyRetry ?? defaultBusyRetry;
    this.#runtimeDir = options.runtimeDir ?? process.env.RUNTIME_DIRECTORY ?? tmpdir();
    this.#onLatency = options.onLatency;
    this.#ownerAuth = options.ownerAuth;
  }

  get timeoutMs(): number {
    return this.#timeoutMs;
  }

  /** The private 0700 scratch dir (created on first use, removed by `close()`). */
  get privateDir(): string {
    if (this.#closed) throw new M2mError("ERR_TPM_CLOSED", "permanent", "the TPM runner is closed");
    if (this.#dir === undefined) {
      // mkdtemp creates the directory 0700 from the first instant.
      this.#dir = mkdtempSync(join(this.#runtimeDir, "m2m-tpm-"));
    }
    return this.#dir;
  }

  /** Runs one tool call while holding the queue. @throws M2mError (see ./errors.ts). */
  run(tool: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    return this.exclusive((tx) => tx.run(tool, args, opts));
  }

  /** Sends one raw TPM command with `tpm2_send` while holding the queue. */
  sendRaw(command: Uint8Array, opts: { op?: string; timeoutMs?: number } = {}): Promise<RawResponse> {
    return this.exclusive((tx) => tx.sendRaw(command, opts));
  }

  /**
   * Holds the TPM queue for a multi-step operation (policy session + command + flush): nothing else in
   * this process talks to the TPM meanwhile. Scratch files created through `tx` are removed at the end.
   */
  exclusive<T>(fn: (tx: TpmTx) => Promise<T>): Promise<T> {
    return enqueue(this.tcti, async () => {
      const files: string[] = [];
      const tx: TpmTx = {
        run: (tool, args, opts) => this.#runRetrying(tool, args, opts ?? {}),
        sendRaw: (command, opts) => this.#sendRawRetrying(command, opts ?? {}),
        path: (name) => {
          if (!/^[\w.-]+$/.test(name)) throw new Error(`bad scratch file name ${name}`);
          const p = join(this.privateDir, name);
          files.push(p);
          return p;
        },
        writeSecret: async (name, value) => {
          const p = tx.path(name);
          await rm(p, { force: true });
          const fh = await open(p, "wx", 0o600);
          try {
            await fh.writeFile(value);
          } finally {
            await fh.close();
          }
          return p;
        },
        ownerAuthArgs: async (flag = "-P") => {
          if (this.#ownerAuth === undefined) return [];
          // tpm2-tools reads `file:` contents as an auth string (plain text, or `hex:...`).
          const p = await tx.writeSecret(`owner-auth-${files.length}`, (await this.#ownerAuth()).reveal());
          return [flag, `file:${p}`];
        },
      };
      try {
        return await fn(tx);
      } finally {
        await Promise.all(files.map((f) => rm(f, { force: true })));
      }
    });
  }

  async #runRetrying(tool: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
    if (opts.retryBusy === false) return this.#runOnce(tool, args, opts);
    return withRetry(this.#busyRetry, () => this.#runOnce(tool, args, opts), { clock: this.#clock });
  }

  async #runOnce(tool: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
    const timeout = opts.timeoutMs ?? this.#timeoutMs;
    const started = this.#clock.monotonicMs();
    const op = opts.op ?? tool;
    const child = execa(tool, [...args], {
      env: { TPM2TOOLS_TCTI: this.tcti },
      extendEnv: true,
      timeout,
      killSignal: "SIGKILL",
      forceKillAfterDelay: 500,
      // Own process group, so a timeout can kill everything the tool started.
      detached: true,
      encoding: "buffer",
      reject: false,
      ...(opts.input === undefined ? { stdin: "ignore" as const } : { input: opts.input }),
    });
    const pid = child.pid;
    if (pid !== undefined) trackGroup(pid);
    const res = await child;
    if (pid !== undefined) {
      liveGroups.delete(pid);
      if (res.timedOut) killGroup(pid);
    }
    const stderr = Buffer.from(res.stderr ?? new Uint8Array()).toString("utf8");
    if (res.failed) {
      const spawnCode = (res as { code?: unknown }).code;
      let err = classifyToolFailure({
        tool,
        exitCode: res.exitCode,
        stderr,
        spawnCode: typeof spawnCode === "string" ? spawnCode : undefined,
        timedOut: res.timedOut,
        timeoutMs: timeout,
      });
      if (err.code === "ERR_TPM_LOCKOUT") err = await this.#withLockoutInfo(err);
      this.#sample(op, tool, started, false, err.code);
      throw err;
    }
    this.#sample(op, tool, started, true);
    const stdout = res.stdout ?? new Uint8Array();
    return { stdout, stderr, text: Buffer.from(stdout).toString("utf8") };
  }

  async #sendRawRetrying(
    command: Uint8Array,
    opts: { op?: string; timeoutMs?: number },
  ): Promise<RawResponse> {
    // A raw command gets no retry from the TSS: the first crypto command after a fresh swtpm start
    // answers TPM_RC_RETRY, so busy codes are retried here.
    return withRetry(
      this.#busyRetry,
      async () => {
        const out = await this.#runOnce("tpm2_send", [], {
          input: command,
          op: opts.op ?? "send",
          ...(opts.timeoutMs === undefined ? {} : { timeoutMs: opts.timeoutMs }),
        });
        const resp = parseResponse(out.stdout);
        const err = classifyTpmRc(resp.rc, "tpm2_send");
        if (err !== undefined) {
          throw err.code === "ERR_TPM_LOCKOUT" ? await this.#withLockoutInfo(err) : err;
        }
        if (resp.rc !== 0) {
          throw new M2mError("ERR_TPM_COMMAND", "permanent", "the TPM refused the command", {
            details: { tool: "tpm2_send", rc: rcHex(resp.rc), rcBase: rcHex(rcBase(resp.rc)) },
          });
        }
        return resp;
      },
      { clock: this.#clock },
    );
  }

  /** Adds the DA counters to a lockout error (best effort: the getcap itself may fail). */
  async #withLockoutInfo(err: M2mError): Promise<M2mError> {
    try {
      const res = await this.#runOnce("tpm2_getcap", ["properties-variable"], {
        op: "lockout-info",
        timeoutMs: Math.min(this.#timeoutMs, 5_000),
      });
      const info = parseLockoutInfo(res.text);
      const hint =
        info.lockoutIntervalSeconds === undefined
          ? err.hint
          : `the TPM forgives one failed authorization every ${info.lockoutIntervalSeconds} s; wait or clear it with the lockout authorization (tpm2_dictionarylockout -c); lockout-auth recovery ${info.lockoutRecoverySeconds ?? "?"} s`;
      const recoveryAfterMs =
        info.lockoutIntervalSeconds === undefined ? undefined : info.lockoutIntervalSeconds * 1000;
      return new M2mError(err.code, err.retry, err.message, {
        cause: err.cause,
        ...(hint === undefined ? {} : { hint }),
        details: {
          ...err.details,
          ...numericFields(info),
          ...(recoveryAfterMs === undefined ? {} : { recoveryAfterMs }),
        },
      });
    } catch {
      return err;
    }
  }

  #sample(op: string, tool: string, started: number, ok: boolean, code?: string): void {
    if (this.#onLatency === undefined) return;
    try {
      this.#onLatency({
        op,
        tool,
        ms: this.#clock.monotonicMs() - started,
        ok,
        ...(code === undefined ? {} : { code }),
      });
    } catch {
      // metrics must never break a TPM operation
    }
  }

  /** Removes the private dir. Queued operations still finish; new ones fail with ERR_TPM_CLOSED. */
  async close(): Promise<void> {
    await enqueue(this.tcti, async () => undefined);
    this.#closed = true;
    if (this.#dir !== undefined) {
      rmSync(this.#dir, { recursive: true, force: true });
      this.#dir = undefined;
    }
  }
}

/** Parses a TPM response header (tag u16, size u32, rc u32). @throws ERR_TPM_RESPONSE when malformed. */
export function parseResponse(bytes: Uint8Array): RawResponse {
  if (bytes.length < 10) {
    throw new M2mError("ERR_TPM_RESPONSE", "permanent", `TPM response too short (${bytes.length} bytes)`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = dv.getUint16(0);
  const size = dv.getUint32(2);
  const rc = dv.getUint32(6);
  if (size !== bytes.length || (tag !== 0x8001 && tag !== 0x8002 && tag !== 0x00c4)) {
    throw new M2mError("ERR_TPM_RESPONSE", "permanent", "malformed TPM response header", {
      details: { tag, size, length: bytes.length },
    });
  }
  return { tag, size, rc, body: bytes.subarray(10) };
}

export interface LockoutInfo {
  readonly lockoutCounter?: number;
  readonly maxAuthFail?: number;
  readonly lockoutIntervalSeconds?: number;
  readonly lockoutRecoverySeconds?: number;
  readonly inLockout?: boolean;
}

/** Parses DA fields from `tpm2_getcap properties-variable` YAML-ish output. */
export function parseLockoutInfo(text: string): LockoutInfo {
  const num = (key: string): number | undefined => {
    const m = new RegExp(`${key}:\\s*(0x[0-9a-fA-F]+|\\d+)`).exec(text);
    return m?.[1] === undefined ? undefined : Number(m[1]);
  };
  const inLockout = num("inLockout");
  const out: Record<string, number | boolean> = {};
  const set = (k: string, v: number | undefined): void => {
    if (v !== undefined) out[k] = v;
  };
  set("lockoutCounter", num("TPM2_PT_LOCKOUT_COUNTER"));
  set("maxAuthFail", num("TPM2_PT_MAX_AUTH_FAIL"));
  set("lockoutIntervalSeconds", num("TPM2_PT_LOCKOUT_INTERVAL"));
  set("lockoutRecoverySeconds", num("TPM2_PT_LOCKOUT_RECOVERY"));
  if (inLockout !== undefined) out.inLockout = inLockout === 1;
  return out as LockoutInfo;
}

function numericFields(info: LockoutInfo): Record<string, number | boolean> {
  const out: Record<string, number | boolean> = {};
  for (const [k, v] of Object.entries(info)) if (typeof v === "number" || typeof v === "boolean") out[k] = v;
  return out;
}

/** Reads the whole current DA state (for `doctor` and tests). */
export async function readLockoutInfo(runner: TpmRunner): Promise<LockoutInfo> {
  try {
    const res = await runner.run("tpm2_getcap", ["properties-variable"], { op: "lockout-info" });
    return parseLockoutInfo(res.text);
  } catch (err) {
    throw asM2mError(err, "ERR_TPM_COMMAND");
  }
}
