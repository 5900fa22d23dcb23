import { createPublicKey, X509Certificate } from "node:crypto";
import { readFile, stat, statfs } from "node:fs/promises";
import { connect, isIP } from "node:net";
import { dirname } from "node:path";
import { checkServerIdentity, connect as tlsConnect } from "node:tls";
import { type AgentConfig, loadConfig, outboxPath, type SecretRef } from "../config/index.js";
import { type Clock, systemClock } from "../core/clock.js";
import { asM2mError, isM2mError } from "../core/errors.js";
import { silentLogger } from "../core/log.js";
import type { EnrolmentState } from "../enroll/state.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import { ClockSanity } from "./clock-sanity.js";

/**
 * `m2m-agent doctor`: named checks, each ok / warn / fail / skip with a fix hint (after aziot's
 * `aziotctl check`). Checks never throw; a check that cannot run is reported, not fatal.
 */
export type CheckStatus = "ok" | "warn" | "fail" | "skip";

export interface CheckResult {
  readonly name: string;
  readonly status: CheckStatus;
  readonly detail: string;
  readonly hint?: string;
}

export interface DoctorOptions {
  readonly configPath?: string;
  readonly explicit?: boolean;
  readonly env?: NodeJS.ProcessEnv;
  readonly clock?: Clock;
  /** TCP connect timeout for reachability checks. */
  readonly connectTimeoutMs?: number;
  /** Test seam. */
  readonly keyProvider?: KeyProvider;
}

const ok = (name: string, detail: string): CheckResult => ({ name, status: "ok", detail });
const warn = (name: string, detail: string, hint: string): CheckResult => ({
  name,
  status: "warn",
  detail,
  hint,
});
const fail = (name: string, detail: string, hint: string): CheckResult => ({
  name,
  status: "fail",
  detail,
  hint,
});
const skip = (name: string, detail: string): CheckResult => ({ name, status: "skip", detail });

/** TCP connect to host:port within the timeout. */
export function tcpReachable(
  host: string,
  port: number,
  timeoutMs: number,
): Promise<{ ok: boolean; detail: string }> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const t = setTimeout(() => {
      s.destroy();
      resolve({ ok: false, detail: `no answer within ${timeoutMs} ms` });
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(t);
      s.destroy();
      resolve({ ok: true, detail: "TCP connect ok" });
    });
    s.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(t);
      resolve({ ok: false, detail: err.code ?? err.message });
    });
  });
}

export interface TlsProbeResult {
  readonly ok: boolean;
  /** The handshake reached the certificate check (false: TCP/DNS/timeout). */
  readonly reached: boolean;
  readonly detail: string;
}

/**
 * A full TLS handshake with `ca` (PEM; system store when undefined) and the host name check, the
 * way the agent itself connects. On a verification failure it says which CA issued the server's
 * certificate and what the agent trusted, so "unreachable" and "untrusted" are never confused.
 */
export function tlsProbe(
  host: string,
  port: number,
  ca: string | undefined,
  trust: string,
  timeoutMs: number,
): Promise<TlsProbeResult> {
  return new Promise((resolve) => {
    // rejectUnauthorized false only to READ the peer certificate for the diagnosis; the verdict is
    // `authorized` + checkServerIdentity below, the same two checks the agent's clients enforce.
    const s = tlsConnect({
      host,
      port,
      ...(ca === undefined ? {} : { ca }),
      ...(isIP(host) === 0 ? { servername: host } : {}),
      rejectUnauthorized: false,
    });
    const t = setTimeout(() => {
      s.destroy();
      resolve({ ok: false, reached: false, detail: `no TLS answer within ${timeoutMs} ms` });
    }, timeoutMs);
    s.once("secureConnect", () => {
      clearTimeout(t);
      const peer = s.getPeerCertificate();
      const issuer = peer?.issuer?.CN ?? peer?.issuer?.O ?? "?";
      const subject = peer?.subject?.CN ?? "?";
      const authErr = s.authorizationError;
      const idErr = peer === undefined ? undefined : checkServerIdentity(host, peer);
      s.destroy();
      if (!s.authorized) {
        const code =
          authErr instanceof Error
            ? ((authErr as NodeJS.ErrnoException).code ?? authErr.message)
            : String(authErr);
        resolve({
          ok: false,
          reached: true,
          detail: `TLS verification failed: certificate "${subject}" issued by "${issuer}" is not trusted by ${trust} (${code})`,
        });
      } else if (idErr !== undefined) {
        resolve({
          ok: false,
          reached: true,
          detail: `TLS verification failed: certificate "${subject}" (issuer "${issuer}") does not name ${host} (${(idErr as NodeJS.ErrnoException).code ?? idErr.message})`,
        });
      } else
        resolve({
          ok: true,
          reached: true,
          detail: `TLS ok: "${subject}" issued by "${issuer}", trusted by ${trust}`,
        });
    });
    s.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(t);
      resolve({ ok: false, reached: false, detail: err.code ?? err.message });
    });
  });
}

