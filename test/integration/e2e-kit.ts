import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expect } from "vitest";
import type { Mosquitto } from "../../hw/mosquitto.js";
import type { SoftHsmHandle } from "../../hw/softhsm.js";
import { type SwtpmHandle, type SwtpmOptions, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import type { Defer } from "../kit/cleanup.js";
import { type CliResult, REPO, runScript } from "./daemon-cli-kit.js";

/**
 * Helpers for the end-to-end tests that drive both BUILT programs (`m2m-registrar`, `m2m-agent`)
 * as child processes, the way an operator would.
 */
export const REGISTRAR_CLI = join(REPO, "dist", "src", "cli", "m2m-registrar.js");
export const AGENT_CLI = join(REPO, "dist", "src", "cli", "m2m-agent.js");

/** Sources whose build output the e2e tests depend on. */
const WATCHED = [
  "src/cli/m2m-agent.ts",
  "src/cli/m2m-registrar.ts",
  "src/cli/agent/decommission.ts",
  "src/daemon/compose.ts",
  "src/daemon/stages/credentials.ts",
  "src/daemon/stages/relay.ts",
  "src/relay/outbox/worker/worker-outbox.ts",
  "src/relay/outbox/worker/outbox-worker.ts",
  "src/daemon/stage-types.ts",
  "src/keys/device-key.ts",
  "src/registrar/app.ts",
  "src/registrar/server.ts",
  "src/registrar/config.ts",
  "src/registrar/store/sqlite-store.ts",
  "src/credentials/est/est-client.ts",
  "src/relay/sinks/mqtt/mqtt-sink.ts",
  "src/cli/agent/token.ts",
  "src/daemon/clock-sanity.ts",
  "src/relay/relay.ts",
];

/**
 * Builds once (`tsc -p .`) when dist is missing or older than the sources the tests exercise.
 * tsc emits even when another module has a type error; the freshness check after the build is
 * what decides (a stale dist would test old code).
 */
export function ensureBuilt(): void {
  const stale = (): string | undefined =>
    WATCHED.find((rel) => {
      const out = join(REPO, "dist", rel.replace(/\.ts$/, ".js"));
      return !existsSync(out) || statSync(out).mtimeMs < statSync(join(REPO, rel)).mtimeMs;
    });
  if (stale() === undefined) return;
  try {
    execFileSync(process.execPath, [join(REPO, "node_modules", "typescript", "bin", "tsc"), "-p", REPO], {
      cwd: REPO,
      stdio: "ignore",
      timeout: 240_000,
    });
  } catch {
    // Type errors elsewhere still emit JavaScript; freshness is checked below.
  }
  const still = stale();
  if (still !== undefined) throw new Error(`build did not refresh the output of ${still}`);
}

export type Run = CliResult;

/** Runs a built CLI to completion (no TTY; stdin from `input` when given, else an empty pipe). */
export function runNode(
  cli: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  input?: string,
  timeoutMs = 90_000,
): Promise<Run> {
  return runScript(cli, args, env, { input: input ?? "", timeoutMs });
}

/** A running `m2m-registrar serve` child. */
export interface RegistrarProcess {
  readonly child: ChildProcess;
  readonly url: string;
  readonly issuer: string;
  stop(): Promise<number | null>;
}

/** Starts `m2m-registrar --json serve --config FILE` and resolves once it printed its URL. */
export function startRegistrarProcess(configPath: string, env: NodeJS.ProcessEnv): Promise<RegistrarProcess> {
  const child = spawn(process.execPath, [REGISTRAR_CLI, "--json", "serve", "--config", configPath], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (c: Buffer) => {
    stderr += c.toString();
  });
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  return new Promise((resolve, reject) => {
    let out = "";
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`registrar did not start:\n${stderr}`));
    }, 30_000);
    child.stdout?.on("data", (c: Buffer) => {
      out += c.toString();
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (line === undefined) return;
      clearTimeout(t);
      const { url, issuer } = JSON.parse(line) as { url: string; issuer: string };
      resolve({
        child,
        url,
        issuer,
        stop: async () => {
          if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
          return exited;
        },
      });
    });
    child.on("exit", () => {
      clearTimeout(t);
      reject(new Error(`registrar exited:\n${stderr}`));
    });
  });
}

