import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { boot, type Container, nodejsDeb, prepareRoot, requireTools } from "./container.js";
import { diffHost, type HostSnapshot, snapshotHost } from "./host-guard.js";

/**
 * The packages as a gateway installs them: a fresh Debian 12 root (debootstrap), Node from the
 * NodeSource .deb, `apt-get install ./m2m-agent_*.deb` resolving every dependency from Debian,
 * systemd as PID 1 (systemd-nspawn -b), SoftHSM2 inside and swtpm on the host's loopback, the
 * m2m-registrar package serving enrolment and ingest. Run by `npm run test:system` (which builds the
 * packages first); tools missing → the test fails. The host is left as it was: checked at the end.
 */

const REPO = resolve(import.meta.dirname, "..", "..");
const DEBS = join(REPO, "dist", "deb");
const log = (s: string): void => {
  process.stderr.write(`[system] ${s}\n`);
};
const PIN = "4711-systest";
const SO_PIN = "9911-systest-so";

let work: string;
let root: string;
let host: HostSnapshot | undefined;
let ct: Container | undefined;
let swtpm: SwtpmHandle | undefined;
let version: string;
let upgradeVersion: string;
let registrarPort: number;
const acked: string[] = [];
const figures: Record<string, string> = {};

function c(): Container {
  if (ct === undefined) throw new Error("container not booted");
  return ct;
}

async function teardown(): Promise<void> {
  await ct?.powerOff();
  ct = undefined;
  await swtpm?.stop();
  swtpm = undefined;
  if (work !== undefined) await rm(work, { recursive: true, force: true });
}

/** Polls until fn returns a value (not undefined) or the timeout passes. */
async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function show(unit: string, props: string[]): Promise<Record<string, string>> {
  const out = await c().must(["systemctl", "show", unit, ...props.map((p) => `-p${p}`)]);
  return Object.fromEntries(
    out
      .trim()
      .split("\n")
      .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]),
  );
}

const journal = async (args: string[]): Promise<string> =>
  (await c().run(["journalctl", "--no-pager", "-o", "cat", ...args])).out;

function agentToml(extra: string): string {
  return `# written by test/system/package.test.ts
[agent]
log_level = "info"
drain_timeout_ms = 10000
${extra}
`;
}

beforeAll(async () => {
  await requireTools([
    "debootstrap",
    "systemd-nspawn",
    "nsenter",
    "dpkg-repack",
    "dpkg-deb",
    "chroot",
    "swtpm",
    "tpm2_getcap",
  ]);
  const debs = existsSync(DEBS) ? readdirSync(DEBS) : [];
  const agentDeb = debs.find((f) => /^m2m-agent_.*\.deb$/.test(f));
  if (agentDeb === undefined || !debs.some((f) => f.startsWith("m2m-registrar_")))
    throw new Error(`no packages in ${DEBS}: run \`npm run package\` first (npm run test:system does)`);
  version = (/^m2m-agent_(.+)_[a-z0-9]+\.deb$/.exec(agentDeb)?.[1] ?? "") as string;
  work = await mkdtemp("/var/tmp/m2m-systest-");
  root = join(work, "root");
  mkdirSync(root);
  await prepareRoot(root, log);
  host = snapshotHost(root, createHash("sha256").update(work).digest("hex").slice(0, 8));

  // The packages and Node go into the root's /root/debs; the "newer" agent is the same build with a
  // higher version (dpkg-deb -R, Version bumped, dpkg-deb -b): an upgrade as apt sees it.
  const inbox = join(root, "root", "debs");
  mkdirSync(inbox, { recursive: true });
  for (const f of debs.filter((f) => f.includes(`_${version}_`))) copyFileSync(join(DEBS, f), join(inbox, f));
  copyFileSync(await nodejsDeb(), join(inbox, "nodejs.deb"));
  upgradeVersion = `${version}+systest1`;
  const unpacked = join(work, "upgrade");
  await execa("dpkg-deb", ["-R", join(DEBS, agentDeb), unpacked]);
  const control = join(unpacked, "DEBIAN", "control");
  writeFileSync(
    control,
    readFileSync(control, "utf8").replace(/^Version: .*$/m, `Version: ${upgradeVersion}`),
  );
  await execa("fakeroot", [
    "dpkg-deb",
    "-Zxz",
    "-b",
    unpacked,
    join(inbox, `m2m-agent_${upgradeVersion}.deb`),
  ]);
  await rm(unpacked, { recursive: true });

  swtpm = await startSwtpm();
  registrarPort = await freeLoopbackPort();
  log(`booting ${root}`);
  ct = await boot(root, `m2m-systest-${process.pid}`, join(work, "console.log"));
}, 1_200_000);

