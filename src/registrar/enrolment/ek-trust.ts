import { X509Certificate } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { M2mError } from "../../core/errors.js";

export interface EkTrustStore {
  /** Self-signed CA certificates (PEM): the anchors a chain must end at. */
  readonly anchorsPem: readonly string[];
  /** Other CA certificates found in the folder (PEM): candidate intermediates. */
  readonly intermediatesPem: readonly string[];
}

const PEM_CERT = /-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----/g;
const cache = new Map<string, { at: number; store: EkTrustStore }>();
const CACHE_MS = 30_000;

/**
 * Loads a folder of PEM files (`*.pem`, `*.crt`; several certificates per file allowed). Self-signed
 * certificates are trust anchors; the others are intermediates offered to path building (they are
 * never anchors). Cached for 30 s so a busy registrar does not re-read the folder per request.
 * @throws ERR_EK_TRUST_STORE when the folder cannot be read.
 */
export async function loadEkTrustStore(dir: string, nowMs: number): Promise<EkTrustStore> {
  const hit = cache.get(dir);
  if (hit !== undefined && nowMs - hit.at < CACHE_MS) return hit.store;
  const anchorsPem: string[] = [];
  const intermediatesPem: string[] = [];
  let names: string[];
  try {
    names = (await readdir(dir)).filter((n) => /\.(pem|crt)$/i.test(n)).sort();
  } catch (err) {
    throw new M2mError("ERR_EK_TRUST_STORE", "permanent", `cannot read EK trust store ${dir}`, {
      cause: err,
    });
  }
  for (const name of names) {
    const text = await readFile(join(dir, name), "utf8");
    for (const pem of text.match(PEM_CERT) ?? []) {
      try {
        const c = new X509Certificate(pem);
        if (c.checkIssued(c) && c.verify(c.publicKey)) anchorsPem.push(pem);
        else intermediatesPem.push(pem);
      } catch {
        // An unparsable file in the trust folder is skipped, not trusted.
      }
    }
  }
  const store = { anchorsPem, intermediatesPem };
  cache.set(dir, { at: nowMs, store });
  return store;
}

export function derToPem(der: Uint8Array): string {
  const b64 = Buffer.from(der)
    .toString("base64")
    .replace(/(.{64})/g, "$1\n")
    .trimEnd();
  return `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
}
