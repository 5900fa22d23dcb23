import { type ChildProcess, fork } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { fileURLToPath, pathToFileURL } from "node:url";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import Database from "better-sqlite3";
import { exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import Provider from "oidc-provider";
import { initSoftHsm } from "../hw/softhsm.js";
import { freeLoopbackPort, startSwtpm } from "../hw/swtpm.js";
import { systemClock } from "../src/core/clock.js";
import { OAuthClient } from "../src/credentials/oauth/client.js";
import type { KeyProvider } from "../src/keys/key-provider.js";
import { Pkcs11KeyProvider } from "../src/keys/pkcs11/index.js";
import { TpmKeyProvider } from "../src/keys/tpm/tpm-provider.js";
import { caPaths, FleetCa, initCa } from "../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../src/registrar/config.js";
import { loadOrCreateSigningKey } from "../src/registrar/oauth/signing-key.js";
import { oauthRoutes, TokenService } from "../src/registrar/oauth/token-service.js";
import { startRegistrar } from "../src/registrar/server.js";
import { SqliteRegistrarStore } from "../src/registrar/store/index.js";

/**
 * OAuth benchmarks (`npm run bench:oauth`).
 *  1. Token endpoint, client_credentials + private_key_jwt with assertions pre-signed: our registrar
 *     (the real server: HTTPS, router, token service, devices read from its SQLite store) and
 *     oidc-provider, each in its own server child process, both HTTPS on 127.0.0.1 with the same
 *     certificate (TLS 1.3, keep-alive). The load comes from worker threads of the parent process: a
 *     wrk-style minimal HTTP/1.1-over-TLS client, 32 connections, one request in flight per
 *     connection (undici cost as much CPU per request as the server under test). Rounds alternate
 *     the order of the two servers. Reported per round and server: tokens/s, server CPU ms per token
 *     (the child's process.cpuUsage delta / tokens, all its threads: what throughput on a dedicated
 *     core is the inverse of, and far steadier on a shared machine) and load-generator CPU ms per
 *     token (shows whether the client could be the limiter). Goal: registrar ≥ 1.5×.
 *     BENCH_OAUTH_ROUNDS (default 6), BENCH_OAUTH_SKIP_LATENCY=1, BENCH_OAUTH_PROFILE_DIR (--cpu-prof
 *     for both server children).
 *  2. Agent token acquisition latency (OAuthClient.getToken, cache bypassed) with the key in swtpm and
 *     in SoftHSM, Bearer and DPoP, against the registrar.
 */

const ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

interface ServeInfo {
  /** The token endpoint. */
  readonly url: string;
  readonly issuer: string;
  readonly caPem: string;
}
type ChildMsg = { kind: "ready"; info: ServeInfo } | { kind: "cpu"; micros: number } | { kind: "ok" };
type ParentMsg = { kind: "cpu" } | { kind: "register"; deviceId: string; jwk: JWK } | { kind: "stop" };

function stats(xs: number[]): { p50: number; p95: number; mean: number; n: number } {
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? Number.NaN;
  const r = (v: number) => Math.round(v * 100) / 100;
  return {
    p50: r(at(0.5)),
    p95: r(at(0.95)),
    mean: r(s.reduce((a, b) => a + b, 0) / Math.max(1, s.length)),
    n: s.length,
  };
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[m] ?? Number.NaN) : ((s[m - 1] ?? Number.NaN) + (s[m] ?? Number.NaN)) / 2;
}

// ---------------------------------------------------------------- server child

type Which = "registrar" | "op";

