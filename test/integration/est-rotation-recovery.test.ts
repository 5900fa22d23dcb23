import "reflect-metadata";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import type { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import { AlternatingKeyRotation } from "../../src/keys/rotation.js";
import { FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/fleet-ca.js";

/** Crash points of a key rotation: each leaves a state from which the device recovers. */
describe("AlternatingKeyRotation crash recovery", () => {
  let dir: string;
  let ca: FleetCa;
  const clock = new ManualClock(new Date());

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-rot-rec-"));
    await initCa({ dir: join(dir, "ca"), clock });
    ca = await FleetCa.load(join(dir, "ca"), clock);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function certFor(keys: FakeKeyProvider): Promise<string> {
    const info = await keys.open();
    const v = await verifyCsr(await createCsr(keys, info, { commonName: "dev" }));
    return (
      await ca.issueDeviceCertificate(v, {
        deviceId: "dev",
        expectedSpkiDer: v.spkiDer,
        lifetimeSeconds: 3600,
      })
    ).pem;
  }

  function rig(name: string) {
    const store = new FakeKeyStore();
    const make = (label: string) => new FakeKeyProvider({ store, label });
    const rotation = new AlternatingKeyRotation({
      names: ["a", "b"],
      stateFile: join(dir, `${name}.json`),
      make,
    });
    return { store, make, rotation };
  }

  it("crash after prepare (before the cert): the pending key is reopened, not replaced", async () => {
    const { rotation } = rig("p1");
    const first = await rotation.prepare();
    const again = await rotation.prepare();
    expect((await again.open()).thumbprint).toBe((await first.open()).thumbprint);
    await rotation.abort(again);
    expect(await rotation.currentName()).toBe("a");
  });

  it("a leftover key under the other name (crash inside commit) is destroyed, never reused", async () => {
    const { make, rotation, store } = rig("p2");
    const stale = make("b");
    const staleInfo = await stale.createOrOpen();
    const next = await rotation.prepare();
    expect((await next.open()).thumbprint).not.toBe(staleInfo.thumbprint);
    expect(store.keys.has("b")).toBe(true);
  });

  it("crash after the new cert was written but before commit: the renewer completes the rotation", async () => {
    const { make, rotation, store } = rig("p3");
    const current = make("a");
    await current.createOrOpen();
    const certFile = join(dir, "p3.pem");
    await writeFile(certFile, await certFor(current));
    const next = (await rotation.prepare()) as FakeKeyProvider;
    await writeFile(certFile, await certFor(next)); // …and the process died here
    const est = { simplereenroll: async () => [] } as unknown as EstClient;
    const renewer = new CertificateRenewer(
      { deviceId: "dev", certFile, caPem: ca.certificatePem, rotateKey: true },
      { keys: current, est, clock, rotation },
    );
    expect(await renewer.recoverRotation()).toBe(true);
    expect(await rotation.currentName()).toBe("b");
    expect(store.keys.has("a")).toBe(false);
    expect((await renewer.keys.open()).thumbprint).toBe((await next.open()).thumbprint);
    expect(new X509Certificate(await readFile(certFile, "utf8")).subject).toContain("dev");
    expect(await renewer.recoverRotation()).toBe(false); // idempotent
  });

  it("refuses a corrupt state file instead of guessing which key is current", async () => {
    const { rotation } = rig("p4");
    await writeFile(join(dir, "p4.json"), "{");
    await expect(rotation.currentName()).rejects.toMatchObject({ code: "ERR_KEY_ROTATION_STATE" });
  });
});
