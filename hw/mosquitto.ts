import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { connect, createServer } from "node:net";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { execa, type ResultPromise } from "execa";
import { M2mError } from "../src/core/errors.js";

/**
 * Test kit: a throwaway CA (openssl CLI, argv only) and a mosquitto 2 broker on loopback with
 *  - an mTLS listener: require_certificate, use_identity_as_username, ACL `pattern readwrite devices/%u/#`;
 *  - optionally a TLS + password listener (token auth; `setPassword` reloads the file with SIGHUP);
 *  - a plain local listener without auth (sensors' local broker; test subscribers).
 */

const OPENSSL_TIMEOUT = 20_000;

export interface TestCa {
  readonly dir: string;
  readonly caPem: string;
  readonly caCertPath: string;
  /** Issues a client certificate with CN = `cn`. With `publicKeyPem` the cert is for that key (e.g. one in a token). */
  issueClient(
    cn: string,
    opts?: { publicKeyPem?: string },
  ): Promise<{ certPem: string; keyPem: string | undefined }>;
  /** Server certificate for 127.0.0.1 / localhost. */
  issueServer(): Promise<{ certPath: string; keyPath: string }>;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  await execa("openssl", args, { cwd, timeout: OPENSSL_TIMEOUT, killSignal: "SIGKILL", stdin: "ignore" });
}

let serial = 0;

/** openssl req arguments: a new P-256 key, unencrypted, written to `keyPath`. */
const newP256Key = (keyPath: string): string[] => [
  "-newkey",
  "ec",
  "-pkeyopt",
  "ec_paramgen_curve:P-256",
  "-nodes",
  "-keyout",
  keyPath,
];

export async function createTestCa(dir?: string): Promise<TestCa> {
  const d = dir ?? (await mkdtemp(join(tmpdir(), "m2m-ca-")));
  await chmod(d, 0o700);
  const caKey = join(d, "ca.key");
  const caCert = join(d, "ca.pem");
  await openssl(
    [
      "req",
      "-x509",
      ...newP256Key(caKey),
      "-out",
      caCert,
      "-days",
      "2",
      "-subj",
      "/CN=m2m-test-ca",
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ],
    d,
  );
  const caPem = await readFile(caCert, "utf8");

  const issue = async (
    name: string,
    cn: string,
    ext: string,
    publicKeyPem?: string,
  ): Promise<{ certPath: string; keyPath: string }> => {
    const n = `${name}-${++serial}`;
    const keyPath = join(d, `${n}.key`);
    const csr = join(d, `${n}.csr`);
    const certPath = join(d, `${n}.pem`);
    const extPath = join(d, `${n}.ext`);
    await writeFile(extPath, ext);
    await openssl(["req", "-new", ...newP256Key(keyPath), "-out", csr, "-subj", `/CN=${cn}`], d);
    const args = [
      "x509",
      "-req",
      "-in",
      csr,
      "-CA",
      caCert,
      "-CAkey",
      caKey,
      "-set_serial",
      String(Date.now() * 100 + serial),
      "-days",
      "2",
      "-extfile",
      extPath,
      "-out",
      certPath,
    ];
    if (publicKeyPem !== undefined) {
      const pub = join(d, `${n}.pub.pem`);
      await writeFile(pub, publicKeyPem);
      // The CSR only carries the subject; the certificate binds the given (token-held) key.
      args.push("-force_pubkey", pub);
    }
    await openssl(args, d);
    return { certPath, keyPath };
  };

  return {
    dir: d,
    caPem,
    caCertPath: caCert,
    async issueClient(cn, opts = {}) {
      const { certPath, keyPath } = await issue(
        "client",
        cn,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        opts.publicKeyPem,
      );
      return {
        certPem: await readFile(certPath, "utf8"),
        keyPem: opts.publicKeyPem === undefined ? await readFile(keyPath, "utf8") : undefined,
      };
    },
    async issueServer() {
      return issue(
        "server",
        "localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
      );
    },
  };
}

