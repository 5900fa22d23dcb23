import { createHash } from "node:crypto";
import { pathToFileURL } from "node:url";
import pkcs11js from "pkcs11js";
import { initSoftHsm } from "../hw/softhsm.js";
import { finalizeModule, loadModule, Pkcs11KeyProvider } from "../src/keys/pkcs11/index.js";

/** Throughput and latency of one benchmark case. */
export interface BenchCase {
  readonly name: string;
  readonly signs: number;
  readonly signsPerSec: number;
  readonly p50Us: number;
  readonly p99Us: number;
}

export interface Pkcs11BenchResult {
  readonly cases: readonly BenchCase[];
  /** provider sequential / raw sync loop (signs per second). Goal ≥ 0.85. */
  readonly ratioSequential: number;
  /** provider with 64 in flight / raw sync loop. */
  readonly ratioConcurrent: number;
  /**
   * raw p50 latency / provider sequential p50 latency: the per-signature overhead ratio, far less
   * sensitive to other processes stealing the CPU than wall-clock throughput on a shared machine.
   */
  readonly ratioSequentialP50: number;
}

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

function summarise(name: string, latenciesMs: number[], wallMs: number): BenchCase {
  const sorted = [...latenciesMs].sort((a, b) => a - b);
  return {
    name,
    signs: latenciesMs.length,
    signsPerSec: Math.round((latenciesMs.length / wallMs) * 1000),
    p50Us: Math.round(percentile(sorted, 50) * 1000),
    p99Us: Math.round(percentile(sorted, 99) * 1000),
  };
}

/**
 * Signs/s and p50/p99 latency on a fresh SoftHSM2 token: (a) raw pkcs11js loop (sync C_SignInit +
 * C_Sign, SHA-256 in node, CKM_ECDSA), (b) Pkcs11KeyProvider.sign sequential, (c) provider with 64
 * signs in flight, plus the async-only provider (syncBudgetMs 0) for comparison.
 */
export async function benchPkcs11(
  options: { signs?: number; rounds?: number } = {},
): Promise<Pkcs11BenchResult> {
  const n = options.signs ?? 4000;
  const rounds = options.rounds ?? 5;
  const hsm = await initSoftHsm({ label: "m2m-bench" });
  process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
  const base = { modulePath: hsm.modulePath, tokenLabel: hsm.tokenLabel, pin: { file: hsm.pinFile } };
  const provider = new Pkcs11KeyProvider(base);
  const asyncOnly = new Pkcs11KeyProvider({ ...base, syncBudgetMs: 0 });
  try {
    await provider.createOrOpen();
    await asyncOnly.open();
    const messages = Array.from({ length: n }, (_, i) =>
      Buffer.from(`{"iss":"device","n":${i},"pad":"${"x".repeat(200)}"}`),
    );

    // (a) raw pkcs11js on its own session of the same (already logged-in) module instance.
    const lib = loadModule(hsm.modulePath);
    const slot = lib
      .C_GetSlotList(true)
      .find((s) => lib.C_GetTokenInfo(s).label.trimEnd() === hsm.tokenLabel);
    if (slot === undefined) throw new Error("bench token not found");
    const session = lib.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION);
    lib.C_FindObjectsInit(session, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY },
      { type: pkcs11js.CKA_LABEL, value: "m2m-device" },
    ]);
    const key = lib.C_FindObjects(session, 1)[0];
    lib.C_FindObjectsFinal(session);
    if (key === undefined) throw new Error("bench key not found");
    const mech = { mechanism: pkcs11js.CKM_ECDSA };
    const raw = async (): Promise<BenchCase> => {
      const lat: number[] = [];
      const t0 = performance.now();
      for (const m of messages) {
        const s = performance.now();
        const digest = createHash("sha256").update(m).digest();
        lib.C_SignInit(session, mech, key);
        lib.C_Sign(session, digest, Buffer.allocUnsafe(64));
        lat.push(performance.now() - s);
      }
      return summarise("raw pkcs11js sync loop", lat, performance.now() - t0);
    };

    const sequential = (p: Pkcs11KeyProvider, name: string) => async (): Promise<BenchCase> => {
      const lat: number[] = [];
      const t0 = performance.now();
      for (const m of messages) {
        const s = performance.now();
        await p.sign(m);
        lat.push(performance.now() - s);
      }
      return summarise(name, lat, performance.now() - t0);
    };

    const concurrent =
      (p: Pkcs11KeyProvider, name: string, inFlight: number) => async (): Promise<BenchCase> => {
        const lat: number[] = [];
        let next = 0;
        const t0 = performance.now();
        const worker = async (): Promise<void> => {
          while (next < messages.length) {
            const m = messages[next++] as Buffer; // index < length checked by the loop
            const s = performance.now();
            await p.sign(m);
            lat.push(performance.now() - s);
          }
        };
        await Promise.all(Array.from({ length: inFlight }, worker));
        return summarise(name, lat, performance.now() - t0);
      };

    // Warm-up (JIT, SoftHSM object cache).
    await raw();
    await sequential(provider, "warm")();

    // Rounds interleave the cases so that a burst of load from elsewhere on the machine hits all of them.
    const runs: Array<() => Promise<BenchCase>> = [
      raw,
      sequential(provider, "provider sequential"),
      concurrent(provider, "provider 64 in flight", 64),
      sequential(asyncOnly, "provider async-only sequential"),
      concurrent(asyncOnly, "provider async-only 64 in flight", 64),
    ];
    const best: Array<BenchCase | undefined> = runs.map(() => undefined);
    for (let r = 0; r < rounds; r++) {
      for (const [k, run] of runs.entries()) {
        const c = await run();
        const prev = best[k];
        if (prev === undefined || c.signsPerSec > prev.signsPerSec) best[k] = c;
      }
    }
    const cases = best.filter((c): c is BenchCase => c !== undefined);
    const [rawCase, seq, conc] = cases;
    if (rawCase === undefined || seq === undefined || conc === undefined) throw new Error("bench incomplete");
    lib.C_CloseSession(session);
    return {
      cases,
      ratioSequential: Math.round((seq.signsPerSec / rawCase.signsPerSec) * 100) / 100,
      ratioConcurrent: Math.round((conc.signsPerSec / rawCase.signsPerSec) * 100) / 100,
      ratioSequentialP50: Math.round((rawCase.p50Us / Math.max(1, seq.p50Us)) * 100) / 100,
    };
  } finally {
    await provider.close();
    await asyncOnly.close();
    finalizeModule(hsm.modulePath);
    await hsm.cleanup();
  }
}

function print(r: Pkcs11BenchResult): void {
  const rows = r.cases.map(
    (c) =>
      `${c.name.padEnd(36)} ${String(c.signsPerSec).padStart(7)} signs/s   p50 ${String(c.p50Us).padStart(6)} µs   p99 ${String(c.p99Us).padStart(6)} µs`,
  );
  process.stdout.write(
    `PKCS#11 ES256 on SoftHSM2 (${r.cases[0]?.signs ?? 0} signs per case, best of rounds)\n${rows.join("\n")}\n` +
      `ratio provider/raw: sequential ${r.ratioSequential}×, 64 in flight ${r.ratioConcurrent}×, ` +
      `sequential by p50 latency ${r.ratioSequentialP50}× (goal ≥ 0.85×)\n`,
  );
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  benchPkcs11().then(print, (err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  });
}
