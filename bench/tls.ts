import { createPublicKey } from "node:crypto";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, createSecureContext, createServer, type SecureContext } from "node:tls";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import { createTestCa } from "../hw/mosquitto.js";
import { initSoftHsm } from "../hw/softhsm.js";
import { startSwtpm } from "../hw/swtpm.js";
import { createEngineSecureContext, type EngineKeyOptions } from "../src/keys/pkcs11/engine-tls.js";
import { TpmTlsKeys } from "../src/keys/tpm/tls.js";
import { TpmKeyProvider } from "../src/keys/tpm/tpm-provider.js";

/**
 * `npm run bench:tls`: TLS client handshakes per second and their p50/p99 against a local Node TLS
 * server that requires client certificates (TLS 1.3, loopback, full handshake each time: no session
 * resumption), with the client key (a) in a PEM file — the baseline, (b) in a SoftHSM2 token through
 * the pkcs11 engine, (c) in the TPM (swtpm behind tpm2-abrmd) through tpm2-pkcs11 and the engine.
 *
 * Each key kind runs in its own child process (the engine binds one PKCS#11 module per process), in
 * alternating rounds so machine load hits all three alike; the figures are the per-kind medians.
 */

interface ChildSpec {
  readonly kind: "file" | "pkcs11" | "tpm";
  readonly port: number;
  readonly caPem: string;
  readonly certPem: string;
  readonly keyPem?: string;
  readonly engine?: EngineKeyOptions;
  readonly env?: Readonly<Record<string, string>>;
  readonly handshakes: number;
}

interface ChildResult {
  readonly kind: string;
  /** Median over rounds of (this kind's p50 / the file key's p50 in the same round). */
  readonly p50RatioToFile?: number;
  readonly contextMs: number;
  readonly handshakes: number;
  readonly perSec: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
}

