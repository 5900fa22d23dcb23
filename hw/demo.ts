#!/usr/bin/env node
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import mqtt, { type MqttClient } from "mqtt";
import { sendMessage } from "../src/cli/agent/send.js";
import { fetchStatus } from "../src/cli/agent/status.js";
import { isMainModule } from "../src/core/main-module.js";
import type { AgentStatus } from "../src/daemon/compose.js";
import {
  bindNotifySocket,
  createUi,
  descendants,
  findTool,
  type ManagedChild,
  type NotifySocket,
  type ProcInfo,
  REQUIRED_FILES,
  REQUIRED_TOOLS,
  spawnLogged,
  stillRunning,
  type Ui,
} from "./demo-kit.js";
import { freePort, type Mosquitto, startMosquitto } from "./mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "./softhsm.js";
import { type SwtpmHandle, startSwtpm } from "./swtpm.js";

/**
 * The one-command demo (README command one, `bash bin/demo`): on simulated hardware it runs the whole
 * story with the BUILT command-line tools, as an operator would:
 *   swtpm (TPM 2.0 with EK certificates) + SoftHSM2 token → `m2m-registrar` (CA, enrolment groups,
 *   bootstrap token, serve) → mosquitto whose mTLS listener trusts the fleet CA → two `m2m-agent run`
 *   daemons (TPM: attested enrolment, DPoP tokens, HTTPS ingest; PKCS#11: bootstrap-token enrolment,
 *   MQTT mTLS with the key inside the token) → sensor readings over the local API → an upstream outage
 *   (broker and ingest endpoint down) → backlog drain → summary. Every process it starts is stopped,
 *   also on Ctrl-C and on failure.
 *
 * Usage: `node dist/hw/demo.js [--quick] [--keep] [--summary-json FILE] [--no-color]`
 * Exit 0 only when the story succeeded (attestation verified, nothing acknowledged was lost).
 */

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const AGENT_CLI = join(REPO, "dist", "src", "cli", "m2m-agent.js");
const REGISTRAR_CLI = join(REPO, "dist", "src", "cli", "m2m-registrar.js");

interface Options {
  readonly quick: boolean;
  /** Gateway 1 (TPM) publishes over MQTT with mTLS, its attested TPM key signing the handshakes. */
  readonly tpmMqtt: boolean;
  readonly keep: boolean;
  readonly summaryJson: string | undefined;
  readonly colour: boolean;
}

function parseArgs(argv: readonly string[]): Options | "help" {
  let quick = false;
  let tpmMqtt = false;
  let keep = false;
  let summaryJson: string | undefined;
  let colour = process.stdout.isTTY === true && process.env.NO_COLOR === undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--quick") quick = true;
    else if (a === "--tpm-mqtt") tpmMqtt = true;
    else if (a === "--keep") keep = true;
    else if (a === "--no-color") colour = false;
    else if (a === "--summary-json") {
      summaryJson = argv[++i];
      if (summaryJson === undefined) throw new Error("--summary-json needs a file");
    } else if (a === "-h" || a === "--help") return "help";
    else throw new Error(`unknown option ${a} (try --help)`);
  }
  return { quick, tpmMqtt, keep, summaryJson, colour };
}

const HELP = `m2m-agent demo: the whole story on simulated hardware (swtpm, SoftHSM2, mosquitto)

usage: node dist/hw/demo.js [--quick] [--tpm-mqtt] [--keep] [--summary-json FILE] [--no-color]
  --quick              fewer readings and a shorter outage (used by the test)
  --tpm-mqtt           gateway 1 (TPM) publishes over MQTT mTLS with its attested TPM key
                       (tpm2-pkcs11; swtpm behind tpm2-abrmd on a private D-Bus bus)
  --keep               keep the work directory (configs, logs, databases) for inspection
  --summary-json FILE  also write the summary as JSON (with the pids the demo started)
  --no-color           plain output even on a terminal`;

/** What a gateway's agent reported about its identity and token (shown live and in the summary). */
interface CredentialFacts {
  deviceId?: string;
  certNotAfter?: string;
  tokenExpiresAt?: string;
  tokenScope?: string;
  tokenLifetimeS?: number;
  dpop?: boolean;
}

/** One gateway of the story: its agent daemon and what it sent. */
interface Device extends CredentialFacts {
  readonly name: string;
  readonly label: string;
  readonly kind: "tpm" | "pkcs11";
  readonly sink: "https" | "mqtt";
  readonly config: string;
  readonly socket: string;
  agent?: ManagedChild;
  notify?: NotifySocket;
  enrolled: boolean;
  attested: boolean;
  sent: number;
  readonly acked: string[];
  sendErrors: number;
}

interface Summary {
  ok: boolean;
  failures: string[];
  notAvailable: string[];
  workdir: string | undefined;
  attestation: { verified: boolean; deviceId?: string; detail?: string };
  devices: (CredentialFacts & {
    name: string;
    method: string;
    sink: string;
    sent: number;
    acked: number;
    delivered: number;
    lost: number;
    duplicates: number;
  })[];
  messages: { sent: number; acked: number; delivered: number; lost: number; duplicates: number };
  outage: { durationMs: number; maxBacklog: number; drainMs: number | undefined; survived: boolean };
  pids: ProcInfo[];
  /** Started processes still alive after cleanup (must be empty). */
  leftover: ProcInfo[];
}

