import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FLEET_TPM_GROUP, prepareFleetRegistrar, startRegistrarProcess } from "../../bench/fleet/kit.js";
import { runFleet } from "../../bench/fleet/sim.js";
import { loadRegistrarConfig } from "../../src/registrar/config.js";
import { openRegistrarStore } from "../../src/registrar/store/open.js";
import { ensureBuilt } from "./e2e-kit.js";

/**
 * A power-on storm against the built `m2m-registrar serve`: every simulated device (TPM devices with
 * EK certificates from a test vendor CA, PKCS#11-style devices with bootstrap tokens) starts at the
 * same instant, far more than the registrar admits at once. The registrar must shed the excess with
 * 429 + Retry-After (never a 5xx), the devices must come back when told, with jitter, and in the end
 * every device is enrolled with a DPoP-bound token, once, under its own identity.
 *
 * The suite runs FLEET_STORM_DEVICES (default 300) so it fits a CI run on a shared 2-core machine; the
 * 10,000-device storm is `npm run fleet:storm` (same code, see docs/fleet-load.md for its figures).
 */
const DEVICES = Number(process.env.FLEET_STORM_DEVICES ?? 300);
const PKCS11 = Math.round(DEVICES / 10);

describe("fleet power-on storm (simulated devices, real HTTPS, built registrar)", () => {
  let work: string;
  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-storm-"));
  });
  afterAll(async () => {
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it(`${DEVICES} devices powering on at once all enrol and get a token: shed with 429, zero 5xx, none stuck`, async () => {
    // A small admission limit so the storm exceeds it by two orders of magnitude.
    const setup = await prepareFleetRegistrar({ work, pkcs11Devices: PKCS11, maxInFlight: 8 });
    const registrar = await startRegistrarProcess(setup.configPath);
    let report: Awaited<ReturnType<typeof runFleet>>;
    try {
      report = await runFleet({
        target: { url: registrar.url, caPem: setup.caPem, caFile: setup.caFile },
        tpm: { count: DEVICES - PKCS11, group: FLEET_TPM_GROUP, ekCa: setup.ekCa },
        pkcs11: { tokens: setup.tokens },
        // Everyone at once: as many devices in flight as there are devices.
        concurrency: DEVICES,
        steps: ["enrol", "token"],
      });
    } finally {
      await registrar.stop();
    }
    // Every device enrolled and holds a DPoP-bound token; none failed, none left half-way.
    expect(report.failures).toEqual([]);
    expect(report.done).toBe(DEVICES);
    expect(report.inProgress).toBe(0);
    expect(report.outcomes["enrol 200"]).toBe(DEVICES);
    expect(report.outcomes["token 200"]).toBe(DEVICES);
    // The registrar shed load (the storm is far above max_in_flight) and never answered 5xx.
    expect(report.outcomes["enrol 429"] ?? 0).toBeGreaterThan(0);
    expect(report.serverErrors).toBe(0);
    expect(Object.keys(report.outcomes).filter((k) => /\s5\d\d$/.test(k))).toEqual([]);
    expect(registrar.errorLines()).toEqual([]);
    // One identity per device: distinct ids on the client side and exactly DEVICES in the registry.
    expect(report.distinctDeviceIds).toBe(DEVICES);
    const store = await openRegistrarStore(await loadRegistrarConfig(setup.configPath));
    try {
      const devices = await store.listDevices();
      expect(devices.length).toBe(DEVICES);
      expect(new Set(devices.map((d) => d.hardwareSerial)).size).toBe(DEVICES);
      expect(devices.filter((d) => d.method === "pkcs11").length).toBe(PKCS11);
    } finally {
      await store.close();
    }
    console.log(
      `storm: ${DEVICES} devices in ${(report.elapsedMs / 1000).toFixed(1)} s; outcomes ${JSON.stringify(report.outcomes)}; ` +
        `enrol p50 ${report.latencyMs.enrol?.p50} ms p99 ${report.latencyMs.enrol?.p99} ms; retries ${report.retries}`,
    );
  }, 900_000);
});