/** One server per child process (same TLS certificate, same Node flags), so CPU is per server. */
async function serve(which: Which, dir: string, deviceJwk: JWK): Promise<void> {
  const paths = caPaths(join(dir, "ca"));
  const caPem = await readFile(paths.caCert, "utf8");
  const send = (m: ChildMsg) => process.send?.(m);
  let close: () => Promise<void>;
  let register: (deviceId: string, jwk: JWK) => void = () => {};
  let info: ServeInfo;
  if (which === "registrar") {
    const port = await freeLoopbackPort();
    const issuer = `https://127.0.0.1:${port}`;
    await mkdir(join(dir, "data"), { recursive: true });
    const dbPath = join(dir, "data", "registrar.db");
    const store = new SqliteRegistrarStore(dbPath);
    // Devices go straight into the devices table (enrolment is not what is measured), with an
    // evidence blob the size of a TPM enrolment's (EK certificate, AK and key publics).
    const raw = new Database(dbPath);
    const insert = raw.prepare(
      `INSERT INTO devices (device_id, method, status, group_name, role, attributes, public_jwk, thumbprint,
         ek_hash, hardware_serial, evidence, cert_serial, cert_not_after, created_at, updated_at)
       VALUES (?, 'tpm', 'active', 'g', 'gw', '{}', ?, ?, NULL, ?, ?, ?, ?, ?, ?)`,
    );
    register = (deviceId, jwk) => {
      const now = Date.now();
      const evidence = {
        ekCertificate: randomBytes(1100).toString("base64"),
        akPublic: randomBytes(280).toString("base64"),
        keyPublic: randomBytes(90).toString("base64"),
        keyName: randomBytes(34).toString("hex"),
      };
      insert.run(
        deviceId,
        JSON.stringify(jwk),
        randomBytes(32).toString("base64url"),
        deviceId,
        JSON.stringify(evidence),
        randomBytes(8).toString("hex"),
        now + 86_400_000,
        now,
        now,
      );
    };
    register("bench-1", deviceJwk);
    const tokenService = new TokenService(
      { issuer, audiences: ["https://api.example"], scopes: { roles: { gw: ["telemetry:write", "est"] } } },
      // The production directory: the registrar's SQLite store, one indexed read per token request
      // (so a revocation takes effect on the next request), as src/registrar/app.ts wires it.
      { directory: store, signingKey: await loadOrCreateSigningKey(join(dir, "data")), clock: systemClock },
    );
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
      },
      dir,
    );
    const running = await startRegistrar(config, {
      store,
      ca: await FleetCa.load(paths.dir),
      extraRoutes: oauthRoutes({ tokenService }),
    });
    close = async () => {
      await running.close();
      raw.close();
      await store.close();
    };
    info = { url: `${issuer}/oauth2/token`, issuer, caPem };
  } else {
    let handler: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
    const tls = { cert: await readFile(paths.serverCert), key: await readFile(paths.serverKey) };
    const opServer = createServer(tls, (req, res) => handler?.(req, res));
    await new Promise<void>((r) => opServer.listen(0, "127.0.0.1", r));
    const opIssuer = `https://127.0.0.1:${(opServer.address() as AddressInfo).port}`;
    const { privateKey: asKey } = await generateKeyPair("ES256", { extractable: true });
    const provider = new Provider(opIssuer, {
      clients: [
        {
          client_id: "bench-1",
          token_endpoint_auth_method: "private_key_jwt",
          token_endpoint_auth_signing_alg: "ES256",
          id_token_signed_response_alg: "ES256",
          jwks: { keys: [deviceJwk] },
          grant_types: ["client_credentials"],
          response_types: [],
          redirect_uris: [],
          scope: "telemetry:write",
        },
      ],
      jwks: { keys: [{ ...(await exportJWK(asKey)), alg: "ES256", use: "sig", kid: "as" }] },
      scopes: ["telemetry:write"],
      features: { clientCredentials: { enabled: true }, devInteractions: { enabled: false } },
    });
    const cb = provider.callback();
    handler = (req, res) => void cb(req, res);
    close = async () => {
      opServer.closeAllConnections();
      opServer.close();
    };
    info = { url: `${opIssuer}/token`, issuer: opIssuer, caPem };
  }
  process.on("message", async (m: ParentMsg) => {
    if (m.kind === "cpu") {
      const u = process.cpuUsage();
      send({ kind: "cpu", micros: u.user + u.system });
    } else if (m.kind === "register") {
      register(m.deviceId, m.jwk);
      send({ kind: "ok" });
    } else {
      await close();
      process.exit(0);
    }
  });
  send({ kind: "ready", info });
}

