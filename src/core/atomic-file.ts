import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { mkdir, open, rename, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { M2mError } from "./errors.js";

/**
 * Writes `data` to `path` so that a crash at any instant leaves either the old or the new file:
 * temp file created 0600 from the first byte (O_CREAT|O_EXCL with mode), write, fsync, rename,
 * fsync the directory.
 * @throws ERR_STATE_WRITE when any step fails (the temp file is removed).
 */
export async function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o600): Promise<void> {
  const dir = dirname(path);
  const tmp = join(dir, `.${basename(path)}.${randomBytes(6).toString("hex")}.tmp`);
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
    await fsyncDir(dir);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw new M2mError("ERR_STATE_WRITE", "transient", `could not write ${path} atomically`, {
      cause: err,
      hint: "check that the state directory exists, is writable by the agent and the disk is not full",
    });
  }
}

/** fsync a directory so that a rename/create inside it survives a power cut. */
export async function fsyncDir(dir: string): Promise<void> {
  const dh = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}
