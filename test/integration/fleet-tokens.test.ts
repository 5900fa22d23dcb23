import { beforeAll, describe, expect, it } from "vitest";
import { FLEET_TPM_GROUP, prepareFleetRegistrar, startRegistrarProcess } from "../../bench/fleet/kit.js";
import { runFleet } from "../../bench/fleet/sim.js";
import { useTempDir } from "../kit/temp-dir.js";
import { ensureBuilt } from "./e2e-kit.js";

/**
 * `tokensPerDevice` (what bench:fleet uses to measure registrar CPU per token): each extra token is a
 * new request that the registrar answers, not the client's cached token handed back again.
 */
describe("fleet simulator: several tokens per device", () => {
  const dir = useTempDir("m2m-fleet-tokens-");
  beforeAll(() => ensureBuilt());

  it("6 devices × 4 tokens: 24 token responses from the registrar, each token distinct", async () => {
    const setup = await prepareFleetRegistrar({ work: dir(), pkcs11Devices: 0 });
    const registrar = await startRegistrarProcess(setup.configPath);
    const seen = new Set<string>();
    let report: Awaited<ReturnType<typeof runFleet>>;
    try {
      report = await runFleet({
        target: { url: registrar.url, caPem: setup.caPem, caFile: setup.caFile },
        tpm: { count: 6, group: FLEET_TPM_GROUP, ekCa: setup.ekCa },
        concurrency: 6,
        steps: ["enrol", "token"],
        tokensPerDevice: 4,
        // Security-irrelevant here (throwaway registrar): the test compares the tokens themselves.
        onToken: (t) => seen.add(t.token.reveal()),
      });
    } finally {
      await registrar.stop();
    }
    expect(report.failures).toEqual([]);
    expect(report.done).toBe(6);
    expect(report.outcomes["token 200"]).toBe(24);
    expect(seen.size).toBe(24);
  }, 300_000);
});