// ---------------------------------------------------------------- load generation

interface HammerJob {
  readonly url: string;
  readonly caPem: string;
  readonly assertions: string[];
  readonly concurrency: number;
}
type HammerResult = { ok: number; failed: number };

/**
 * One keep-alive HTTP/1.1-over-TLS connection that sends pre-built requests one at a time and parses
 * just enough of each response (status, Content-Length or chunked end) to count a token. A minimal
 * client (wrk-style) on purpose: undici's fetch/request cost about as much CPU per request as the
 * server under test, so on a 2-core machine the client was the bottleneck.
 */
async function connectionLoop(
  url: URL,
  caPem: string,
  take: () => string | undefined,
  onResult: (ok: boolean) => void,
): Promise<void> {
  const socket = tlsConnect({
    host: url.hostname,
    port: Number(url.port),
    ca: caPem,
    // The server asks for a client certificate (EST mTLS routes); we send none.
  });
  socket.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    socket.once("secureConnect", resolve);
    socket.once("error", reject);
  });
  const head = `POST ${url.pathname} HTTP/1.1\r\nhost: ${url.host}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: `;
  let buf = "";
  let waiting: ((response: string) => void) | undefined;
  // Returns the complete response in `buf` or undefined when more bytes are needed.
  const complete = (): string | undefined => {
    const end = buf.indexOf("\r\n\r\n");
    if (end < 0) return undefined;
    const headers = buf.slice(0, end).toLowerCase();
    const m = /\r\ncontent-length: *(\d+)/.exec(headers);
    let total: number;
    if (m?.[1] !== undefined) total = end + 4 + Number(m[1]);
    else {
      const z = buf.indexOf("\r\n0\r\n\r\n", end);
      if (z < 0) return undefined;
      total = z + 7;
    }
    if (buf.length < total) return undefined;
    const response = buf.slice(0, total);
    buf = buf.slice(total);
    return response;
  };
  socket.setEncoding("latin1");
  socket.on("data", (chunk: string) => {
    buf += chunk;
    const r = complete();
    if (r !== undefined && waiting !== undefined) {
      const w = waiting;
      waiting = undefined;
      w(r);
    }
  });
  const closed = new Promise<string>((resolve) => socket.once("close", () => resolve("")));
  try {
    for (;;) {
      const body = take();
      if (body === undefined) return;
      const response = new Promise<string>((resolve) => {
        waiting = resolve;
      });
      socket.write(`${head}${body.length}\r\n\r\n${body}`);
      const r = await Promise.race([response, closed]);
      onResult(r.startsWith("HTTP/1.1 200 ") && r.includes('"access_token"'));
      if (r === "") return;
    }
  } finally {
    socket.destroy();
  }
}

async function hammerHere(job: HammerJob): Promise<HammerResult> {
  const url = new URL(job.url);
  const bodies = job.assertions.map((a) =>
    new URLSearchParams({
      grant_type: "client_credentials",
      client_id: "bench-1",
      client_assertion_type: ASSERTION_TYPE,
      client_assertion: a,
      scope: "telemetry:write",
    }).toString(),
  );
  let next = 0;
  let ok = 0;
  let failed = 0;
  const take = () => bodies[next++];
  const onResult = (good: boolean) => {
    if (good) ok++;
    else failed++;
  };
  await Promise.all(
    Array.from({ length: job.concurrency }, () => connectionLoop(url, job.caPem, take, onResult)),
  );
  return { ok, failed: failed + Math.max(0, bodies.length - ok - failed) };
}

