import { defineConfig } from "vitest/config";

// Tiers: test/unit (pure logic), test/contract (every backend of a seam), test/integration (real swtpm,
// SoftHSM, mosquitto, HTTP servers on port 0), test/fuzz (fast-check, time-capped). All run in CI.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // The system tier boots a Debian root under systemd: `npm run test:system` (.ci/run calls it).
    exclude: ["test/system/**", "node_modules/**"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // swtpm has no resource manager and the machine has 2 cores: hardware-touching files run one at a time.
    fileParallelism: false,
    pool: "forks",
    reporters: ["default"],
  },
});
