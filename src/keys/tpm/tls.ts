/**
 * The attested TPM device key as a TLS client key: tpm2-pkcs11 exposes the key (the very object the
 * registrar certified through TPM2_Certify: same TPM2B_PUBLIC / TPM2B_PRIVATE, so the same Name) as a
 * PKCS#11 object, and Node's OpenSSL uses it through the pkcs11 engine (keys/pkcs11/engine-tls.ts,
 * the one module that knows about engines). Measured route: hardware notes, "TPM key for TLS".
 *
 * What this module owns:
 * - the tpm2-pkcs11 store (`TPM2_PKCS11_STORE`, a SQLite file in a 0700 dir) and one token in it whose
 *   objects are the device keys, labelled by handle (`device-0x81000002`), so a rotated key gets its own
 *   object and the old one is unlinked when it is destroyed;
 * - provisioning with `tpm2_ptool` without any PIN on a command line (see PTOOL_SHIM);
 * - the secure context for a handshake (`createTpmTlsSecureContext`).
 *
 * Serialisation: tpm2-pkcs11 keeps its own ESYS context (sessions, loaded objects) open for the life of
 * the process, outside the TpmRunner queue. That is only safe behind a resource manager, which gives
 * every connection its own virtual handles: the kernel RM (`device:/dev/tpmrm0`) on a gateway,
 * tpm2-abrmd (`tabrmd:`) in tests. A direct TCTI (`device:/dev/tpm0`, `swtpm:`, `mssim:`) is refused
 * with ERR_KEY_CONFIG: there the engine and tpm2-tools would evict each other's objects (0x902/0x903).
 */