/** A JSON-lines record (log or audit line) as an object; undefined for any other line. */
function jsonLine(line: string): Record<string, unknown> | undefined {
  if (!line.startsWith("{")) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** TPMA_OBJECT bits that matter for a device key (hardware-notes: attribute bits). */
function tpmAttrs(bits: number | undefined): string {
  if (bits === undefined) return "(attributes unknown)";
  const names: [number, string][] = [
    [0x2, "fixedTPM"],
    [0x10, "fixedParent"],
    [0x20, "sensitiveDataOrigin"],
    [0x400, "noDA"],
    [0x40000, "sign"],
  ];
  return names
    .filter(([b]) => (bits & b) !== 0)
    .map(([, n]) => n)
    .join("|");
}

/** Anything still running under the demo (a stuck tool run) is ended by pid, never by name. */
function killStragglers(): void {
  for (const p of descendants()) {
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function writeSecretFile(path: string, text: string): Promise<void> {
  // 0600 from the first byte (O_EXCL + mode): the bootstrap token is never world-readable.
  const fh = await open(path, "wx", 0o600);
  try {
    await fh.writeFile(text);
  } finally {
    await fh.close();
  }
}

function toml(s: string): string {
  return JSON.stringify(s);
}

function fmtDuration(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s >= 2 * 86_400) return `${Math.round(s / 86_400)} d`;
  if (s >= 2 * 3600) return `${Math.round(s / 3600)} h`;
  if (s >= 120) return `${Math.round(s / 60)} min`;
  return `${s} s`;
}

class Demo {
  readonly ui: Ui;
  readonly o: Options;
  workdir: string | undefined;
  swtpm: SwtpmHandle | undefined;
  hsm: SoftHsmHandle | undefined;
  broker: Mosquitto | undefined;
  registrar: ManagedChild | undefined;
  registrarUrl: string | undefined;
  registrarConfig = "";
  subscriber: MqttClient | undefined;
  readonly devices: Device[] = [];
  readonly procs = new Map<number, ProcInfo>();
  readonly failures: string[] = [];
  readonly notAvailable: string[] = [];
  /** m2m-id → how many times the observer saw it on the broker. */
  readonly mqttSeen = new Map<string, number>();
  attestation: Summary["attestation"] = { verified: false };
  outage: Summary["outage"] = { durationMs: 0, maxBacklog: 0, drainMs: undefined, survived: false };
  #cleanup: Promise<void> | undefined;
  /** Set once cleanup began: nothing new may be started after that (Ctrl-C during a step). */
  closing = false;

  guard(): void {
    if (this.closing) throw new Error("interrupted");
  }
  env: NodeJS.ProcessEnv = {};

  constructor(o: Options) {
    this.o = o;
    this.ui = createUi(process.stdout, o.colour);
  }

  /** Remembers every live process under the demo (for the summary and the leak check). */
  snapshotProcs(): void {
    for (const p of descendants()) {
      // Short-lived tool runs (tpm2_*, openssl) come and go; long-lived ones are what can leak.
      if (!this.procs.has(p.pid)) this.procs.set(p.pid, p);
    }
  }

  fail(text: string): void {
    this.failures.push(text);
    this.ui.fail(text);
  }

  // ── 1. tools ──
  checkTools(): boolean {
    const { ui } = this;
    ui.section("Checking the tools the demo needs");
    const missing = new Map<string, string[]>();
    for (const [tool, pkg] of REQUIRED_TOOLS) {
      const p = findTool(tool);
      if (p === undefined) missing.set(pkg, [...(missing.get(pkg) ?? []), tool]);
      else if (!(process.env.PATH ?? "").split(":").includes(dirname(p)))
        process.env.PATH = `${process.env.PATH ?? ""}:${dirname(p)}`;
    }
    for (const [files, pkg] of REQUIRED_FILES) {
      if (!files.some((f) => existsSync(f))) missing.set(pkg, [...(missing.get(pkg) ?? []), files[0] ?? pkg]);
    }
    if (!existsSync(AGENT_CLI) || !existsSync(REGISTRAR_CLI)) {
      ui.fail(`the build is missing (${AGENT_CLI}): run \`npm run build\` (or \`bash bin/setup\`)`);
      return false;
    }
    if (missing.size > 0) {
      for (const [pkg, tools] of missing)
        ui.fail(`missing ${tools.join(", ")}: install the Debian package ${pkg}`);
      ui.info(`sudo apt-get install -y ${[...missing.keys()].join(" ")}   (or run \`bash bin/setup\`)`);
      return false;
    }
    ui.ok(`swtpm, tpm2-tools, softhsm2-util, mosquitto, openssl, OpenSSL PKCS#11 engine: all present`);
    return true;
  }

  // ── 2. work dir, simulated hardware ──
  async hardware(): Promise<void> {
    const { ui } = this;
    ui.section("Simulated hardware");
    this.workdir = await mkdtemp(join(tmpdir(), "m2m-demo-"));
    await chmod(this.workdir, 0o700);
    const wd = this.workdir;
    // The hardware kits make their own temp dirs: keep them inside the work dir too.
    process.env.TMPDIR = wd;
    this.env = { PATH: process.env.PATH, HOME: wd, TMPDIR: wd, LANG: "C.UTF-8" };
    ui.info(`work directory ${wd}${this.o.keep ? " (kept: --keep)" : ""}`);
    this.guard();
    // TLS with the TPM key needs a resource manager (the gateway's /dev/tpmrm0): tpm2-abrmd here.
    this.swtpm = await startSwtpm(this.o.tpmMqtt ? { resourceManager: "abrmd" } : {});
    if (this.swtpm.dbusAddress !== undefined) this.env.DBUS_SESSION_BUS_ADDRESS = this.swtpm.dbusAddress;
    ui.ok(`swtpm TPM 2.0 on ${this.swtpm.tcti} (EK certificates from its own manufacturer CA)`);
    const trust = join(wd, "ek-trust");
    await mkdir(trust, { mode: 0o700 });
    await writeFile(join(trust, "swtpm-root.pem"), this.swtpm.caCertPems[0] ?? "");
    await writeFile(join(trust, "swtpm-intermediate.pem"), this.swtpm.caCertPems[1] ?? "");
    const pin = randomBytes(6).toString("hex");
    this.guard();
    this.hsm = await initSoftHsm({ label: "m2m-demo-gw2", pin, soPin: randomBytes(8).toString("hex") });
    ui.ok(`SoftHSM2 token "${this.hsm.tokenLabel}" (user PIN in a 0600 file, never on screen)`);
    this.snapshotProcs();
  }

  async registrarCli(args: readonly string[]): Promise<unknown> {
    const r = await execa(process.execPath, [REGISTRAR_CLI, ...args, "--json"], {
      env: this.env,
      extendEnv: false,
      timeout: 60_000,
      killSignal: "SIGKILL",
      stdin: "ignore",
      reject: false,
    });
    const text = String(r.stdout ?? "").trim();
    let parsed: unknown;
    try {
      parsed = JSON.parse(text.split("\n").pop() ?? "");
    } catch {
      parsed = undefined;
    }
    if (r.exitCode !== 0) {
      const err = (parsed as { error?: { code?: string; message?: string } } | undefined)?.error;
      throw new Error(
        `m2m-registrar ${args.slice(0, 3).join(" ")} failed: ${err?.code ?? r.exitCode} ${err?.message ?? String(r.stderr).slice(-300)}`,
      );
    }
    return parsed;
  }

  // ── 3. registrar via its CLI ──
  async startRegistrar(): Promise<void> {
    const { ui } = this;
    const wd = this.workdir as string; // set by hardware()
    ui.section("Reference registrar (m2m-registrar, as an operator runs it)");
    const caDir = join(wd, "registrar", "ca");
    const dataDir = join(wd, "registrar", "data");
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    const paths = (await this.registrarCli(["ca", "init", "--dir", caDir])) as {
      caCert: string;
      serverCert: string;
      serverKey: string;
    };
    ui.ok(`ca init: fleet CA and registrar TLS certificate in ${caDir}`);
    const port = await freePort();
    this.registrarConfig = join(wd, "registrar", "registrar.toml");
    await writeFile(
      this.registrarConfig,
      [
        "# m2m-registrar config written by the demo",
        `data_dir = ${toml(dataDir)}`,
        `ca_dir = ${toml(caDir)}`,
        'cert_lifetime = "7d"',
        "",
        "[listen]",
        'host = "127.0.0.1"',
        `port = ${port}`,
        "",
        "[tls]",
        `cert = ${toml(paths.serverCert)}`,
        `key = ${toml(paths.serverKey)}`,
        "",
        "[oauth]",
        'access_token_ttl = "10m"',
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const cfg = ["--config", this.registrarConfig];
    await this.registrarCli([
      "enrollment",
      "group",
      "add",
      "tpm-gateways",
      "--role",
      "gateway",
      "--methods",
      "tpm",
      "--ek-trust-dir",
      join(wd, "ek-trust"),
      "--attr",
      "site=demo-lab",
      ...cfg,
    ]);
    ui.ok("enrollment group add tpm-gateways (TPM attestation; EK trust store = the swtpm manufacturer CA)");
    await this.registrarCli([
      "enrollment",
      "group",
      "add",
      "hsm-gateways",
      "--role",
      "gateway",
      "--methods",
      "pkcs11",
      "--attr",
      "site=demo-lab",
      ...cfg,
    ]);
    ui.ok("enrollment group add hsm-gateways (PKCS#11 key + one-time bootstrap token)");
    const tok = (await this.registrarCli([
      "enrollment",
      "token",
      "create",
      "--group",
      "hsm-gateways",
      "--ttl",
      "1h",
      ...cfg,
    ])) as { token: string; expiresAt: string };
    await writeSecretFile(join(wd, "bootstrap-token"), tok.token);
    ui.ok(
      `enrollment token create: ${tok.token.slice(0, 4)}… (one-time, expires ${tok.expiresAt}; written to a 0600 file)`,
    );
    await this.serveRegistrar();
    this.registrarCa = paths.caCert;
    this.startAuditTail(join(dataDir, "audit.log"));
  }

  registrarCa = "";

  async serveRegistrar(): Promise<void> {
    const wd = this.workdir as string; // set by hardware()
    let onUrl: (u: string) => void = () => undefined;
    const urlSeen = new Promise<string>((r) => {
      onUrl = r;
    });
    this.guard();
    const child = spawnLogged({
      name: "registrar",
      file: process.execPath,
      args: [REGISTRAR_CLI, "serve", "--config", this.registrarConfig],
      env: this.env,
      logFile: join(wd, "registrar.log"),
      onLine: (line) => {
        const m = /listening on (https?:\/\/\S+)/.exec(line);
        if (m?.[1] !== undefined) onUrl(m[1]);
        this.registrarEvent(line);
      },
    });
    this.registrar = child;
    const url = await Promise.race([
      urlSeen,
      child.exited.then((c) => {
        throw new Error(`m2m-registrar serve exited (${c}); see ${child.logFile}`);
      }),
      sleep(30_000).then(() => {
        throw new Error("m2m-registrar serve did not listen within 30 s");
      }),
    ]);
    this.registrarUrl = url.replace(/\/+$/, "");
    this.ui.ok(`serve: listening on ${this.registrarUrl} (pid ${child.pid})`);
    this.snapshotProcs();
  }

  /** Device ids whose TPM attestation the registrar's audit log records as successful. */
  readonly auditAttested = new Set<string>();
  #auditOffset = 0;
  #auditTimer: NodeJS.Timeout | undefined;

  /** Follows the registrar's audit log (identity events) and shows each one as it happens. */
  startAuditTail(file: string): void {
    const tick = async (): Promise<void> => {
      let buf: Buffer;
      try {
        const fh = await open(file, "r");
        try {
          const { size } = await fh.stat();
          if (size <= this.#auditOffset) return;
          buf = Buffer.alloc(size - this.#auditOffset);
          await fh.read(buf, 0, buf.length, this.#auditOffset);
        } finally {
          await fh.close();
        }
      } catch {
        return;
      }
      const text = buf.toString("utf8");
      const end = text.lastIndexOf("\n");
      if (end < 0) return;
      this.#auditOffset += Buffer.byteLength(text.slice(0, end + 1));
      for (const l of text.slice(0, end).split("\n")) this.auditEvent(l);
    };
    this.#auditTimer = setInterval(() => void tick(), 200);
  }

  stopAuditTail(): void {
    if (this.#auditTimer !== undefined) clearInterval(this.#auditTimer);
    this.#auditTimer = undefined;
  }

  auditEvent(line: string): void {
    const r = jsonLine(line);
    if (r === undefined) return;
    const ev = String(r.event ?? "");
    const dev = r.deviceId === undefined ? "" : String(r.deviceId);
    if (r.outcome !== "success") {
      this.ui.event("registrar", `${ev} refused (${String(r.code ?? r.outcome ?? "?")})`);
      return;
    }
    if (ev === "enroll.tpm.begin")
      this.ui.event(
        "registrar",
        `EK certificate chains to the manufacturer CA (EK ${String(r.ekHash ?? "").slice(0, 12)}…); credential challenge sent`,
      );
    else if (ev === "enroll.tpm.finish") {
      this.auditAttested.add(dev);
      this.ui.event("registrar", `credential activated + TPM2_Certify checked → certificate for ${dev}`);
    } else if (ev === "enroll.pkcs11")
      this.ui.event("registrar", `bootstrap token accepted and consumed → certificate for ${dev}`);
    else if (ev.length > 0) this.ui.event("registrar", `${ev}${dev === "" ? "" : ` (${dev})`}`);
  }

  /** Surfaces the registrar's key events from its JSON log lines. */
  registrarEvent(line: string): void {
    const rec = jsonLine(line);
    if (rec === undefined) return;
    const msg = String(rec.msg ?? "");
    if (rec.level === "error") this.ui.event("registrar", `error: ${msg} ${String(rec.code ?? "")}`);
  }

  // ── 4. broker ──
  async startBroker(): Promise<void> {
    const { ui } = this;
    ui.section("Local MQTT broker (mosquitto)");
    this.guard();
    this.broker = await startMosquitto({ persistence: true, clientCaFile: this.registrarCa });
    ui.ok(`mosquitto: mTLS on ${this.broker.mtlsUrl} (client certificates must chain to the fleet CA,`);
    ui.info("  username = certificate CN = device id; ACL `pattern readwrite devices/%u/#`)");
    // The observer: a persistent QoS 1 session on the loopback listener, so nothing published while
    // it reconnects after the outage is missed.
    this.subscriber = await mqtt.connectAsync(this.broker.plainUrl, {
      protocolVersion: 5,
      clean: false,
      clientId: "m2m-demo-observer",
      properties: { sessionExpiryInterval: 600 },
      reconnectPeriod: 250,
      connectTimeout: 5_000,
    });
    this.subscriber.on("error", () => undefined);
    this.subscriber.on("message", (_topic, _payload, packet) => {
      const up = packet.properties?.userProperties?.["m2m-id"];
      const id = Array.isArray(up) ? up[0] : up;
      if (id !== undefined) this.mqttSeen.set(id, (this.mqttSeen.get(id) ?? 0) + 1);
    });
    await this.subscriber.subscribeAsync("devices/#", { qos: 1 });
    ui.ok("observer subscribed to devices/# (counts what really arrives)");
    this.snapshotProcs();
  }

  // ── 5/6. agents ──
  async writeAgentConfig(d: Device): Promise<void> {
    const wd = this.workdir as string; // set by hardware()
    const base = join(wd, d.name);
    await mkdir(join(base, "state"), { recursive: true, mode: 0o700 });
    const url = this.registrarUrl as string; // set by startRegistrar()
    const lines = [
      `# ${d.label}: written by the demo`,
      "[agent]",
      `state_dir = ${toml(join(base, "state"))}`,
      `runtime_dir = ${toml(base)}`,
      'log_level = "info"',
      "drain_timeout_ms = 5000",
      "",
    ];
    if (d.kind === "tpm") {
      const tpm = this.swtpm as SwtpmHandle;
      lines.push("[keys]", 'provider = "tpm"', "", "[keys.tpm]", `tcti = ${toml(tpm.tcti)}`);
      if (d.sink === "mqtt") {
        // The tpm2-pkcs11 token's user PIN: a random secret in a 0600 file, never on screen or argv.
        const pinFile = join(base, "tpm-token.pin");
        await writeFile(pinFile, randomBytes(12).toString("hex"), { mode: 0o600 });
        lines.push(`tls_pin_file = ${toml(pinFile)}`);
      }
      lines.push("");
    } else {
      const hsm = this.hsm as SoftHsmHandle;
      lines.push(
        "[keys]",
        'provider = "pkcs11"',
        "",
        "[keys.pkcs11]",
        `module = ${toml(hsm.modulePath)}`,
        `token_label = ${toml(hsm.tokenLabel)}`,
        'key_label = "m2m-device"',
        `pin = { file = ${toml(hsm.pinFile)} }`,
        "",
      );
    }
    lines.push(
      "[enroll]",
      "enabled = true",
      `registrar_url = ${toml(url)}`,
      `registrar_ca_file = ${toml(this.registrarCa)}`,
      `method = ${toml(d.kind)}`,
      `group = ${toml(d.kind === "tpm" ? "tpm-gateways" : "hsm-gateways")}`,
      ...(d.kind === "pkcs11" ? [`bootstrap_token = { file = ${toml(join(wd, "bootstrap-token"))} }`] : []),
      "",
    );
    if (d.sink === "https") {
      lines.push(
        "[relay.https]",
        `url = ${toml(`${url}/v1/ingest`)}`,
        "batch_max = 50",
        "batch_ms = 200",
        "",
      );
    } else {
      const broker = this.broker as Mosquitto;
      lines.push(
        "[relay.mqtt]",
        `urls = [${toml(broker.mtlsUrl)}]`,
        `auth = ${toml(d.kind === "tpm" ? "mtls-tpm" : "mtls-pkcs11")}`,
        `ca_file = ${toml(broker.ca.caCertPath)}`,
        "qos = 1",
        "",
      );
    }
    lines.push("[api]", `socket = ${toml(d.socket)}`, "mode = 0o600", "");
    await writeFile(d.config, lines.join("\n"), { mode: 0o600 });
  }

  async startAgent(d: Device): Promise<boolean> {
    const { ui } = this;
    const wd = this.workdir as string; // set by hardware()
    await this.writeAgentConfig(d);
    ui.info(`agent.toml: keys.provider = "${d.kind}", [enroll] → ${this.registrarUrl}, relay → ${d.sink}`);
    let lastStatus = "";
    d.notify = await bindNotifySocket(join(wd, `${d.name}.notify`), (msg) => {
      for (const l of msg.split("\n")) {
        if (l === "READY=1") ui.event(d.name, "sd_notify READY=1");
        else if (l.startsWith("STATUS=") && l !== lastStatus) {
          lastStatus = l;
          ui.event(d.name, `sd_notify ${l}`);
        }
      }
    });
    const env: NodeJS.ProcessEnv = {
      ...this.env,
      NOTIFY_SOCKET: d.notify.path,
      ...(d.kind === "pkcs11" ? (this.hsm as SoftHsmHandle).env : {}),
    };
    this.guard();
    d.agent = spawnLogged({
      name: d.name,
      file: process.execPath,
      args: [AGENT_CLI, "run", "--config", d.config],
      env,
      logFile: join(wd, `${d.name}.log`),
      onLine: (line) => this.agentEvent(d, line),
    });
    ui.ok(`m2m-agent run --config ${d.config} (pid ${d.agent.pid})`);
    this.snapshotProcs();
    // Wait until it is enrolled and its relay is up (or it gives up).
    const deadline = Date.now() + 60_000;
    let st: AgentStatus | undefined;
    while (Date.now() < deadline && d.agent.running) {
      st = await fetchStatus(d.socket, 2_000).catch(() => undefined);
      if (st?.enrolment.enrolled === true && st.stages.relay !== undefined && st.state === "running") break;
      if (st?.state === "degraded" && Object.keys(st.reasons).some((k) => k.startsWith("enrol"))) break;
      await sleep(300);
    }
    this.snapshotProcs();
    if (!d.agent.running) {
      this.fail(`${d.name}: m2m-agent exited (${await d.agent.exited}); see ${d.agent.logFile}`);
      return false;
    }
    if (st === undefined) {
      this.fail(`${d.name}: the agent's local API never answered (${d.socket})`);
      return false;
    }
    if (!st.enrolment.enrolled) {
      this.fail(`${d.name}: not enrolled: ${Object.values(st.reasons).join("; ") || st.status}`);
      return false;
    }
    d.enrolled = true;
    d.deviceId = st.enrolment.deviceId;
    d.certNotAfter = st.enrolment.certificateNotAfter;
    const certLeft =
      d.certNotAfter === undefined ? "" : ` (valid ${fmtDuration(Date.parse(d.certNotAfter) - Date.now())})`;
    ui.ok(
      `enrolled as ${ui.c.bold(d.deviceId ?? "?")}: certificate until ${d.certNotAfter ?? "?"}${certLeft}`,
    );
    await this.showAttestation(d);
    await this.showToken(d, st);
    if (st.stages.relay === undefined) {
      this.notAvailable.push(`${d.name}: relay stage not running (${JSON.stringify(st.reasons)})`);
      this.fail(`${d.name}: relay: not available in this build (${Object.values(st.reasons).join("; ")})`);
      return false;
    }
    ui.ok(`relay up: outbox ${this.outbox(st)?.path ?? "?"}, sink ${d.sink}`);
    return true;
  }

  /** The registrar's own record of the device: how it was verified. */
  async showAttestation(d: Device): Promise<void> {
    if (d.deviceId === undefined) return;
    try {
      const rec = (await this.registrarCli([
        "devices",
        "show",
        d.deviceId,
        "--config",
        this.registrarConfig,
      ])) as {
        method: string;
        status: string;
        ekHash?: string;
        evidence?: unknown;
        group: string;
        role: string;
      };
      if (d.kind === "tpm") {
        // Only a registered TPM device with an EK hash went through credential activation + certify.
        // The registrar audits before it answers; give the audit tail a moment to read that line.
        for (let i = 0; i < 30 && !this.auditAttested.has(d.deviceId); i++) await sleep(100);
        const verified =
          rec.method === "tpm" &&
          rec.status === "active" &&
          typeof rec.ekHash === "string" &&
          this.auditAttested.has(d.deviceId);
        d.attested = verified;
        if (verified) {
          this.attestation = {
            verified: true,
            deviceId: d.deviceId,
            detail: `EK ${rec.ekHash?.slice(0, 16)}…, group ${rec.group}, role ${rec.role}`,
          };
          const ev = rec.evidence as { akName?: string; objectAttributes?: number } | undefined;
          this.ui.ok(
            `${this.ui.c.green("attestation verified")} by the registrar: device key ${tpmAttrs(ev?.objectAttributes)}, certified by AK ${String(ev?.akName ?? "").slice(0, 12)}…`,
          );
        } else {
          this.fail(
            `${d.name}: registrar record does not show a TPM attestation (${rec.method}/${rec.status})`,
          );
        }
      } else {
        d.attested = rec.method === "pkcs11" && rec.status === "active";
        this.ui.ok(
          `registrar accepted the bootstrap token (one-time): device ${rec.status}, group ${rec.group}`,
        );
      }
    } catch (err) {
      this.fail(`${d.name}: cannot read the registrar's device record: ${(err as Error).message}`);
    }
  }

  async showToken(d: Device, first: AgentStatus): Promise<void> {
    let st = first;
    const deadline = Date.now() + 15_000;
    const tokenOf = (s: AgentStatus) =>
      (
        s.stages.credentials as {
          token?: { type: string; scope: string; expiresAt: string } | null;
          dpop?: boolean;
        }
      )?.token ?? undefined;
    while (tokenOf(st) === undefined && Date.now() < deadline) {
      await sleep(300);
      st = (await fetchStatus(d.socket, 2_000).catch(() => undefined)) ?? st;
    }
    const cred = st.stages.credentials as { dpop?: boolean } | undefined;
    const t = tokenOf(st);
    if (cred === undefined) {
      this.notAvailable.push(`${d.name}: credentials stage not running`);
      this.ui.warn(`${d.name}: credentials: not available in this build`);
      return;
    }
    if (t === undefined) {
      this.ui.warn(`${d.name}: no access token yet (${JSON.stringify(st.reasons)})`);
      return;
    }
    d.tokenExpiresAt = t.expiresAt;
    d.tokenScope = t.scope;
    d.tokenLifetimeS = Math.round((Date.parse(t.expiresAt) - Date.now()) / 1000);
    d.dpop = t.type.toLowerCase() === "dpop";
    this.ui.ok(
      `access token (private_key_jwt signed in the ${d.kind === "tpm" ? "TPM" : "token"}): ${t.type}${d.dpop ? "-bound" : ""}, scopes "${t.scope}", lifetime ${fmtDuration(Date.parse(t.expiresAt) - Date.now())}`,
    );
  }

  /** Agent JSON log lines → the few events worth showing. */
  agentEvent(d: Device, line: string): void {
    const rec = jsonLine(line);
    if (rec === undefined) return;
    const msg = String(rec.msg ?? "");
    if (msg === "enrolment step" && rec.status === "done") {
      this.ui.event(
        d.name,
        `enrol: ${String(rec.step)}${rec.detail === undefined ? "" : ` — ${String(rec.detail)}`}`,
      );
    } else if (msg === "device enrolled") {
      this.ui.event(d.name, `enrolled (${String(rec.deviceId ?? "")}, role ${String(rec.role ?? "?")})`);
    } else if (msg === "device key open") {
      this.ui.event(d.name, `device key ${String(rec.ref ?? "")}`);
    } else if (rec.level === "error") {
      this.ui.event(d.name, `error: ${msg}${rec.code === undefined ? "" : ` (${String(rec.code)})`}`);
    } else if (rec.level === "warn" && this.#showWarn(d.name, msg)) {
      this.ui.event(d.name, `warn: ${msg}${rec.code === undefined ? "" : ` (${String(rec.code)})`}`);
    }
  }

  readonly #warned = new Map<string, number>();
  #showWarn(who: string, msg: string): boolean {
    // The same warning repeats on every retry during an outage: show it once per 10 s.
    const k = `${who}:${msg}`;
    const last = this.#warned.get(k) ?? 0;
    if (Date.now() - last < 10_000) return false;
    this.#warned.set(k, Date.now());
    return true;
  }

  outbox(st: AgentStatus | undefined): { path?: string; depth: number } | undefined {
    const r = st?.stages.relay as { outbox?: { path?: string; depth: number } | null } | undefined;
    return r?.outbox ?? undefined;
  }

  // ── readings ──
  reading = 0;
  async sendReading(d: Device): Promise<void> {
    const n = ++this.reading;
    const payload = {
      n,
      sensor: d.kind === "tpm" ? "boiler-temp" : "pump-pressure",
      value:
        d.kind === "tpm" ? +(60 + 5 * Math.sin(n / 3)).toFixed(2) : +(2 + Math.cos(n / 4) / 3).toFixed(3),
      unit: d.kind === "tpm" ? "°C" : "bar",
      ts: new Date().toISOString(),
    };
    d.sent++;
    if (d.sent === 1) this.ui.event(d.name, `reading e.g. ${JSON.stringify(payload)}`);
    try {
      const ids = await sendMessage({
        socketPath: d.socket,
        channel: d.kind === "tpm" ? "sensors/temperature" : "sensors/pressure",
        data: Buffer.from(JSON.stringify(payload)),
        timeoutMs: 10_000,
      });
      d.acked.push(...ids);
    } catch (err) {
      d.sendErrors++;
      this.ui.warn(`${d.name}: reading ${n} refused: ${(err as Error).message}`);
    }
  }

  /** Ids the upstream really has: the broker observer for MQTT, the registrar's ingest log for HTTPS. */
  async delivered(d: Device): Promise<Map<string, number>> {
    if (d.sink === "mqtt") return this.mqttSeen;
    const out = new Map<string, number>();
    const file = join(this.workdir as string, "registrar", "data", "ingest.ndjson");
    const text = await readFile(file, "utf8").catch(() => "");
    for (const l of text.split("\n")) {
      if (l.length === 0) continue;
      try {
        const id = (JSON.parse(l) as { id?: string }).id;
        if (id !== undefined) out.set(id, (out.get(id) ?? 0) + 1);
      } catch {
        // a torn last line while the registrar writes: counted next time
      }
    }
    return out;
  }

  async missing(d: Device): Promise<number> {
    const seen = await this.delivered(d);
    return d.acked.filter((id) => !seen.has(id)).length;
  }

  async waitDelivered(devices: readonly Device[], timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let left = 0;
      for (const d of devices) left += await this.missing(d);
      if (left === 0) return true;
      if (Date.now() > deadline) return false;
      await sleep(200);
    }
  }

  async readingsPhase(devices: readonly Device[]): Promise<void> {
    const { ui } = this;
    const n = this.o.quick ? 6 : 30;
    ui.section(`Sensor readings through the agents' local API (POST /v1/messages on the Unix socket)`);
    for (let i = 0; i < n; i++) {
      await Promise.all(devices.map((d) => this.sendReading(d)));
      if ((i + 1) % (this.o.quick ? 3 : 5) === 0) {
        const parts: string[] = [];
        for (const d of devices) {
          const seen = await this.delivered(d);
          parts.push(
            `${d.name} acked ${d.acked.length}, upstream ${d.acked.filter((id) => seen.has(id)).length}`,
          );
        }
        ui.event("readings", parts.join(" · "));
      }
      await sleep(this.o.quick ? 100 : 400);
    }
    const ok = await this.waitDelivered(devices, 30_000);
    for (const d of devices) {
      const miss = await this.missing(d);
      const where =
        d.sink === "mqtt" ? "subscribed on the broker" : "received by the registrar's ingest endpoint";
      if (miss === 0) ui.ok(`${d.name}: ${d.acked.length} readings acknowledged, all ${where}`);
      else ui.warn(`${d.name}: ${miss} of ${d.acked.length} not (yet) ${where}`);
    }
    if (!ok) this.fail("readings were not all relayed within 30 s");
    await this.showBrokerIdentities(devices);
  }

  /** The broker's own log says which identity each mTLS client had (username = certificate CN). */
  async showBrokerIdentities(devices: readonly Device[]): Promise<void> {
    const broker = this.broker;
    if (broker === undefined) return;
    const log = await readFile(join(broker.dir, "mosquitto.log"), "utf8").catch(() => "");
    for (const d of devices) {
      if (d.sink !== "mqtt" || d.deviceId === undefined) continue;
      if (log.includes(`u'${d.deviceId}'`))
        this.ui.ok(
          `mosquitto authenticated ${d.name} as "${d.deviceId}" from its fleet certificate (TLS key used inside the token via the OpenSSL PKCS#11 engine)`,
        );
      else this.ui.info(`mosquitto log does not name ${d.deviceId} (log level?)`);
    }
  }

  /** What an operator would type: `m2m-agent status --json --config …` against the running daemon. */
  async showCliStatus(d: Device | undefined): Promise<void> {
    if (d === undefined) return;
    const r = await execa(process.execPath, [AGENT_CLI, "status", "--json", "--config", d.config], {
      env: this.env,
      extendEnv: false,
      timeout: 20_000,
      killSignal: "SIGKILL",
      stdin: "ignore",
      reject: false,
    });
    try {
      const st = JSON.parse(String(r.stdout)) as AgentStatus;
      const ob = this.outbox(st);
      const reasons = Object.entries(st.reasons)
        .map(([k, v]) => `${k}: ${v}`)
        .join("; ");
      this.ui.event(
        "status",
        `m2m-agent status --json (${d.name}): state ${st.state}, outbox depth ${ob?.depth ?? "?"}${reasons === "" ? "" : `, ${reasons}`}`,
      );
    } catch {
      this.ui.warn(`m2m-agent status (${d.name}) gave no JSON (exit ${r.exitCode})`);
    }
  }

  // ── 7. outage ──
  async outagePhase(devices: readonly Device[]): Promise<void> {
    const { ui } = this;
    const broker = this.broker as Mosquitto;
    const outageMs = this.o.quick ? 4_000 : 10_000;
    const withMqtt = devices.some((d) => d.sink === "mqtt");
    const withHttps = devices.some((d) => d.sink === "https");
    ui.section(
      `Upstream outage: ${[withMqtt ? "mosquitto" : "", withHttps ? "registrar (ingest endpoint)" : ""].filter(Boolean).join(" and ")} stopped for ${outageMs / 1000} s`,
    );
    this.snapshotProcs();
    const before = new Map(devices.map((d) => [d.name, d.acked.length]));
    const t0 = Date.now();
    if (withMqtt) await broker.stop();
    if (withHttps) await this.registrar?.stop();
    ui.warn(
      `upstream down: ${withMqtt ? "broker stopped" : ""}${withMqtt && withHttps ? ", " : ""}${withHttps ? "registrar stopped" : ""}`,
    );
    ui.info("readings keep coming: each is acknowledged once it is in the agent's on-disk outbox");
    while (Date.now() - t0 < outageMs) {
      await Promise.all(devices.map((d) => this.sendReading(d)));
      const parts: string[] = [];
      for (const d of devices) {
        const depth = this.outbox(await fetchStatus(d.socket, 2_000).catch(() => undefined))?.depth;
        if (depth !== undefined) this.outage.maxBacklog = Math.max(this.outage.maxBacklog, depth);
        parts.push(`${d.name} outbox ${depth ?? "?"}`);
      }
      ui.event("outage", parts.join(" · "));
      await sleep(this.o.quick ? 400 : 1_000);
    }
    await this.showCliStatus(devices[devices.length - 1]);
    const during = devices.reduce((a, d) => a + d.acked.length - (before.get(d.name) ?? 0), 0);
    this.outage.durationMs = Date.now() - t0;
    ui.info(`${during} readings acknowledged while upstream was down`);
    const tUp = Date.now();
    this.guard();
    if (withMqtt) await broker.start();
    if (withHttps) await this.serveRegistrar();
    ui.ok(`upstream back after ${(this.outage.durationMs / 1000).toFixed(1)} s: draining the backlog`);
    this.snapshotProcs();
    const deadline = Date.now() + 90_000;
    let lastLine = "";
    let lastShown = 0;
    for (;;) {
      let left = 0;
      const parts: string[] = [];
      for (const d of devices) {
        const miss = await this.missing(d);
        left += miss;
        const depth = this.outbox(await fetchStatus(d.socket, 2_000).catch(() => undefined))?.depth;
        parts.push(`${d.name} outbox ${depth ?? "?"}, ${miss} to go`);
      }
      if (left === 0 || Date.now() > deadline) break;
      const line = parts.join(" · ");
      // Show changes, and a heartbeat every 3 s while a sink waits out its (jittered) backoff.
      if (line !== lastLine || Date.now() - lastShown > 3_000) {
        const waiting = line === lastLine;
        lastLine = line;
        lastShown = Date.now();
        this.ui.event(
          "drain",
          `${line}${waiting ? "  (sink waits out its jittered reconnect backoff)" : ""}`,
        );
      }
      await sleep(200);
    }
    const left = (await Promise.all(devices.map((d) => this.missing(d)))).reduce((a, b) => a + b, 0);
    if (left === 0) {
      this.outage.drainMs = Date.now() - tUp;
      this.outage.survived = true;
      ui.ok(
        `backlog drained in ${(this.outage.drainMs / 1000).toFixed(1)} s: every acknowledged reading arrived (ids compared)`,
      );
    } else {
      this.fail(`${left} acknowledged readings did not arrive within 90 s after the outage`);
    }
  }

  // ── 8. summary ──
  async summary(): Promise<Summary> {
    const devs: Summary["devices"] = [];
    for (const d of this.devices) {
      const seen = await this.delivered(d);
      const delivered = d.acked.filter((id) => seen.has(id)).length;
      const duplicates = d.acked.reduce((a, id) => a + Math.max(0, (seen.get(id) ?? 0) - 1), 0);
      devs.push({
        name: d.name,
        method: d.kind,
        sink: d.sink,
        ...(d.deviceId === undefined ? {} : { deviceId: d.deviceId }),
        ...(d.certNotAfter === undefined ? {} : { certNotAfter: d.certNotAfter }),
        ...(d.tokenExpiresAt === undefined ? {} : { tokenExpiresAt: d.tokenExpiresAt }),
        ...(d.tokenScope === undefined ? {} : { tokenScope: d.tokenScope }),
        ...(d.tokenLifetimeS === undefined ? {} : { tokenLifetimeS: d.tokenLifetimeS }),
        ...(d.dpop === undefined ? {} : { dpop: d.dpop }),
        sent: d.sent,
        acked: d.acked.length,
        delivered,
        lost: d.acked.length - delivered,
        duplicates,
      });
    }
    const sum = (k: "sent" | "acked" | "delivered" | "lost" | "duplicates") =>
      devs.reduce((a, d) => a + d[k], 0);
    const messages = {
      sent: sum("sent"),
      acked: sum("acked"),
      delivered: sum("delivered"),
      lost: sum("lost"),
      duplicates: sum("duplicates"),
    };
    const ok =
      this.failures.length === 0 &&
      this.attestation.verified &&
      messages.delivered > 0 &&
      messages.lost === 0 &&
      this.outage.survived &&
      this.devices.length > 0 &&
      this.devices.every((d) => d.enrolled);
    return {
      ok,
      failures: [...this.failures],
      notAvailable: [...this.notAvailable],
      workdir: this.o.keep ? this.workdir : undefined,
      attestation: this.attestation,
      devices: devs,
      messages,
      outage: this.outage,
      pids: [...this.procs.values()],
      leftover: [],
    };
  }

  printSummary(s: Summary): void {
    const { ui } = this;
    ui.section("Summary");
    const rows: [string, string][] = [
      [
        "attestation",
        s.attestation.verified
          ? `verified (${s.attestation.deviceId ?? ""}; ${s.attestation.detail ?? ""})`
          : "NOT verified",
      ],
    ];
    for (const d of s.devices) {
      rows.push([
        `${d.name}`,
        `${d.method.toUpperCase()} → ${d.sink.toUpperCase()}  device ${d.deviceId ?? "-"}`,
      ]);
      rows.push([
        "  certificate",
        d.certNotAfter === undefined
          ? "-"
          : `notAfter ${d.certNotAfter} (${fmtDuration(Date.parse(d.certNotAfter) - Date.now())} left)`,
      ]);
      rows.push([
        "  token",
        d.tokenExpiresAt === undefined
          ? "-"
          : `${d.dpop === true ? "DPoP-bound" : "bearer"}, scopes "${d.tokenScope ?? ""}", lifetime ${fmtDuration((d.tokenLifetimeS ?? 0) * 1000)} (expires ${d.tokenExpiresAt})`,
      ]);
      rows.push([
        "  messages",
        `sent ${d.sent}, acked ${d.acked}, delivered ${d.delivered}, lost ${d.lost}, duplicates ${d.duplicates}`,
      ]);
    }
    rows.push([
      "messages (all)",
      `sent ${s.messages.sent}, acked ${s.messages.acked}, delivered ${s.messages.delivered}, lost ${s.messages.lost}, duplicates ${s.messages.duplicates}`,
    ]);
    rows.push([
      "outage",
      `${(s.outage.durationMs / 1000).toFixed(1)} s, backlog up to ${s.outage.maxBacklog}, drained in ${s.outage.drainMs === undefined ? "-" : `${(s.outage.drainMs / 1000).toFixed(1)} s`}: ${s.outage.survived ? "survived" : "NOT survived"}`,
    ]);
    rows.push([
      "processes",
      s.leftover.length === 0
        ? `${s.pids.length} started, all stopped (checked by pid)`
        : `${s.leftover.length} of ${s.pids.length} STILL RUNNING: ${s.leftover.map((p) => p.pid).join(", ")}`,
    ]);
    if (s.workdir !== undefined) rows.push(["work dir", `${s.workdir} (configs, logs, databases)`]);
    ui.table(rows);
    for (const n of s.notAvailable) ui.warn(`not available in this build: ${n}`);
    if (s.workdir !== undefined) {
      ui.info(
        `logs: ${join(s.workdir, "*.log")}; registrar audit: ${join(s.workdir, "registrar", "data", "audit.log")}`,
      );
      ui.info(
        `try: node ${REGISTRAR_CLI} devices list --config ${join(s.workdir, "registrar", "registrar.toml")}`,
      );
    }
    if (s.ok) ui.ok(ui.c.bold("demo succeeded"));
    else ui.fail(`demo FAILED${s.failures.length > 0 ? `: ${s.failures.join("; ")}` : ""}`);
  }

  // ── cleanup ──
  cleanup(): Promise<void> {
    this.closing = true;
    this.#cleanup ??= this.#doCleanup();
    return this.#cleanup;
  }

  async #doCleanup(): Promise<void> {
    const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        this.ui.warn(`cleanup ${what}: ${(err as Error).message}`);
      }
    };
    this.stopAuditTail();
    this.snapshotProcs();
    // Agents first (SIGTERM: they drain and close their outboxes), then what they talk to.
    await Promise.all(this.devices.map((d) => step(d.name, async () => d.agent?.stop(15_000))));
    for (const d of this.devices) d.notify?.close();
    await step("observer", async () => this.subscriber?.endAsync(true));
    await step("registrar", async () => this.registrar?.stop(10_000));
    await step("mosquitto", async () => this.broker?.cleanup());
    // tpm2_shutdown before the stop keeps the DA counter from growing.
    await step("swtpm", async () => this.swtpm?.stop());
    await step("softhsm", async () => this.hsm?.cleanup());
    killStragglers();
    if (this.workdir !== undefined && !this.o.keep)
      await step("work dir", () => rm(this.workdir as string, { recursive: true, force: true }));
  }

  async run(): Promise<Summary> {
    if (!this.checkTools()) {
      this.failures.push("required tools missing");
      return this.summary();
    }
    await this.hardware();
    await this.startRegistrar();
    await this.startBroker();
    const wd = this.workdir as string; // set by hardware()
    const mk = (name: string, label: string, kind: "tpm" | "pkcs11", sink: "https" | "mqtt"): Device => ({
      name,
      label,
      kind,
      sink,
      config: join(wd, name, "agent.toml"),
      socket: join(wd, name, "api.sock"),
      enrolled: false,
      attested: false,
      sent: 0,
      acked: [],
      sendErrors: 0,
    });
    const gw1 = mk("gw1-tpm", "Gateway 1: TPM 2.0 (swtpm)", "tpm", this.o.tpmMqtt ? "mqtt" : "https");
    const gw2 = mk("gw2-hsm", "Gateway 2: PKCS#11 token (SoftHSM2)", "pkcs11", "mqtt");
    this.devices.push(gw1, gw2);
    this.ui.section(
      this.o.tpmMqtt
        ? `${gw1.label}: attested enrolment, MQTT mTLS with the attested TPM key`
        : `${gw1.label}: attested enrolment, DPoP token, HTTPS ingest`,
    );
    const up: Device[] = [];
    if (await this.startAgent(gw1)) up.push(gw1);
    this.ui.section(`${gw2.label}: bootstrap-token enrolment, MQTT mTLS with the key in the token`);
    if (await this.startAgent(gw2)) up.push(gw2);
    if (up.length === 0) return this.summary();
    await this.readingsPhase(up);
    await this.outagePhase(up);
    this.snapshotProcs();
    return this.summary();
  }
}

export async function main(argv: readonly string[]): Promise<number> {
  let opts: Options | "help";
  try {
    opts = parseArgs(argv);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 2;
  }
  if (opts === "help") {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  const demo = new Demo(opts);
  demo.ui.section("m2m-agent demo: hardware-backed identity, attestation, credentials and relay");
  demo.ui.info("cast: a simulated TPM (swtpm) and a PKCS#11 token (SoftHSM2), the reference registrar,");
  demo.ui.info("      a local mosquitto broker, and two gateways running `m2m-agent run` (logs go to files)");
  let interrupted = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interrupted) return;
    interrupted = true;
    demo.ui.warn(`${sig}: stopping everything the demo started…`);
    void demo.cleanup().finally(() => {
      // Synchronous from here to exit: a step still running in main cannot start anything new.
      killStragglers();
      process.exit(130);
    });
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  let summary: Summary | undefined;
  try {
    summary = await demo.run();
  } catch (err) {
    demo.fail(`unexpected: ${(err as Error).message}`);
    summary = await demo.summary().catch(() => undefined);
  } finally {
    await demo.cleanup();
  }
  if (summary === undefined) return 1;
  // Processes are all stopped now: the summary's pid list is final.
  summary.pids = [...demo.procs.values()];
  summary.leftover = summary.pids.filter(stillRunning);
  if (summary.leftover.length > 0) {
    summary.ok = false;
    summary.failures.push(`${summary.leftover.length} started processes still running`);
  }
  demo.printSummary(summary);
  if (opts.summaryJson !== undefined)
    await writeFile(opts.summaryJson, `${JSON.stringify(summary, null, 2)}\n`);
  return summary.ok ? 0 : 1;
}

if (isMainModule(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
  // Open handles (the MQTT observer's timers) must not keep a finished demo alive.
  setTimeout(() => process.exit(process.exitCode ?? 0), 200).unref();
}
