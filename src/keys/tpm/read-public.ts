import { readFile } from "node:fs/promises";
import { M2mError } from "../../core/errors.js";
import type { TpmTx } from "./runner.js";
import { type ParsedPublic, parseTpmtPublic, publicKeyOf } from "./tpmt.js";
import { hex32 } from "./transient.js";

/** `tpm2_readpublic -f tpmt`; undefined when the handle is empty. */
export async function readPublicOrUndefined(tx: TpmTx, handle: number): Promise<ParsedPublic | undefined> {
  const out = tx.path("pub.tpmt");
  try {
    await tx.run("tpm2_readpublic", ["-c", hex32(handle), "-f", "tpmt", "-o", out], { op: "readpublic" });
  } catch (err) {
    if (err instanceof M2mError && err.code === "ERR_TPM_HANDLE_MISSING") return undefined;
    throw err;
  }
  return parseTpmtPublic(new Uint8Array(await readFile(out)));
}

/** Public key (SPKI PEM) of an object in the TPM. */
export function spkiPemOf(pub: ParsedPublic): string {
  return publicKeyOf(pub).export({ format: "pem", type: "spki" }).toString();
}