import { existsSync, readFileSync } from "node:fs";
import { chmod, mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import type { SecureContext } from "node:tls";
import { execa } from "execa";
import { M2mError } from "../../core/errors.js";
import { Secret } from "../../core/secret.js";
import type { TlsTunnel, TlsTunnelInput } from "../capabilities.js";
import { createEngineSecureContext, type EngineKeyOptions } from "../pkcs11/engine-tls.js";
import { hex32 } from "./transient.js";

/** Debian's tpm2-pkcs11 module (package libtpm2-pkcs11-1). */
export const DEFAULT_TPM2_PKCS11_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

export interface TpmTlsConfig {
  /** The tpm2-pkcs11 store directory (created 0700). Always set: unset, the module silently uses ~/.tpm2_pkcs11. */
  readonly storeDir: string;
  /** TCTI of a resource manager: `device:/dev/tpmrm0` or `tabrmd:…` (the same TPM as the device key). */
  readonly tcti: string;
  /** Persistent SRK, parent of the device key (default 0x81000001). */
  readonly srkHandle?: number;
  /** Token label inside the store. Default `m2m-device`. */
  readonly tokenLabel?: string;
  /**
   * A file (0600, owned by the agent) holding the token's user PIN. The engine reads it itself
   * (`pin-source=file:`); provisioning reads it and hands it to tpm2_ptool over a pipe.
   */
  readonly userPinFile: string;
  /** Default DEFAULT_TPM2_PKCS11_MODULE. */
  readonly modulePath?: string;
  /**
   * python3 that has the `tpm2_pkcs11` package (python3-tpm2-pkcs11-tools). Default: the interpreter
   * of `tpm2_ptool`'s own `#!` line (a `python3` earlier in PATH, e.g. a venv, lacks the package).
   */
  readonly python?: string;
  /** Timeout of each provisioning step (ms). Default 60 s. */
  readonly timeoutMs?: number;
}

/** Label of the token object for the device key at `keyHandle`. */
export function tpmTlsKeyLabel(keyHandle: number): string {
  return `device-${hex32(keyHandle)}`;
}

/**
 * Refuses a TCTI without a resource manager (see the module comment).
 * @throws ERR_KEY_CONFIG
 */
export function requireResourceManagerTcti(tcti: string): void {
  // Why: without an RM the engine's long-lived ESYS context and the per-call tpm2-tools processes share
  // three object/session slots and flush each other's objects; only an RM keeps them apart.
  if (/^device:\/dev\/tpmrm\d+$/.test(tcti) || /^tabrmd(:|$)/.test(tcti)) return;
  throw new M2mError("ERR_KEY_CONFIG", "permanent", "TLS with the TPM key needs a TPM resource manager", {
    hint: "set keys.tpm.tcti to device:/dev/tpmrm0 (kernel resource manager) or a tabrmd: TCTI (tpm2-abrmd)",
    details: { tcti },
  });
}

/**
 * Runs tpm2_ptool inside one python3 process with the PINs read from stdin (JSON), so no PIN is ever
 * on a command line: tpm2_ptool takes `--userpin/--sopin` on argv (visible in /proc/PID/cmdline), and
 * itself spawns tpm2-tools with the derived seal auth values as `-p VALUE` / `-P VALUE`. Here argv is
 * set inside the interpreter (not visible in /proc), and the tool's Popen is wrapped so each `-p/-P`
 * value is written to a 0600 file in a private 0700 dir and passed as `file:PATH` (tpm2-tools reads
 * auth values from files). The dir is removed on exit.
 */
const PTOOL_SHIM = `
import json, os, shutil, sys, tempfile
req = json.loads(sys.stdin.read())
import tpm2_pkcs11.tpm2 as t2
from tpm2_pkcs11.tpm2_ptool import main
priv = tempfile.mkdtemp(prefix="m2m-ptool-")
os.chmod(priv, 0o700)
real_popen = t2.Popen
n = [0]
def to_file(v):
    if v.startswith("file:") or v.startswith("session:") or v.startswith("pcr:"):
        return v
    data = bytes.fromhex(v[4:]) if v.startswith("hex:") else (v[4:] if v.startswith("str:") else v).encode()
    n[0] += 1
    p = os.path.join(priv, "a%d" % n[0])
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    return "file:" + p
def popen(cmd, *a, **k):
    cmd = list(cmd)
    for i in range(len(cmd) - 1):
        if cmd[i] in ("-p", "-P", "--auth", "--hierarchy-auth", "--key-auth"):
            cmd[i + 1] = to_file(cmd[i + 1])
    return real_popen(cmd, *a, **k)
t2.Popen = popen
sys.argv = ["tpm2_ptool"] + req["args"]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, int) and e.code is not None:
        sys.stderr.write(str(e.code) + "\\n")
finally:
    shutil.rmtree(priv, ignore_errors=True)
sys.exit(code)
`;

/** The interpreter tpm2_ptool runs with (its `#!` line), else /usr/bin/python3. */
function ptoolPython(): string {
  for (const d of (process.env.PATH ?? "/usr/bin").split(":")) {
    const f = join(d, "tpm2_ptool");
    if (d === "" || !existsSync(f)) continue;
    const first = readFileSync(f, "utf8").split("\n", 1)[0] ?? "";
    const m = /^#!\s*(\S+python3?\S*)\s*$/.exec(first);
    if (m?.[1] !== undefined) return m[1];
  }
  return "/usr/bin/python3";
}

/** Reads a PIN file (0600, no group/other access), trimming one trailing line ending. */
async function readPinFile(path: string): Promise<Secret> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (err) {
    throw new M2mError("ERR_KEY_CONFIG", "permanent", "the TPM token PIN file is missing", {
      cause: err,
      hint: "write the token user PIN to the configured pin file (mode 0600, owned by the agent)",
    });
  }
  // Why: a PIN readable by other users is a PIN any local process can use against the token.
  if ((st.mode & 0o077) !== 0) {
    throw new M2mError("ERR_KEY_CONFIG", "permanent", "the TPM token PIN file is readable by others", {
      hint: "chmod 0600 the pin file",
    });
  }
  const pin = (await readFile(path, "utf8")).replace(/\r?\n$/, "");
  if (pin.length === 0 || /[\r\n]/.test(pin)) {
    throw new M2mError("ERR_KEY_CONFIG", "permanent", "the TPM token PIN file must hold one non-empty line");
  }
  return new Secret(pin);
}

/** Provisioning and TLS use of the TPM device key through tpm2-pkcs11. */
export class TpmTlsKeys {
  readonly storeDir: string;
  readonly tcti: string;
  readonly tokenLabel: string;
  readonly modulePath: string;
  readonly #cfg: TpmTlsConfig;

  /** @throws ERR_KEY_CONFIG for a TCTI without resource manager. */
  constructor(cfg: TpmTlsConfig) {
    requireResourceManagerTcti(cfg.tcti);
    this.#cfg = cfg;
    this.storeDir = cfg.storeDir;
    this.tcti = cfg.tcti;
    this.tokenLabel = cfg.tokenLabel ?? "m2m-device";
    this.modulePath = cfg.modulePath ?? DEFAULT_TPM2_PKCS11_MODULE;
  }

  /** Environment every tpm2_ptool run and the module in this process need. */
  get env(): Readonly<Record<string, string>> {
    return { TPM2_PKCS11_STORE: this.storeDir, TPM2_PKCS11_TCTI: this.tcti, TPM2TOOLS_TCTI: this.tcti };
  }