/** Connectivity the way the agent connects: a TLS handshake for https/mqtts, TCP for mqtt://. */
async function probe(
  url: string,
  ca: string | undefined,
  trust: string,
  timeoutMs: number,
): Promise<{ ok: boolean; tlsFailed: boolean; where: string; detail: string }> {
  const hp = hostPort(url);
  if (hp === undefined) return { ok: false, tlsFailed: false, where: url, detail: "unparsable URL" };
  const where = `${hp.host}:${hp.port}`;
  if (url.startsWith("mqtt://") || url.startsWith("http://")) {
    const r = await tcpReachable(hp.host, hp.port, timeoutMs);
    return { ...r, tlsFailed: false, where, detail: `${r.detail} (no TLS)` };
  }
  const r = await tlsProbe(hp.host, hp.port, ca, trust, timeoutMs);
  return { ok: r.ok, tlsFailed: r.reached && !r.ok, where, detail: r.detail };
}

function hostPort(url: string): { host: string; port: number } | undefined {
  try {
    const u = new URL(url);
    const defaults: Record<string, number> = { "https:": 443, "http:": 80, "mqtts:": 8883, "mqtt:": 1883 };
    const port = u.port === "" ? defaults[u.protocol] : Number(u.port);
    if (port === undefined) return undefined;
    return { host: u.hostname.replace(/^\[|\]$/g, ""), port };
  } catch {
    return undefined;
  }
}

function secretRefs(c: AgentConfig): { key: string; ref: SecretRef }[] {
  const out: { key: string; ref: SecretRef }[] = [];
  if (c.keys.provider === "pkcs11" && c.keys.pkcs11.pin !== undefined)
    out.push({ key: "keys.pkcs11.pin", ref: c.keys.pkcs11.pin });
  if (c.enroll.bootstrap_token !== undefined)
    out.push({ key: "enroll.bootstrap_token", ref: c.enroll.bootstrap_token });
  return out;
}

async function permissions(c: AgentConfig, env: NodeJS.ProcessEnv): Promise<CheckResult[]> {
  const results: CheckResult[] = [];
  const st = await stat(c.agent.state_dir).catch(() => undefined);
  if (st === undefined) {
    results.push(
      warn(
        "state-dir-permissions",
        `${c.agent.state_dir} does not exist yet`,
        "systemd creates it (StateDirectory=m2m-agent, 0700) on first start; outside systemd: install -d -m 0700 " +
          c.agent.state_dir,
      ),
    );
  } else if ((st.mode & 0o077) !== 0) {
    results.push(
      fail(
        "state-dir-permissions",
        `${c.agent.state_dir} has mode ${(st.mode & 0o777).toString(8)}`,
        `chmod 700 ${c.agent.state_dir}`,
      ),
    );
  } else {
    results.push(ok("state-dir-permissions", `${c.agent.state_dir} mode ${(st.mode & 0o777).toString(8)}`));
  }
  const problems: string[] = [];
  const fine: string[] = [];
  for (const { key, ref } of secretRefs(c)) {
    if ("file" in ref) {
      const s = await stat(ref.file).catch(() => undefined);
      if (s === undefined) problems.push(`${key}: ${ref.file} missing`);
      else if ((s.mode & 0o077) !== 0)
        problems.push(`${key}: ${ref.file} mode ${(s.mode & 0o777).toString(8)}`);
      else fine.push(`${key}: ${ref.file} ${(s.mode & 0o777).toString(8)}`);
    } else if ("credential" in ref) {
      if (env.CREDENTIALS_DIRECTORY === undefined)
        fine.push(`${key}: systemd credential ${ref.credential} (checked at runtime)`);
      else fine.push(`${key}: systemd credential ${ref.credential}`);
    } else {
      fine.push(`${key}: env ${ref.env}`);
    }
  }
  if (problems.length > 0)
    results.push(
      fail(
        "secret-file-permissions",
        problems.join("; "),
        "create secret files 0600 owned by the agent user (or use LoadCredential=)",
      ),
    );
  else if (fine.length === 0)
    results.push(skip("secret-file-permissions", "no secret references configured"));
  else results.push(ok("secret-file-permissions", fine.join("; ")));
  return results;
}