/** Polls `fn` until it returns a value other than undefined (or throws after `timeoutMs`). */
export async function eventually<T>(
  fn: () => Promise<T | undefined>,
  timeoutMs = 30_000,
  what = "condition",
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what} not reached in ${timeoutMs} ms: ${String(last)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The payload of a compact JWS/JWT (no verification: for assertions about claims). */
export function jwtClaims(jwt: string): Record<string, unknown> {
  const part = jwt.split(".")[1] ?? "";
  return JSON.parse(Buffer.from(part, "base64url").toString("utf8")) as Record<string, unknown>;
}

// ---------- daemon-level setup: registrar CA, config, groups, bootstrap tokens, agent.toml ----------

/** The environment for the built CLIs: `extra` on top of ours, without systemd's NOTIFY_SOCKET. */
export function cliEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  // A NOTIFY_SOCKET inherited from a systemd-run test runner would make the daemon notify it.
  delete env.NOTIFY_SOCKET;
  return env;
}

/** An enrolment group, as `m2m-registrar enrollment group add` takes it. */
export interface EnrollmentGroup {
  readonly name: string;
  readonly role: string;
  /** `--methods`, e.g. "pkcs11" or "tpm". */
  readonly methods: string;
  /** `--attr k=v`. */
  readonly attr?: string;
  /** `--ek-trust-dir` (TPM groups). */
  readonly ekTrustDir?: string;
}

export interface RegistrarSetup {
  readonly work: string;
  readonly env: NodeJS.ProcessEnv;
  /** The fleet CA certificate `ca init` made (agents' `registrar_ca_file`, brokers' client CA). */
  readonly caCert: string;
  readonly regConfig: string;
  /** `m2m-registrar --json ARGS --config registrar.toml`. */
  reg(args: readonly string[], input?: string): Promise<Run>;
}

/**
 * `m2m-registrar ca init` in WORK/ca, WORK/registrar.toml (loopback, port 0, the CA's server
 * certificate) and `enrollment group add` for each group; the registrar is not started, so a test
 * can still create tokens first (`startRegistrarProcess(setup.regConfig, env)`).
 */
export async function setupRegistrar(o: {
  readonly work: string;
  readonly env: NodeJS.ProcessEnv;
  /** Top-level keys, written before [listen] (e.g. `cert_lifetime = "60s"`). */
  readonly topLevel?: readonly string[];
  /** Tables written after [tls] (e.g. [oauth.roles], [rotation]). */
  readonly extraConfig?: readonly string[];
  readonly groups: readonly EnrollmentGroup[];
}): Promise<RegistrarSetup> {
  const caDir = join(o.work, "ca");
  const init = await runNode(REGISTRAR_CLI, ["--json", "ca", "init", "--dir", caDir], o.env);
  expect(init.code, init.stderr).toBe(0);
  const paths = JSON.parse(init.stdout) as { caCert: string; serverCert: string; serverKey: string };
  const regConfig = join(o.work, "registrar.toml");
  await writeFile(
    regConfig,
    [
      `data_dir = "${join(o.work, "registrar-data")}"`,
      `ca_dir = "${caDir}"`,
      ...(o.topLevel ?? []),
      "[listen]",
      'host = "127.0.0.1"',
      "port = 0",
      "[tls]",
      `cert = "${paths.serverCert}"`,
      `key = "${paths.serverKey}"`,
      ...(o.extraConfig ?? []),
      "",
    ].join("\n"),
  );
  const reg = (args: readonly string[], input?: string): Promise<Run> =>
    runNode(REGISTRAR_CLI, ["--json", ...args, "--config", regConfig], o.env, input);
  for (const g of o.groups) {
    const added = await reg([
      "enrollment",
      "group",
      "add",
      g.name,
      "--role",
      g.role,
      ...(g.attr === undefined ? [] : ["--attr", g.attr]),
      "--methods",
      g.methods,
      ...(g.ekTrustDir === undefined ? [] : ["--ek-trust-dir", g.ekTrustDir]),
    ]);
    expect(added.code, added.stderr + added.stdout).toBe(0);
  }
  return { work: o.work, env: o.env, caCert: paths.caCert, regConfig, reg };
}

/** `enrollment token create --group GROUP --ttl 10m`, written to WORK/bootstrap-token (0600); returns the path. */
export async function createBootstrapToken(registrar: RegistrarSetup, group: string): Promise<string> {
  const tok = await registrar.reg(["enrollment", "token", "create", "--group", group, "--ttl", "10m"]);
  expect(tok.code, tok.stderr).toBe(0);
  const file = join(registrar.work, "bootstrap-token");
  await writeFile(file, (JSON.parse(tok.stdout) as { token: string }).token, { mode: 0o600 });
  return file;
}