/**
 * Splits the load over worker threads of this (load-generator) process; returns wall time and the
 * load generator's own CPU time so a report can show the client was not the limiter.
 */
async function hammer(url: string, caPem: string, assertions: string[], concurrency: number, workers = 2) {
  const per = Math.ceil(assertions.length / workers);
  const parts = await Promise.all(
    Array.from({ length: workers }, (_, i) => {
      const job: HammerJob = {
        url,
        caPem,
        assertions: assertions.slice(i * per, (i + 1) * per),
        concurrency: Math.ceil(concurrency / workers),
      };
      return new Promise<Worker>((resolve, reject) => {
        const w = new Worker(new URL(import.meta.url), { workerData: { kind: "hammer" } });
        // Started and loaded before the clock runs: module loading is not load generation.
        w.once("message", () => resolve(w));
        w.once("error", reject);
      }).then((w) => ({ w, job }));
    }),
  );
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const results = await Promise.all(
    parts.map(
      ({ w, job }) =>
        new Promise<HammerResult>((resolve, reject) => {
          w.once("message", (m: HammerResult) => {
            resolve(m);
            void w.terminate();
          });
          w.once("error", reject);
          w.postMessage(job);
        }),
    ),
  );
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  const ok = results.reduce((a, p) => a + p.ok, 0);
  return {
    ok,
    failed: results.reduce((a, p) => a + p.failed, 0),
    ms,
    clientCpuMicros: cpu.user + cpu.system,
  };
}

async function presign(
  n: number,
  key: Awaited<ReturnType<typeof generateKeyPair>>["privateKey"],
  aud: string,
): Promise<string[]> {
  const now = Math.floor(Date.now() / 1000);
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    out.push(
      await new SignJWT({ jti: randomBytes(16).toString("base64url") })
        .setProtectedHeader({ alg: "ES256" })
        .setIssuer("bench-1")
        .setSubject("bench-1")
        .setAudience(aud)
        .setIssuedAt(now)
        .setExpirationTime(now + 280)
        .sign(key),
    );
  }
  return out;
}

// ---------------------------------------------------------------- parent

class ServerChild {
  readonly #child: ChildProcess;
  #waiters: ((m: ChildMsg) => void)[] = [];

  constructor(which: Which, dir: string, jwk: JWK) {
    this.#child = fork(fileURLToPath(import.meta.url), ["serve", which, dir, JSON.stringify(jwk)], {
      stdio: "inherit",
      execArgv:
        process.env.BENCH_OAUTH_PROFILE_DIR === undefined
          ? []
          : ["--cpu-prof", `--cpu-prof-dir=${process.env.BENCH_OAUTH_PROFILE_DIR}`],
    });
    this.#child.on("message", (m: ChildMsg) => this.#waiters.shift()?.(m));
  }

  next(): Promise<ChildMsg> {
    return new Promise((r) => this.#waiters.push(r));
  }

  async ask(m: ParentMsg): Promise<ChildMsg> {
    const p = this.next();
    this.#child.send(m);
    return p;
  }

  async cpuMicros(): Promise<number> {
    const m = await this.ask({ kind: "cpu" });
    return m.kind === "cpu" ? m.micros : Number.NaN;
  }

  stop(): void {
    this.#child.send({ kind: "stop" } satisfies ParentMsg);
  }
}

export interface RoundFigures {
  readonly tokensPerSec: number[];
  readonly cpuMsPerToken: number[];
  readonly clientCpuMsPerToken: number[];
}

