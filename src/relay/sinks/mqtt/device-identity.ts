import { createPublicKey, X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { M2mError } from "../../../core/errors.js";
import type { DeviceKeyOwner } from "../../../keys/device-key.js";
import type { MtlsIdentity } from "./mqtt-sink.js";

/**
 * The owner's CURRENT key with the certificate on disk, read at every MQTT connect. A certificate
 * issued for another key is refused (transient: a rotation is between "certificate written" and
 * "key switched" and settles within moments) rather than paired with the wrong key.
 */
export async function currentIdentity(
  keys: Pick<DeviceKeyOwner, "current" | "info">,
  certFile: string,
): Promise<MtlsIdentity> {
  const key = keys.current;
  const tls = key.tlsClient;
  if (tls === undefined)
    throw new M2mError("ERR_TLS_KEY_UNAVAILABLE", "permanent", "the device key cannot do TLS");
  const [certPem, info] = await Promise.all([readFile(certFile, "utf8"), keys.info()]);
  // Security: the broker would see a certificate whose key did not sign the handshake (it fails), or
  // worse a destroyed key paired with a new certificate; only a matching pair is ever used.
  if (!new X509Certificate(certPem).publicKey.equals(createPublicKey(info.spkiPem)))
    throw new M2mError(
      "ERR_TLS_CERT_KEY_MISMATCH",
      "transient",
      "the device certificate is not for the current key yet",
    );
  return { certPem, key: tls, keyId: info.thumbprint };
}
