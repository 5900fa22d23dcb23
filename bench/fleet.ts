import { mkdtemp, rm } from "node:fs/promises";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { startHaproxy } from "../hw/haproxy.js";
import { startPostgres } from "../hw/postgres.js";
import { freeLoopbackPort } from "../hw/swtpm.js";
import {
  FLEET_TPM_GROUP,
  prepareFleetRegistrar,
  type RegistrarProcess,
  startRegistrarProcess,
  writeReplicaConfig,
} from "./fleet/kit.js";
import { type FleetReport, runFleet } from "./fleet/sim.js";

/**
 * `npm run bench:fleet`: attested enrolments/s and tokens/s of the built registrar under the fleet
 * simulator (SIMULATED TPM devices over real HTTPS), p50/p99 per step, and registrar CPU per
 * enrolment and per token (utime+stime of the registrar processes from /proc) so larger machines
 * can be projected. Configurations, measured in the same run:
 *   A. one process, SQLite (the baseline);
 *   B. PostgreSQL (throwaway cluster, hw/postgres.ts), one replica (goal ≥ 0.7× A);
 *   C. PostgreSQL, two replicas behind haproxy (goal ≥ 1.6× B where the cores allow).
 *
 * Env: FLEET_BENCH_DEVICES (devices per phase, default 300), FLEET_BENCH_CONCURRENCY (default 64),
 * FLEET_BENCH_TOKENS (tokens each device of phase 2 obtains, default 20: the registrar CPU per token
 * is phase 2's CPU beyond phase 1's per device, divided by this; one token per device left it within
 * the noise of the enrolment's CPU).
 * The simulator runs on the same 2 cores as the registrar: client CPU competes with server CPU.
 */
const DEVICES = Number(process.env.FLEET_BENCH_DEVICES ?? 300);
const CONCURRENCY = Number(process.env.FLEET_BENCH_CONCURRENCY ?? 64);
const TOKENS = Math.max(1, Number(process.env.FLEET_BENCH_TOKENS ?? 20));

interface Row {
  readonly config: string;
  readonly enrolPerSec: number;
  readonly tokenPerSec: number;
  readonly enrolP50: number;
  readonly enrolP99: number;
  readonly tokenP50: number;
  readonly tokenP99: number;
  readonly cpuMsPerEnrol: number;
  readonly cpuMsPerToken: number;
  readonly errors: number;
}

async function cpu(procs: readonly RegistrarProcess[]): Promise<number> {
  let s = 0;
  for (const p of procs) s += await p.cpuSeconds();
  return s;
}

