/**
 * Child process entry of the TPM TLS tunnel (./tls-tunnel.ts): ONE TLS client connection whose
 * handshake the TPM key signs through tpm2-pkcs11 and the pkcs11 engine, with the plaintext bytes on
 * stdin/stdout and control messages on the IPC channel. Loading the module here (not in the daemon)
 * gives every connection a fresh tpm2-pkcs11 instance, which reads the token's objects at
 * C_Initialize: a key linked after a rotation is found, and a destroyed key's process is gone with its
 * connection. Never run by hand; no secret crosses the IPC channel (the engine reads the PIN file).
 */
import { connect } from "node:tls";
import { createEngineSecureContext } from "../pkcs11/engine-tls.js";
import type { TunnelRequest, TunnelStatus } from "./tls-tunnel.js";

function send(m: TunnelStatus): void {
  process.send?.(m);
}

process.once("message", (raw: unknown) => {
  const req = raw as TunnelRequest;
  let ready = false;
  let ctx: ReturnType<typeof createEngineSecureContext>;
  try {
    ctx = createEngineSecureContext({ ...req.engine, certPem: req.certPem, caPem: req.caPem });
  } catch (err) {
    const e = err as { code?: string; message?: string; cause?: { message?: string } };
    send({
      type: "error",
      stage: "key",
      code: String(e.code ?? "ERR_TLS_ENGINE_KEY"),
      message: String(e.cause?.message ?? e.message ?? "engine key load failed").slice(0, 300),
    });
    process.exit(2);
  }
  const sock = connect({
    host: req.host,
    port: req.port,
    ...(req.servername === undefined ? {} : { servername: req.servername }),
    secureContext: ctx,
    // Always verify the broker (the context carries the CA).
    rejectUnauthorized: true,
  });
  sock.setNoDelay(true);
  sock.once("secureConnect", () => {
    ready = true;
    const own = sock.getCertificate() as { serialNumber?: string } | null;
    send({ type: "ready", certSerial: own?.serialNumber });
    process.stdin.pipe(sock);
    sock.pipe(process.stdout, { end: false });
  });
  sock.on("error", (err: Error & { code?: string }) => {
    if (!ready)
      send({ type: "error", stage: "connect", code: String(err.code ?? "ECONNECT"), message: err.message });
  });
  sock.on("close", () => process.exit(ready ? 0 : 1));
  // The parent closed the stream (or died): end the TLS connection cleanly.
  process.stdin.on("end", () => sock.end());
});
