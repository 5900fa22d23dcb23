// Child process for est-crash.test.ts: renews the device certificate over EST (mTLS with a
// software device key) in a loop until it is SIGKILLed. argv: certFile keyFile caFile baseUrl deviceId
import { createPrivateKey, createPublicKey } from "node:crypto";
import { readFile } from "node:fs/promises";
import { systemClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";

const [certFile, keyFile, caFile, baseUrl, deviceId] = process.argv.slice(2) as [
  string,
  string,
  string,
  string,
  string,
];
const keyPem = await readFile(keyFile, "utf8");
const caPem = await readFile(caFile, "utf8");
const privateKey = createPrivateKey(keyPem);
const store = new FakeKeyStore();
store.keys.set("device", { privateKey, publicKey: createPublicKey(privateKey) });
const keys = new FakeKeyProvider({ store, label: "device" });
const est = new EstClient(
  { baseUrl, caPem },
  { kind: "mtls", certPem: () => readFile(certFile, "utf8"), key: keyPem },
  systemClock,
);
const renewer = new CertificateRenewer({ deviceId, certFile, caPem }, { keys, est, clock: systemClock });
for (let i = 1; ; i++) {
  await renewer.renew();
  process.stdout.write(`renewed ${i}\n`);
}