async function keyChecks(
  c: AgentConfig,
  opts: DoctorOptions,
): Promise<{ results: CheckResult[]; info: KeyInfo | undefined }> {
  const reachName = c.keys.provider === "tpm" ? "tpm-reachable" : "token-reachable";
  let provider: KeyProvider;
  let close: () => Promise<void>;
  try {
    if (opts.keyProvider !== undefined) {
      provider = opts.keyProvider;
      close = () => provider.close();
    } else {
      const { deviceKeyFromConfig } = await import("../keys/from-config.js");
      const owner = await deviceKeyFromConfig(c, {
        log: silentLogger,
        ...(opts.env === undefined ? {} : { env: opts.env }),
      });
      provider = owner.current;
      close = () => owner.close();
    }
  } catch (err) {
    const e = asM2mError(err);
    return {
      results: [
        fail(reachName, `${e.code}: ${e.message}`, e.hint ?? "check the [keys] section"),
        skip("key-present", "backend unavailable"),
      ],
      info: undefined,
    };
  }
  const results: CheckResult[] = [];
  let info: KeyInfo | undefined;
  try {
    const h = await provider.health();
    if (h.ok) results.push(ok(reachName, h.detail));
    // (A locked PKCS#11 PIN reports ERR_PKCS11_PIN, handled below.)
    else if (h.code === "ERR_TPM_LOCKOUT")
      results.push(
        fail(
          reachName,
          `${h.code}: ${h.detail}`,
          "the TPM is in dictionary-attack lockout: wait for the recovery time or clear it with the lockout auth (tpm2_dictionarylockout -c)",
        ),
      );
    else if (h.code === "ERR_KEY_NOT_FOUND") results.push(ok(reachName, "backend answers (no key yet)"));
    else if (h.code === "ERR_PKCS11_PIN")
      results.push(
        fail(
          reachName,
          `${h.code}: ${h.detail}`,
          "the PIN is wrong or locked: verify it manually (pkcs11-tool --login --test) or unblock it with the SO PIN; the agent never retries a PIN",
        ),
      );
    else
      results.push(
        fail(
          reachName,
          `${h.code ?? "?"}: ${h.detail}`,
          c.keys.provider === "tpm"
            ? `check the TCTI (${c.keys.tpm.tcti}), /dev/tpmrm0 permissions (group tss) and DeviceAllow=`
            : "check module path, token label and PIN",
        ),
      );
    const lockout = await tpmLockout(provider);
    if (lockout !== undefined) results.push(lockout);
    try {
      info = await provider.open();
      results.push(ok("key-present", `${info.ref} ${info.algorithm} thumbprint ${info.thumbprint}`));
    } catch (err) {
      const e = asM2mError(err);
      results.push(
        isM2mError(err, "ERR_KEY_NOT_FOUND")
          ? fail(
              "key-present",
              "no device key",
              c.enroll.enabled
                ? "start the agent (enrolment creates it) or run `m2m-agent keys init`"
                : "run `m2m-agent keys init`",
            )
          : fail("key-present", `${e.code}: ${e.message}`, e.hint ?? "see the backend check above"),
      );
    }
  } finally {
    await close().catch(() => undefined);
  }
  return { results, info };
}

/**
 * DA lockout state of a TPM (the device key is noDA, but enrolment's EK/AK operations and anything
 * DA-protected fail until recovery). Undefined for other backends or when unreadable.
 */
