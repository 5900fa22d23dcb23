import type { TpmTx } from "./runner.js";

/**
 * On a TCTI without a resource manager (swtpm, /dev/tpm0) every `-c file.ctx` that tpm2-tools loads
 * stays loaded after the tool exits, and the TPM has only ~3 transient slots. Creation paths therefore
 * snapshot the transient handles, run, and flush exactly the handles that appeared meanwhile (never
 * `tpm2_flushcontext -t`, which would also flush someone else's objects). The caller holds the queue.
 * Through a kernel resource manager (/dev/tpmrm0) the list is per-connection and stays empty.
 */
export async function withTransientCleanup<T>(tx: TpmTx, fn: () => Promise<T>): Promise<T> {
  const before = new Set(await listHandles(tx, "handles-transient"));
  try {
    return await fn();
  } finally {
    const after = await listHandles(tx, "handles-transient").catch(() => [] as string[]);
    for (const h of after) {
      if (!before.has(h)) {
        await tx.run("tpm2_flushcontext", [h], { op: "flush" }).catch(() => undefined);
      }
    }
  }
}

/** Lists handles of a getcap capability (`handles-transient`, `handles-persistent`, `handles-nv-index`). */
export async function listHandles(tx: TpmTx, capability: string): Promise<string[]> {
  const res = await tx.run("tpm2_getcap", [capability], { op: "getcap" });
  return [...res.text.matchAll(/^-\s*(0x[0-9a-fA-F]+)\s*$/gm)].map((m) => (m[1] ?? "").toLowerCase());
}

/** Flushes a session context file (policy sessions); best effort, never throws. */
export async function flushSession(tx: TpmTx, sessionFile: string): Promise<void> {
  await tx.run("tpm2_flushcontext", [sessionFile], { op: "flush-session" }).catch(() => undefined);
}

export function hex32(handle: number): string {
  return `0x${(handle >>> 0).toString(16).padStart(8, "0")}`;
}