export interface OauthBenchResult {
  readonly requests: number;
  readonly concurrency: number;
  /** Per round: throughput, server CPU per token, load-generator CPU per token. */
  readonly registrar: RoundFigures;
  readonly oidcProvider: RoundFigures;
  /** Ratios of the per-round medians (registrar / oidc-provider; CPU: oidc-provider / registrar). */
  readonly throughputRatio: number;
  readonly cpuCostRatio: number;
  /**
   * Median of the per-round ratios (each round runs the two servers back to back, so a burst of
   * other load on a shared machine hits both of a pair): the steadier throughput comparison.
   */
  readonly pairedThroughputRatio: number;
  readonly pairedCpuCostRatio: number;
  readonly agentLatencyMs: Record<string, ReturnType<typeof stats>>;
}

export async function benchOauth(
  options: {
    requests?: number;
    concurrency?: number;
    rounds?: number;
    latencyRuns?: number;
    skipLatency?: boolean;
  } = {},
): Promise<OauthBenchResult> {
  const requests = options.requests ?? 3000;
  const concurrency = options.concurrency ?? 32;
  const rounds = options.rounds ?? Number(process.env.BENCH_OAUTH_ROUNDS ?? 6);
  const latencyRuns = options.latencyRuns ?? 30;
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-oauth-"));
  const { privateKey, publicKey } = await generateKeyPair("ES256", { extractable: true });
  const publicJwk = { ...(await exportJWK(publicKey)), alg: "ES256" } as JWK;
  await initCa({ dir: caPaths(join(dir, "ca")).dir });
  const child = new ServerChild("registrar", dir, publicJwk);
  const opChild = new ServerChild("op", dir, publicJwk);
  try {
    const [ready, opReady] = await Promise.all([child.next(), opChild.next()]);
    if (ready.kind !== "ready" || opReady.kind !== "ready") throw new Error("server child did not start");
    const { issuer, caPem } = ready.info;
    const ourUrl = ready.info.url;
    const opTokenUrl = opReady.info.url;
    const run = async (server: ServerChild, url: string) => {
      const assertions = await presign(requests, privateKey, url);
      const c0 = await server.cpuMicros();
      const r = await hammer(url, caPem, assertions, concurrency);
      const c1 = await server.cpuMicros();
      if (r.failed > 0) throw new Error(`${r.failed} token requests failed at ${url}`);
      return {
        perSec: Math.round((r.ok / r.ms) * 1000),
        cpuMs: Math.round(((c1 - c0) / 1000 / r.ok) * 1000) / 1000,
        clientCpuMs: Math.round((r.clientCpuMicros / 1000 / r.ok) * 1000) / 1000,
      };
    };
    // Warm-up (JIT, connections), then alternate the two servers, starting with each in turn.
    await hammer(ourUrl, caPem, await presign(3000, privateKey, ourUrl), concurrency);
    await hammer(opTokenUrl, caPem, await presign(3000, privateKey, opTokenUrl), concurrency);
    const ours = {
      tokensPerSec: [] as number[],
      cpuMsPerToken: [] as number[],
      clientCpuMsPerToken: [] as number[],
    };
    const theirs = {
      tokensPerSec: [] as number[],
      cpuMsPerToken: [] as number[],
      clientCpuMsPerToken: [] as number[],
    };
    const record = (to: typeof ours, x: Awaited<ReturnType<typeof run>>) => {
      to.tokensPerSec.push(x.perSec);
      to.cpuMsPerToken.push(x.cpuMs);
      to.clientCpuMsPerToken.push(x.clientCpuMs);
    };
    for (let i = 0; i < rounds; i++) {
      if (i % 2 === 0) {
        record(ours, await run(child, ourUrl));
        record(theirs, await run(opChild, opTokenUrl));
      } else {
        record(theirs, await run(opChild, opTokenUrl));
        record(ours, await run(child, ourUrl));
      }
    }
    const latency: Record<string, ReturnType<typeof stats>> = {};
    if (options.skipLatency !== true) {
      const hsm = await initSoftHsm({ label: "m2m-bench" });
      process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
      const tpm = await startSwtpm();
      try {
        const backends: [string, KeyProvider][] = [
          [
            "pkcs11",
            new Pkcs11KeyProvider({
              modulePath: hsm.modulePath,
              tokenLabel: hsm.tokenLabel,
              pin: { file: hsm.pinFile },
            }),
          ],
          ["tpm", new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 })],
        ];
        for (const [name, keys] of backends) {
          const info = await keys.createOrOpen();
          await child.ask({ kind: "register", deviceId: `dev-${name}`, jwk: info.publicJwk });
          for (const dpop of [false, true]) {
            const c = new OAuthClient(
              { clientId: `dev-${name}`, issuer, caPem, dpop, scope: "telemetry:write" },
              { keys, clock: systemClock },
            );
            await c.getToken(); // discovery + connection warm-up
            const xs: number[] = [];
            for (let i = 0; i < latencyRuns; i++) {
              c.invalidate();
              const t0 = performance.now();
              await c.getToken();
              xs.push(performance.now() - t0);
            }
            latency[`${name}${dpop ? "+dpop" : ""}`] = stats(xs);
            await c.close();
          }
          await keys.close();
        }
      } finally {
        await tpm.stop();
        await hsm.cleanup();
      }
    }
    const r2 = (v: number) => Math.round(v * 100) / 100;
    return {
      requests,
      concurrency,
      registrar: ours,
      oidcProvider: theirs,
      throughputRatio: r2(median(ours.tokensPerSec) / median(theirs.tokensPerSec)),
      cpuCostRatio: r2(median(theirs.cpuMsPerToken) / median(ours.cpuMsPerToken)),
      pairedThroughputRatio: r2(median(ours.tokensPerSec.map((v, i) => v / (theirs.tokensPerSec[i] ?? v)))),
      pairedCpuCostRatio: r2(median(theirs.cpuMsPerToken.map((v, i) => v / (ours.cpuMsPerToken[i] ?? v)))),
      agentLatencyMs: latency,
    };
  } finally {
    child.stop();
    opChild.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

if (!isMainThread && (workerData as { kind?: string } | null)?.kind === "hammer") {
  parentPort?.once("message", async (job: HammerJob) => parentPort?.postMessage(await hammerHere(job)));
  parentPort?.postMessage("ready");
} else if (isMainThread && process.argv[2] === "serve" && process.send !== undefined) {
  await serve(
    process.argv[3] === "op" ? "op" : "registrar",
    process.argv[4] ?? "",
    JSON.parse(process.argv[5] ?? "{}") as JWK,
  );
} else if (isMainThread && import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const line = (f: RoundFigures) =>
    `${f.tokensPerSec.join(" / ")} tokens/s (median ${Math.round(median(f.tokensPerSec))}), server CPU ${f.cpuMsPerToken.join(" / ")} ms/token (median ${median(f.cpuMsPerToken).toFixed(3)}), load generator CPU median ${median(f.clientCpuMsPerToken).toFixed(3)} ms/token`;
  const r = await benchOauth({ skipLatency: process.env.BENCH_OAUTH_SKIP_LATENCY === "1" });
  console.log(JSON.stringify(r, null, 2));
  console.log(
    `token endpoint (client_credentials + private_key_jwt, pre-signed, ${r.concurrency} in flight, ${r.requests}/round):\n` +
      `  registrar      ${line(r.registrar)}\n` +
      `  oidc-provider  ${line(r.oidcProvider)}\n` +
      `  → medians: throughput ${r.throughputRatio}×, CPU cost per token ${r.cpuCostRatio}× in the registrar's favour (goal ≥ 1.5×)\n` +
      `  → median of per-round pairs: throughput ${r.pairedThroughputRatio}×, CPU cost per token ${r.pairedCpuCostRatio}×`,
  );
  for (const [k, v] of Object.entries(r.agentLatencyMs)) {
    console.log(`agent getToken ${k}: p50 ${v.p50} ms, p95 ${v.p95} ms (n=${v.n})`);
  }
}
