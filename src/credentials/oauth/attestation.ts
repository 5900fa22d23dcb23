import { open } from "node:fs/promises";
import { base64url } from "jose";
import { M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import type { TpmAttestation } from "../../keys/capabilities.js";
import {
  type AttestationEvidence,
  MAX_EVENT_LOG_BYTES,
  type PcrSelection,
  quoteQualifyingData,
  WIRE_VERSION,
} from "../../wire/v1/index.js";

/** Makes the evidence a token request carries when the authorization server asks for a TPM quote. */
export interface AttestationEvidenceSource {
  evidence(nonce: string, selection: PcrSelection): Promise<AttestationEvidence>;
}

/**
 * Reads the measured-boot event log: at most MAX_EVENT_LOG_BYTES (a larger log is not sent: the
 * registrar then works with PCR values alone). Undefined when the file does not exist (no firmware
 * log, or no securityfs): normal on many devices.
 */
export async function readEventLog(
  path: string,
  log: Logger = silentLogger,
): Promise<Uint8Array | undefined> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(path, "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    log.warn("event log unreadable; quoting PCR values alone", { path, error: err });
    return undefined;
  }
  try {
    // securityfs files report size 0: read in chunks up to the cap + 1.
    const buf = Buffer.alloc(MAX_EVENT_LOG_BYTES + 1);
    let n = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, null);
      if (bytesRead === 0) break;
      n += bytesRead;
      if (n >= buf.length) break;
    }
    if (n > MAX_EVENT_LOG_BYTES) {
      log.warn("event log larger than the wire limit; quoting PCR values alone", { path });
      return undefined;
    }
    return n === 0 ? undefined : new Uint8Array(buf.subarray(0, n));
  } finally {
    await fh.close();
  }
}

/** The evidence source of a TPM key: TPM2_Quote by its enrolled AK, plus the event log when present. */
export function tpmEvidenceSource(
  attestation: TpmAttestation,
  options: { readonly eventLogPath?: string | undefined; readonly log?: Logger } = {},
): AttestationEvidenceSource {
  return {
    async evidence(nonce, selection) {
      const q = await attestation.quote(quoteQualifyingData(nonce), selection.bank, selection.pcrs);
      const values: Record<string, string> = {};
      const sorted = [...selection.pcrs].sort((a, b) => a - b);
      sorted.forEach((p, i) => {
        const v = q.values[i];
        if (v === undefined) throw new M2mError("ERR_TPM_RESPONSE", "permanent", "missing PCR value");
        values[String(p)] = Buffer.from(v).toString("hex");
      });
      const logBytes =
        options.eventLogPath === undefined
          ? undefined
          : await readEventLog(options.eventLogPath, options.log);
      return {
        v: WIRE_VERSION,
        nonce,
        quote: base64url.encode(q.attest),
        signature: base64url.encode(q.signature),
        pcrs: { bank: selection.bank, values },
        ...(logBytes === undefined ? {} : { eventLog: base64url.encode(logBytes) }),
      };
    },
  };
}