async function tpmLockout(provider: KeyProvider): Promise<CheckResult | undefined> {
  const attestation = provider.attestation;
  if (attestation === undefined) return undefined;
  try {
    const l = await attestation.lockout();
    const counter = `DA counter ${l.lockoutCounter ?? "?"}/${l.maxAuthFail ?? "?"}`;
    if (l.inLockout === true)
      return warn(
        "tpm-lockout",
        `TPM in dictionary-attack lockout (${counter}, recovery ${l.lockoutRecoverySeconds ?? "?"} s); the device key is noDA and unaffected`,
        "find what is failing authorization (tpm2 tools with a wrong password, power cuts during DA-protected use); wait for recovery or clear with the lockout auth: tpm2_dictionarylockout -c",
      );
    return ok("tpm-lockout", `not in lockout (${counter})`);
  } catch (err) {
    const e = asM2mError(err);
    return warn("tpm-lockout", `cannot read the DA state: ${e.code}`, "check TPM access (see tpm-reachable)");
  }
}

function certChecks(
  enrolment: EnrolmentState | undefined,
  info: KeyInfo | undefined,
  c: AgentConfig,
  clock: Clock,
): CheckResult[] {
  if (enrolment === undefined) {
    const why = c.enroll.enabled ? "not enrolled yet" : "enrolment not enabled";
    return [skip("key-matches-certificate", why), skip("certificate-expiry", why)];
  }
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(enrolment.certificatePem);
  } catch (err) {
    return [
      fail(
        "key-matches-certificate",
        `certificate unreadable: ${asM2mError(err).message}`,
        "re-enrol (`m2m-agent enroll --force`)",
      ),
      skip("certificate-expiry", "certificate unreadable"),
    ];
  }
  const out: CheckResult[] = [];
  if (info === undefined)
    out.push(
      fail(
        "key-matches-certificate",
        "enrolment state exists but the enrolled device key is missing (re-provisioning required)",
        `the fleet operator runs \`m2m-registrar devices allow-reenrol ${enrolment.deviceId}\`, then stop the agent and run \`m2m-agent enroll --force\` (docs/operations.md)`,
      ),
    );
  else {
    const certSpki = cert.publicKey.export({ format: "der", type: "spki" });
    const keySpki = createPublicKey(info.spkiPem).export({ format: "der", type: "spki" });
    // Security: a certificate for another key means the identity would be presented by the wrong key.
    out.push(
      certSpki.equals(keySpki)
        ? ok("key-matches-certificate", `certificate ${cert.serialNumber} is for ${info.thumbprint}`)
        : fail(
            "key-matches-certificate",
            "the enrolled certificate does not match the device key (re-provisioning required)",
            `the key was replaced or the state directory copied: the fleet operator runs \`m2m-registrar devices allow-reenrol ${enrolment.deviceId}\`, then \`m2m-agent enroll --force\` (docs/operations.md)`,
          ),
    );
  }
  const now = clock.now().getTime();
  const nb = new Date(cert.validFrom).getTime();
  const na = new Date(cert.validTo).getTime();
  const left = na - now;
  const days = (left / 86_400_000).toFixed(1);
  if (left <= 0)
    out.push(
      fail(
        "certificate-expiry",
        `expired ${cert.validTo}`,
        "renewal has failed: check registrar/EST reachability, then re-enrol",
      ),
    );
  else out.push(expiryVerdict(c, enrolment, { now, notBefore: nb, notAfter: na, days }));
  return out;
}

/**
 * Judged against the certificate's own lifetime and the renewal point the agent uses
 * (`credentials.est.renew_fraction`, default 2/3): a fresh 7-day certificate is fine; one past its
 * renewal point by more than a tenth of its lifetime means renewal is failing.
 */
