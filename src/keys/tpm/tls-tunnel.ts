/**
 * A TLS client connection signed by the TPM key, made in a child process of its own (one per
 * connection). Why a process: tpm2-pkcs11 reads the token's objects once, at C_Initialize, and
 * re-initialising it in a process breaks libp11's cached sessions (measured, docs/credentials.md). A
 * key linked after a rotation is therefore invisible to a process that already did a handshake; a
 * fresh process per connection sees it. It also bounds where a key lives: the process that loaded a
 * rotated-out key exits with its connection, before the owner destroys the key.
 *
 * Wire: the plaintext of the TLS connection is the child's stdin/stdout (a pipe pair no other local
 * process can reach); status travels over the IPC channel (`TunnelStatus`); no secret crosses it.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { Duplex } from "node:stream";
import { fileURLToPath } from "node:url";
import { M2mError } from "../../core/errors.js";
import type { TlsTunnel, TlsTunnelInput } from "../capabilities.js";
import { DEFAULT_OPENSSL_ENGINES_DIR, type EngineKeyOptions } from "../pkcs11/engine-tls.js";

/** What the parent sends once, right after the spawn. */
export interface TunnelRequest {
  readonly engine: EngineKeyOptions;
  readonly certPem: string;
  readonly caPem: string;
  readonly host: string;
  readonly port: number;
  readonly servername?: string;
}

/** What the child reports: the handshake is done, or why it is not. */
export type TunnelStatus =
  | { readonly type: "ready"; readonly certSerial: string | undefined }
  | {
      readonly type: "error";
      readonly stage: "key" | "connect";
      readonly code: string;
      readonly message: string;
    };

/**
 * The child entry: next to this module in the build output. Running from TypeScript sources (tests
 * import src/), the built copy in dist/ is used.
 */
function childEntry(): string {
  const sibling = fileURLToPath(new URL("./tls-tunnel-child.js", import.meta.url));
  if (existsSync(sibling)) return sibling;
  const built = sibling.replace(
    /\/src\/keys\/tpm\/tls-tunnel-child\.js$/,
    "/dist/src/keys/tpm/tls-tunnel-child.js",
  );
  if (existsSync(built)) return built;
  throw new M2mError("ERR_INTERNAL", "permanent", "the TPM TLS tunnel entry is missing", {
    hint: "check that the build output (tls-tunnel-child.js) is installed next to tls-tunnel.js",
  });
}

/**
 * Opens one tunnel: spawns the child with the tpm2-pkcs11 environment, waits for its handshake.
 * @throws ERR_TLS_ENGINE_KEY (permanent: the key could not be loaded, e.g. wrong PIN, unknown object),
 *   ERR_MQTT_CONNECT (transient: network, TLS verification; `cause.code` is the TLS error code).
 */
export function openTpmTlsTunnel(
  engine: EngineKeyOptions,
  env: Readonly<Record<string, string>>,
  input: TlsTunnelInput,
): Promise<TlsTunnel> {
  const child: ChildProcess = spawn(process.execPath, [childEntry()], {
    stdio: ["pipe", "pipe", "pipe", "ipc"],
    env: {
      ...process.env,
      ...env,
      OPENSSL_ENGINES: process.env.OPENSSL_ENGINES ?? engine.enginesDir ?? DEFAULT_OPENSSL_ENGINES_DIR,
      PKCS11_MODULE_PATH: engine.modulePath,
    },
  });
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  let stderrTail = "";
  child.stderr?.on("data", (c: Buffer) => {
    stderrTail = (stderrTail + c.toString()).slice(-600);
  });
  return new Promise<TlsTunnel>((resolve, reject) => {
    let settled = false;
    const fail = (err: M2mError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill("SIGKILL");
      reject(err);
    };
    const timer = setTimeout(
      () =>
        fail(
          new M2mError("ERR_MQTT_CONNECT", "transient", "TLS handshake with the TPM key timed out", {
            details: { timeoutMs: input.timeoutMs },
          }),
        ),
      input.timeoutMs,
    );
    child.once("error", (err) =>
      fail(new M2mError("ERR_MQTT_CONNECT", "transient", "cannot start the TPM TLS tunnel", { cause: err })),
    );
    child.once("exit", (code, signal) =>
      fail(
        new M2mError("ERR_MQTT_CONNECT", "transient", "the TPM TLS tunnel exited before the handshake", {
          details: { code: code ?? -1, signal: signal ?? "", stderr: stderrTail.slice(-300) },
        }),
      ),
    );
    child.on("message", (raw: unknown) => {
      const m = raw as TunnelStatus;
      if (settled) return;
      if (m.type === "error") {
        const cause = Object.assign(new Error(m.message), { code: m.code });
        fail(
          m.stage === "key"
            ? new M2mError(
                "ERR_TLS_ENGINE_KEY",
                "permanent",
                "cannot use the TPM key through the PKCS#11 engine",
                {
                  cause,
                  hint: "check keys.tpm.tls_pin_file, the tpm2-pkcs11 store and the resource manager TCTI",
                },
              )
            : new M2mError("ERR_MQTT_CONNECT", "transient", "TLS connection with the TPM key failed", {
                cause,
                details: { code: m.code },
              }),
        );
        return;
      }
      settled = true;
      clearTimeout(timer);
      const { stdout, stdin } = child;
      if (stdout === null || stdin === null) {
        child.kill("SIGKILL");
        reject(new M2mError("ERR_INTERNAL", "permanent", "the TPM TLS tunnel has no pipes"));
        return;
      }
      const stream = Duplex.from({ readable: stdout, writable: stdin });
      const certSerial = m.certSerial;
      // What MqttSink.liveConnections() reads from a TLS socket: the certificate this side presented.
      Object.assign(stream, { getCertificate: () => ({ serialNumber: certSerial }) });
      const close = (): void => {
        if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      };
      stream.once("close", close);
      child.once("exit", () => stream.destroy());
      // A pipe error (child gone) surfaces as the stream's close; it must not crash the daemon.
      stdin.on("error", () => stream.destroy());
      child.disconnect?.();
      resolve({ stream, certSerial, close, closed: exited });
    });
    const request: TunnelRequest = {
      engine,
      certPem: input.certPem,
      caPem: input.caPem,
      host: input.host,
      port: input.port,
      ...(input.servername === undefined ? {} : { servername: input.servername }),
    };
    child.send(request);
  });
}