/** A free TCP port on 127.0.0.1 (bind 0, read, close). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      const port = typeof addr === "object" && addr !== null ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

export interface MosquittoOptions {
  /** Add a TLS listener with username/password auth (same ACL pattern). */
  readonly passwordListener?: boolean;
  /** Keep sessions and queued messages across `stop()`/`start()` (persistent subscribers in outage tests). */
  readonly persistence?: boolean;
  /** Extra mosquitto.conf lines (global section). */
  readonly extraConfig?: readonly string[];
  /**
   * CA file (PEM) that client certificates on the mTLS listener must chain to, e.g. the fleet CA of a
   * registrar that issues the device certificates. Default: the broker's own test CA (`ca`).
   */
  readonly clientCaFile?: string;
  /** `crlfile` of the mTLS listener (PEM; must exist at start; re-read only on `reload()`). */
  readonly crlFile?: string;
  /**
   * Adds a Unix-socket listener (`controlSocket`) with the dynamic-security plugin whose anonymous
   * group may use `$CONTROL/dynamic-security/#`: the local control channel the revocation hook
   * uses to drop a client (access is the socket's file permissions).
   */
  readonly controlSocket?: boolean;
}

/** dynamic-security config: no clients; anonymous clients of the control listener administer it. */
export const DYNSEC_CONTROL_CONFIG = {
  defaultACLAccess: {
    publishClientSend: false,
    publishClientReceive: true,
    subscribe: false,
    unsubscribe: true,
  },
  clients: [],
  groups: [{ groupname: "local-control", roles: [{ rolename: "dynsec-control" }], clients: [] }],
  roles: [
    {
      rolename: "dynsec-control",
      acls: [
        { acltype: "publishClientSend", topic: "$CONTROL/dynamic-security/#", priority: 0, allow: true },
        { acltype: "publishClientReceive", topic: "$CONTROL/dynamic-security/#", priority: 0, allow: true },
        { acltype: "subscribePattern", topic: "$CONTROL/dynamic-security/#", priority: 0, allow: true },
      ],
    },
  ],
  anonymousGroup: "local-control",
} as const;

const DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";

export interface Mosquitto {
  readonly ca: TestCa;
  /** mqtts://127.0.0.1:PORT (mTLS). */
  readonly mtlsUrl: string;
  /** mqtts://127.0.0.1:PORT (password), when enabled. */
  readonly passwordUrl: string | undefined;
  /** mqtt://127.0.0.1:PORT (no auth, loopback only). */
  readonly plainUrl: string;
  readonly dir: string;
  /** Adds/replaces a user in the password file and reloads it (SIGHUP). Test-only: password on argv. */
  setPassword(user: string, password: string): Promise<void>;
  stop(): Promise<void>;
  /** Starts the broker again on the same ports (after `stop`). */
  start(): Promise<void>;
  readonly running: boolean;
  /** The broker's process id while it runs (benchmarks read its CPU time from /proc). */
  readonly pid: number | undefined;
  /** mosquitto's `pid_file`. */
  readonly pidFile: string;
  /** The control listener's Unix socket, when `controlSocket` was asked for. */
  readonly controlSocket: string | undefined;
  /** SIGHUP: mosquitto re-reads its config, ACL and password files, and the listeners' `crlfile`. */
  reload(): Promise<void>;
  /** The broker's log so far. */
  log(): Promise<string>;
  /** Stops the broker and removes the temp dir. */
  cleanup(): Promise<void>;
}