function expiryVerdict(
  c: AgentConfig,
  enrolment: EnrolmentState,
  t: { now: number; notBefore: number; notAfter: number; days: string },
): CheckResult {
  const lifetime = Math.max(1, t.notAfter - t.notBefore);
  const until = new Date(t.notAfter).toISOString();
  // Every enrolment names an EST endpoint (wire schema): an enrolled agent always renews.
  void enrolment;
  const fraction = c.credentials.est?.renew_fraction ?? 2 / 3;
  const renewAt = t.notBefore + fraction * lifetime;
  const renewIso = new Date(renewAt).toISOString();
  if (t.now < renewAt)
    return ok(
      "certificate-expiry",
      `valid for ${t.days} more days (until ${until}); renewal due ${renewIso}`,
    );
  const overdue = t.now - renewAt;
  if (overdue <= 0.1 * lifetime)
    return ok(
      "certificate-expiry",
      `valid for ${t.days} more days (until ${until}); renewal due since ${renewIso}`,
    );
  return warn(
    "certificate-expiry",
    `expires in ${t.days} days (${until}); renewal was due ${renewIso} and has not happened`,
    "renewal is failing: see `m2m-agent status` and the agent's logs (EST reachability, credentials.est.url)",
  );
}

async function reachability(
  c: AgentConfig,
  enrolment: EnrolmentState | undefined,
  timeoutMs: number,
): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  const { registrarCaPem } = await import("../credentials/registrar-ca.js");
  const fleetCa = await registrarCaPem(c, enrolment).catch(() => undefined);
  const fleetTrust =
    c.enroll.registrar_ca_file === undefined && enrolment === undefined
      ? "the system CA store"
      : [
          c.enroll.registrar_ca_file === undefined
            ? undefined
            : `enroll.registrar_ca_file ${c.enroll.registrar_ca_file}`,
          enrolment === undefined ? undefined : "the enrolment's CA chain",
        ]
          .filter((x) => x !== undefined)
          .join(" + ");
  const tlsHint = (key: string): string =>
    `the server's certificate is not trusted or does not name the host: set ${key} to the CA that issued it, or fix the server certificate`;

  const registrar = c.enroll.registrar_url ?? enrolment?.registrarUrl;
  if (registrar === undefined) out.push(skip("registrar-reachable", "no registrar configured"));
  else {
    const r = await probe(registrar, fleetCa, fleetTrust, timeoutMs);
    out.push(
      r.ok
        ? ok("registrar-reachable", `${r.where} ${r.detail}`)
        : r.tlsFailed
          ? fail("registrar-reachable", `${r.where}: ${r.detail}`, tlsHint("enroll.registrar_ca_file"))
          : fail(
              "registrar-reachable",
              `${r.where}: ${r.detail}`,
              "check network, DNS, firewall (IPAddressAllow=) and enroll.registrar_url",
            ),
    );
  }

  const { oauthTarget } = await import("../credentials/oauth/target.js");
  const target = await oauthTarget(c, enrolment).catch(() => undefined);
  const tokenUrl = target?.tokenEndpoint ?? target?.issuer;
  if (target === undefined || tokenUrl === undefined)
    out.push(
      skip("token-endpoint-reachable", "no OAuth client configured (not enrolled, no [credentials.oauth])"),
    );
  else {
    const r = await probe(tokenUrl, target.caPem, target.trust.description, timeoutMs);
    out.push(
      r.ok
        ? ok("token-endpoint-reachable", `${r.where} ${r.detail}`)
        : r.tlsFailed
          ? fail("token-endpoint-reachable", `${r.where}: ${r.detail}`, tlsHint(target.trust.key))
          : fail(
              "token-endpoint-reachable",
              `${r.where}: ${r.detail}`,
              "check network, DNS, firewall and credentials.oauth.issuer / token_endpoint",
            ),
    );
  }

  const brokers = c.relay.mqtt?.urls ?? [];
  if (brokers.length === 0) out.push(skip("broker-reachable", "no MQTT broker configured"));
  else {
    const caFile = c.relay.mqtt?.ca_file;
    const brokerCa = caFile === undefined ? fleetCa : await readFile(caFile, "utf8").catch(() => undefined);
    const brokerTrust = caFile === undefined ? fleetTrust : `relay.mqtt.ca_file ${caFile}`;
    const res = await Promise.all(brokers.map((u) => probe(u, brokerCa, brokerTrust, timeoutMs)));
    const bad = res.filter((r) => !r.ok);
    const line = (r: (typeof res)[number]): string => `${r.where} ${r.detail}`;
    if (bad.length === 0) out.push(ok("broker-reachable", res.map(line).join("; ")));
    else if (bad.some((r) => r.tlsFailed))
      out.push(fail("broker-reachable", res.map(line).join("; "), tlsHint("relay.mqtt.ca_file")));
    else if (bad.length < res.length)
      out.push(
        warn(
          "broker-reachable",
          res.map(line).join("; "),
          "one broker is down; the agent fails over to the others",
        ),
      );
    else
      out.push(
        fail(
          "broker-reachable",
          bad.map(line).join("; "),
          "check broker, network and relay.mqtt.urls; messages wait in the outbox meanwhile",
        ),
      );
  }
  return out;
}

