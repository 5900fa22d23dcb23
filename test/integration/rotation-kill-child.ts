// Child process for rotation-crash.test.ts: starts a TPM key rotation and stops dead at one step
// (prints `at <step>` and waits) so that the parent can SIGKILL it exactly there.
// argv[2]: JSON { tcti, issuer, caFile, deviceId, certFile, stateFile, step }
import { readFile } from "node:fs/promises";
import { writeFileAtomic } from "../../src/core/atomic-file.js";
import { systemClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer, type KeyRotation } from "../../src/credentials/est/renewer.js";
import { TpmRotationClient } from "../../src/credentials/est/tpm-rotation.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { tpmKeyRotation } from "../../src/keys/tpm/rotation.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";

const o = JSON.parse(process.argv[2] ?? "{}") as {
  tcti: string;
  issuer: string;
  caFile: string;
  deviceId: string;
  certFile: string;
  stateFile: string;
  step: "before-call" | "before-write" | "before-commit";
};
const stop = async (step: string): Promise<void> => {
  if (step !== o.step) return;
  process.stdout.write(`at ${step}\n`);
  await new Promise(() => undefined);
};
const caPem = await readFile(o.caFile, "utf8");
const base = new TpmKeyProvider({ tcti: o.tcti, timeoutMs: 20_000 });
const rotation = tpmKeyRotation(base, o.stateFile);
const keys = await rotation.current();
const oauth = new OAuthClient(
  { clientId: o.deviceId, issuer: o.issuer, caPem, dpop: true },
  { keys, clock: systemClock },
);
const dpop = await oauth.dpopSigner();
if (dpop === undefined) throw new Error("no DPoP signer");
const client = new TpmRotationClient({ baseUrl: o.issuer, caPem }, { tokens: oauth, dpop });
const paused: KeyRotation = {
  prepare: () => rotation.prepare(),
  abort: (next) => rotation.abort(next),
  hasPending: () => rotation.hasPending(),
  commit: async (next) => {
    await stop("before-commit");
    return rotation.commit(next);
  },
};
const renewer = new CertificateRenewer(
  { deviceId: o.deviceId, certFile: o.certFile, caPem, rotateKey: true },
  {
    keys,
    est: new EstClient({ baseUrl: o.issuer, caPem }, { kind: "token", tokens: oauth, dpop }, systemClock),
    clock: systemClock,
    rotation: paused,
    issueWithNewKey: async (next, csr) => {
      await stop("before-call");
      const certs = await client.issue(next, csr);
      await stop("before-write");
      return certs;
    },
    writeFile: (path, data) => writeFileAtomic(path, data, 0o600),
  },
);
await renewer.renew();
process.stdout.write("done\n");