export interface AgentTomlOptions {
  readonly stateDir: string;
  readonly runtimeDir: string;
  /** Further [agent] keys, e.g. `log_level = "info"`. */
  readonly agent?: readonly string[];
  /** A SoftHSM token (`provider = "pkcs11"`) or a TPM's TCTI (`provider = "tpm"`). */
  readonly keys:
    | { readonly hsm: Pick<SoftHsmHandle, "modulePath" | "tokenLabel" | "pinFile"> }
    | { readonly tcti: string };
  readonly enroll: {
    readonly registrarUrl: string;
    readonly caFile: string;
    readonly hardwareSerial: string;
    readonly group?: string;
    readonly bootstrapToken?: string;
  };
  /** Tables between [enroll] and [api] ([relay…], [credentials.est]); see `mqttSinkToml`. */
  readonly sections?: readonly string[];
  readonly api: { readonly socket: string; readonly mode0600?: boolean };
  /** Tables after [api] (e.g. [metrics]). */
  readonly tail?: readonly string[];
}

/** An agent.toml that enrols at the registrar with the key provider's method. */
export function agentToml(o: AgentTomlOptions): string {
  const method = "hsm" in o.keys ? "pkcs11" : "tpm";
  const keys =
    "hsm" in o.keys
      ? [
          "[keys.pkcs11]",
          `module = "${o.keys.hsm.modulePath}"`,
          `token_label = "${o.keys.hsm.tokenLabel}"`,
          `pin = { file = "${o.keys.hsm.pinFile}" }`,
        ]
      : ["[keys.tpm]", `tcti = "${o.keys.tcti}"`];
  const e = o.enroll;
  return [
    "[agent]",
    `state_dir = "${o.stateDir}"`,
    `runtime_dir = "${o.runtimeDir}"`,
    ...(o.agent ?? []),
    "[keys]",
    `provider = "${method}"`,
    ...keys,
    "[enroll]",
    "enabled = true",
    `registrar_url = "${e.registrarUrl}"`,
    `registrar_ca_file = "${e.caFile}"`,
    `method = "${method}"`,
    ...(e.group === undefined ? [] : [`group = "${e.group}"`]),
    ...(e.bootstrapToken === undefined ? [] : [`bootstrap_token = { file = "${e.bootstrapToken}" }`]),
    `hardware_serial = "${e.hardwareSerial}"`,
    ...(o.sections ?? []),
    "[api]",
    `socket = "${o.api.socket}"`,
    ...(o.api.mode0600 === true ? ["mode = 0o600"] : []),
    ...(o.tail ?? []),
    "",
  ].join("\n");
}

/** What `startTpmGateway` started and wrote. */
export interface TpmGateway {
  readonly work: string;
  readonly tpm: SwtpmHandle;
  readonly env: NodeJS.ProcessEnv;
  readonly setup: RegistrarSetup;
  readonly registrar: RegistrarProcess;
  /** WORK/agent.toml (0600). */
  readonly config: string;
  readonly stateDir: string;
}

/**
 * The built-CLI rig of a TPM gateway: a fresh work dir, a swtpm, the registrar (fleet CA, a
 * "gateways" group with TPM attestation that trusts the swtpm's EK CAs, then `serve`), and
 * WORK/agent.toml for a gateway of that group (info logs, runtime WORK/run, local API WORK/api.sock).
 * Everything it starts is released through `defer` (last started, first stopped).
 */
export async function startTpmGateway(
  defer: Defer,
  o: {
    /** mkdtemp prefix of the work dir. */
    readonly prefix: string;
    readonly swtpm?: SwtpmOptions;
    /** Extra environment for the CLIs, from the started swtpm (e.g. its D-Bus address). */
    readonly env?: (tpm: SwtpmHandle) => NodeJS.ProcessEnv;
    /** `setupRegistrar`'s `topLevel` and `extraConfig`. */
    readonly registrar?: { readonly topLevel?: readonly string[]; readonly extraConfig?: readonly string[] };
    /** Runs after `setupRegistrar`, before `serve` (e.g. `attestation policy set`). */
    readonly beforeServe?: (setup: RegistrarSetup) => Promise<void>;
    readonly agent: {
      /** The state dir, under WORK. */
      readonly stateDir: string;
      readonly hardwareSerial: string;
      /** Further [agent] keys. */
      readonly keys?: readonly string[];
      /**
       * Tables between [enroll] and [api]; as a function, made once the registrar is set up (it may
       * start what they name, e.g. a broker trusting the fleet CA, and defer its cleanup).
       */
      readonly sections?:
        | readonly string[]
        | ((rig: { readonly work: string; readonly setup: RegistrarSetup }) => Promise<readonly string[]>);
      readonly apiMode0600?: boolean;
    };
  },
): Promise<TpmGateway> {
  ensureBuilt();
  const work = await mkdtemp(join(tmpdir(), o.prefix));
  defer(() => rm(work, { recursive: true, force: true }));
  const tpm = await startSwtpm(o.swtpm);
  defer(() => tpm.stop());
  const env = cliEnv(o.env?.(tpm));
  const ekTrustDir = await writeEkTrustDir(tpm, work);
  const setup = await setupRegistrar({
    work,
    env,
    ...o.registrar,
    groups: [{ name: "gateways", role: "gateway", methods: "tpm", ekTrustDir }],
  });
  await o.beforeServe?.(setup);
  const registrar = await startRegistrarProcess(setup.regConfig, env);
  defer(() => registrar.stop());
  const config = join(work, "agent.toml");
  const stateDir = join(work, o.agent.stateDir);
  const sections =
    typeof o.agent.sections === "function" ? await o.agent.sections({ work, setup }) : o.agent.sections;
  await writeAgentToml(config, {
    stateDir,
    runtimeDir: join(work, "run"),
    agent: ['log_level = "info"', ...(o.agent.keys ?? [])],
    keys: { tcti: tpm.tcti },
    enroll: {
      registrarUrl: registrar.url,
      caFile: setup.caCert,
      group: "gateways",
      hardwareSerial: o.agent.hardwareSerial,
    },
    ...(sections === undefined ? {} : { sections }),
    api: { socket: join(work, "api.sock"), ...(o.agent.apiMode0600 === true ? { mode0600: true } : {}) },
  });
  return { work, tpm, env, setup, registrar, config, stateDir };
}

