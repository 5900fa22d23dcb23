import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * `npm run bench:keys`: both key providers, each next to its bare baseline measured in the same run
 * (a directly spawned `tpm2_sign`; a raw pkcs11js sign loop). Each runs in its own process so one
 * backend's native state cannot skew the other.
 */
export const KEY_BENCHES = ["keys-tpm.js", "keys-pkcs11.js"] as const;

export function runBenchFiles(files: readonly string[]): number {
  const here = dirname(fileURLToPath(import.meta.url));
  let failed = 0;
  for (const file of files) {
    process.stdout.write(`\n== ${file.replace(/\.js$/, "")} ==\n`);
    const r = spawnSync(process.execPath, [join(here, file)], { stdio: "inherit" });
    if (r.status !== 0) failed++;
  }
  return failed;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = runBenchFiles(KEY_BENCHES) === 0 ? 0 : 1;
}
