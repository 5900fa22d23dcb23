import { X509Certificate } from "node:crypto";
import type { Command } from "commander";
import { systemClock } from "../../core/clock.js";
import type { EnrollStep } from "../../enroll/progress.js";
import {
  action,
  cliLogger,
  EXIT,
  globalOptions,
  loadCliConfig,
  output,
  progressFor,
  withStateLock,
} from "./common.js";

const STEP_TEXT: Record<EnrollStep, string> = {
  "check-state": "checking enrolment state",
  "open-key": "opening the device key",
  "read-endorsement": "reading the TPM endorsement key and its certificate",
  "prepare-ak": "preparing the attestation key under the EK",
  begin: "asking the registrar for a credential challenge",
  "activate-credential": "activating the credential inside the TPM",
  certify: "certifying the device key with the attestation key",
  "build-csr": "building a CSR signed by the hardware key",
  submit: "submitting evidence to the registrar",
  "store-state": "storing enrolment state",
};

/** `m2m-agent enroll [--force]`: attested enrolment (TPM) or bootstrap-token enrolment (PKCS#11). */
export function register(program: Command): void {
  program
    .command("enroll")
    .description(
      "enrol this device with the registrar (idempotent: does nothing when enrolled unless --force)",
    )
    .option("--force", "enrol again even when enrolment state exists")
    .action(
      action(async (cmd) => {
        const opts = globalOptions(cmd);
        const force = cmd.opts<{ force?: boolean }>().force === true;
        const { config } = await loadCliConfig(opts);
        return withStateLock(config.agent.state_dir, "m2m-agent enroll", async () => {
          const log = cliLogger(opts);
          // Why: enrolment opens TLS and judges certificate validity: refuse below the time floor.
          const { assertClockTrustedForCli } = await import("../../daemon/clock-sanity.js");
          await assertClockTrustedForCli({ clock: systemClock, stateDir: config.agent.state_dir, log });
          const [{ deviceKeyFromConfig }, { enrollFromConfig }] = await Promise.all([
            import("../../keys/from-config.js"),
            import("../../enroll/from-config.js"),
          ]);
          const keys = await deviceKeyFromConfig(config, { log });
          const provider = keys.current;
          const progress = progressFor(opts);
          try {
            const outcome = await enrollFromConfig(config, provider, {
              force,
              onProgress: (p) => {
                if (p.status === "start") progress.step(STEP_TEXT[p.step]);
                else
                  progress.done(
                    p.detail === undefined ? STEP_TEXT[p.step] : `${STEP_TEXT[p.step]}: ${p.detail}`,
                  );
              },
            });
            const s = outcome.state;
            const cert = new X509Certificate(s.certificatePem);
            const summary = {
              status: outcome.status,
              deviceId: s.deviceId,
              method: s.method,
              role: s.role,
              attributes: s.attributes,
              keyRef: s.keyRef,
              keyThumbprint: s.keyThumbprint,
              certificate: {
                subject: cert.subject,
                issuer: cert.issuer,
                notAfter: cert.validTo,
                serial: cert.serialNumber,
              },
              endpoints: s.endpoints,
            };
            output(opts, summary, () =>
              [
                outcome.status === "enrolled" ? "enrolled" : "already enrolled (use --force to enrol again)",
                `device id:    ${s.deviceId}`,
                `method:       ${s.method}`,
                `role:         ${s.role}`,
                `attributes:   ${Object.entries(s.attributes)
                  .map(([k, v]) => `${k}=${v}`)
                  .join(", ")}`,
                `key:          ${s.keyRef}`,
                `certificate:  ${cert.subject.replace(/\n/g, ", ")} (valid until ${cert.validTo})`,
              ].join("\n"),
            );
            return EXIT.ok;
          } catch (err) {
            progress.fail();
            throw err;
          } finally {
            await keys.close();
          }
        });
      }),
    );
}
