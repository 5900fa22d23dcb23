import { generateKeyPairSync } from "node:crypto";
import { copyFile, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { startSwtpm } from "../hw/swtpm.js";
import {
  type EnrollTpmOps,
  enrollTpm,
  RegistrarClient,
  runEnroll,
  tpmEnrollOps,
} from "../src/enroll/index.js";
import { FakeKeyProvider } from "../src/keys/fake/fake-provider.js";
import { TpmKeyProvider } from "../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../src/registrar/admin.js";
import { startRegistrar } from "../src/registrar/server.js";
import { ekFingerprint } from "../src/registrar/verifier/tpm-verifier.js";
import type { TpmtPublic } from "../src/tpm/public.js";
import { softTpmOps as sharedSoftTpmOps } from "./fleet/soft-tpm.js";
import { benchRegistrarSetup } from "./registrar-setup.js";

/**
 * Enrolment benchmarks.
 *  1. Full attested enrolment on swtpm end to end (`runEnroll`: key open, EK read, AK, begin over
 *     HTTPS, credential activation, certify with nonce, CSR signed in the TPM, finish, state write).
 *     Goal ≤ 1.5 s.
 *  2. Registrar verification throughput: begin+finish pairs/s over HTTPS with the TPM replaced by
 *     software keys encoded as TPM structures (prepared in advance), so the figure is the registrar's.
 */

/** A software stand-in for the TPM's attestation operations (bench / tests only): RSA EK, P-256 AK. */
export async function softTpmOps(
  device: FakeKeyProvider,
): Promise<{ ops: EnrollTpmOps; ekPublic: TpmtPublic }> {
  return sharedSoftTpmOps({
    ek: generateKeyPairSync("rsa", { modulusLength: 2048 }),
    ak: generateKeyPairSync("ec", { namedCurve: "P-256" }),
    device,
  });
}

function stats(ms: number[]): {
  n: number;
  p50: number;
  p95: number;
  mean: number;
  min: number;
  max: number;
} {
  const s = [...ms].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? 0;
  const r = (v: number) => Math.round(v * 10) / 10;
  return {
    n: s.length,
    p50: r(at(0.5)),
    p95: r(at(0.95)),
    mean: r(s.reduce((a, b) => a + b, 0) / s.length),
    min: r(s[0] ?? 0),
    max: r(s[s.length - 1] ?? 0),
  };
}

async function startBenchRegistrar(dir: string) {
  const { config, store, ca, caFile } = await benchRegistrarSetup(dir);
  const running = await startRegistrar(config, { store, ca });
  return { store, running, caFile };
}

export interface EnrollBenchResult {
  readonly swtpmFirstMs: number;
  readonly swtpmRepeatMs: ReturnType<typeof stats>;
  readonly registrarPairsPerSec: number;
  readonly registrarPairs: number;
  readonly concurrency: number;
  readonly serverBeginMs: ReturnType<typeof stats>;
  readonly serverFinishMs: ReturnType<typeof stats>;
}

export async function benchEnroll(options: { repeats?: number; pairs?: number; concurrency?: number } = {}) {
  const repeats = options.repeats ?? 8;
  const pairs = options.pairs ?? 300;
  const concurrency = options.concurrency ?? 8;
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-enroll-"));
  const reg = await startBenchRegistrar(dir);
  const tpm = await startSwtpm();
  const provider = new TpmKeyProvider({ tcti: tpm.tcti });
  try {
    // ---- 1. swtpm end to end ------------------------------------------------------------------
    const trust = join(dir, "ek-trust");
    await mkdir(trust);
    await copyFile(tpm.rootCaPemPath, join(trust, "root.pem"));
    await copyFile(tpm.intermediateCaPemPath, join(trust, "intermediate.pem"));
    await addEnrolmentGroup(reg.store, { name: "gw", role: "gateway", methods: ["tpm"], ekTrustDir: trust });
    await provider.createOrOpen();
    const ops = tpmEnrollOps(provider);
    const cfg = {
      registrarUrl: reg.running.url,
      registrarCaFile: reg.caFile,
      method: "tpm" as const,
      group: "gw",
      hardwareSerial: "BENCH-1",
      stateDir: join(dir, "state"),
    };
    let t0 = performance.now();
    await runEnroll(cfg, { keyProvider: provider, tpm: ops, force: true });
    const swtpmFirstMs = Math.round(performance.now() - t0);
    const repeat: number[] = [];
    for (let i = 0; i < repeats; i++) {
      t0 = performance.now();
      await runEnroll(cfg, { keyProvider: provider, tpm: ops, force: true });
      repeat.push(performance.now() - t0);
    }

    // ---- 2. registrar throughput with software "TPM" evidence ------------------------------------
    const device = new FakeKeyProvider({ label: "soft" });
    const soft = await softTpmOps(device);
    await addEnrolmentGroup(reg.store, {
      name: "soft",
      role: "gateway",
      methods: ["tpm"],
      ekAllow: [ekFingerprint(soft.ekPublic)],
    });
    const client = await RegistrarClient.create({ baseUrl: reg.running.url, caFile: reg.caFile });
    const auditBefore = (await reg.store.listAudit(1_000_000)).length;
    const once = () =>
      enrollTpm({ client, provider: device, tpm: soft.ops, group: "soft", hardwareSerial: "SOFT-1" });
    await once(); // warm-up (first registration; later ones are re-enrolments of the same hardware)
    let done = 0;
    t0 = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (done < pairs) {
          done++;
          await once();
        }
      }),
    );
    const elapsed = performance.now() - t0;
    await client.close();
    const audit = (await reg.store.listAudit(1_000_000)).slice(auditBefore + 2);
    const ms = (ev: string) => audit.filter((a) => a.event === ev).map((a) => Number(a.ms));
    return {
      swtpmFirstMs,
      swtpmRepeatMs: stats(repeat),
      registrarPairsPerSec: Math.round((done / elapsed) * 1000),
      registrarPairs: done,
      concurrency,
      serverBeginMs: stats(ms("enroll.tpm.begin")),
      serverFinishMs: stats(ms("enroll.tpm.finish")),
    } satisfies EnrollBenchResult;
  } finally {
    await provider.close();
    await tpm.stop();
    await reg.running.close();
    await reg.store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const r = await benchEnroll();
  console.log(JSON.stringify(r, null, 2));
  console.log(
    `swtpm end-to-end enrolment: first ${r.swtpmFirstMs} ms, repeat p50 ${r.swtpmRepeatMs.p50} ms ` +
      `(p95 ${r.swtpmRepeatMs.p95} ms; goal ≤ 1500 ms)`,
  );
  console.log(
    `registrar: ${r.registrarPairsPerSec} begin+finish pairs/s over HTTPS (concurrency ${r.concurrency}, ` +
      `client in the same process); server time begin p50 ${r.serverBeginMs.p50} ms, finish p50 ${r.serverFinishMs.p50} ms`,
  );
}
