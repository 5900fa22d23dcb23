import { type ChildProcess, fork } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import Provider from "oidc-provider";
import { Agent, fetch } from "undici";
import { initSoftHsm } from "../hw/softhsm.js";
import { freeLoopbackPort, startSwtpm } from "../hw/swtpm.js";
import { systemClock } from "../src/core/clock.js";
import { OAuthClient } from "../src/credentials/oauth/client.js";
import type { KeyProvider } from "../src/keys/key-provider.js";
import { Pkcs11KeyProvider } from "../src/keys/pkcs11/index.js";
import { TpmKeyProvider } from "../src/keys/tpm/tpm-provider.js";
import { caPaths, FleetCa, initCa } from "../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../src/registrar/config.js";
import { InMemoryDeviceDirectory } from "../src/registrar/oauth/directory.js";
import { loadOrCreateSigningKey } from "../src/registrar/oauth/signing-key.js";
import { oauthRoutes, TokenService } from "../src/registrar/oauth/token-service.js";
import { startRegistrar } from "../src/registrar/server.js";
import { SqliteRegistrarStore } from "../src/registrar/store/index.js";

/**
 * OAuth benchmarks (`npm run bench:oauth`).
 *  1. Token endpoint, client_credentials + private_key_jwt with assertions pre-signed: our registrar
 *     (the real server: TLS, router, token service) and oidc-provider, both in ONE server child
 *     process, same TLS certificate, same load (undici keep-alive, N in flight, from worker threads
 *     of the parent process). Reported per server: tokens/s, and server CPU ms per token (the child's
 *     process.cpuUsage delta / tokens), which is what throughput on a dedicated core is the inverse of
 *     and is far less sensitive to other load on a shared machine. Goal: registrar ≥ 1.5×.
 *  2. Agent token acquisition latency (OAuthClient.getToken, cache bypassed) with the key in swtpm and
 *     in SoftHSM, Bearer and DPoP, against the registrar.
 */

const ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

