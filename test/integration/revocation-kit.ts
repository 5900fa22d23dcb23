import "reflect-metadata";
import { webcrypto } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import mqtt, { type MqttClient } from "mqtt";
import { createLogger, type Logger } from "../../src/core/log.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { type FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/index.js";
import { type RegistrarConfig, registrarConfigFrom } from "../../src/registrar/config.js";
import { keyIdentity, newDeviceId } from "../../src/registrar/enrolment/complete.js";
import { hashBootstrapToken } from "../../src/registrar/enrolment/pkcs11-route.js";
import type { RegistrarStore } from "../../src/registrar/store/index.js";

/** Helpers shared by the revocation tests: registered devices with fleet-CA certificates, a logger. */

export const GROUP = "revocation-sensors";

export interface TestDevice {
  readonly deviceId: string;
  readonly keyPem: string;
  /** Certificates in issue order (enrolment first, then renewals). */
  readonly certs: { readonly pem: string; readonly serial: string }[];
}

async function newCsr(): Promise<{ csrDer: Uint8Array; keyPem: string; keys: webcrypto.CryptoKeyPair }> {
  const keys = (await webcrypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, [
    "sign",
    "verify",
  ])) as webcrypto.CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: "CN=device",
    keys,
    signingAlgorithm: { name: "ECDSA", hash: "SHA-256" },
  });
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey("pkcs8", keys.privateKey));
  const keyPem = `-----BEGIN PRIVATE KEY-----\n${pkcs8.toString("base64").replace(/(.{64})/g, "$1\n")}\n-----END PRIVATE KEY-----\n`;
  return { csrDer: new Uint8Array(csr.rawData), keyPem, keys };
}

/** Creates the enrolment group used by `registerDevice` (PKCS#11 method, bootstrap tokens). */
export async function addTestGroup(store: RegistrarStore): Promise<void> {
  await addEnrolmentGroup(store, { name: GROUP, role: "sensor", methods: ["pkcs11"] });
}

/**
 * Registers a device the way the PKCS#11 enrolment route does (bootstrap token consumed in
 * `commitEnrolment`, certificate from the fleet CA for the CSR's key), with a software key so the
 * test's MQTT client can use it. `renewals` more certificates are issued and recorded like EST
 * renewals (`recordCertificate`).
 */
export async function registerDevice(
  store: RegistrarStore,
  ca: FleetCa,
  n: number,
  renewals = 0,
): Promise<TestDevice> {
  const { csrDer, keyPem } = await newCsr();
  const verified = await verifyCsr(csrDer);
  const deviceId = newDeviceId();
  const issue = () =>
    ca.issueDeviceCertificate(verified, {
      deviceId,
      expectedSpkiDer: verified.spkiDer,
      lifetimeSeconds: 3600,
    });
  const first = await issue();
  const { token } = await createBootstrapToken(store, GROUP, 3600);
  const id = await keyIdentity(verified.spkiDer);
  await store.commitEnrolment({
    method: "pkcs11",
    thumbprint: id.thumbprint,
    ekHash: undefined,
    hardwareSerial: `SN-REV-${n}`,
    proposedDeviceId: deviceId,
    proof: { kind: "token", hash: hashBootstrapToken(token.reveal()) },
    now: new Date(),
    deviceId,
    group: GROUP,
    role: "sensor",
    attributes: {},
    publicJwk: id.jwk,
    evidence: undefined,
    certSerial: first.serial,
    certNotAfter: first.notAfter,
  });
  const certs = [{ pem: first.pem, serial: first.serial }];
  for (let i = 0; i < renewals; i++) {
    const c = await issue();
    await store.recordCertificate(deviceId, c, new Date());
    certs.push({ pem: c.pem, serial: c.serial });
  }
  return { deviceId, keyPem, certs };
}

/** A fresh fleet CA and a registrar config (plain HTTP on loopback) with `revocation` overrides. */
export async function revocationConfig(
  dir: string,
  revocation: Record<string, unknown>,
): Promise<{ config: RegistrarConfig; file: string; caDir: string }> {
  const paths = await initCa({ dir: join(dir, "ca") });
  const raw = {
    listen: { host: "127.0.0.1", port: 0 },
    tls: { insecure_http: true },
    data_dir: join(dir, "data"),
    ca_dir: paths.dir,
    revocation,
  };
  const file = join(dir, "registrar.toml");
  const toml = [
    `data_dir = ${JSON.stringify(raw.data_dir)}`,
    `ca_dir = ${JSON.stringify(raw.ca_dir)}`,
    "[listen]",
    'host = "127.0.0.1"',
    "port = 0",
    "[tls]",
    "insecure_http = true",
    "[revocation]",
    ...Object.entries(revocation).map(([k, v]) => `${k} = ${JSON.stringify(v)}`),
  ];
  await writeFile(file, `${toml.join("\n")}\n`);
  return { config: registrarConfigFrom(raw, dir, file), file, caDir: paths.dir };
}

/** A logger that keeps every line (tests read the hook's outcome from it). */
export function capturingLogger(): { logger: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger({
    level: "debug",
    write: (l) => {
      lines.push(JSON.parse(l) as Record<string, unknown>);
    },
  });
  return { logger, lines };
}

/** A device's MQTT 5 client over mTLS that reconnects every 300 ms and records what happens. */
export function deviceClient(
  url: string,
  caPem: string,
  device: TestDevice,
  certIndex = device.certs.length - 1,
): { client: MqttClient; errors: string[]; connects: number[] } {
  const cert = device.certs[certIndex];
  if (cert === undefined) throw new Error(`device has no certificate ${certIndex}`);
  const errors: string[] = [];
  const connects: number[] = [];
  const client = mqtt.connect(url, {
    ca: caPem,
    cert: cert.pem,
    key: device.keyPem,
    protocolVersion: 5,
    clientId: `${device.deviceId}-${Math.random().toString(16).slice(2, 8)}`,
    reconnectPeriod: 300,
    connectTimeout: 3000,
    rejectUnauthorized: true,
  });
  client.on("connect", () => connects.push(Date.now()));
  client.on("error", (e) => errors.push(e.message));
  return { client, errors, connects };
}

/** One connection attempt with a certificate: "connected" or the error message. */
export async function tryConnect(
  url: string,
  caPem: string,
  device: TestDevice,
  certIndex: number,
): Promise<string> {
  const cert = device.certs[certIndex];
  if (cert === undefined) throw new Error(`device has no certificate ${certIndex}`);
  const client = mqtt.connect(url, {
    ca: caPem,
    cert: cert.pem,
    key: device.keyPem,
    protocolVersion: 5,
    clientId: `probe-${Math.random().toString(16).slice(2, 10)}`,
    reconnectPeriod: 0,
    connectTimeout: 3000,
  });
  try {
    return await new Promise<string>((resolve) => {
      client.once("connect", () => resolve("connected"));
      client.once("error", (e) => resolve(e.message));
      client.once("close", () => resolve("closed"));
    });
  } finally {
    client.end(true);
  }
}
