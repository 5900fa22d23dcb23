import { defineConfig } from "vitest/config";

// The system tier (npm run test:system): one file that boots a Debian 12 root under systemd-nspawn.
export default defineConfig({
  test: {
    include: ["test/system/**/*.test.ts"],
    testTimeout: 600_000,
    hookTimeout: 1_200_000,
    fileParallelism: false,
    pool: "forks",
    reporters: ["default"],
  },
});
