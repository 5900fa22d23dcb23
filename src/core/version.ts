import { readFileSync } from "node:fs";

let cached: string | undefined;

/** The package version (read once from package.json next to dist/ or src/). */
export function agentVersion(): string {
  if (cached !== undefined) return cached;
  for (const rel of ["../../package.json", "../../../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), "utf8")) as {
        name?: string;
        version?: string;
      };
      if (pkg.name === "m2m-agent" && typeof pkg.version === "string") {
        cached = pkg.version;
        return cached;
      }
    } catch {
      // try the next location
    }
  }
  cached = "0.0.0-unknown";
  return cached;
}