async function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(port, "127.0.0.1");
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline)
      throw new M2mError("ERR_HW_MOSQUITTO_START", "permanent", `mosquitto did not listen on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Starts mosquitto 2 with a fresh test CA. Fails (never skips) when mosquitto is not installed.
 * @throws ERR_HW_MOSQUITTO_START
 */
export async function startMosquitto(opts: MosquittoOptions = {}): Promise<Mosquitto> {
  const dir = await mkdtemp(join(tmpdir(), "m2m-mosquitto-"));
  const ca = await createTestCa(join(dir));
  const server = await ca.issueServer();
  const mtlsPort = await freePort();
  const plainPort = await freePort();
  const passwordPort = opts.passwordListener === true ? await freePort() : undefined;
  const acl = join(dir, "acl");
  await writeFile(acl, "pattern readwrite devices/%u/#\n");
  const pwFile = join(dir, "passwd");
  await writeFile(pwFile, "", { mode: 0o600 });
  const lines = [
    "per_listener_settings true",
    // Run as the invoking user: as root mosquitto would switch to `mosquitto`, which cannot read the
    // private (0700) temp dir holding keys and the ACL.
    `user ${userInfo().username}`,
    ...(opts.persistence === true
      ? ["persistence true", `persistence_location ${dir}/`]
      : ["persistence false"]),
    `log_dest file ${join(dir, "mosquitto.log")}`,
    "log_type error",
    "log_type warning",
    "log_type notice",
    ...(opts.extraConfig ?? []),
    `listener ${mtlsPort} 127.0.0.1`,
    `cafile ${opts.clientCaFile ?? ca.caCertPath}`,
    `certfile ${server.certPath}`,
    `keyfile ${server.keyPath}`,
    "require_certificate true",
    "use_identity_as_username true",
    `acl_file ${acl}`,
    "allow_anonymous false",
    `listener ${plainPort} 127.0.0.1`,
    "allow_anonymous true",
  ];
  if (passwordPort !== undefined) {
    lines.push(
      `listener ${passwordPort} 127.0.0.1`,
      `certfile ${server.certPath}`,
      `keyfile ${server.keyPath}`,
      `password_file ${pwFile}`,
      `acl_file ${acl}`,
      "allow_anonymous false",
    );
  }
  const pidFile = join(dir, "mosquitto.pid");
  lines.splice(1, 0, `pid_file ${pidFile}`);
  if (opts.crlFile !== undefined) {
    // Listener options: insert right after the mTLS listener's cafile line.
    const at = lines.findIndex((l) => l.startsWith("cafile "));
    lines.splice(at + 1, 0, `crlfile ${opts.crlFile}`);
  }
  let controlSocket: string | undefined;
  if (opts.controlSocket === true) {
    controlSocket = join(dir, "control.sock");
    const dynsec = join(dir, "dynsec.json");
    await writeFile(dynsec, JSON.stringify(DYNSEC_CONTROL_CONFIG), { mode: 0o600 });
    lines.push(
      `listener 0 ${controlSocket}`,
      "allow_anonymous true",
      `plugin ${DYNSEC_PLUGIN}`,
      `plugin_opt_config_file ${dynsec}`,
    );
  }
  const conf = join(dir, "mosquitto.conf");
  await writeFile(conf, `${lines.join("\n")}\n`);

  let proc: ResultPromise | undefined;
  const start = async (): Promise<void> => {
    const p = execa("mosquitto", ["-c", conf], { stdin: "ignore", reject: false, cleanup: true });
    proc = p;
    p.catch(() => undefined);
    try {
      // Every listener, not just the first: mosquitto opens them one by one, and a client of the plain
      // listener connecting right after a (re)start was refused (ECONNREFUSED) on a loaded machine.
      for (const port of [mtlsPort, plainPort, passwordPort])
        if (port !== undefined) await waitForPort(port, 10_000);
    } catch (err) {
      p.kill("SIGKILL");
      const log = await readFile(join(dir, "mosquitto.log"), "utf8").catch(() => "");
      throw new M2mError(
        "ERR_HW_MOSQUITTO_START",
        "permanent",
        `mosquitto failed to start: ${log.slice(-800)}`,
        {
          cause: err,
        },
      );
    }
  };
  const stop = async (): Promise<void> => {
    const p = proc;
    proc = undefined;
    if (p === undefined) return;
    p.kill("SIGTERM");
    const t = setTimeout(() => p.kill("SIGKILL"), 5_000);
    await p.catch(() => undefined);
    clearTimeout(t);
  };
  await start();
  return {
    ca,
    mtlsUrl: `mqtts://127.0.0.1:${mtlsPort}`,
    passwordUrl: passwordPort === undefined ? undefined : `mqtts://127.0.0.1:${passwordPort}`,
    plainUrl: `mqtt://127.0.0.1:${plainPort}`,
    dir,
    get running() {
      return proc !== undefined;
    },
    get pid() {
      return proc?.pid;
    },
    pidFile,
    controlSocket,
    async reload() {
      proc?.kill("SIGHUP");
      // mosquitto handles the signal at the top of its next loop iteration.
      await new Promise((r) => setTimeout(r, 100));
    },
    log: () => readFile(join(dir, "mosquitto.log"), "utf8").catch(() => ""),
    async setPassword(user, password) {
      await execa("mosquitto_passwd", ["-b", pwFile, user, password], { timeout: 10_000, stdin: "ignore" });
      proc?.kill("SIGHUP");
      // mosquitto reloads asynchronously; give it a moment before clients use the new password.
      await new Promise((r) => setTimeout(r, 150));
    },
    stop,
    start,
    async cleanup() {
      await stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