  async #ptool(args: readonly string[], pins: Record<string, Secret> = {}): Promise<string> {
    const python = this.#cfg.python ?? ptoolPython();
    const input = JSON.stringify({
      args: [...args, ...Object.entries(pins).map(([k, v]) => `--${k}=${v.reveal()}`)],
    });
    const res = await execa(python, ["-c", PTOOL_SHIM], {
      input,
      env: { ...this.env, PYTHONDONTWRITEBYTECODE: "1" },
      extendEnv: true,
      timeout: this.#cfg.timeoutMs ?? 60_000,
      killSignal: "SIGKILL",
      reject: false,
    });
    if (res.exitCode !== 0) {
      // stderr of tpm2_ptool carries tool output, never the PINs (they only travel on stdin).
      const detail = String(res.stderr ?? "")
        .split("\n")
        .filter((l) => l.trim() !== "")
        .slice(-3)
        .join(" | ")
        .slice(0, 600);
      throw new M2mError("ERR_KEY_TLS_PROVISION", "permanent", `tpm2_ptool ${args[0] ?? ""} failed`, {
        hint: "check python3-tpm2-pkcs11-tools, the resource manager TCTI, the store dir and the SRK handle",
        details: { step: args[0] ?? "", stderr: detail },
      });
    }
    return String(res.stdout ?? "");
  }

  /** Labels of the token's objects (tpm2_ptool listobjects), or undefined when the token is absent. */
  async #objects(): Promise<{ id: string; label: string }[] | undefined> {
    const tokens = await this.#ptool(["listtokens", `--pid=1`, `--path=${this.storeDir}`]).catch(() => "");
    if (!tokens.split("\n").some((l) => l.trim() === `label: ${this.tokenLabel}`)) return undefined;
    const out = await this.#ptool(["listobjects", `--label=${this.tokenLabel}`, `--path=${this.storeDir}`]);
    // listobjects prints a YAML list: one "- " item per object with CKA_LABEL and id among its keys.
    const objs: { id: string; label: string }[] = [];
    for (const item of out.split(/^- /m).slice(1)) {
      const id = /^(?:\s*)id: (\d+)\s*$/m.exec(item)?.[1];
      const label = /^\s*CKA_LABEL: (.*)$/m
        .exec(item)?.[1]
        ?.trim()
        .replace(/^'(.*)'$/, "$1");
      if (id !== undefined && label !== undefined) objs.push({ id, label });
    }
    return objs;
  }

  /**
   * Makes the device key at `keyHandle` usable for TLS: creates the store (0700) and the token (user
   * PIN from the pin file, a random SO PIN that is not kept: a lost user PIN means re-provisioning from
   * the kept key blobs) when absent, then links the key's blobs under `tpmTlsKeyLabel(keyHandle)`.
   * Idempotent: an already linked key is left alone.
   * @param blobs TPM2B_PUBLIC / TPM2B_PRIVATE kept at creation (TpmKeyProvider `keyBlobDir`).
   * @throws ERR_KEY_CONFIG (PIN file, TCTI, missing blobs), ERR_KEY_TLS_PROVISION (tpm2_ptool failed).
   */
  async link(keyHandle: number, blobs: { pub: string; priv: string }): Promise<string> {
    for (const f of [blobs.pub, blobs.priv]) {
      if (!existsSync(f)) {
        throw new M2mError("ERR_KEY_CONFIG", "permanent", "the device key's TPM blobs are missing", {
          hint: "the key was created without keys.tpm.key_blob_dir: rotate the key (keys rotate) so the new key keeps its blobs",
          details: { handle: hex32(keyHandle) },
        });
      }
    }
    const pin = await readPinFile(this.#cfg.userPinFile);
    await mkdir(this.storeDir, { recursive: true, mode: 0o700 });
    await chmod(this.storeDir, 0o700);
    const label = tpmTlsKeyLabel(keyHandle);
    let objs = await this.#objects();
    if (objs === undefined) {
      const primaries = await this.#ptool(["listprimaries", `--path=${this.storeDir}`]).catch(() => "");
      if (!/id: 1\b/.test(primaries)) {
        await this.#ptool([
          "init",
          `--primary-handle=${hex32(this.#cfg.srkHandle ?? 0x81000001)}`,
          `--path=${this.storeDir}`,
        ]);
      }
      const { randomBytes } = await import("node:crypto");
      const soPin = new Secret(randomBytes(24).toString("base64url"));
      await this.#ptool(["addtoken", "--pid=1", `--label=${this.tokenLabel}`, `--path=${this.storeDir}`], {
        sopin: soPin,
        userpin: pin,
      });
      objs = [];
    }
    if (!objs.some((o) => o.label === label)) {
      await this.#ptool(
        [
          "link",
          `--label=${this.tokenLabel}`,
          `--key-label=${label}`,
          `--path=${this.storeDir}`,
          blobs.pub,
          blobs.priv,
        ],
        { userpin: pin },
      );
    }
    await chmod(join(this.storeDir, "tpm2_pkcs11.sqlite3"), 0o600).catch(() => undefined);
    return label;
  }

  /**
   * Removes the key's objects from the token (both the private and the public object). Part of
   * destroying a rotated-out key: the store holds the key's SRK-wrapped private blob, which could be
   * loaded again as long as the SRK exists. Idempotent.
   */
  async unlink(keyHandle: number): Promise<void> {
    const objs = await this.#objects();
    if (objs === undefined) return;
    const label = tpmTlsKeyLabel(keyHandle);
    const gone = objs.filter((x) => x.label === label);
    for (const o of gone) {
      await this.#ptool(["objdel", `--path=${this.storeDir}`, o.id]);
    }
    if (gone.length === 0) return;
    // Security: SQLite only marks deleted rows free; VACUUM rewrites the file so the key's wrapped
    // private blob does not linger in free pages of the store.
    const python = this.#cfg.python ?? ptoolPython();
    await execa(
      python,
      [
        "-c",
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('VACUUM'); c.close()",
        join(this.storeDir, "tpm2_pkcs11.sqlite3"),
      ],
      { timeout: this.#cfg.timeoutMs ?? 60_000, killSignal: "SIGKILL", stdin: "ignore" },
    );
  }

  /** Whether the key at `keyHandle` is linked in the token. */
  async isLinked(keyHandle: number): Promise<boolean> {
    const objs = await this.#objects();
    return objs?.some((o) => o.label === tpmTlsKeyLabel(keyHandle)) ?? false;
  }

  /**
   * A TLS client context whose private key operations run in the TPM. Call once per connection
   * attempt (≈ 30–50 ms), never per message. The first call in a process fixes the module's store and
   * TCTI (read when the module initialises): one TPM store per process.
   * @throws ERR_TLS_ENGINE_KEY (permanent: a wrong PIN counts against the TPM's DA lockout)
   */
  createSecureContext(keyHandle: number, tls: { certPem: string; caPem: string }): SecureContext {
    return createEngineSecureContext({
      ...this.engineOptions(keyHandle),
      certPem: tls.certPem,
      caPem: tls.caPem,
    });
  }

  /**
   * A TLS connection signed by the key at `keyHandle`, made in a child process of its own
   * (./tls-tunnel.ts): a fresh tpm2-pkcs11 instance per connection finds a key linked after this
   * process first used the module (a rotated-in key). The module is never loaded in this process.
   * @throws ERR_TLS_ENGINE_KEY (permanent), ERR_MQTT_CONNECT (transient)
   */
  async connect(keyHandle: number, input: TlsTunnelInput): Promise<TlsTunnel> {
    requireResourceManagerTcti(this.tcti);
    const { openTpmTlsTunnel } = await import("./tls-tunnel.js");
    return openTpmTlsTunnel(
      {
        modulePath: this.modulePath,
        tokenLabel: this.tokenLabel,
        keyLabel: tpmTlsKeyLabel(keyHandle),
        pinFile: this.#cfg.userPinFile,
      },
      { TPM2_PKCS11_STORE: this.storeDir, TPM2_PKCS11_TCTI: this.tcti },
      input,
    );
  }

  /**
   * Engine options for the MQTT sink's `mtls-engine` auth (or `createEngineSecureContext`): the same
   * route as `createSecureContext`. Sets TPM2_PKCS11_STORE / TPM2_PKCS11_TCTI in this process (read
   * when the module initialises, at the first handshake).
   */
  engineOptions(keyHandle: number): EngineKeyOptions {
    requireResourceManagerTcti(this.tcti);
    process.env.TPM2_PKCS11_STORE = this.storeDir;
    process.env.TPM2_PKCS11_TCTI = this.tcti;
    return {
      modulePath: this.modulePath,
      tokenLabel: this.tokenLabel,
      keyLabel: tpmTlsKeyLabel(keyHandle),
      pinFile: this.#cfg.userPinFile,
    };
  }
}