function pct(sorted: readonly number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

async function child(spec: ChildSpec): Promise<ChildResult> {
  for (const [k, v] of Object.entries(spec.env ?? {})) process.env[k] = v;
  const t0 = performance.now();
  const ctx: SecureContext =
    spec.engine === undefined
      ? createSecureContext({ ca: spec.caPem, cert: spec.certPem, key: spec.keyPem ?? "" })
      : createEngineSecureContext({ ...spec.engine, certPem: spec.certPem, caPem: spec.caPem });
  const contextMs = performance.now() - t0;
  const once = () =>
    new Promise<number>((resolve, reject) => {
      const start = performance.now();
      const s = connect({ port: spec.port, host: "127.0.0.1", servername: "localhost", secureContext: ctx });
      // The server answers one byte only after it has verified the client's certificate and signature.
      s.once("data", () => {
        const ms = performance.now() - start;
        s.destroy();
        resolve(ms);
      });
      s.once("error", reject);
    });
  for (let i = 0; i < 5; i++) await once(); // warm-up (engine login, first TPM sessions)
  const lat: number[] = [];
  const w0 = performance.now();
  for (let i = 0; i < spec.handshakes; i++) lat.push(await once());
  const wall = performance.now() - w0;
  lat.sort((a, b) => a - b);
  return {
    kind: spec.kind,
    contextMs,
    handshakes: lat.length,
    perSec: (lat.length / wall) * 1000,
    p50Ms: pct(lat, 50),
    p99Ms: pct(lat, 99),
  };
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

export async function benchTls(
  options: { handshakes?: number; rounds?: number } = {},
): Promise<ChildResult[]> {
  const handshakes = options.handshakes ?? 100;
  const rounds = options.rounds ?? 6;
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-tls-"));
  await chmod(dir, 0o700);
  const ca = await createTestCa();
  const tpm = await startSwtpm({ resourceManager: "abrmd" });
  const hsm = await initSoftHsm({ label: "m2m-bench-tls" });
  try {
    const srv = await ca.issueServer();
    const server = createServer(
      {
        key: await readFile(srv.keyPath),
        cert: await readFile(srv.certPath),
        ca: ca.caPem,
        requestCert: true,
        rejectUnauthorized: true,
        minVersion: "TLSv1.3",
      },
      (s) => s.end("k"),
    );
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;

    // (a) file key
    const fileClient = await ca.issueClient("bench-file");

    // (b) SoftHSM2 key, generated in the token (pkcs11-tool; throwaway PIN of a throwaway token on argv).
    const p11env = { ...hsm.env };
    const tool = (args: readonly string[]) =>
      execa("pkcs11-tool", ["--module", hsm.modulePath, "--token-label", hsm.tokenLabel, ...args], {
        env: p11env,
        timeout: 30_000,
        stdin: "ignore",
      });
    await tool([
      ...["--login", "--pin", hsm.pin.reveal(), "--keypairgen", "--key-type", "EC:prime256v1"],
      ...["--label", "device", "--id", "01"],
    ]);
    const pubDer = join(hsm.dir, "pub.der");
    await tool(["--read-object", "--type", "pubkey", "--label", "device", "-o", pubDer]);
    const hsmPub = createPublicKey({ key: await readFile(pubDer), format: "der", type: "spki" })
      .export({ format: "pem", type: "spki" })
      .toString();
    const hsmCert = await ca.issueClient("bench-pkcs11", { publicKeyPem: hsmPub });

    // (c) the TPM device key (created by the provider, linked into tpm2-pkcs11).
    process.env.DBUS_SESSION_BUS_ADDRESS = tpm.dbusAddress ?? "";
    const provider = new TpmKeyProvider({ tcti: tpm.tcti, keyBlobDir: join(dir, "blobs") });
    const info = await provider.createOrOpen();
    const pinFile = join(dir, "tpm.pin");
    await writeFile(pinFile, "bench-tpm-pin", { mode: 0o600 });
    const tlsKeys = new TpmTlsKeys({ storeDir: join(dir, "p11"), tcti: tpm.tcti, userPinFile: pinFile });
    const blobs = provider.keyBlobPaths;
    if (blobs === undefined) throw new Error("no key blobs");
    await tlsKeys.link(provider.keyHandle, blobs);
    await provider.close();
    const tpmCert = await ca.issueClient("bench-tpm", { publicKeyPem: info.spkiPem });

    const specs: ChildSpec[] = [
      {
        kind: "file",
        port,
        caPem: ca.caPem,
        certPem: fileClient.certPem,
        keyPem: fileClient.keyPem ?? "",
        handshakes,
      },
      {
        kind: "pkcs11",
        port,
        caPem: ca.caPem,
        certPem: hsmCert.certPem,
        engine: {
          modulePath: hsm.modulePath,
          tokenLabel: hsm.tokenLabel,
          keyLabel: "device",
          pinFile: hsm.pinFile,
        },
        env: p11env,
        handshakes,
      },
      {
        kind: "tpm",
        port,
        caPem: ca.caPem,
        certPem: tpmCert.certPem,
        engine: tlsKeys.engineOptions(provider.keyHandle),
        env: { ...tpm.env, ...tlsKeys.env },
        handshakes,
      },
    ];
    const results = new Map<string, ChildResult[]>();
    for (let r = 0; r < rounds; r++) {
      for (const spec of specs) {
        // The child runs while this process keeps serving the handshakes: spawn asynchronously.
        const out = await execa(process.execPath, [fileURLToPath(import.meta.url), "--child"], {
          input: JSON.stringify(spec),
          timeout: 300_000,
          reject: false,
        });
        if (out.exitCode !== 0)
          throw new Error(`${spec.kind} child failed: ${String(out.stderr).slice(-800)}`);
        const res = JSON.parse(String(out.stdout).trim().split("\n").pop() ?? "{}") as ChildResult;
        results.set(spec.kind, [...(results.get(spec.kind) ?? []), res]);
      }
    }
    server.close();
    const fileRounds = results.get("file") ?? [];
    return specs.map((s) => {
      const rs = results.get(s.kind) ?? [];
      return {
        kind: s.kind,
        // A round runs the three kinds back to back, so a burst of load on the machine hits all three.
        p50RatioToFile: median(rs.map((x, i) => x.p50Ms / (fileRounds[i]?.p50Ms ?? Number.NaN))),
        contextMs: median(rs.map((x) => x.contextMs)),
        handshakes: rs.reduce((a, x) => a + x.handshakes, 0),
        perSec: median(rs.map((x) => x.perSec)),
        p50Ms: median(rs.map((x) => x.p50Ms)),
        p99Ms: median(rs.map((x) => x.p99Ms)),
      };
    });
  } finally {
    await tpm.stop();
    await hsm.cleanup();
    await rm(dir, { recursive: true, force: true });
    await rm(ca.dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.argv[2] === "--child") {
    const chunks: Buffer[] = [];
    for await (const c of process.stdin) chunks.push(c as Buffer);
    const res = await child(JSON.parse(Buffer.concat(chunks).toString("utf8")) as ChildSpec);
    process.stdout.write(`${JSON.stringify(res)}\n`);
    process.exit(0);
  }
  const handshakes = Number(process.env.BENCH_TLS_HANDSHAKES ?? 100);
  const rounds = Number(process.env.BENCH_TLS_ROUNDS ?? 6);
  const res = await benchTls({ handshakes, rounds });
  const base = res.find((r) => r.kind === "file");
  console.log("TLS 1.3 client handshakes against a local Node TLS server requiring client certificates");
  console.log(`${handshakes} handshakes x ${rounds} rounds per kind; medians over rounds`);
  console.log("kind     handshakes/s   p50 ms   p99 ms   context ms   p50/file (median of per-round ratios)");
  for (const r of res) {
    const ratio = r.p50RatioToFile ?? (base === undefined || base.p50Ms === 0 ? 0 : r.p50Ms / base.p50Ms);
    console.log(
      `${r.kind.padEnd(8)} ${r.perSec.toFixed(1).padStart(12)} ${r.p50Ms.toFixed(2).padStart(8)} ${r.p99Ms
        .toFixed(2)
        .padStart(8)} ${r.contextMs.toFixed(1).padStart(12)} ${ratio.toFixed(2).padStart(10)}x`,
    );
  }
}