async function measure(config: string, replicas: number, postgres: boolean): Promise<Row> {
  const work = await mkdtemp(join(tmpdir(), "m2m-bench-fleet-"));
  const procs: RegistrarProcess[] = [];
  let stopLb: (() => Promise<void>) | undefined;
  const pg = postgres ? await startPostgres() : undefined;
  try {
    const setup = await prepareFleetRegistrar({
      work,
      pkcs11Devices: 0,
      ...(pg === undefined ? {} : { storeUrl: pg.url }),
    });
    let url: string;
    if (replicas === 1 && pg === undefined) {
      procs.push(await startRegistrarProcess(setup.configPath));
      url = procs[0]?.url ?? "";
    } else {
      const lbPort = await freeLoopbackPort();
      const ports: number[] = [];
      for (let i = 0; i < replicas; i++) {
        const port = await freeLoopbackPort();
        ports.push(port);
        const cfg = await writeReplicaConfig(setup, `r${i}`, {
          port,
          publicUrl: `https://127.0.0.1:${lbPort}`,
        });
        procs.push(await startRegistrarProcess(cfg));
      }
      const lb = await startHaproxy({ port: lbPort, backends: ports.map((p) => `127.0.0.1:${p}`) });
      stopLb = () => lb.stop();
      url = lb.url;
    }
    const target = { url, caPem: setup.caPem, caFile: setup.caFile };
    const tpm = { group: FLEET_TPM_GROUP, ekCa: setup.ekCa };
    // Warm-up (not measured): JIT, first store statements, first TLS contexts; without it phase 1
    // carries the one-off costs and the per-token figure (phase 2 minus phase 1) comes out negative.
    await runFleet({
      target,
      tpm: { ...tpm, count: Math.min(40, Math.max(8, Math.round(DEVICES / 5))) },
      concurrency: CONCURRENCY,
      steps: ["enrol", "token"],
      serialPrefix: "W",
    });
    // Phase 1: enrolment only.
    let c0 = await cpu(procs);
    const enrol: FleetReport = await runFleet({
      target,
      tpm: { ...tpm, count: DEVICES },
      concurrency: CONCURRENCY,
      steps: ["enrol"],
      serialPrefix: "E",
    });
    const cpuEnrol = (await cpu(procs)) - c0;
    // Phase 2: enrolment + TOKENS tokens per device; the tokens' share is what phase 2 costs beyond
    // phase 1.
    c0 = await cpu(procs);
    const both: FleetReport = await runFleet({
      target,
      tpm: { ...tpm, count: DEVICES },
      concurrency: CONCURRENCY,
      steps: ["enrol", "token"],
      tokensPerDevice: TOKENS,
      serialPrefix: "T",
    });
    const cpuBoth = (await cpu(procs)) - c0;
    const perEnrol = cpuEnrol / Math.max(1, enrol.done);
    const perToken = Math.max(0, (cpuBoth / Math.max(1, both.done) - perEnrol) / TOKENS);
    return {
      config,
      enrolPerSec: Math.round((enrol.done / (enrol.elapsedMs / 1000)) * 10) / 10,
      // Tokens completed per second of phase 2 (enrolment + TOKENS tokens per device): a lower bound.
      tokenPerSec: both.ratePerSec.token ?? 0,
      enrolP50: enrol.latencyMs.enrol?.p50 ?? 0,
      enrolP99: enrol.latencyMs.enrol?.p99 ?? 0,
      tokenP50: both.latencyMs.token?.p50 ?? 0,
      tokenP99: both.latencyMs.token?.p99 ?? 0,
      cpuMsPerEnrol: Math.round(perEnrol * 10_000) / 10,
      cpuMsPerToken: Math.round(perToken * 100_000) / 100,
      errors: enrol.failed + both.failed + enrol.serverErrors + both.serverErrors,
    };
  } finally {
    await stopLb?.();
    for (const p of procs) await p.stop();
    await pg?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

const rows: Row[] = [];
rows.push(await measure("SQLite, 1 process (baseline)", 1, false));
rows.push(await measure("PostgreSQL, 1 replica behind haproxy", 1, true));
rows.push(await measure("PostgreSQL, 2 replicas behind haproxy", 2, true));
console.log(
  `devices per phase ${DEVICES}, tokens per device in phase 2 ${TOKENS}, concurrency ${CONCURRENCY}, ` +
    `load average at the end ${loadavg()
      .map((l) => l.toFixed(1))
      .join(" ")}`,
);
console.table(rows);
const [a, b, c] = rows;
if (a !== undefined && b !== undefined && c !== undefined) {
  const r = (x: number, y: number) => (y > 0 ? (x / y).toFixed(2) : "n/a");
  console.log(
    `PG 1 replica / SQLite: enrolments ${r(b.enrolPerSec, a.enrolPerSec)}x, tokens ${r(b.tokenPerSec, a.tokenPerSec)}x (goal ≥ 0.7x)`,
  );
  console.log(
    `PG 2 replicas / 1 replica: enrolments ${r(c.enrolPerSec, b.enrolPerSec)}x, tokens ${r(c.tokenPerSec, b.tokenPerSec)}x ` +
      "(goal ≥ 1.6x where cores allow: simulator, haproxy, PostgreSQL and registrars share 2 cores)",
  );
}
