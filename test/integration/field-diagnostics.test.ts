import type { AgentStatus } from "../../src/wire/v1/local-api.js";
import "reflect-metadata";
import { type JsonWebKey, webcrypto } from "node:crypto";
import { closeSync, fstatSync, openSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer as createHttpServer, type Server as HttpServer, request } from "node:http";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import type { CheckResult } from "../../src/daemon/doctor.js";
import { writeGatewayEnrolment } from "../kit/enrolment-state.js";
import { throwawayDeviceCert } from "../kit/throwaway-cert.js";
import { assertBuilt, CLI, runCli } from "./daemon-cli-kit.js";
import { makeTestPki, startHttps, type TestPki } from "./oauth-fixtures.js";

/**
 * Issue 12 "diagnostics that point the right way", each against the BUILT CLI with SoftHSM2, real
 * TLS servers and real sockets: TLS failures named as such, doctor's TLS handshakes and expiry
 * verdict, size limits, a not-ready agent's API answer, human CLI logs, journald priorities,
 * `status --wait-drain`.
 */
let dir: string;
let stateDir: string;
let hsm: SoftHsmHandle;
let good: TestPki;
let other: TestPki;
let tls: Awaited<ReturnType<typeof startHttps>>;
let closedPort: number;
let env: NodeJS.ProcessEnv;
let thumbprint: string;
let spkiPem: string;

const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

