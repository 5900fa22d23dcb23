import { existsSync } from "node:fs";
import { chmod, chown, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import pg from "pg";
import { M2mError } from "../src/core/errors.js";
import { freeLoopbackPort } from "./swtpm.js";

/**
 * Throwaway PostgreSQL test kit, the way `hw/swtpm.ts` starts a software TPM: `initdb` in a private
 * temp dir, the server listening on a Unix socket in that dir (no TCP unless asked), stopped and
 * removed by `stop()`. PostgreSQL refuses to run as root, so when the caller is root the dir is
 * chowned to the `postgres` system user and every server command runs through `runuser`.
 *
 * Missing binaries fail loudly (ERR_HW_TOOL_MISSING), they never turn into a skipped test.
 */

export interface PostgresOptions {
  /** Also listen on 127.0.0.1 on a free port (for clients that cannot use a Unix socket). Default false. */
  readonly tcp?: boolean;
  /**
   * `fsync` and `synchronous_commit` on (default true: the durability a production server has).
   * Off makes test clusters faster; benchmarks should keep the default.
   */
  readonly durable?: boolean;
  /** `max_connections` (default 200: several registrar replicas with their pools plus tests). */
  readonly maxConnections?: number;
  /** Extra `-c name=value` server settings. */
  readonly settings?: Readonly<Record<string, string | number>>;
  /** Name of the database created for the caller (default `m2m`). */
  readonly database?: string;
  /** Timeout for each setup command (ms). Default 60 s. */
  readonly timeoutMs?: number;
}

export interface PostgresHandle {
  /** Connection URL of the caller's database (socket dir in `host=`; the password-less `m2m` superuser). */
  readonly url: string;
  /** The Unix socket directory (also the cluster's temp dir root). */
  readonly socketDir: string;
  /** The port: the TCP port when `tcp` was asked for, else the number in the socket file name. */
  readonly port: number;
  /** `postgresql://m2m@127.0.0.1:PORT/DB` when `tcp` was asked for. */
  readonly tcpUrl: string | undefined;
  /** Directory of the server's binaries (pg_dump, psql live in /usr/bin too). */
  readonly binDir: string;
  /** Creates a fresh empty database and returns its URL (one per test keeps tests independent). */
  createDatabase(name: string): Promise<string>;
  /** URL of another database on this cluster (not created). */
  urlFor(database: string): string;
  /** Fast shutdown (`pg_ctl stop -m fast`) and removal of the temp dir. Idempotent. */
  stop(): Promise<void>;
}

const SUPERUSER = "m2m";

/** The newest installed PostgreSQL server binaries (Debian: /usr/lib/postgresql/<major>/bin). */
export function postgresBinDir(): string {
  const env = process.env.M2M_PG_BINDIR;
  if (env !== undefined && existsSync(join(env, "initdb"))) return env;
  for (const major of [17, 16, 15, 14, 13]) {
    const dir = `/usr/lib/postgresql/${major}/bin`;
    if (existsSync(join(dir, "initdb")) && existsSync(join(dir, "pg_ctl"))) return dir;
  }
  throw new M2mError(
    "ERR_HW_TOOL_MISSING",
    "permanent",
    "PostgreSQL server binaries (initdb, pg_ctl) not found",
    {
      hint: "apt-get install postgresql (Debian 12: postgresql-15), or set M2M_PG_BINDIR",
    },
  );
}

function stderrOf(err: unknown): string {
  return String((err as { stderr?: unknown }).stderr ?? (err as Error).message ?? err).slice(-2000);
}

async function systemUser(name: string): Promise<{ uid: number; gid: number }> {
  try {
    const uid = Number((await execa("id", ["-u", name])).stdout.trim());
    const gid = Number((await execa("id", ["-g", name])).stdout.trim());
    return { uid, gid };
  } catch (err) {
    throw new M2mError("ERR_HW_TOOL_MISSING", "permanent", `system user ${name} not found`, {
      cause: err,
      hint: "running as root needs the `postgres` user the Debian postgresql package creates",
    });
  }
}

const quoteIdent = (s: string): string => `"${s.replaceAll('"', '""')}"`;

/**
 * Starts a fresh PostgreSQL cluster in a temp dir and creates one database.
 * @throws ERR_HW_TOOL_MISSING (binaries or the postgres user absent), ERR_HW_POSTGRES_START (initdb or
 * the server failed; the message carries the server log's tail).
 */
export async function startPostgres(opts: PostgresOptions = {}): Promise<PostgresHandle> {
  const binDir = postgresBinDir();
  const timeout = opts.timeoutMs ?? 60_000;
  const asRoot = process.getuid?.() === 0;
  // Short prefix: the socket path (dir + "/.s.PGSQL.<port>") must fit in 107 bytes.
  const dir = await mkdtemp(join(tmpdir(), "m2m-pg-"));
  const data = join(dir, "data");
  const log = join(dir, "server.log");
  if (asRoot) {
    const pgUser = await systemUser("postgres");
    await chown(dir, pgUser.uid, pgUser.gid);
  }
  await chmod(dir, 0o700);
  const run = (tool: string, args: readonly string[]) =>
    asRoot
      ? execa("runuser", ["-u", "postgres", "--", join(binDir, tool), ...args], { timeout, cwd: "/" })
      : execa(join(binDir, tool), [...args], { timeout, cwd: "/" });

  const port = opts.tcp === true ? await freeLoopbackPort() : 5432;
  const durable = opts.durable ?? true;
  const settings: Record<string, string | number> = {
    listen_addresses: opts.tcp === true ? "127.0.0.1" : "",
    port,
    unix_socket_directories: dir,
    max_connections: opts.maxConnections ?? 200,
    fsync: durable ? "on" : "off",
    synchronous_commit: durable ? "on" : "off",
    full_page_writes: durable ? "on" : "off",
    ...(opts.settings ?? {}),
  };
  const serverOpts = Object.entries(settings)
    .map(([k, v]) => `-c ${k}=${String(v) === "" ? "''" : String(v)}`)
    .join(" ");

  let started = false;
  const stop = async (): Promise<void> => {
    if (started) {
      started = false;
      await run("pg_ctl", ["-D", data, "-m", "fast", "-w", "stop"]).catch(() => undefined);
    }
    await rm(dir, { recursive: true, force: true });
  };
  const fail = async (what: string, err: unknown): Promise<never> => {
    const tail = await readFile(log, "utf8").then(
      (t) => t.slice(-1500),
      () => "",
    );
    await stop();
    throw new M2mError("ERR_HW_POSTGRES_START", "permanent", `${what}: ${stderrOf(err)}\n${tail}`, {
      cause: err,
    });
  };

  try {
    // trust on a private 0700 socket dir: only this user (and root) can reach the server at all.
    await run("initdb", [
      "-D",
      data,
      "-A",
      "trust",
      "-U",
      SUPERUSER,
      "-E",
      "UTF8",
      "--no-sync",
      "--no-instructions",
    ]);
  } catch (err) {
    return fail("initdb failed", err);
  }
  try {
    await run("pg_ctl", [
      "-D",
      data,
      "-l",
      log,
      "-o",
      serverOpts,
      "-w",
      "-t",
      String(Math.ceil(timeout / 1000)),
      "start",
    ]);
    started = true;
  } catch (err) {
    return fail("PostgreSQL did not start", err);
  }

  const urlFor = (database: string): string =>
    `postgresql://${SUPERUSER}@localhost/${encodeURIComponent(database)}?host=${encodeURIComponent(dir)}&port=${port}`;
  const createDatabase = async (name: string): Promise<string> => {
    const client = new pg.Client({ host: dir, port, user: SUPERUSER, database: "postgres" });
    await client.connect();
    try {
      await client.query(`CREATE DATABASE ${quoteIdent(name)}`);
    } finally {
      await client.end();
    }
    return urlFor(name);
  };
  const database = opts.database ?? "m2m";
  let url: string;
  try {
    url = await createDatabase(database);
  } catch (err) {
    return fail("could not create the test database", err);
  }
  return {
    url,
    socketDir: dir,
    port,
    tcpUrl:
      opts.tcp === true
        ? `postgresql://${SUPERUSER}@127.0.0.1:${port}/${encodeURIComponent(database)}`
        : undefined,
    binDir,
    createDatabase,
    urlFor,
    stop,
  };
}
