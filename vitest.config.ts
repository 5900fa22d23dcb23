import { defineConfig } from "vitest/config";

/**
 * Test tiers, one vitest project each (`npm test` runs them all, one after the other):
 * - `unit` (`npm run test:unit`): pure logic and time-capped fast-check fuzzing, no hardware, seconds.
 * - `integration` (`npm run test:integration`): contract suites and integration tests against real
 *   swtpm, SoftHSM2, mosquitto, PostgreSQL and HTTP servers on port 0.
 * - `soak` (`npm run test:soak`): the built daemon under steady load for minutes (memory leak gate).
 * A `system` tier (real systemd, packages) adds one more entry here and a `test:system` script.
 */
const tiers = {
  unit: ["test/unit/**/*.test.ts", "test/fuzz/**/*.test.ts"],
  integration: ["test/contract/**/*.test.ts", "test/integration/**/*.test.ts"],
  soak: ["test/soak/**/*.test.ts"],
} as const;

export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // swtpm has no resource manager and the machine has 2 cores: hardware-touching files run one at a time.
    fileParallelism: false,
    pool: "forks",
    reporters: ["default"],
    // Tiers run one after the other (groupOrder), cheapest first: they share the hardware helpers and cores.
    projects: Object.entries(tiers).map(([name, include], i) => ({
      extends: true,
      test: { name, include: [...include], sequence: { groupOrder: i } },
    })),
  },
});
