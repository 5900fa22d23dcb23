import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll } from "vitest";

/**
 * A fresh directory under the OS temp dir for the enclosing `describe` block: made in `beforeAll`,
 * removed (recursively) in `afterAll`. Returns its path; calling it before `beforeAll` ran throws.
 */
export function useTempDir(prefix: string): () => string {
  let dir: string | undefined;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), prefix));
  });
  afterAll(async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });
  return () => {
    if (dir === undefined) throw new Error(`temp dir ${prefix}* used before beforeAll made it`);
    return dir;
  };
}
