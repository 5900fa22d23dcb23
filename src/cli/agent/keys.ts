import { randomBytes, X509Certificate } from "node:crypto";
import { createInterface } from "node:readline/promises";
import type { Command } from "commander";
import { auditLogPath } from "../../config/index.js";
import { systemClock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { Logger } from "../../core/log.js";
import type { KeyEvidence, KeyInfo, KeyProvider } from "../../keys/key-provider.js";
import { withStep } from "../progress.js";
import {
  action,
  cliLogger,
  EXIT,
  type GlobalOptions,
  globalOptions,
  loadCliConfig,
  output,
  progressFor,
  withStateLock,
} from "./common.js";

/** `m2m-agent keys init | show | test | destroy`. */
export function register(program: Command): void {
  const keys = program.command("keys").description("manage the hardware-held device key");

  keys
    .command("init")
    .description("create the device key in the TPM / token (idempotent: an existing key is kept)")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        return withProvider(
          opts,
          async (provider) => {
            const info = await withStep(progressFor(opts), "creating or opening the device key", () =>
              provider.createOrOpen(),
            );
            output(opts, keySummary(info), () =>
              [`${info.created ? "created" : "existing"} device key`, ...humanKey(info)].join("\n"),
            );
            return EXIT.ok;
          },
          "init",
        );
      }),
    );

  keys
    .command("show")
    .description("print key reference, algorithm, JWK thumbprint, EK certificate (TPM) and key evidence")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        return withProvider(opts, async (provider) => {
          const info = await provider.open();
          const evidence = await provider.evidence();
          const ek = provider.attestation === undefined ? undefined : await ekCertificates(provider);
          output(
            opts,
            { ...keySummary(info), evidence, ...(ek === undefined ? {} : { ekCertificates: ek }) },
            () =>
              [
                ...humanKey(info),
                ...humanEvidence(evidence),
                ...(ek === undefined
                  ? []
                  : ek.length === 0
                    ? ["EK certificate: none found at the standard NV indices"]
                    : ek.flatMap((c) => [
                        `EK certificate (${c.kind}, NV ${c.nvIndex}):`,
                        `  subject: ${c.subject}`,
                        `  issuer:  ${c.issuer}`,
                        `  valid:   ${c.notBefore} .. ${c.notAfter}`,
                      ])),
              ].join("\n"),
          );
          return EXIT.ok;
        });
      }),
    );

  keys
    .command("test")
    .description("sign a random challenge with the device key and verify it with jose")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        return withProvider(opts, async (provider) => {
          const info = await provider.open();
          const { defaultJwsAlg, signCompactJws } = await import("../../keys/jws.js");
          const alg = defaultJwsAlg(info);
          const challenge = randomBytes(32).toString("base64url");
          const t0 = performance.now();
          const jws = await signCompactJws(
            provider,
            info,
            { typ: "m2m-selftest" },
            { challenge, iat: systemClock.nowSeconds() },
            alg,
          );
          const signMs = performance.now() - t0;
          const { compactVerify, importJWK } = await import("jose");
          const key = await importJWK(info.publicJwk, alg);
          // Independent check: jose verifies the hardware signature against the exported public key.
          const { payload } = await compactVerify(jws, key, { algorithms: [alg] });
          const ok =
            (JSON.parse(new TextDecoder().decode(payload)) as { challenge?: string }).challenge === challenge;
          if (!ok)
            throw new M2mError(
              "ERR_KEY_SELFTEST",
              "permanent",
              "verified payload does not carry the challenge",
            );
          output(
            opts,
            {
              ok: true,
              alg,
              ref: info.ref,
              thumbprint: info.thumbprint,
              signMs: Math.round(signMs * 10) / 10,
            },
            () => `ok: ${alg} signature by ${info.ref} verified with jose (${signMs.toFixed(1)} ms)`,
          );
          return EXIT.ok;
        });
      }),
    );

  keys
    .command("destroy")
    .description("crypto-erase the device key (evict the TPM object / destroy the token objects)")
    .option("--yes", "do not ask for confirmation")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const yes = (cmd.opts() as { yes?: boolean }).yes === true;
        return withProvider(
          opts,
          async (provider, cfg, log) => {
            let info: KeyInfo | undefined;
            try {
              info = await provider.open();
            } catch (err) {
              if (!(err instanceof M2mError && err.code === "ERR_KEY_NOT_FOUND")) throw err;
            }
            if (info === undefined) {
              output(opts, { destroyed: false, reason: "no key" }, () => "no device key: nothing to destroy");
              return EXIT.ok;
            }
            if (!yes) await confirm(info);
            await withStep(progressFor(opts), `destroying ${info.ref}`, () => provider.destroy());
            await auditBestEffort(auditLogPath(cfg), log, info);
            output(
              opts,
              { destroyed: true, ref: info.ref, thumbprint: info.thumbprint },
              () => `destroyed ${info.ref}`,
            );
            return EXIT.ok;
          },
          "destroy",
        );
      }),
    );
}

type Cfg = Awaited<ReturnType<typeof loadCliConfig>>["config"];

