/**
 * Bundles a TypeScript entry into one ESM file under node_modules/.cache/<cacheDir> (bare imports stay
 * external and resolve from the repo's node_modules), so a test can run it as a real child process
 * (or worker) and SIGKILL it.
 */
export async function bundleEntry(entry: string, name: string, cacheDir = "m2m-relay"): Promise<string> {
  const { build } = await import("rolldown");
  const outDir = new URL(`../../node_modules/.cache/${cacheDir}/`, import.meta.url).pathname;
  await build({
    input: entry,
    platform: "node",
    external: (id: string) => !id.startsWith(".") && !id.startsWith("/") && !id.startsWith("\0"),
    output: { dir: outDir, format: "esm", entryFileNames: `${name}.mjs` },
    logLevel: "silent",
  });
  return `${outDir}${name}.mjs`;
}