async function freePort(): Promise<number> {
  const s: Server = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const a = s.address();
  const port = typeof a === "object" && a !== null ? a.port : 0;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

function config(extra: string, o: { registrarCa?: string; socket?: string } = {}): string {
  return `[agent]
state_dir = "${stateDir}"
${softHsmKeysToml(hsm).join("\n")}
[enroll]
registrar_url = "${tls.origin}"
${o.registrarCa === undefined ? "" : `registrar_ca_file = "${o.registrarCa}"`}
[api]
socket = "${o.socket ?? join(dir, "api.sock")}"
${extra}`;
}

async function writeConfig(name: string, text: string): Promise<string> {
  const p = join(dir, name);
  await writeFile(p, text);
  return p;
}

async function doctor(cfg: string): Promise<Map<string, CheckResult>> {
  const r = await runCli(["--config", cfg, "--json", "doctor", "--timeout", "3000"], env);
  const out = JSON.parse(r.stdout) as { checks: CheckResult[] };
  return new Map(out.checks.map((c) => [c.name, c]));
}

/** A certificate for the device key from a throwaway CA, valid from `ageDays` ago for `days`. */
function certFor(ageDays: number, days: number): Promise<string> {
  const nb = Date.now() - ageDays * 86_400_000;
  return throwawayDeviceCert(spkiPem, {
    serialNumber: "0a0b",
    issuer: "CN=fleet",
    notBefore: new Date(nb),
    notAfter: new Date(nb + days * 86_400_000),
  });
}

function enrol(certificatePem: string): Promise<void> {
  return writeGatewayEnrolment(stateDir, {
    certificatePem,
    caChainPem: [good.caPem],
    keyThumbprint: thumbprint,
    registrarUrl: tls.origin,
    endpoints: {
      registrar: tls.origin,
      token: `${tls.origin}/oauth2/token`,
      est: `${tls.origin}/.well-known/est`,
    },
  });
}

beforeAll(async () => {
  assertBuilt();
  dir = await mkdtemp(join(tmpdir(), "m2m-field-diag-"));
  stateDir = join(dir, "state");
  await mkdir(stateDir, { mode: 0o700 });
  hsm = await initSoftHsm({ label: "m2m-field-diag" });
  [good, other] = await Promise.all([makeTestPki(), makeTestPki()]);
  tls = await startHttps(good, (_req, res) => res.writeHead(404).end());
  closedPort = await freePort();
  env = { PATH: process.env.PATH, HOME: dir, ...hsm.env };
  const cfg = await writeConfig("base.toml", config(""));
  const init = JSON.parse((await runCli(["--config", cfg, "--json", "keys", "init"], env)).stdout) as {
    thumbprint: string;
  };
  thumbprint = init.thumbprint;
  const show = await runCli(["--config", cfg, "--json", "keys", "show"], env);
  const jwk = (JSON.parse(show.stdout) as { publicJwk: JsonWebKey }).publicJwk;
  const key = await webcrypto.subtle.importKey("jwk", jwk, alg, true, ["verify"]);
  spkiPem = `-----BEGIN PUBLIC KEY-----\n${Buffer.from(await webcrypto.subtle.exportKey("spki", key)).toString("base64")}\n-----END PUBLIC KEY-----`;
}, 120_000);

afterAll(async () => {
  await tls?.close();
  await hsm?.cleanup();
  await good?.cleanup();
  await other?.cleanup();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("TLS failures are named as such", () => {
  it("doctor: a TLS handshake with the configured trust; a registrar cert from another CA is 'not trusted', naming issuer and CA file", async () => {
    const okCfg = await writeConfig("tls-ok.toml", config("", { registrarCa: good.caCertFile }));
    const okChecks = await doctor(okCfg);
    expect(okChecks.get("registrar-reachable")).toMatchObject({ status: "ok" });
    expect(okChecks.get("registrar-reachable")?.detail).toMatch(
      /TLS ok: "localhost" issued by "m2m test CA"/,
    );

    const badCfg = await writeConfig("tls-bad.toml", config("", { registrarCa: other.caCertFile }));
    const bad = (await doctor(badCfg)).get("registrar-reachable");
    expect(bad?.status).toBe("fail");
    expect(bad?.detail).toContain("TLS verification failed");
    expect(bad?.detail).toContain(`enroll.registrar_ca_file`);
    expect(bad?.detail).toContain(other.caCertFile);
    expect(bad?.detail).not.toMatch(/ECONNREFUSED|unreachable/);
    expect(bad?.hint).toContain("enroll.registrar_ca_file");
  });

  it("doctor: a closed port is still 'unreachable' (TCP), not a TLS problem", async () => {
    const cfg = await writeConfig(
      "closed.toml",
      config("").replace(
        `registrar_url = "${tls.origin}"`,
        `registrar_url = "https://127.0.0.1:${closedPort}"`,
      ),
    );
    const r = (await doctor(cfg)).get("registrar-reachable");
    expect(r).toMatchObject({ status: "fail", detail: `127.0.0.1:${closedPort}: ECONNREFUSED` });
  });

  it("token: an authorization server whose cert the configured credentials.oauth.ca_file does not trust -> ERR_TLS_VERIFY, not 'unreachable'", async () => {
    const cfg = await writeConfig(
      "oauth-bad-ca.toml",
      config(`[credentials.oauth]
issuer = "${tls.origin}"
client_id = "dev-1"
ca_file = "${other.caCertFile}"
`),
    );
    const r = await runCli(["--config", cfg, "token", "--direct"], env);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("code: ERR_TLS_VERIFY");
    expect(r.stderr).toContain("TLS verification of 127.0.0.1:");
    expect(r.stderr).toContain(`credentials.oauth.ca_file ${other.caCertFile}`);
    expect(r.stderr).not.toContain("unreachable");
  });

  it("config: an http:// issuer is refused at load, naming the key", async () => {
    const cfg = await writeConfig(
      "oauth-http.toml",
      config(`[credentials.oauth]
issuer = "http://127.0.0.1:9"
client_id = "dev-1"
`),
    );
    const r = await runCli(["--config", cfg, "config", "check"], env);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("credentials.oauth.issuer");
    expect(r.stderr).toContain("https://");
  });
});

describe("doctor's certificate expiry is relative to the lifetime and the renewal point", () => {
  it("a fresh 7-day certificate is ok (renewal due later); one past its renewal point warns that renewal failed", async () => {
    const cfg = await writeConfig("expiry.toml", config("", { registrarCa: good.caCertFile }));
    await enrol(await certFor(0.01, 7));
    const fresh = (await doctor(cfg)).get("certificate-expiry");
    expect(fresh?.status).toBe("ok");
    expect(fresh?.detail).toMatch(/renewal due 20/);

    await enrol(await certFor(6, 7));
    const late = (await doctor(cfg)).get("certificate-expiry");
    expect(late?.status).toBe("warn");
    expect(late?.detail).toMatch(/renewal was due .* and has not happened/);

    await rm(join(stateDir, "enrollment.json"), { force: true });
    await rm(join(stateDir, "enrolment.json"), { force: true });
  });
});

function httpOverSocket(
  socketPath: string,
  method: string,
  path: string,
  body?: Buffer | string,
): Promise<{ status: number; json: { error?: { code: string; message: string } } }> {
  return new Promise((resolve, reject) => {
    const req = request(
      { socketPath, method, path, headers: { "content-type": "application/json" } },
      (res) => {
        let data = "";
        res.on("data", (c: Buffer) => {
          data += c.toString();
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(data || "{}") }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

describe("the built daemon: journald priorities, human/JSON logs, not-ready API, size limits", () => {
  it("runs with JOURNAL_STREAM: <N> prefixes per level; the relay's backoff level never replaces the record's level; send says why it cannot accept", async () => {
    const sock = join(dir, "d.sock");
    const cfg = await writeConfig(
      "daemon.toml",
      `[agent]
state_dir = "${stateDir}"
${softHsmKeysToml(hsm).join("\n")}
[api]
socket = "${sock}"
[relay]
unhealthy_after_s = 0.5
[relay.mqtt]
urls = ["mqtts://127.0.0.1:${closedPort}"]
ca_file = "${good.caCertFile}"
auth = "mtls-pkcs11"
`,
    );
    // The relay needs a device identity: an enrolment for the SoftHSM key, certificate fresh.
    await enrol(await certFor(0.01, 7));
    const errFile = join(dir, "daemon.stderr");
    const fd = openSync(errFile, "w");
    const st = fstatSync(fd);
    const { spawn } = await import("node:child_process");
    const child = spawn(process.execPath, [CLI, "--config", cfg, "run"], {
      env: { ...env, JOURNAL_STREAM: `${st.dev}:${st.ino}` },
      stdio: ["ignore", "ignore", fd],
    });
    closeSync(fd);
    try {
      const until = async (pred: (text: string) => boolean, ms = 30_000): Promise<string> => {
        const end = Date.now() + ms;
        for (;;) {
          const text = readFileSync(errFile, "utf8");
          if (pred(text)) return text;
          if (Date.now() > end) throw new Error(`not seen; stderr:\n${text}`);
          await new Promise((r) => setTimeout(r, 200));
        }
      };
      await until((t) => t.includes("local API listening"));
      // An oversized message: the per-message limit is stated with its number.
      const big = JSON.stringify({ channel: "t", payload: "x".repeat(300 * 1024) });
      // The API answers before the relay stage mounted its route: 503 "starting" until then.
      let tooBig = await httpOverSocket(sock, "POST", "/v1/messages", big);
      for (let i = 0; i < 100 && tooBig.status === 503; i++) {
        await new Promise((r) => setTimeout(r, 200));
        tooBig = await httpOverSocket(sock, "POST", "/v1/messages", big);
      }
      expect(tooBig.status, JSON.stringify(tooBig.json)).toBe(413);
      expect(tooBig.json.error?.message).toContain("per-message limit of 262144 bytes");
      const huge = Buffer.alloc(5 * 1024 * 1024, 0x20);
      const tooMuch = await httpOverSocket(sock, "POST", "/v1/messages", huge).catch(() => undefined);
      if (tooMuch !== undefined)
        expect(tooMuch.json.error?.message).toContain("per-request limit of 4194304 bytes");
      // One message queued: the sink fails, the relay backs off and logs its backoff level.
      const sent = await runCli(["--config", cfg, "send", "-t", "t", '{"c":1}'], env);
      expect(sent.code).toBe(0);
      const text = await until((t) => t.includes("delivery failed; backing off"));
      const lines = text.split("\n").filter((l) => l !== "");
      // Every line carries a syslog priority that matches its level.
      const prio = { debug: 7, info: 6, warn: 4, error: 3 } as const;
      for (const l of lines) {
        const m = /^<(\d)>(\{.*\})$/.exec(l);
        expect(m, l).not.toBeNull();
        const rec = JSON.parse(m?.[2] ?? "{}") as { level: keyof typeof prio };
        expect(Number(m?.[1])).toBe(prio[rec.level]);
      }
      const backoff = lines
        .map((l) => JSON.parse(l.replace(/^<\d>/, "")))
        .find((r) => r.msg === "delivery failed; backing off");
      expect(backoff.level).toBe("info");
      expect(typeof backoff.field_level).toBe("number");
      expect(lines.some((l) => l.startsWith("<4>"))).toBe(true);
    } finally {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
    }
  }, 90_000);

  it("a daemon without its device key (unprovisioned): send -> ERR_AGENT_NOT_READY naming the state, not 'not found'", async () => {
    const sock = join(dir, "u.sock");
    const hsm2 = await initSoftHsm({ label: "m2m-diag-empty" });
    const cfg = await writeConfig(
      "unprov.toml",
      `[agent]
state_dir = "${join(dir, "state-u")}"
${softHsmKeysToml(hsm2).join("\n")}
[api]
socket = "${sock}"
[relay.mqtt]
urls = ["mqtts://127.0.0.1:${closedPort}"]
ca_file = "${good.caCertFile}"
auth = "mtls-pkcs11"
`,
    );
    await mkdir(join(dir, "state-u"), { mode: 0o700 });
    const { startDaemon } = await import("./daemon-cli-kit.js");
    const d = startDaemon(["--config", cfg, "run"], { ...env, ...hsm2.env });
    try {
      await d.waitLog((r) => r.msg === "local API listening");
      await new Promise((r) => setTimeout(r, 500));
      const r = await runCli(["--config", cfg, "send", "-t", "t", '{"c":1}'], { ...env, ...hsm2.env });
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain("ERR_AGENT_NOT_READY");
      expect(r.stderr).toContain("unprovisioned");
      expect(r.stderr).not.toContain("not found");
      // Human status: no JSON blobs.
      const s = await runCli(["--config", cfg, "status"], { ...env, ...hsm2.env });
      expect(s.code).toBe(3);
      expect(s.stdout).toContain("state:");
      expect(s.stdout).not.toMatch(/[{[]"/);
    } finally {
      d.kill();
      await d.exited;
      await hsm2.cleanup();
    }
  }, 60_000);

  it("CLI errors on stderr are human text, never JSON log lines", async () => {
    // keys show against a token without the key logs nothing; a wrong PIN file path makes an error:
    // the error report is human text either way, never a JSON log line.
    const cfg = await writeConfig("nokey.toml", config("").replace(hsm.pinFile, join(dir, "missing.pin")));
    const human = await runCli(["--config", cfg, "keys", "show"], env);
    expect(human.code).not.toBe(0);
    expect(human.stderr).toMatch(/^m2m-agent: /m);
    expect(human.stderr.split("\n").some((l) => l.startsWith("{"))).toBe(false);
  });
});

describe("status --wait-drain", () => {
  it("exits 0 once the backlog drained, even when the agent is not 'running'", async () => {
    const sock = join(dir, "drain.sock");
    let depth = 3;
    const server: HttpServer = createHttpServer((_req, res) => {
      depth = Math.max(0, depth - 1);
      res.writeHead(200, { "content-type": "application/json" });
      // Typed as the wire type, so the fake cannot drift from what the CLI validates.
      const body: AgentStatus = {
        state: "degraded",
        status: "degraded: sink mqtt recovering",
        since: new Date().toISOString(),
        pid: 1,
        uptimeS: 1,
        version: "x",
        enrolment: { enrolled: false },
        clock: {
          trusted: true,
          now: new Date().toISOString(),
          floor: "2026-01-01T00:00:00.000Z",
          floorSource: "build",
        },
        reasons: {},
        anomalies: [],
        stages: {
          relay: { outbox: { depth, bytes: depth * 10 }, sinks: [{ name: "mqtt", lastError: null }] },
        },
      };
      res.end(JSON.stringify(body));
    });
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const cfg = await writeConfig("drain.toml", config("", { socket: sock }));
      const r = await runCli(["--config", cfg, "status", "--wait-drain", "--timeout", "20"], env);
      expect(r.code).toBe(0);
      expect(r.stdout).toContain("state:      degraded");
      expect(r.stdout).toContain("depth: 0");
      expect(r.stdout).not.toMatch(/[{[]"/);
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});