async function withProvider(
  opts: GlobalOptions,
  fn: (provider: KeyProvider, config: Cfg, log: Logger) => Promise<number>,
  /** Commands that change the key hold the state directory's lock (`m2m-agent keys <lock>`). */
  lock?: string,
): Promise<number> {
  const { config } = await loadCliConfig(opts);
  if (lock !== undefined)
    return withStateLock(config.agent.state_dir, `m2m-agent keys ${lock}`, () =>
      withProviderOf(opts, config, fn),
    );
  return withProviderOf(opts, config, fn);
}

async function withProviderOf(
  opts: GlobalOptions,
  config: Cfg,
  fn: (provider: KeyProvider, config: Cfg, log: Logger) => Promise<number>,
): Promise<number> {
  // CLI logs only warnings and errors (stderr); results go to stdout.
  const log = cliLogger(opts);
  // Loaded on use: registering the command must not pull in backends, jose or the daemon.
  const { deviceKeyFromConfig } = await import("../../keys/from-config.js");
  const keys = await deviceKeyFromConfig(config, { log });
  try {
    return await fn(keys.current, config, log);
  } finally {
    await keys.close();
  }
}

function keySummary(info: KeyInfo): Record<string, unknown> {
  return {
    ref: info.ref,
    algorithm: info.algorithm,
    jwsAlgorithms: info.jwsAlgorithms,
    thumbprint: info.thumbprint,
    publicJwk: info.publicJwk,
    created: info.created,
  };
}

function humanKey(info: KeyInfo): string[] {
  return [
    `reference:  ${info.ref}`,
    `algorithm:  ${info.algorithm} (${info.jwsAlgorithms.join(", ")})`,
    `thumbprint: ${info.thumbprint} (RFC 7638, SHA-256)`,
  ];
}

function humanEvidence(e: KeyEvidence): string[] {
  switch (e.kind) {
    case "tpm":
      return [
        `evidence:   TPM object attributes 0x${e.objectAttributes.toString(16).padStart(8, "0")} (${e.attributeNames.join("|")})`,
        `name:       ${e.nameHex}`,
      ];
    case "pkcs11":
      return [
        `evidence:   PKCS#11 LOCAL=${e.local} NEVER_EXTRACTABLE=${e.neverExtractable} ALWAYS_SENSITIVE=${e.alwaysSensitive} EXTRACTABLE=${e.extractable} SENSITIVE=${e.sensitive}`,
        "            (token's own claims, not a remotely verifiable attestation)",
      ];
    case "fake":
      return ["evidence:   software key (tests only)"];
  }
}

interface EkCertSummary {
  readonly nvIndex: string;
  readonly kind: string;
  readonly subject: string;
  readonly issuer: string;
  readonly notBefore: string;
  readonly notAfter: string;
}

/** Parses the leading DER certificate (some TPMs pad the NV area). */
function parseLeadingDer(der: Uint8Array): X509Certificate {
  const b = Buffer.from(der);
  if (b[0] === 0x30 && b[1] === 0x82 && b.length >= 4) {
    const len = b.readUInt16BE(2) + 4;
    return new X509Certificate(b.subarray(0, Math.min(len, b.length)));
  }
  return new X509Certificate(b);
}

async function ekCertificates(provider: KeyProvider): Promise<EkCertSummary[]> {
  const certs = (await provider.attestation?.readEkCertificates()) ?? [];
  return certs.map((c) => {
    const x = parseLeadingDer(c.der);
    return {
      nvIndex: `0x${c.nvIndex.toString(16).padStart(8, "0")}`,
      kind: c.kind,
      subject: x.subject.replace(/\n/g, ", ") || "(empty: identity is in the SAN)",
      issuer: x.issuer.replace(/\n/g, ", "),
      notBefore: new Date(x.validFrom).toISOString(),
      notAfter: new Date(x.validTo).toISOString(),
    };
  });
}

/**
 * Interactive confirmation. Without a TTY there is nobody to ask: refuse rather than destroy an
 * identity because a script forgot `--yes`.
 * @throws ERR_CONFIRMATION_REQUIRED
 */
async function confirm(info: KeyInfo): Promise<void> {
  if (process.stdin.isTTY !== true) {
    throw new M2mError(
      "ERR_CONFIRMATION_REQUIRED",
      "permanent",
      "refusing to destroy the device key without confirmation",
      {
        hint: "run on a terminal to confirm interactively, or pass --yes",
      },
    );
  }
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(
      `This permanently destroys ${info.ref} (thumbprint ${info.thumbprint}).\nThe device loses its identity. Type "destroy" to continue: `,
    );
    if (answer.trim() !== "destroy") {
      throw new M2mError("ERR_CONFIRMATION_REQUIRED", "permanent", "not confirmed; nothing was destroyed");
    }
  } finally {
    rl.close();
  }
}

async function auditBestEffort(path: string, log: Logger, info: KeyInfo): Promise<void> {
  try {
    const { AuditLog } = await import("../../daemon/audit.js");
    const audit = await AuditLog.open(path, { clock: systemClock, log });
    await audit.record("key_destroyed", { ref: info.ref, thumbprint: info.thumbprint, by: "cli" });
    await audit.close();
  } catch (err) {
    log.warn("could not write the audit record (key was destroyed)", { error: err });
  }
}
