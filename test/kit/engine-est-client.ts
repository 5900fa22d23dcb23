import { readFile } from "node:fs/promises";
import type { SoftHsmHandle } from "../../hw/softhsm.js";
import { systemClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { createEngineSecureContext } from "../../src/keys/pkcs11/engine-tls.js";

/**
 * An EST client authenticated over mTLS by the certificate in `certFile` (read at each handshake) and
 * the token key `keyLabel()` (asked at each handshake: after a rotation it names the new key), the
 * key used through the OpenSSL PKCS#11 engine.
 */
export function engineMtlsEstClient(o: {
  readonly baseUrl: string;
  readonly caPem: string;
  readonly hsm: Pick<SoftHsmHandle, "modulePath" | "tokenLabel" | "pinFile">;
  readonly certFile: string;
  readonly keyLabel: () => string | Promise<string>;
}): EstClient {
  return new EstClient(
    { baseUrl: o.baseUrl, caPem: o.caPem },
    {
      kind: "mtls",
      certPem: () => readFile(o.certFile, "utf8"),
      secureContext: async (certPem) =>
        createEngineSecureContext({
          modulePath: o.hsm.modulePath,
          tokenLabel: o.hsm.tokenLabel,
          keyLabel: await o.keyLabel(),
          pinFile: o.hsm.pinFile,
          certPem,
          caPem: o.caPem,
        }),
    },
    systemClock,
  );
}