async function diskHeadroom(c: AgentConfig): Promise<CheckResult> {
  const path = outboxPath(c);
  let dir = dirname(path);
  // The outbox may not exist yet: measure the nearest existing parent (same filesystem once created).
  for (let i = 0; i < 20; i++) {
    if ((await stat(dir).catch(() => undefined)) !== undefined) break;
    dir = dirname(dir);
  }
  try {
    const fs = await statfs(dir);
    const free = Number(fs.bavail) * Number(fs.bsize);
    const need = c.relay.outbox.max_bytes;
    const mib = (n: number): string => `${(n / 1048576).toFixed(0)} MiB`;
    if (free < need)
      return fail(
        "outbox-disk-headroom",
        `${mib(free)} free at ${dir}, outbox may grow to ${mib(need)}`,
        "free disk space or lower relay.outbox.max_bytes",
      );
    if (free < 2 * need)
      return warn(
        "outbox-disk-headroom",
        `${mib(free)} free at ${dir}, outbox may grow to ${mib(need)}`,
        "less than 2x the outbox cap is free",
      );
    return ok("outbox-disk-headroom", `${mib(free)} free at ${dir} (outbox cap ${mib(need)})`);
  } catch (err) {
    return fail("outbox-disk-headroom", `statfs ${dir}: ${asM2mError(err).message}`, "check the outbox path");
  }
}

/** Runs every check. */
export async function runDoctor(opts: DoctorOptions = {}): Promise<CheckResult[]> {
  const clock = opts.clock ?? systemClock;
  const env = opts.env ?? process.env;
  const timeoutMs = opts.connectTimeoutMs ?? 3_000;
  let config: AgentConfig;
  try {
    const loaded = await loadConfig({
      ...(opts.configPath === undefined ? {} : { path: opts.configPath }),
      explicit: opts.explicit ?? false,
      env,
    });
    config = loaded.config;
  } catch (err) {
    const e = asM2mError(err);
    return [fail("config-well-formed", e.message, e.hint ?? "fix the configuration")];
  }
  const results: CheckResult[] = [
    ok("config-well-formed", `provider ${config.keys.provider}, state ${config.agent.state_dir}`),
  ];
  results.push(...(await permissions(config, env)));
  const { results: keyResults, info } = await keyChecks(config, opts);
  results.push(...keyResults);
  let enrolment: EnrolmentState | undefined;
  try {
    const { readEnrolmentState } = await import("../enroll/state.js");
    enrolment = await readEnrolmentState(config.agent.state_dir);
  } catch (err) {
    const e = asM2mError(err);
    results.push(fail("enrolment-state", `${e.code}: ${e.message}`, e.hint ?? "re-enrol"));
  }
  results.push(...certChecks(enrolment, info, config, clock));
  results.push(...(await reachability(config, enrolment, timeoutMs)));
  const cs = new ClockSanity({ clock, stateDir: config.agent.state_dir, log: silentLogger });
  await cs.load();
  if (enrolment !== undefined) {
    try {
      cs.setCertificateNotBefore(new Date(new X509Certificate(enrolment.certificatePem).validFrom));
    } catch {
      // reported by the certificate checks
    }
  }
  const v = cs.check();
  results.push(
    v.trusted
      ? ok("clock-plausible", `${v.now} ≥ ${v.floorSource} floor ${v.floor}`)
      : fail(
          "clock-plausible",
          v.reason ?? "untrusted clock",
          "enable time sync (timedatectl set-ntp true) or fix the RTC",
        ),
  );
  results.push(await diskHeadroom(config));
  return results;
}

/** Worst status of a set of results. */
export function overall(results: readonly CheckResult[]): CheckStatus {
  if (results.some((r) => r.status === "fail")) return "fail";
  if (results.some((r) => r.status === "warn")) return "warn";
  return "ok";
}
