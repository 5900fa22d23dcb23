#!/usr/bin/env node
import { join } from "node:path";
import { Command, CommanderError, Option } from "commander";
import { systemClock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import { createLogger } from "../core/log.js";
import { isMainModule } from "../core/main-module.js";
import { agentVersion } from "../core/version.js";
import {
  addEnrolmentGroup,
  allowReenrolment,
  bootstrapTokenId,
  bootstrapTokenState,
  createBootstrapToken,
  revokeBootstrapToken,
  revokeDevice,
} from "../registrar/admin.js";
import { startRegistrarApp } from "../registrar/app.js";
import {
  approveFromDevice,
  attestationReport,
  setAttestationPolicy,
} from "../registrar/attestation/index.js";
import { caPaths, FleetCa, initCa } from "../registrar/ca/index.js";
import { loadRegistrarConfig, parseDurationSeconds, REGISTRAR_DB_FILE } from "../registrar/config.js";
import {
  generateSigningKeyPem,
  loadSigningKeySet,
  signingKeyFromPem,
  writeNewKeyFile,
} from "../registrar/oauth/signing-key.js";
import { CrlPublisher } from "../registrar/revocation/index.js";
import {
  type DeviceRecord,
  migrateRegistrarStore,
  openRegistrarStore,
  type RegistrarStore,
  SqliteRegistrarStore,
} from "../registrar/store/index.js";
import type { EnrolmentMethod } from "../wire/v1/index.js";

/** Where the CLI writes; tests capture it. */
export interface CliIo {
  out(text: string): void;
  err(text: string): void;
  /** Resolves when `serve` should stop (default: SIGINT/SIGTERM). */
  stopSignal?: () => Promise<void>;
}

const defaultIo: CliIo = {
  out: (t) => process.stdout.write(`${t}\n`),
  err: (t) => process.stderr.write(`${t}\n`),
};

interface StoreOpts {
  config?: string;
  dataDir?: string;
}

async function openStore(opts: StoreOpts): Promise<RegistrarStore> {
  if (opts.config !== undefined) {
    const cfg = await loadRegistrarConfig(opts.config);
    return openRegistrarStore(cfg);
  }
  if (opts.dataDir !== undefined) return new SqliteRegistrarStore(join(opts.dataDir, REGISTRAR_DB_FILE));
  throw new M2mError("ERR_USAGE", "permanent", "give --config FILE or --data-dir DIR");
}

async function withStore<T>(opts: StoreOpts, fn: (s: RegistrarStore) => T | Promise<T>): Promise<T> {
  const store = await openStore(opts);
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

function deviceJson(d: DeviceRecord): Record<string, unknown> {
  return {
    deviceId: d.deviceId,
    status: d.status,
    method: d.method,
    group: d.group,
    role: d.role,
    attributes: d.attributes,
    thumbprint: d.thumbprint,
    ekHash: d.ekHash,
    hardwareSerial: d.hardwareSerial,
    certSerial: d.certSerial,
    certNotAfter: d.certNotAfter.toISOString(),
    createdAt: d.createdAt.toISOString(),
    updatedAt: d.updatedAt.toISOString(),
    revokedAt: d.revokedAt?.toISOString(),
    evidence: d.evidence,
  };
}

/** Who ran an operator command, for the audit trail (the login user; never a secret). */
function operatorName(): string {
  const env = process.env.SUDO_USER ?? process.env.USER ?? process.env.LOGNAME;
  return `${env ?? "unknown"} (uid ${process.getuid?.() ?? "?"})`;
}

function parseAttr(value: string, previous: Record<string, string>): Record<string, string> {
  const i = value.indexOf("=");
  if (i <= 0) throw new M2mError("ERR_USAGE", "permanent", "--attr takes key=value");
  return { ...previous, [value.slice(0, i)]: value.slice(i + 1) };
}

/** Tab-separated rows under a header row (`cut -f`, `column -t` and awk read it). */
function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  return [header, ...rows].map((r) => r.join("\t")).join("\n");
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, ...value.split(",").filter((v) => v.length > 0)];
}

