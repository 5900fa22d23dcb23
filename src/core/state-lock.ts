import { readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "./atomic-file.js";
import { M2mError } from "./errors.js";

export const STATE_LOCK_FILE = "agent.lock";
export const STATE_LOCK_PID_FILE = "agent.lock.pid";

/** A held lock on the state directory; `release()` is idempotent. */
export interface StateLock {
  readonly path: string;
  release(): void;
}

interface LockDb {
  exec(sql: string): unknown;
  pragma(sql: string): unknown;
  close(): unknown;
}

/**
 * One agent per state directory. Node has no flock, so the lock is SQLite's: an EXCLUSIVE
 * transaction on `<state_dir>/agent.lock`, held by this process until `release()` or its death.
 * SQLite locks with POSIX fcntl record locks, which the kernel drops when the process dies (kill -9
 * included): a stale lock file is never an obstacle. The holder's PID is written beside it
 * (`agent.lock.pid`) only to name it in the refusal; the lock itself never trusts that file.
 *
 * @throws ERR_STATE_LOCKED when another process holds it (the message names its PID and command).
 */
export async function lockStateDir(stateDir: string, purpose: string): Promise<StateLock> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const path = join(stateDir, STATE_LOCK_FILE);
  const { default: Database } = await import("better-sqlite3");
  const db: LockDb = new Database(path, { timeout: 0 });
  try {
    db.pragma("locking_mode = EXCLUSIVE");
    // BEGIN EXCLUSIVE takes the write lock at once; with locking_mode EXCLUSIVE it stays held.
    db.exec("BEGIN EXCLUSIVE");
  } catch (err) {
    db.close();
    if (
      (err as { code?: unknown }).code === "SQLITE_BUSY" ||
      (err as { code?: unknown }).code === "SQLITE_LOCKED"
    ) {
      const holder = readHolder(stateDir);
      throw new M2mError(
        "ERR_STATE_LOCKED",
        "permanent",
        `the state directory ${stateDir} is in use by ${holder === undefined ? "another process" : `PID ${holder.pid} (${holder.purpose})`}`,
        {
          hint: "stop the running agent first (`systemctl stop m2m-agent`); only one m2m-agent may use a state directory",
          details: { stateDir, ...(holder === undefined ? {} : { pid: holder.pid }) },
        },
      );
    }
    throw new M2mError("ERR_STATE_WRITE", "transient", `cannot lock the state directory ${stateDir}`, {
      cause: err,
    });
  }
  await writeFileAtomic(
    join(stateDir, STATE_LOCK_PID_FILE),
    `${JSON.stringify({ pid: process.pid, purpose })}\n`,
    0o600,
  );
  let held = true;
  return {
    path,
    release() {
      if (!held) return;
      held = false;
      try {
        db.exec("ROLLBACK");
      } catch {
        // closing releases the lock anyway
      }
      db.close();
    },
  };
}

function readHolder(stateDir: string): { pid: number; purpose: string } | undefined {
  try {
    const j = JSON.parse(readFileSync(join(stateDir, STATE_LOCK_PID_FILE), "utf8")) as {
      pid?: unknown;
      purpose?: unknown;
    };
    return typeof j.pid === "number"
      ? { pid: j.pid, purpose: typeof j.purpose === "string" ? j.purpose : "m2m-agent" }
      : undefined;
  } catch {
    return undefined;
  }
}
