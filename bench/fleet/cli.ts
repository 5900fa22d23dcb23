import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { FLEET_TPM_GROUP, prepareFleetRegistrar, startRegistrarProcess } from "./kit.js";
import { ALL_STEPS, type FleetReport, type FleetStep, runFleet } from "./sim.js";

/**
 * `npm run fleet -- --devices 2000 --pkcs11 200 --concurrency 500 [--steps enrol,token] [--max-in-flight 64] [--max-active 256]`
 *
 * Prepares a throwaway registrar (fleet CA, simulated TPM vendor CA, groups, bootstrap tokens),
 * starts the built `m2m-registrar serve`, runs the simulated fleet against it and prints the report
 * (JSON on stdout, progress on stderr). Exit code 1 when any device failed or any 5xx was seen.
 * SIMULATION: the devices are software keys dressed as TPM / PKCS#11 devices (docs/fleet-load.md).
 */
const { values } = parseArgs({
  options: {
    devices: { type: "string", default: "1000" },
    pkcs11: { type: "string", default: "0" },
    concurrency: { type: "string", default: "256" },
    steps: { type: "string", default: ALL_STEPS.join(",") },
    "max-in-flight": { type: "string" },
    "max-active": { type: "string" },
    keep: { type: "boolean", default: false },
  },
});

const devices = Number(values.devices);
const pkcs11 = Number(values.pkcs11);
const steps = (values.steps ?? "")
  .split(",")
  .filter((s): s is FleetStep => (ALL_STEPS as string[]).includes(s));
const work = await mkdtemp(join(tmpdir(), "m2m-fleet-"));
const setup = await prepareFleetRegistrar({
  work,
  pkcs11Devices: pkcs11,
  ...(values["max-in-flight"] === undefined ? {} : { maxInFlight: Number(values["max-in-flight"]) }),
});
const registrar = await startRegistrarProcess(setup.configPath);
// The simulator's own event-loop delay: when it grows, the simulator (not the registrar) is the bottleneck.
const loopDelay = monitorEventLoopDelay({ resolution: 20 });
loopDelay.enable();
let report: FleetReport | undefined;
try {
  const cpu0 = await registrar.cpuSeconds();
  report = await runFleet({
    target: { url: registrar.url, caPem: setup.caPem, caFile: setup.caFile },
    tpm: { count: devices - pkcs11, group: FLEET_TPM_GROUP, ekCa: setup.ekCa },
    pkcs11: { tokens: setup.tokens },
    concurrency: Number(values.concurrency),
    ...(values["max-active"] === undefined ? {} : { maxActive: Number(values["max-active"]) }),
    steps,
    onProgress: (r) => {
      const lag = `simulator loop delay max ${Math.round(loopDelay.max / 1e6)} ms, active limit ${r.activeLimit ?? "-"}`;
      loopDelay.reset();
      process.stderr.write(
        `${(r.elapsedMs / 1000).toFixed(0)} s: ${r.done} done, ${r.failed} failed, ${r.inProgress} in progress; ${lag}; ${JSON.stringify(r.outcomes)}\n`,
      );
    },
  });
  const cpu = (await registrar.cpuSeconds()) - cpu0;
  console.log(
    JSON.stringify(
      { ...report, registrarCpuSeconds: cpu, registrarErrors: registrar.errorLines().length },
      null,
      2,
    ),
  );
} finally {
  await registrar.stop();
  if (values.keep) process.stderr.write(`kept ${work}\n`);
  else await rm(work, { recursive: true, force: true });
}
process.exitCode = report !== undefined && report.failed === 0 && report.serverErrors === 0 ? 0 : 1;