/**
 * Builds the `m2m-registrar` program. Every command accepts `--json`; errors print
 * `{error:{code,message}}` (JSON) or `error CODE: message` and exit with code 2.
 */
export function buildRegistrarProgram(io: CliIo = defaultIo): Command {
  const program = new Command("m2m-registrar")
    .description("Reference registrar: attests devices (TPM / PKCS#11) and issues device certificates")
    .version(agentVersion())
    .option("--json", "machine-readable output")
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.err(s.trimEnd()) })
    .exitOverride();
  const json = (cmd: Command): boolean => cmd.optsWithGlobals<{ json?: boolean }>().json === true;
  const print = (cmd: Command, value: unknown, text: string): void => {
    io.out(json(cmd) ? JSON.stringify(value) : text);
  };
  const storeOptions = (c: Command): Command =>
    c
      .option("--config <file>", "registrar TOML config")
      .option("--data-dir <dir>", "registrar data directory");

  program
    .command("serve")
    .description("run the registrar (HTTPS)")
    .requiredOption("--config <file>", "registrar TOML config")
    .action(async (opts: { config: string }, cmd: Command) => {
      const config = await loadRegistrarConfig(opts.config);
      const logger = createLogger({ base: { svc: "m2m-registrar" } });
      // Migrates first when [store] auto_migrate (default) says so; otherwise refuses an old schema.
      const store = await openRegistrarStore(config);
      try {
        const ca = await FleetCa.load(config.caDir, systemClock, { crlUrls: config.revocation.crlUrls });
        const running = await startRegistrarApp(config, { store, ca, logger });
        print(cmd, { url: running.url, issuer: running.issuer }, `m2m-registrar listening on ${running.url}`);
        await (io.stopSignal?.() ??
          new Promise<void>((resolve) => {
            process.once("SIGINT", () => resolve());
            process.once("SIGTERM", () => resolve());
          }));
        await running.close();
      } finally {
        await store.close();
      }
    });

  const db = program.command("db").description("the registry database");
  db.command("migrate")
    .description("apply pending schema migrations (under a lock; safe while replicas run)")
    .requiredOption("--config <file>", "registrar TOML config")
    .action(async (opts: { config: string }, cmd: Command) => {
      const config = await loadRegistrarConfig(opts.config);
      const r = await migrateRegistrarStore(config);
      print(
        cmd,
        r,
        r.from === r.to
          ? `${r.backend} ${r.location}: schema at version ${r.to}, nothing to do`
          : `${r.backend} ${r.location}: migrated schema ${r.from} -> ${r.to}`,
      );
    });

  const keys = program.command("keys").description("token signing keys (rollover: docs/registrar-scale.md)");
  keys
    .command("new-signing-key")
    .description("write a new ES256 signing key (0600) for [keys] and print its kid")
    .requiredOption("--out <file>", "where to write the PEM (must not exist)")
    .action(async (opts: { out: string }, cmd: Command) => {
      const pem = generateSigningKeyPem();
      await writeNewKeyFile(opts.out, pem);
      const k = await signingKeyFromPem(pem);
      print(cmd, { kid: k.kid, file: opts.out }, `${opts.out}: kid ${k.kid}`);
    });
  keys
    .command("show")
    .description("print the kids /jwks publishes and the one that signs")
    .requiredOption("--config <file>", "registrar TOML config")
    .action(async (opts: { config: string }, cmd: Command) => {
      const config = await loadRegistrarConfig(opts.config);
      const set = await loadSigningKeySet(config);
      const out = { signing: set.signing.kid, published: set.published.map((k) => k.kid) };
      print(cmd, out, `signing:   ${out.signing}\npublished: ${out.published.join(", ")}`);
    });

  const ca = program.command("ca").description("fleet CA");
  ca.command("init")
    .description("create the fleet CA and a registrar TLS certificate")
    .requiredOption("--dir <dir>", "CA directory (keys are written 0600)")
    .option("--san <name>", "extra TLS SAN (DNS name or IP), repeatable or comma-separated", collect, [])
    .option("--force", "replace an existing CA")
    .action(async (opts: { dir: string; san: string[]; force?: boolean }, cmd: Command) => {
      const paths = await initCa({ dir: opts.dir, sans: opts.san, force: opts.force === true });
      print(
        cmd,
        paths,
        [`CA certificate:     ${paths.caCert}`, `registrar TLS cert: ${paths.serverCert}`].join("\n"),
      );
    });

  const enrollment = program.command("enrollment").description("enrolment groups and bootstrap tokens");
  const group = enrollment.command("group").description("enrolment groups");
  storeOptions(
    group
      .command("add <name>")
      .description("add an enrolment group")
      .requiredOption("--role <role>", "role given to devices of this group")
      .option("--attr <k=v>", "attribute given to devices (repeatable)", parseAttr, {})
      .addOption(new Option("--methods <list>", "allowed methods").default("tpm,pkcs11"))
      .option("--ek-trust-dir <dir>", "folder of TPM manufacturer CA PEMs")
      .option("--ek-allow <sha256>", "allowed EK SPKI SHA-256 (repeatable or comma-separated)", collect, []),
  ).action(
    async (
      name: string,
      opts: StoreOpts & {
        role: string;
        attr: Record<string, string>;
        methods: string;
        ekTrustDir?: string;
        ekAllow: string[];
      },
      cmd: Command,
    ) => {
      const methods = opts.methods.split(",").map((m) => m.trim());
      for (const m of methods) {
        if (m !== "tpm" && m !== "pkcs11")
          throw new M2mError("ERR_USAGE", "permanent", `unknown method ${m}`);
      }
      const g = await withStore(opts, (s) =>
        addEnrolmentGroup(s, {
          name,
          role: opts.role,
          attributes: opts.attr,
          methods: methods as EnrolmentMethod[],
          ekTrustDir: opts.ekTrustDir,
          ekAllow: opts.ekAllow,
        }),
      );
      print(cmd, { ...g, createdAt: g.createdAt.toISOString() }, `group ${g.name} added (role ${g.role})`);
    },
  );
  storeOptions(group.command("list").description("list enrolment groups")).action(
    async (opts: StoreOpts, cmd: Command) => {
      const groups = await withStore(opts, (s) => s.listGroups());
      print(
        cmd,
        groups.map((g) => ({ ...g, createdAt: g.createdAt.toISOString() })),
        table(
          ["GROUP", "ROLE", "METHODS"],
          groups.map((g) => [g.name, g.role, g.methods.join(",")]),
        ),
      );
    },
  );

  storeOptions(
    group
      .command("remove <name>")
      .description(
        "remove an enrolment group and its bootstrap tokens (devices enrolled through it keep their records: revoke them separately)",
      ),
  ).action(async (name: string, opts: StoreOpts, cmd: Command) => {
    const r = await withStore(opts, (s) => s.removeGroup(name));
    print(cmd, { name, ...r }, `group ${name} removed (${r.tokensRemoved} bootstrap token(s) removed)`);
  });

  const token = enrollment.command("token").description("one-time bootstrap tokens");
  storeOptions(
    token
      .command("list")
      .description("list bootstrap tokens (id = start of the token's SHA-256; never the token)"),
  ).action(async (opts: StoreOpts, cmd: Command) => {
    const list = await withStore(opts, (s) => s.listBootstrapTokens());
    const now = systemClock.now();
    const rows = list.map((t) => ({
      id: bootstrapTokenId(t),
      group: t.group,
      state: bootstrapTokenState(t, now),
      createdAt: t.createdAt.toISOString(),
      expiresAt: t.expiresAt.toISOString(),
      usedBy: t.usedBy,
      revokedAt: t.revokedAt?.toISOString(),
    }));
    print(
      cmd,
      rows,
      table(
        ["ID", "GROUP", "STATE", "EXPIRES", "USED BY"],
        rows.map((r) => [r.id, r.group, r.state, r.expiresAt, r.usedBy ?? "-"]),
      ),
    );
  });
  storeOptions(
    token
      .command("revoke <id>")
      .description("revoke an unused bootstrap token (id from `token list`); enrolment with it then fails"),
  ).action(async (id: string, opts: StoreOpts, cmd: Command) => {
    const t = await withStore(opts, (s) => revokeBootstrapToken(s, id));
    print(
      cmd,
      { id: bootstrapTokenId(t), group: t.group, revokedAt: t.revokedAt?.toISOString() },
      `bootstrap token ${bootstrapTokenId(t)} (group ${t.group}) revoked`,
    );
  });
  storeOptions(
    token
      .command("create")
      .description("create a one-time bootstrap token (printed once; only its hash is stored)")
      .requiredOption("--group <group>", "enrolment group the token is bound to")
      .option("--ttl <duration>", "lifetime, e.g. 24h, 30m, 7d", "24h"),
  ).action(async (opts: StoreOpts & { group: string; ttl: string }, cmd: Command) => {
    let ttl: number;
    try {
      ttl = parseDurationSeconds(opts.ttl);
    } catch (err) {
      throw new M2mError("ERR_USAGE", "permanent", "--ttl must look like 90s, 15m, 24h or 7d", {
        cause: err,
      });
    }
    const { token: t, record } = await withStore(opts, (s) => createBootstrapToken(s, opts.group, ttl));
    // The only place the token is ever shown: it is not stored and cannot be recovered later.
    print(
      cmd,
      { token: t.reveal(), group: record.group, expiresAt: record.expiresAt.toISOString() },
      `${t.reveal()}\n(group ${record.group}, expires ${record.expiresAt.toISOString()}; shown once)`,
    );
  });

  const attestation = program
    .command("attestation")
    .description(
      "continuous attestation: group PCR policies, golden values, device quotes (docs/attestation.md)",
    );
  const policyCmd = attestation.command("policy").description("a group's attestation policy");
  storeOptions(
    policyCmd
      .command("set <group>")
      .description("create or change a group's policy (the version in tokens' `attested.policy` goes up)")
      .requiredOption("--pcrs <selection>", "bank and PCRs a quote must cover, e.g. sha256:0,1,2,3,7")
      .option("--max-quote-age <seconds>", "how old a quote's nonce may be", (v) => Number(v))
      .option("--golden <pcr=hex>", "golden value given by the operator (repeat for each PCR)", collect, [])
      .option("--no-require-for-tokens", "verify quotes when sent, but also issue tokens without one")
      .option("--require-for-renewal", "EST renewals need a token minted after a fresh quote")
      .addOption(
        new Option("--non-attestable <rule>", "devices that cannot quote (PKCS#11)").choices([
          "claimless",
          "refuse",
        ]),
      ),
  ).action(async (group: string, opts: StoreOpts & Record<string, unknown>, cmd: Command) => {
    const goldenList = opts.golden as string[];
    const golden =
      goldenList.length === 0
        ? undefined
        : Object.fromEntries(
            goldenList.map((g) => {
              const i = g.indexOf("=");
              if (i <= 0) throw new M2mError("ERR_USAGE", "permanent", "--golden takes pcr=hex");
              return [g.slice(0, i), g.slice(i + 1)];
            }),
          );
    const p = await withStore(opts, (st) =>
      setAttestationPolicy(
        st,
        {
          group,
          pcrs: String(opts.pcrs),
          ...(opts.maxQuoteAge === undefined ? {} : { maxQuoteAgeSec: Number(opts.maxQuoteAge) }),
          ...(golden === undefined ? {} : { golden }),
          requireForTokens: opts.requireForTokens !== false,
          ...(opts.requireForRenewal === true ? { requireForRenewal: true } : {}),
          ...(opts.nonAttestable === undefined
            ? {}
            : { nonAttestable: opts.nonAttestable as "claimless" | "refuse" }),
        },
        systemClock,
      ),
    );
    print(
      cmd,
      p,
      `policy ${p.group}#${p.version}: ${p.selection.bank}:${p.selection.pcrs.join(",")}; golden values ${
        p.golden === undefined
          ? "NOT approved yet (devices are refused until `attestation approve`)"
          : `from ${p.goldenSource}`
      }`,
    );
  });
  storeOptions(policyCmd.command("show <group>").description("show a group's policy")).action(
    async (group: string, opts: StoreOpts, cmd: Command) => {
      const p = await withStore(opts, (st) => st.getAttestationPolicy(group));
      if (p === undefined)
        throw new M2mError("ERR_ATTESTATION_POLICY", "permanent", `group ${group} has no attestation policy`);
      const out = { ...p, goldenEventLog: p.goldenEventLog === undefined ? undefined : "<kept>" };
      print(cmd, out, JSON.stringify(out, null, 2));
    },
  );
  storeOptions(
    attestation
      .command("show <deviceId>")
      .description(
        "a device's last quote, its anomaly flag, and the PCRs (and events) that differ from the policy",
      ),
  ).action(async (deviceId: string, opts: StoreOpts, cmd: Command) => {
    const r = await withStore(opts, (st) => attestationReport(st, deviceId));
    const last = r.last;
    const lines = [
      `device ${r.deviceId} (group ${r.group}, policy ${r.policy ?? "none"} over ${r.selection ?? "-"})`,
      last === undefined
        ? "no quote yet"
        : `last quote ${last.at.toISOString()}: ${last.outcome}${last.code === undefined ? "" : ` ${last.code}: ${last.reason}`}`,
      `last verified quote: ${last?.lastVerifiedAt?.toISOString() ?? "never"}`,
      ...(last === undefined || r.policy === undefined
        ? []
        : [
            r.differing.length === 0
              ? "PCRs differing from the policy: none"
              : `PCRs differing from the policy: ${r.differing.map((d) => d.pcr).join(", ")}`,
          ]),
      ...(last?.anomaly === undefined
        ? []
        : [`ANOMALY since ${last.anomaly.at.toISOString()}: ${last.anomaly.reason}`]),
      ...r.differing.map(
        (d) =>
          `PCR ${d.pcr}: expected ${d.expected ?? "(not approved)"} got ${d.actual ?? "?"}${
            d.event === undefined
              ? ""
              : `; first differing event #${d.event.position} of this PCR: ${d.event.description}`
          }`,
      ),
    ];
    print(
      cmd,
      {
        ...r,
        last:
          last === undefined
            ? undefined
            : { ...last, eventLog: last.eventLog === undefined ? undefined : "<kept>" },
      },
      lines.join("\n"),
    );
  });
  storeOptions(
    attestation
      .command("approve <deviceId>")
      .description(
        "approve the PCR values of this device's last authentic quote as its group's golden values",
      ),
  ).action(async (deviceId: string, opts: StoreOpts, cmd: Command) => {
    const p = await withStore(opts, (st) => approveFromDevice(st, deviceId, systemClock));
    print(
      cmd,
      { group: p.group, version: p.version, golden: p.golden },
      `policy ${p.group}#${p.version}: golden values approved from ${deviceId}`,
    );
  });

  const devices = program.command("devices").description("the device registry");
  storeOptions(devices.command("list").description("list devices")).action(
    async (opts: StoreOpts, cmd: Command) => {
      const list = await withStore(opts, (s) => s.listDevices());
      print(
        cmd,
        list.map(deviceJson),
        table(
          ["DEVICE", "STATUS", "METHOD", "GROUP", "ROLE", "HARDWARE SERIAL"],
          list.map((d) => [d.deviceId, d.status, d.method, d.group, d.role, d.hardwareSerial]),
        ),
      );
    },
  );
  storeOptions(devices.command("show <deviceId>").description("show one device")).action(
    async (deviceId: string, opts: StoreOpts, cmd: Command) => {
      const d = await withStore(opts, (s) => s.getDevice(deviceId));
      if (d === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", `no device ${deviceId}`);
      print(cmd, deviceJson(d), JSON.stringify(deviceJson(d), null, 2));
    },
  );
  storeOptions(
    devices
      .command("revoke <deviceId>")
      .description(
        "revoke a device: no more tokens or certificates; the running registrar puts its certificates on the CRL and runs the revocation hook",
      ),
  ).action(async (deviceId: string, opts: StoreOpts, cmd: Command) => {
    const d = await withStore(opts, (s) => revokeDevice(s, deviceId));
    print(
      cmd,
      deviceJson(d),
      `device ${d.deviceId} revoked; the running registrar publishes the CRL and runs the revocation hook within revocation.check_interval_ms`,
    );
  });

  storeOptions(
    devices
      .command("allow-reenrol <deviceId>")
      .description(
        "a device lost its key (TPM cleared or replaced, token reset): revoke its identity and release its EK so that `m2m-agent enroll --force` enrols it again, as a new device id (audited)",
      ),
  ).action(async (deviceId: string, opts: StoreOpts, cmd: Command) => {
    const { device: d, releasedEkHash } = await withStore(opts, (s) =>
      allowReenrolment(s, deviceId, { actor: operatorName() }),
    );
    print(
      cmd,
      { ...deviceJson(d), releasedEkHash: releasedEkHash ?? null, reenrolAllowed: true },
      [
        `device ${d.deviceId} revoked; ${releasedEkHash === undefined ? "no EK was bound" : `its EK ${releasedEkHash.slice(0, 16)}… is released`}`,
        "the device may now enrol again (`m2m-agent enroll --force` on the gateway); it gets a new device id",
        "the running registrar puts the old certificates on the CRL within revocation.check_interval_ms",
      ].join("\n"),
    );
  });

  program
    .command("crl")
    .description(
      "sign the fleet CA's CRL now and write it to revocation.crl_file (e.g. before a broker's first start)",
    )
    .requiredOption("--config <file>", "registrar TOML config")
    .option("--out <file>", "write here instead of revocation.crl_file")
    .action(async (opts: { config: string; out?: string }, cmd: Command) => {
      const config = await loadRegistrarConfig(opts.config);
      const ca = await FleetCa.load(config.caDir);
      const file = opts.out ?? config.revocation.crlFile;
      const published = await withStore({ config: opts.config }, async (store) => {
        const p = new CrlPublisher({
          store,
          ca,
          clock: systemClock,
          file,
          validitySeconds: config.revocation.crlValiditySeconds,
          refreshSeconds: config.revocation.crlRefreshSeconds,
          checkIntervalMs: config.revocation.checkIntervalMs,
        });
        const c = await p.start();
        await p.close();
        return c;
      });
      print(
        cmd,
        {
          file,
          crlNumber: published.crlNumber.toString(),
          entries: published.entries,
          thisUpdate: published.thisUpdate.toISOString(),
          nextUpdate: published.nextUpdate.toISOString(),
        },
        `CRL ${published.crlNumber} with ${published.entries} entries written to ${file} (next update ${published.nextUpdate.toISOString()})`,
      );
    });

  ca.command("paths")
    .description("print the file paths of a CA directory")
    .requiredOption("--dir <dir>", "CA directory")
    .action((opts: { dir: string }, cmd: Command) => {
      const p = caPaths(opts.dir);
      print(cmd, p, `${p.caCert}\n${p.serverCert}`);
    });
  return program;
}

/** Runs the CLI; returns the exit code (0 ok, 2 error). Never calls process.exit. */
export async function runRegistrarCli(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  const program = buildRegistrarProgram(io);
  try {
    await program.parseAsync([...argv], { from: "user" });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === "commander.helpDisplayed" || err.code === "commander.version") return 0;
      if (argv.includes("--json")) {
        io.out(
          JSON.stringify({ error: { code: "ERR_USAGE", message: err.message.replace(/^error: /, "") } }),
        );
      }
      return 2;
    }
    const e =
      err instanceof M2mError
        ? err
        : new M2mError("ERR_INTERNAL", "permanent", err instanceof Error ? err.message : String(err));
    if (argv.includes("--json")) {
      io.out(
        JSON.stringify({ error: { code: e.code, message: e.message, ...(e.hint ? { hint: e.hint } : {}) } }),
      );
    } else {
      io.err(`error ${e.code}: ${e.message}${e.hint ? `\nhint: ${e.hint}` : ""}`);
    }
    return 2;
  }
}

if (isMainModule(import.meta.url)) {
  process.exitCode = await runRegistrarCli(process.argv.slice(2));
}
