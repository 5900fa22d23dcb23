import type { KeyObject } from "node:crypto";
import { createPublicKey, X509Certificate } from "node:crypto";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, createServer, type Server, type TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { isM2mError } from "../../src/core/errors.js";
import { TpmAttestationOps } from "../../src/keys/tpm/endorsement.js";
import { requireResourceManagerTcti, TpmTlsKeys, tpmTlsKeyLabel } from "../../src/keys/tpm/tls.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import {
  beginActivation,
  checkAkPublic,
  checkEkPublic,
  verifyActivationAndCertify,
  verifyEkCertificate,
} from "../../src/registrar/verifier/tpm-verifier.js";
import { newMessageId } from "../../src/relay/ids.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { startSubscriber } from "./relay-helpers.js";

/**
 * The attested TPM device key signs TLS handshakes (src/keys/tpm/tls.ts): swtpm behind tpm2-abrmd on a
 * private D-Bus bus (the gateway's /dev/tpmrm0 plays that role), the key created by TpmKeyProvider and
 * enrolled the registrar's way (EK certificate, credential activation, TPM2_Certify over a nonce,
 * verified by the registrar's verifier), exposed through tpm2-pkcs11 and the OpenSSL pkcs11 engine.
 */
describe("TPM device key for mTLS (tpm2-pkcs11 + pkcs11 engine)", () => {
  let tpm: SwtpmHandle;
  let dir: string;
  let broker: Mosquitto;
  let provider: TpmKeyProvider;
  let tlsKeys: TpmTlsKeys;
  /** The public key the registrar's verifier accepted from TPM2_Certify (the enrolled key). */
  let enrolledKey: KeyObject;
  let certPem: string;
  let pinFile: string;
  const PIN = "tpm-user-pin-7319";
  const DEVICE = "dev-tpm";

  /** MQTT mTLS through the key's own `tlsClient` capability (what the daemon's relay stage uses). */
  const tpmAuth = () => ({
    kind: "mtls-key" as const,
    identity: async () => {
      const key = provider.tlsClient;
      if (key === undefined) throw new Error("the TPM key offers no tlsClient capability");
      return { certPem, key, keyId: String(provider.keyHandle) };
    },
  });

  beforeAll(async () => {
    tpm = await startSwtpm({ resourceManager: "abrmd" });
    // The tabrmd TCTI finds the broker on this bus: tools (runner children) and the module in-process.
    process.env.DBUS_SESSION_BUS_ADDRESS = tpm.dbusAddress ?? "";
    dir = await mkdtemp(join(tmpdir(), "m2m-tpm-tls-"));
    await chmod(dir, 0o700);
    pinFile = join(dir, "token.pin");
    await writeFile(pinFile, `${PIN}\n`, { mode: 0o600 });

    tlsKeys = new TpmTlsKeys({ storeDir: join(dir, "p11"), tcti: tpm.tcti, userPinFile: pinFile });
    provider = new TpmKeyProvider({ tcti: tpm.tcti, keyBlobDir: join(dir, "blobs"), tls: tlsKeys });
    await provider.createOrOpen();

    // Enrolment, agent and registrar side (registrar/verifier): what the registrar certifies.
    const ops = new TpmAttestationOps(provider.runner);
    const [ekCert] = (await ops.readEkCertificates()).filter((c) => c.nvIndex === 0x01c00002);
    const ek = (await ops.readEkPublics()).find((e) => e.kind === "rsa-2048");
    if (ekCert === undefined || ek === undefined) throw new Error("swtpm has no RSA EK / certificate");
    const ak = await ops.createAk();
    const [root = "", inter = ""] = tpm.caCertPems;
    const cert = await verifyEkCertificate(ekCert.der, [root], [inter], new Date());
    const ekPublic = checkEkPublic(ek.tpm2bPublic, cert.publicKey);
    const ch = beginActivation(ekPublic, checkAkPublic(ak.tpm2bPublic).name);
    const recovered = await ops.activateCredential(ch.blob);
    const certified = await ops.certify(provider.keyHandle, ops.akHandle, ch.nonce);
    const ev = await provider.evidence();
    if (ev.kind !== "tpm") throw new Error("not a TPM key");
    const tpmt = Buffer.from(ev.tpmtPublicHex, "hex");
    const devicePublic = Buffer.concat([Buffer.from([tpmt.length >> 8, tpmt.length & 0xff]), tpmt]);
    enrolledKey = verifyActivationAndCertify({
      expectedSecret: ch.secret,
      recoveredSecret: recovered.reveal(),
      ekPublic,
      akPublic: ak.tpm2bPublic,
      nonce: ch.nonce,
      attestBytes: certified.attest,
      signatureBytes: certified.signature,
      devicePublic,
    }).deviceKey;

    broker = await startMosquitto();
    const publicKeyPem = enrolledKey.export({ format: "pem", type: "spki" }).toString();
    certPem = (await broker.ca.issueClient(DEVICE, { publicKeyPem })).certPem;
  }, 180_000);

  afterAll(async () => {
    await broker?.cleanup();
    await tpm?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it("refuses a TCTI without a resource manager (engine and tpm2-tools would evict each other's objects)", () => {
    for (const tcti of ["swtpm:host=127.0.0.1,port=2321", "device:/dev/tpm0", "mssim:port=2321"]) {
      let err: unknown;
      try {
        requireResourceManagerTcti(tcti);
      } catch (e) {
        err = e;
      }
      expect(isM2mError(err, "ERR_KEY_CONFIG")).toBe(true);
    }
    expect(() => requireResourceManagerTcti("device:/dev/tpmrm0")).not.toThrow();
    expect(() => requireResourceManagerTcti(tpm.tcti)).not.toThrow();
  });

  it("links the enrolled key without any PIN or auth value on a command line", async () => {
    // Every tpm2-tools binary tpm2_ptool spawns is shadowed by a wrapper that logs its argv.
    const bin = join(dir, "argv-spy");
    const log = join(dir, "argv.log");
    const { mkdir } = await import("node:fs/promises");
    await mkdir(bin, { mode: 0o700 });
    const tools = ["tpm2_create", "tpm2_load", "tpm2_unseal", "tpm2_encryptdecrypt", "tpm2_createprimary"];
    for (const t of [
      ...tools,
      "tpm2_readpublic",
      "tpm2_evictcontrol",
      "tpm2_changeauth",
      "tpm2_loadexternal",
    ]) {
      await writeFile(
        join(bin, t),
        `#!/bin/sh\nprintf '%s\\n' "$0 $*" >> '${log}'\nexec /usr/bin/${t} "$@"\n`,
        {
          mode: 0o700,
        },
      );
    }
    const path = process.env.PATH;
    process.env.PATH = `${bin}:${path ?? "/usr/bin:/bin"}`;
    // The provider linked its key into `tlsKeys` when it created it; a store of its own makes this
    // test see the whole provisioning (init, addtoken, link) under the spy.
    const spied = new TpmTlsKeys({ storeDir: join(dir, "p11-spy"), tcti: tpm.tcti, userPinFile: pinFile });
    try {
      expect(await tlsKeys.isLinked(provider.keyHandle)).toBe(true); // linked at creation
      expect(await spied.isLinked(provider.keyHandle)).toBe(false);
      const label = await spied.link(provider.keyHandle, provider.keyBlobPaths ?? { pub: "", priv: "" });
      expect(label).toBe(tpmTlsKeyLabel(provider.keyHandle));
      expect(await spied.isLinked(provider.keyHandle)).toBe(true);
      // Idempotent: a second link leaves the token alone.
      await spied.link(provider.keyHandle, provider.keyBlobPaths ?? { pub: "", priv: "" });
    } finally {
      process.env.PATH = path;
    }
    const calls = (await readFile(log, "utf8")).trim().split("\n");
    // init + addtoken + link seal and unseal with the PIN-derived auth: the spy must have seen them.
    expect(calls.filter((c) => /tpm2_create |tpm2_unseal /.test(c)).length).toBeGreaterThanOrEqual(2);
    for (const c of calls) {
      expect(c).not.toContain(PIN);
      const args = c.split(" ");
      for (let i = 0; i < args.length - 1; i++) {
        if (args[i] === "-p" || args[i] === "-P") expect(args[i + 1]).toMatch(/^file:/);
      }
    }
    const st = await import("node:fs/promises").then((f) =>
      f.stat(join(dir, "p11-spy", "tpm2_pkcs11.sqlite3")),
    );
    expect(st.mode & 0o777).toBe(0o600);
  }, 120_000);

  it("a TLS server requiring client certificates sees exactly the enrolled key in the handshake", async () => {
    const ca = broker.ca;
    const srvFiles = await ca.issueServer();
    const seen: X509Certificate[] = [];
    const server: Server = createServer(
      {
        key: await readFile(srvFiles.keyPath),
        cert: await readFile(srvFiles.certPath),
        ca: ca.caPem,
        requestCert: true,
        rejectUnauthorized: true,
      },
      (s) => {
        seen.push(new X509Certificate(s.getPeerCertificate(true).raw));
        s.end("hi");
      },
    );
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    const tlsClient = provider.tlsClient;
    if (tlsClient === undefined) throw new Error("no tlsClient capability");
    expect(tlsClient.mechanism).toBe("tpm2-pkcs11-engine");
    const ctx = await tlsClient.secureContext({ certPem, caPem: ca.caPem });
    for (let i = 0; i < 2; i++) {
      await new Promise<void>((resolve, reject) => {
        const s: TLSSocket = connect({
          port,
          host: "127.0.0.1",
          servername: "localhost",
          secureContext: ctx,
        });
        s.on("data", () => undefined);
        s.on("end", () => resolve());
        s.on("error", reject);
      });
    }
    server.close();
    expect(seen).toHaveLength(2);
    const spki = (k: KeyObject) => k.export({ format: "der", type: "spki" });
    for (const c of seen) expect(Buffer.compare(spki(c.publicKey), spki(enrolledKey))).toBe(0);
    // And the enrolled key is the key the provider signs JWS with (same TPM object).
    const info = await provider.open();
    expect(Buffer.compare(spki(createPublicKey(info.spkiPem)), spki(enrolledKey))).toBe(0);
  }, 60_000);

  it("publishes to mosquitto (require_certificate + use_identity_as_username + per-device ACL) with the TPM key", async () => {
    const sub = await startSubscriber(broker.plainUrl, "devices/#");
    const sink = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: tpmAuth(),
      deviceId: DEVICE,
    });
    const enc = new TextEncoder();
    const msg = (seq: number, channel = "tpm") => ({
      id: newMessageId(),
      seq,
      channel,
      payload: enc.encode(JSON.stringify({ seq })),
      contentType: "application/json",
      ts: 0,
      ingestedAt: 0,
      attempt: 1,
    });
    const batch = [1, 2, 3].map((i) => msg(i));
    expect((await sink.deliver(batch)).map((o) => o.kind)).toEqual(["ok", "ok", "ok"]);
    await sub.waitFor((r) => r.length >= 3);
    // use_identity_as_username: the broker took the certificate's CN, so the ACL put it under its own tree.
    expect(sub.received.map((r) => r.topic)).toEqual(Array(3).fill(`devices/${DEVICE}/tpm`));
    // Another device's topic is refused by the ACL (MQTT 5 PUBACK 0x87): the identity is the certificate's.
    const foreign = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: tpmAuth(),
      deviceId: DEVICE,
      topicTemplate: "devices/other-device/{channel}",
    });
    expect((await foreign.deliver([msg(4)]))[0]).toMatchObject({ kind: "dead-letter" });
    await foreign.close();
    await sink.close();
    await sub.close();
  }, 60_000);

  it("a destroyed key leaves no copy behind: store objects unlinked (and vacuumed), kept blobs deleted", async () => {
    const second = new TpmKeyProvider({
      runner: provider.runner,
      keyHandle: 0x81000005,
      keyBlobDir: join(dir, "blobs"),
      tls: tlsKeys,
    });
    await second.createOrOpen();
    const blobs = second.keyBlobPaths;
    if (blobs === undefined) throw new Error("no blob paths");
    const privHex = (await readFile(blobs.priv)).toString("hex");
    await tlsKeys.link(second.keyHandle, blobs);
    const store = join(dir, "p11", "tpm2_pkcs11.sqlite3");
    const storeText = async () => (await readFile(store)).toString("latin1");
    // The store holds the key's wrapped private blob (hex in the object's attributes): the check can see it.
    expect((await storeText()).includes(privHex.slice(4))).toBe(true);
    // destroy(): evict, delete the kept blobs, unlink from the token (the owner destroys a rotated-out key so).
    await second.destroy();
    expect(await tlsKeys.isLinked(second.keyHandle)).toBe(false);
    expect(await tlsKeys.isLinked(provider.keyHandle)).toBe(true);
    expect((await storeText()).includes(privHex.slice(4))).toBe(false);
    const { existsSync } = await import("node:fs");
    expect(existsSync(blobs.priv) || existsSync(blobs.pub)).toBe(false);
    await second.close();
  }, 120_000);

  // Last: after a lost TPM connection the module in this process cannot recover (hardware notes).
  it("stopping the TPM breaks the next handshake: the TPM really signs", async () => {
    const sink = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: tpmAuth(),
      deviceId: DEVICE,
      connectTimeoutMs: 5_000,
    });
    const enc = new TextEncoder();
    const one = {
      id: newMessageId(),
      seq: 99,
      channel: "tpm",
      payload: enc.encode("{}"),
      contentType: "application/json",
      ts: 0,
      ingestedAt: 0,
      attempt: 1,
    };
    await tpm.kill();
    const out = await sink.deliver([one]);
    expect(out[0]?.kind).toBe("retry");
    await sink.close();
  }, 60_000);
});
