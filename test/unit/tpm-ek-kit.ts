/** Test helpers for EK certificates as some real TPM vendors issue them. */

/** id-RSAES-OAEP SPKI with TPM 1.2-style parameters (pSourceFunc = pSpecified "TCPA"), same key bits. */
export function oaepLabelledSpki(rsaSpki: Uint8Array): Uint8Array {
  const b = Buffer.from(rsaSpki);
  // rsaEncryption SPKI: 30 82 LL LL | 30 0d <oid rsaEncryption> 05 00 | 03 ... (the key BIT STRING)
  const bits = b.subarray(4 + 15);
  const pSource = Buffer.from(
    `a213301106092a864886f70d0101090404${Buffer.from("TCPA").toString("hex")}`,
    "hex",
  );
  const params = Buffer.concat([Buffer.from([0x30, pSource.length]), pSource]);
  const algBody = Buffer.concat([Buffer.from("06092a864886f70d010107", "hex"), params]);
  const alg = Buffer.concat([Buffer.from([0x30, algBody.length]), algBody]);
  const body = Buffer.concat([alg, bits]);
  return new Uint8Array(
    Buffer.concat([Buffer.from([0x30, 0x82, body.length >> 8, body.length & 0xff]), body]),
  );
}
