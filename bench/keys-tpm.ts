import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { execa } from "execa";
import { startSwtpm } from "../hw/swtpm.js";
import { TpmKeyProvider } from "../src/keys/tpm/tpm-provider.js";

/** Throughput and latency of one benchmark case. */
export interface TpmBenchCase {
  readonly name: string;
  readonly signs: number;
  readonly signsPerSec: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly meanMs: number;
}

export interface TpmBenchResult {
  readonly cases: readonly TpmBenchCase[];
  /** Mean latency of TpmKeyProvider.sign / mean latency of a bare `tpm2_sign` spawn. Goal ≤ 1.15. */
  readonly ratio: number;
  readonly ratioP50: number;
}

export type BenchResult = TpmBenchResult;

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

function summarise(name: string, latenciesMs: number[]): TpmBenchCase {
  const sorted = [...latenciesMs].sort((a, b) => a - b);
  const total = latenciesMs.reduce((a, b) => a + b, 0);
  const round = (v: number) => Math.round(v * 100) / 100;
  return {
    name,
    signs: latenciesMs.length,
    signsPerSec: Math.round((latenciesMs.length / total) * 1000),
    p50Ms: round(percentile(sorted, 50)),
    p99Ms: round(percentile(sorted, 99)),
    meanMs: round(total / latenciesMs.length),
  };
}

/**
 * ES256 on swtpm: N sequential signs through TpmKeyProvider.sign (SHA-256 in Node, queue, tpm2_sign,
 * TPMT_SIGNATURE → r‖s, signature check against the opened key) vs the same `tpm2_sign` command spawned
 * bare with execa. The two are interleaved in blocks so machine noise hits both alike.
 */
export async function benchTpm(options: { signs?: number; block?: number } = {}): Promise<TpmBenchResult> {
  const n = options.signs ?? 200;
  const block = options.block ?? 25;
  const tpm = await startSwtpm();
  const provider = new TpmKeyProvider({ tcti: tpm.tcti });
  const scratch = await mkdtemp(join(tmpdir(), "m2m-bench-tpm-"));
  try {
    await provider.createOrOpen();
    const messages = Array.from({ length: n }, (_, i) =>
      Buffer.from(`{"iss":"device","n":${i},"pad":"${randomBytes(8).toString("hex")}"}`),
    );
    const sigFile = join(scratch, "sig");
    const bareArgs = ["-c", "0x81000002", "-g", "sha256", "-s", "ecdsa", "-d", "-o", sigFile];
    const bare = async (msg: Uint8Array) => {
      const digest = createHash("sha256").update(msg).digest();
      await execa("tpm2_sign", bareArgs, { env: tpm.env, input: digest, timeout: 10_000 });
    };
    // Warm-up: first crypto command after a fresh swtpm start can answer TPM_RC_RETRY; JIT warm-up.
    for (let i = 0; i < 10; i++) {
      await provider.sign(messages[i] ?? Buffer.alloc(1));
      await bare(messages[i] ?? Buffer.alloc(1));
    }
    const providerMs: number[] = [];
    const bareMs: number[] = [];
    for (let start = 0; start < n; start += block) {
      const slice = messages.slice(start, start + block);
      for (const m of slice) {
        const t0 = performance.now();
        await bare(m);
        bareMs.push(performance.now() - t0);
      }
      for (const m of slice) {
        const t0 = performance.now();
        await provider.sign(m, "ES256");
        providerMs.push(performance.now() - t0);
      }
    }
    const bareCase = summarise("bare tpm2_sign spawn (execa)", bareMs);
    const providerCase = summarise("TpmKeyProvider.sign (ES256)", providerMs);
    return {
      cases: [bareCase, providerCase],
      ratio: Math.round((providerCase.meanMs / bareCase.meanMs) * 100) / 100,
      ratioP50: Math.round((providerCase.p50Ms / bareCase.p50Ms) * 100) / 100,
    };
  } finally {
    await provider.close();
    await rm(scratch, { recursive: true, force: true });
    await tpm.stop();
  }
}

function print(r: TpmBenchResult): void {
  const rows = r.cases.map(
    (c) =>
      `${c.name.padEnd(32)} ${String(c.signsPerSec).padStart(5)} signs/s   p50 ${c.p50Ms.toFixed(2).padStart(6)} ms   p99 ${c.p99Ms.toFixed(2).padStart(6)} ms   mean ${c.meanMs.toFixed(2).padStart(6)} ms`,
  );
  process.stdout.write(
    `TPM ES256 on swtpm (${r.cases[0]?.signs ?? 0} sequential signs per case, interleaved)\n${rows.join("\n")}\n` +
      `ratio provider/bare: mean ${r.ratio}×, p50 ${r.ratioP50}× (goal ≤ 1.15×)\n`,
  );
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  benchTpm().then(print, (err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  });
}