/** The usual SoftHSM sensor fleet's group for `setupRegistrar`: role sensor, PKCS#11 enrolment. */
export const SENSORS_GROUP: EnrollmentGroup = { name: "sensors", role: "sensor", methods: "pkcs11" };

/**
 * Agent options for a SoftHSM sensor of `SENSORS_GROUP` enrolling with a bootstrap token: info logs,
 * state WORK/state, runtime WORK/run, local API at WORK/api.sock; `agent` adds [agent] keys,
 * `sections` go between [enroll] and [api].
 */
export function hsmSensorAgent(o: {
  readonly work: string;
  readonly hsm: Pick<SoftHsmHandle, "modulePath" | "tokenLabel" | "pinFile">;
  readonly registrar: { readonly url: string; readonly caFile: string };
  readonly bootstrapToken: string;
  readonly hardwareSerial: string;
  readonly agent?: readonly string[];
  readonly sections?: readonly string[];
  readonly apiMode0600?: boolean;
}): AgentTomlOptions {
  return {
    stateDir: join(o.work, "state"),
    runtimeDir: join(o.work, "run"),
    agent: ['log_level = "info"', ...(o.agent ?? [])],
    keys: { hsm: o.hsm },
    enroll: {
      registrarUrl: o.registrar.url,
      caFile: o.registrar.caFile,
      bootstrapToken: o.bootstrapToken,
      hardwareSerial: o.hardwareSerial,
    },
    ...(o.sections === undefined ? {} : { sections: o.sections }),
    api: { socket: join(o.work, "api.sock"), ...(o.apiMode0600 === true ? { mode0600: true } : {}) },
  };
}

/** Writes `agentToml(o)` to `path` (0600: it names the PIN file and the bootstrap token). */
export function writeAgentToml(path: string, o: AgentTomlOptions): Promise<void> {
  return writeFile(path, agentToml(o), { mode: 0o600 });
}

/** [relay.mqtt] to the broker's mTLS listener with the device key inside the token (engine). */
export function mqttSinkToml(broker: Pick<Mosquitto, "mtlsUrl" | "ca">, inflight?: number): string[] {
  return [
    "[relay.mqtt]",
    `urls = ["${broker.mtlsUrl}"]`,
    'auth = "mtls-pkcs11"',
    `ca_file = "${broker.ca.caCertPath}"`,
    ...(inflight === undefined ? [] : [`inflight = ${inflight}`]),
  ];
}

/**
 * `m2m-agent --config FILE --json status` of the running daemon, parsed. Exit 3 is reachable but not
 * healthy (degraded): the JSON is still the status; any other non-zero exit throws.
 */
export async function agentStatus<T>(config: string, env: NodeJS.ProcessEnv): Promise<T> {
  const r = await runNode(AGENT_CLI, ["--config", config, "--json", "status"], env);
  if (r.code !== 0 && r.code !== 3) throw new Error(`status exit ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** `m2m-agent --config FILE --json enroll`, which must succeed. */
export async function enrollAgent(config: string, env: NodeJS.ProcessEnv): Promise<Run> {
  const enrolled = await runNode(AGENT_CLI, ["--config", config, "--json", "enroll"], env);
  expect(enrolled.code, enrolled.stderr + enrolled.stdout).toBe(0);
  return enrolled;
}
