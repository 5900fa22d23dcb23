import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  FLEET_TPM_GROUP,
  prepareFleetRegistrar,
  type RegistrarProcess,
  startRegistrarProcess,
  writeReplicaConfig,
} from "../../bench/fleet/kit.js";
import { runFleet } from "../../bench/fleet/sim.js";
import { type HaproxyHandle, startHaproxy } from "../../hw/haproxy.js";
import { type PostgresHandle, startPostgres } from "../../hw/postgres.js";
import { freeLoopbackPort } from "../../hw/swtpm.js";
import { loadRegistrarConfig } from "../../src/registrar/config.js";
import { openRegistrarStore } from "../../src/registrar/store/open.js";
import { ensureBuilt } from "./e2e-kit.js";

/**
 * Three `m2m-registrar serve` replicas behind Debian's haproxy (TCP passthrough, health checks),
 * one shared PostgreSQL store (a throwaway cluster from hw/postgres.ts). In the middle of an enrolment storm one replica is SIGKILLed: its connections
 * reset, haproxy takes it out, the devices retry (their one retry policy) and land on the survivors.
 * In the end every device is enrolled with a token, exactly once, and the survivors never answered
 * 5xx.
 */
const DEVICES = Number(process.env.FLEET_REPLICA_DEVICES ?? 120);

describe("registrar replicas behind haproxy: a replica killed mid-storm", () => {
  let work: string;
  const replicas: RegistrarProcess[] = [];
  let lb: HaproxyHandle | undefined;
  let pg: PostgresHandle | undefined;
  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-replicas-"));
  });
  afterAll(async () => {
    await lb?.stop();
    for (const r of replicas) await r.stop();
    await pg?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it(`${DEVICES} TPM devices: no device stuck, no duplicate identity, no 5xx from the survivors`, async () => {
    pg = await startPostgres();
    const setup = await prepareFleetRegistrar({ work, pkcs11Devices: 0, storeUrl: pg.url });
    const lbPort = await freeLoopbackPort();
    const publicUrl = `https://127.0.0.1:${lbPort}`;
    const ports: number[] = [];
    for (let i = 0; i < 3; i++) {
      const port = await freeLoopbackPort();
      ports.push(port);
      const cfg = await writeReplicaConfig(setup, `r${i + 1}`, { port, publicUrl, maxInFlight: 16 });
      replicas.push(await startRegistrarProcess(cfg));
    }
    lb = await startHaproxy({ port: lbPort, backends: ports.map((p) => `127.0.0.1:${p}`) });
    const victim = replicas[0];
    if (victim === undefined) throw new Error("unreachable");
    let killedAt: { done: number; inProgress: number } | undefined;
    const report = await runFleet({
      target: { url: lb.url, caPem: setup.caPem, caFile: setup.caFile },
      tpm: { count: DEVICES, group: FLEET_TPM_GROUP, ekCa: setup.ekCa },
      concurrency: DEVICES,
      steps: ["enrol", "token"],
      progressEveryMs: 200,
      onProgress: (r) => {
        if (killedAt === undefined && r.done >= DEVICES / 4) {
          killedAt = { done: r.done, inProgress: r.inProgress };
          void victim.kill();
        }
      },
    });
    console.log(
      `replicas: killed r1 at ${JSON.stringify(killedAt)}; ${DEVICES} devices in ${(report.elapsedMs / 1000).toFixed(1)} s; ` +
        `outcomes ${JSON.stringify(report.outcomes)}`,
    );
    // The kill happened mid-storm, with devices still in flight.
    expect(killedAt?.inProgress ?? 0).toBeGreaterThan(0);
    expect(victim.child.signalCode).toBe("SIGKILL");
    // No device stuck: all enrolled and holding a token.
    expect(report.failures).toEqual([]);
    expect(report.done).toBe(DEVICES);
    expect(report.outcomes["token 200"]).toBe(DEVICES);
    // No 5xx reached any device, and the survivors logged no failed request.
    expect(report.serverErrors).toBe(0);
    for (const survivor of replicas.slice(1)) expect(survivor.errorLines()).toEqual([]);
    // No duplicate identity: one device id per device, one registry entry per EK.
    expect(report.distinctDeviceIds).toBe(DEVICES);
    const store = await openRegistrarStore(await loadRegistrarConfig(setup.configPath));
    try {
      const devices = await store.listDevices();
      expect(devices.length).toBe(DEVICES);
      expect(new Set(devices.map((d) => d.ekHash)).size).toBe(DEVICES);
    } finally {
      await store.close();
    }
  }, 900_000);
});