afterAll(async () => {
  await teardown();
  if (Object.keys(figures).length > 0) log(`figures: ${JSON.stringify(figures)}`);
}, 120_000);

describe("m2m-agent and m2m-registrar .debs on a fresh Debian 12 under systemd", () => {
  it("apt-get installs both packages and Node, resolving every dependency from Debian", async () => {
    await c().must(["apt-get", "update", "-q"], { timeout: 300_000 });
    const r = await c().run(
      [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "/root/debs/nodejs.deb",
        `/root/debs/m2m-agent_${version}_amd64.deb`,
        `/root/debs/m2m-registrar_${version}_amd64.deb`,
        // Test fixtures, not dependencies: the token and the swtpm TCTI (a gateway has /dev/tpmrm0).
        "softhsm2",
        "libtss2-tcti-swtpm0",
      ],
      { timeout: 600_000 },
    );
    expect(r.code, r.out.slice(-3000) + r.err.slice(-2000)).toBe(0);
    for (const p of ["tpm2-tools", "libengine-pkcs11-openssl", "procps", "tpm-udev", "nodejs"])
      expect(await c().must(["dpkg-query", "-W", "-f=${Status}", p])).toBe("install ok installed");
    // Installed size (without Node), from dpkg's own accounting.
    figures.installedKiB = (await c().must(["dpkg-query", "-W", "-f=${Installed-Size}", "m2m-agent"])).trim();
    figures.debBytes = String(
      readFileSync(join(root, "root", "debs", `m2m-agent_${version}_amd64.deb`)).length,
    );
    expect(Number(figures.installedKiB)).toBeLessThanOrEqual(40 * 1024);
    // sysusers + tmpfiles applied by postinst; the conffile readable by the agent's group only.
    expect(await c().must(["getent", "passwd", "m2m-agent"])).toContain("/var/lib/m2m-agent");
    expect(
      await c().must(["stat", "-c", "%a %U %G", "/etc/m2m-agent/agent.toml", "/etc/m2m-agent/pin"]),
    ).toBe("640 root m2m-agent\n600 root root");
    // Enabled, not started (not configured yet).
    expect((await c().run(["systemctl", "is-enabled", "m2m-agent"])).out.trim()).toBe("enabled");
    expect((await c().run(["systemctl", "is-active", "m2m-agent"])).out.trim()).toBe("inactive");
    expect((await c().run(["systemctl", "is-enabled", "m2m-registrar"])).out.trim()).toBe("enabled");
    expect(await c().must(["m2m-agent", "--version"])).toBe(version);
    for (const f of [
      "/usr/share/man/man8/m2m-agent.8.gz",
      "/usr/share/man/man5/agent.toml.5.gz",
      "/usr/share/man/man8/m2m-registrar.8.gz",
      "/usr/share/bash-completion/completions/m2m-agent",
    ])
      expect(existsSync(join(root, f)), f).toBe(true);
    const verify = await c().run([
      "systemd-analyze",
      "verify",
      "--man=no",
      "m2m-agent.service",
      "m2m-registrar.service",
    ]);
    expect(verify.err.trim()).toBe("");
  });

  it("the shipped (unconfigured) config leaves the service stopped with a clear journal line", async () => {
    await c().run(["systemctl", "start", "m2m-agent"]);
    // ExecCondition= failed: the unit is skipped (inactive, no restart loop), never started.
    expect((await c().run(["systemctl", "is-active", "m2m-agent"])).out.trim()).toBe("inactive");
    expect((await show("m2m-agent", ["ExecMainPID"])).ExecMainPID).toBe("0");
    const errs = await journal(["-u", "m2m-agent", "-p", "err"]);
    expect(errs).toContain(
      'm2m-agent: not configured yet: enroll.registrar_url = "https://registrar.example.com"',
    );
    await c().must(["systemctl", "reset-failed", "m2m-agent"]);
  });

  it("the hardened unit reaches the TPM (swtpm over TCP here; /dev/tpmrm0 on a gateway)", async () => {
    const tpm = swtpm as SwtpmHandle;
    writeFileSync(
      join(root, "etc/m2m-agent/agent.toml"),
      agentToml(`[keys]\nprovider = "tpm"\n\n[keys.tpm]\ntcti = "${tpm.tcti}"\n`),
    );
    await c().must(["runuser", "-u", "m2m-agent", "--", "m2m-agent", "keys", "init"]);
    await c().must(["systemctl", "start", "m2m-agent"]);
    const st = JSON.parse(await c().must(["m2m-agent", "--json", "status"])) as {
      state: string;
      key?: { provider?: string };
    };
    expect(st.state).toBe("running");
    expect(st.key?.provider).toBe("tpm");
    await c().must(["systemctl", "stop", "m2m-agent"]);
  });

  it("registrar package: ca init, enrolment group, token; `systemctl enable --now m2m-registrar` serves", async () => {
    const reg = (args: string[]) =>
      c().must(["runuser", "-u", "m2m-registrar", "--", "m2m-registrar", ...args]);
    await reg(["ca", "init", "--dir", "/var/lib/m2m-registrar/ca"]);
    // The revocation hook docs/revocation.md and registrar.toml name is installed, executable.
    await c().must(["test", "-x", "/usr/share/m2m-registrar/hooks/mosquitto-revoke"]);
    const conf = join(root, "etc/m2m-registrar/registrar.toml");
    writeFileSync(
      conf,
      readFileSync(conf, "utf8")
        .replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
        .replace("port = 8443", `port = ${registrarPort}`),
    );
    const cfg = ["--config", "/etc/m2m-registrar/registrar.toml"];
    await reg(["enrollment", "group", "add", "gateways", "--role", "gateway", "--methods", "pkcs11", ...cfg]);
    const tok = JSON.parse(
      await reg(["--json", "enrollment", "token", "create", "--group", "gateways", "--ttl", "1h", ...cfg]),
    ) as { token: string };
    // Secrets reach the agent as systemd credentials: files only root reads.
    writeFileSync(join(root, "etc/m2m-agent/bootstrap-token"), tok.token);
    writeFileSync(join(root, "etc/m2m-agent/pin"), PIN);
    copyFileSync(join(root, "var/lib/m2m-registrar/ca/ca.pem"), join(root, "etc/m2m-agent/registrar-ca.pem"));
    await c().must(["systemctl", "enable", "--now", "m2m-registrar"]);
    await until("registrar listening", async () =>
      (await c().run(["bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${registrarPort}`])).code === 0
        ? true
        : undefined,
    );
  });

  it("`systemctl enable --now m2m-agent`: READY with the PKCS#11 PIN from LoadCredential=, enrolled; watchdog pings", async () => {
    // SoftHSM2's token store is group softhsm: the operator adds the agent to it.
    await c().must(["usermod", "-aG", "softhsm", "m2m-agent"]);
    await c().must([
      "runuser",
      "-u",
      "m2m-agent",
      "--",
      "softhsm2-util",
      "--init-token",
      "--free",
      "--label",
      "m2m",
      "--pin",
      PIN,
      "--so-pin",
      SO_PIN,
    ]);
    writeFileSync(
      join(root, "etc/m2m-agent/agent.toml"),
      agentToml(`
[keys]
provider = "pkcs11"

[keys.pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "m2m"
pin = { credential = "pkcs11-pin" }

[enroll]
enabled = true
registrar_url = "https://127.0.0.1:${registrarPort}"
registrar_ca_file = "/etc/m2m-agent/registrar-ca.pem"
method = "pkcs11"
group = "gateways"
bootstrap_token = { credential = "bootstrap-token" }

[relay.https]
url = "https://127.0.0.1:${registrarPort}/v1/ingest"
batch_ms = 200
`),
    );
    // A short watchdog so pings are observable within seconds (the shipped unit says 30 s).
    mkdirSync(join(root, "etc/systemd/system/m2m-agent.service.d"), { recursive: true });
    writeFileSync(
      join(root, "etc/systemd/system/m2m-agent.service.d/10-systest.conf"),
      "[Service]\nWatchdogSec=4\n",
    );
    await c().must(["systemctl", "daemon-reload"]);
    const t0 = Date.now();
    const r = await c().run(["systemctl", "enable", "--now", "m2m-agent"], { timeout: 120_000 });
    figures.startToReadyMs = String(Date.now() - t0);
    expect(r.code, `${r.err}\n${await journal(["-u", "m2m-agent", "-n", "40"])}`).toBe(0);
    const s = await show("m2m-agent", [
      "ActiveState",
      "SubState",
      "StatusText",
      "MainPID",
      "WatchdogTimestampMonotonic",
    ]);
    expect(s.ActiveState).toBe("active");
    expect(s.StatusText).toBe("running");
    const st = JSON.parse(await c().must(["m2m-agent", "--json", "status"])) as {
      enrolment: { enrolled: boolean };
      key?: { provider?: string };
    };
    expect(st.enrolment.enrolled).toBe(true);
    expect(st.key?.provider).toBe("pkcs11");
    // Watchdog: systemd records each WATCHDOG=1; it advances while the agent is healthy.
    const w1 = Number(s.WatchdogTimestampMonotonic);
    const w2 = await until(
      "a later watchdog ping",
      async () => {
        const w = Number(
          (await show("m2m-agent", ["WatchdogTimestampMonotonic"])).WatchdogTimestampMonotonic,
        );
        return w > w1 ? w : undefined;
      },
      15_000,
    );
    expect(w2).toBeGreaterThan(w1);
    // Memory under systemd.
    const pid = s.MainPID;
    const rss = /VmRSS:\s+(\d+) kB/.exec(await c().must(["cat", `/proc/${pid}/status`]))?.[1];
    figures.rssUnderSystemdKiB = rss ?? "?";
  });

  it("`systemctl reload` applies a change live; the restart-only one is a warning `journalctl -p warning` shows", async () => {
    const pid = (await show("m2m-agent", ["MainPID"])).MainPID;
    mkdirSync(join(root, "etc/m2m-agent/agent.d"), { recursive: true });
    writeFileSync(
      join(root, "etc/m2m-agent/agent.d/50-systest.toml"),
      '[agent]\nlog_level = "debug"\n\n[relay.outbox]\nmax_count = 5000\n',
    );
    await c().must(["chgrp", "m2m-agent", "/etc/m2m-agent/agent.d/50-systest.toml"]);
    await c().must(["chmod", "0640", "/etc/m2m-agent/agent.d/50-systest.toml"]);
    await c().must(["systemctl", "reload", "m2m-agent"]);
    const reloaded = await until("the reload log line", async () => {
      const j = await journal(["-u", "m2m-agent", "-g", "configuration reloaded"]);
      return j.includes("configuration reloaded") ? j : undefined;
    });
    expect(reloaded).toContain("agent.log_level");
    expect((await show("m2m-agent", ["MainPID"])).MainPID).toBe(pid);
    const warnings = await journal(["-u", "m2m-agent", "-p", "warning"]);
    expect(warnings).toContain('"msg":"restart required for changed keys"');
    expect(warnings).toContain("relay.outbox.max_count");
    // Priorities are real: info lines are not in the warning view.
    expect(warnings).not.toContain('"level":"info"');
  });

  it("upgrade over a running agent restarts it; every message acknowledged before is delivered after", async () => {
    // The registrar (ingest) goes down so acknowledged messages wait in the agent's outbox.
    await c().must(["systemctl", "stop", "m2m-registrar"]);
    for (let i = 0; i < 20; i++) {
      const out = JSON.parse(
        await c().must(["m2m-agent", "--json", "send", "-t", "sensors/systest", JSON.stringify({ seq: i })]),
      ) as { ids: string[] };
      acked.push(...out.ids);
    }
    expect(acked).toHaveLength(20);
    const before = await show("m2m-agent", ["MainPID"]);
    const r = await c().run(
      ["apt-get", "install", "-y", "-q", `/root/debs/m2m-agent_${upgradeVersion}.deb`],
      {
        timeout: 300_000,
      },
    );
    expect(r.code, r.out.slice(-2000) + r.err.slice(-2000)).toBe(0);
    const after = await show("m2m-agent", ["MainPID", "ActiveState"]);
    expect(after.ActiveState).toBe("active");
    expect(after.MainPID).not.toBe(before.MainPID);
    expect(await c().must(["dpkg-query", "-W", "-f=${Version}", "m2m-agent"])).toBe(upgradeVersion);
    await c().must(["systemctl", "start", "m2m-registrar"]);
    const ingest = join(root, "var/lib/m2m-registrar/data/ingest.ndjson");
    const delivered = await until(
      "every acknowledged message at the ingest",
      async () => {
        const ids = new Set(
          (existsSync(ingest) ? readFileSync(ingest, "utf8") : "")
            .split("\n")
            .filter((l) => l.startsWith("{"))
            .map((l) => {
              try {
                return String((JSON.parse(l) as { id?: unknown }).id);
              } catch {
                return "";
              }
            }),
        );
        return acked.every((id) => ids.has(id)) ? ids : undefined;
      },
      90_000,
    );
    expect(acked.filter((id) => !delivered.has(id))).toEqual([]);
  });

  it("`systemctl stop` drains and exits cleanly", async () => {
    await c().must(["systemctl", "stop", "m2m-agent"]);
    const s = await show("m2m-agent", ["ActiveState", "Result", "ExecMainStatus"]);
    expect(s).toMatchObject({ ActiveState: "inactive", Result: "success", ExecMainStatus: "0" });
    const j = await journal(["-u", "m2m-agent", "-g", '"msg":"stopped"']);
    expect(j).toContain('"drained":true');
  });

  it("`systemd-analyze security m2m-agent` exposure is reported and ≤ 2.0", async () => {
    const r = await c().run(["systemd-analyze", "security", "--no-pager", "m2m-agent.service"]);
    const m = /Overall exposure level for m2m-agent\.service: (\d+\.\d)/.exec(r.out);
    expect(m, r.out.slice(-1000)).not.toBeNull();
    figures.exposure = m?.[1] ?? "?";
    expect(Number(m?.[1])).toBeLessThanOrEqual(2.0);
  });

  it("remove keeps config and identity; purge removes config and keeps an enrolled identity (decommission first)", async () => {
    await c().must(["apt-get", "remove", "-y", "-q", "m2m-agent"]);
    expect(existsSync(join(root, "etc/m2m-agent/agent.toml"))).toBe(true);
    expect(existsSync(join(root, "var/lib/m2m-agent/enrolment.json"))).toBe(true);
    const p = await c().run(["apt-get", "purge", "-y", "-q", "m2m-agent"]);
    expect(p.code).toBe(0);
    expect(p.err + p.out).toContain("still holds an enrolled device identity: kept");
    expect(existsSync(join(root, "etc/m2m-agent"))).toBe(false);
    expect(existsSync(join(root, "var/lib/m2m-agent/enrolment.json"))).toBe(true);
  });

  it("powers off and leaves the host exactly as it found it", async () => {
    const snap = host as HostSnapshot;
    await teardown();
    expect(diffHost(snap)).toEqual([]);
  });
});