interface ServeInfo {
  readonly issuer: string;
  readonly opTokenUrl: string;
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

async function serve(dir: string, deviceJwk: JWK): Promise<void> {
  const paths = caPaths(join(dir, "ca"));
  await initCa({ dir: paths.dir });
  const caPem = await readFile(paths.caCert, "utf8");
  const port = await freeLoopbackPort();
  const issuer = `https://127.0.0.1:${port}`;
  const directory = new InMemoryDeviceDirectory();
  directory.put({
    deviceId: "bench-1",
    status: "active",
    role: "gw",
    attributes: {},
    publicJwk: deviceJwk,
    group: "g",
  });
  const tokenService = new TokenService(
    { issuer, audiences: ["https://api.example"], scopes: { roles: { gw: ["telemetry:write", "est"] } } },
    { directory, signingKey: await loadOrCreateSigningKey(join(dir, "data")), clock: systemClock },
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
  const store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
  const running = await startRegistrar(config, {
    store,
    ca: await FleetCa.load(paths.dir),
    extraRoutes: oauthRoutes({ tokenService }),
  });

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

  const send = (m: ChildMsg) => process.send?.(m);
  process.on("message", async (m: ParentMsg) => {
    if (m.kind === "cpu") {
      const u = process.cpuUsage();
      send({ kind: "cpu", micros: u.user + u.system });
    } else if (m.kind === "register") {
      directory.put({
        deviceId: m.deviceId,
        status: "active",
        role: "gw",
        attributes: {},
        publicJwk: m.jwk,
        group: "g",
      });
      send({ kind: "ok" });
    } else {
      opServer.closeAllConnections();
      opServer.close();
      await running.close();
      store.close();
      process.exit(0);
    }
  });
  send({ kind: "ready", info: { issuer, opTokenUrl: `${opIssuer}/token`, caPem } });
}

// ---------------------------------------------------------------- load generation

interface HammerJob {
  readonly url: string;
  readonly caPem: string;
  readonly assertions: string[];
  readonly concurrency: number;
}
type HammerResult = { ok: number; failed: number };

async function hammerHere(job: HammerJob): Promise<HammerResult> {
  const dispatcher = new Agent({ connect: { ca: job.caPem }, connections: job.concurrency, pipelining: 1 });
  let next = 0;
  let ok = 0;
  let failed = 0;
  const loop = async () => {
    for (;;) {
      const a = job.assertions[next++];
      if (a === undefined) return;
      const body = new URLSearchParams({
        grant_type: "client_credentials",
        client_id: "bench-1",
        client_assertion_type: ASSERTION_TYPE,
        client_assertion: a,
        scope: "telemetry:write",
      });
      const r = await fetch(job.url, {
        method: "POST",
        body,
        headers: { "content-type": "application/x-www-form-urlencoded" },
        dispatcher,
      });
      const j = (await r.json()) as { access_token?: string };
      if (r.status === 200 && typeof j.access_token === "string") ok++;
      else failed++;
    }
  };
  await Promise.all(Array.from({ length: job.concurrency }, loop));
  await dispatcher.close();
  return { ok, failed };
}

/** Splits the load over worker threads so the client is not the bottleneck. */
async function hammer(url: string, caPem: string, assertions: string[], concurrency: number, workers = 2) {
  const per = Math.ceil(assertions.length / workers);
  const t0 = performance.now();
  const parts = await Promise.all(
    Array.from({ length: workers }, (_, i) => {
      const job: HammerJob = {
        url,
        caPem,
        assertions: assertions.slice(i * per, (i + 1) * per),
        concurrency: Math.ceil(concurrency / workers),
      };
      return new Promise<HammerResult>((resolve, reject) => {
        const w = new Worker(new URL(import.meta.url), { workerData: { kind: "hammer", job } });
        w.once("message", (m: HammerResult) => resolve(m));
        w.once("error", reject);
      });
    }),
  );
  const ms = performance.now() - t0;
  const ok = parts.reduce((a, p) => a + p.ok, 0);
  return { ok, failed: parts.reduce((a, p) => a + p.failed, 0), ms };
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

  constructor(dir: string, jwk: JWK) {
    this.#child = fork(fileURLToPath(import.meta.url), ["serve", dir, JSON.stringify(jwk)], {
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

export interface OauthBenchResult {
  readonly requests: number;
  readonly concurrency: number;
  readonly registrar: { tokensPerSec: number[]; cpuMsPerToken: number[] };
  readonly oidcProvider: { tokensPerSec: number[]; cpuMsPerToken: number[] };
  /** Ratios of the per-round medians (registrar / oidc-provider; CPU: oidc-provider / registrar). */
  readonly throughputRatio: number;
  readonly cpuCostRatio: number;
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
  const rounds = options.rounds ?? 5;
  const latencyRuns = options.latencyRuns ?? 30;
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-oauth-"));
  const { privateKey, publicKey } = await generateKeyPair("ES256", { extractable: true });
  const publicJwk = { ...(await exportJWK(publicKey)), alg: "ES256" } as JWK;
  const child = new ServerChild(dir, publicJwk);
  try {
    const ready = await child.next();
    if (ready.kind !== "ready") throw new Error("server child did not start");
    const { issuer, opTokenUrl, caPem } = ready.info;
    const ourUrl = `${issuer}/oauth2/token`;
    const run = async (url: string, aud: string) => {
      const assertions = await presign(requests, privateKey, aud);
      const c0 = await child.cpuMicros();
      const r = await hammer(url, caPem, assertions, concurrency);
      const c1 = await child.cpuMicros();
      if (r.failed > 0) throw new Error(`${r.failed} token requests failed at ${url}`);
      return {
        perSec: Math.round((r.ok / r.ms) * 1000),
        cpuMs: Math.round(((c1 - c0) / 1000 / r.ok) * 1000) / 1000,
      };
    };
    // Warm-up (JIT, connections), then alternate the two servers.
    await hammer(ourUrl, caPem, await presign(400, privateKey, ourUrl), concurrency);
    await hammer(opTokenUrl, caPem, await presign(400, privateKey, opTokenUrl), concurrency);
    const ours = { tokensPerSec: [] as number[], cpuMsPerToken: [] as number[] };
    const theirs = { tokensPerSec: [] as number[], cpuMsPerToken: [] as number[] };
    for (let i = 0; i < rounds; i++) {
      const a = await run(ourUrl, ourUrl);
      const b = await run(opTokenUrl, opTokenUrl);
      ours.tokensPerSec.push(a.perSec);
      ours.cpuMsPerToken.push(a.cpuMs);
      theirs.tokensPerSec.push(b.perSec);
      theirs.cpuMsPerToken.push(b.cpuMs);
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
      agentLatencyMs: latency,
    };
  } finally {
    child.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

if (!isMainThread && (workerData as { kind?: string } | null)?.kind === "hammer") {
  parentPort?.postMessage(await hammerHere((workerData as { job: HammerJob }).job));
} else if (isMainThread && process.argv[2] === "serve" && process.send !== undefined) {
  await serve(process.argv[3] ?? "", JSON.parse(process.argv[4] ?? "{}") as JWK);
} else if (isMainThread && import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const r = await benchOauth({ skipLatency: process.env.BENCH_OAUTH_SKIP_LATENCY === "1" });
  console.log(JSON.stringify(r, null, 2));
  console.log(
    `token endpoint (client_credentials + private_key_jwt, pre-signed, ${r.concurrency} in flight, ${r.requests}/round):\n` +
      `  registrar      ${r.registrar.tokensPerSec.join(" / ")} tokens/s, server CPU ${r.registrar.cpuMsPerToken.join(" / ")} ms/token\n` +
      `  oidc-provider  ${r.oidcProvider.tokensPerSec.join(" / ")} tokens/s, server CPU ${r.oidcProvider.cpuMsPerToken.join(" / ")} ms/token\n` +
      `  → medians: throughput ${r.throughputRatio}×, CPU cost per token ${r.cpuCostRatio}× in the registrar's favour (goal ≥ 1.5×)`,
  );
  for (const [k, v] of Object.entries(r.agentLatencyMs)) {
    console.log(`agent getToken ${k}: p50 ${v.p50} ms, p95 ${v.p95} ms (n=${v.n})`);
  }
}
