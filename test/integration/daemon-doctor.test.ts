import "reflect-metadata";
import { type JsonWebKey, webcrypto } from "node:crypto";
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import type { CheckResult } from "../../src/daemon/doctor.js";
import { writeGatewayEnrolment } from "../kit/enrolment-state.js";
import { throwawayDeviceCert } from "../kit/throwaway-cert.js";
import { assertBuilt, runCli } from "./daemon-cli-kit.js";

/** `m2m-agent doctor` against SoftHSM, a real TCP "broker", a closed registrar port and a real cert. */
let dir: string;
let stateDir: string;
let hsm: SoftHsmHandle;
let broker: Server;
let brokerPort: number;
let closedPort: number;
let env: NodeJS.ProcessEnv;

const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

async function listen(): Promise<Server> {
  const s = createServer((c) => c.destroy());
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  return s;
}
const portOf = (s: Server): number => {
  const a = s.address();
  return typeof a === "object" && a !== null ? a.port : 0;
};

function configText(pinFile: string): string {
  return `[agent]
state_dir = "${stateDir}"
${softHsmKeysToml(hsm, `{ file = "${pinFile}" }`).join("\n")}
[enroll]
registrar_url = "https://127.0.0.1:${closedPort}"
[relay.mqtt]
urls = ["mqtt://127.0.0.1:${brokerPort}"]
[relay.outbox]
max_bytes = 1048576
`;
}

/** Issues a certificate for `spkiPem` from a throwaway software CA (the registrar's role). */
function certFor(spkiPem: string, days: number): Promise<string> {
  const now = Date.now();
  return throwawayDeviceCert(spkiPem, {
    serialNumber: "0102",
    issuer: "CN=test-ca",
    notBefore: new Date(now - 3600_000),
    notAfter: new Date(now + days * 86_400_000),
  });
}

function enrol(certificatePem: string, thumbprint: string): Promise<void> {
  return writeGatewayEnrolment(stateDir, {
    certificatePem,
    caChainPem: [certificatePem],
    keyThumbprint: thumbprint,
    registrarUrl: `https://127.0.0.1:${closedPort}`,
    endpoints: {
      registrar: "https://r.example",
      token: "https://r.example/token",
      est: "https://r.example/est",
    },
  });
}

async function doctor(
  config: string,
): Promise<{ code: number | null; checks: Map<string, CheckResult>; overall: string }> {
  const r = await runCli(["--config", config, "--json", "doctor", "--timeout", "2000"], env);
  const out = JSON.parse(r.stdout) as { overall: string; checks: CheckResult[] };
  return { code: r.code, overall: out.overall, checks: new Map(out.checks.map((c) => [c.name, c])) };
}

beforeAll(async () => {
  assertBuilt();
  dir = await mkdtemp(join(tmpdir(), "m2m-doctor-"));
  stateDir = join(dir, "state");
  await mkdir(stateDir, { mode: 0o700 });
  hsm = await initSoftHsm({ label: "m2m-doctor" });
  broker = await listen();
  brokerPort = portOf(broker);
  const closed = await listen();
  closedPort = portOf(closed);
  await new Promise<void>((r) => closed.close(() => r()));
  env = { PATH: process.env.PATH, HOME: dir, ...hsm.env };
});

afterAll(async () => {
  await new Promise<void>((r) => (broker ? broker.close(() => r()) : r()));
  await hsm?.cleanup();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("m2m-agent doctor", () => {
  it("names each check with a status and a fix hint", async () => {
    const config = join(dir, "agent.toml");
    await writeFile(config, configText(hsm.pinFile));
    const before = await doctor(config);
    expect([...before.checks.keys()]).toEqual([
      "config-well-formed",
      "state-dir-permissions",
      "secret-file-permissions",
      "token-reachable",
      "key-present",
      "key-matches-certificate",
      "certificate-expiry",
      "registrar-reachable",
      "token-endpoint-reachable",
      "broker-reachable",
      "clock-plausible",
      "outbox-disk-headroom",
    ]);
    expect(before.checks.get("key-present")).toMatchObject({
      status: "fail",
      hint: "run `m2m-agent keys init`",
    });
    expect(before.checks.get("state-dir-permissions")?.status).toBe("ok");
    expect(before.checks.get("secret-file-permissions")?.status).toBe("ok");
    expect(before.checks.get("token-reachable")?.status).toBe("ok");
    expect(before.checks.get("broker-reachable")?.status).toBe("ok");
    expect(before.checks.get("registrar-reachable")).toMatchObject({
      status: "fail",
      detail: `127.0.0.1:${closedPort}: ECONNREFUSED`,
    });
    expect(before.checks.get("clock-plausible")?.status).toBe("ok");
    expect(before.checks.get("outbox-disk-headroom")?.status).toBe("ok");
    expect(before.checks.get("key-matches-certificate")?.status).toBe("skip");
    expect(before.overall).toBe("fail");
    expect(before.code).toBe(3);
  });

  it("after keys init and enrolment: key matches the certificate, expiry is reported", async () => {
    const config = join(dir, "agent.toml");
    const init = JSON.parse((await runCli(["--config", config, "--json", "keys", "init"], env)).stdout) as {
      thumbprint: string;
    };
    const show = await runCli(["--config", config, "--json", "keys", "show"], env);
    const jwk = (JSON.parse(show.stdout) as { publicJwk: JsonWebKey }).publicJwk;
    const key = await webcrypto.subtle.importKey("jwk", jwk, alg, true, ["verify"]);
    const spki = Buffer.from(await webcrypto.subtle.exportKey("spki", key)).toString("base64");
    await enrol(
      await certFor(`-----BEGIN PUBLIC KEY-----\n${spki}\n-----END PUBLIC KEY-----`, 90),
      init.thumbprint,
    );
    const r = await doctor(config);
    expect(r.checks.get("key-present")?.status).toBe("ok");
    expect(r.checks.get("key-matches-certificate")).toMatchObject({ status: "ok" });
    expect(r.checks.get("certificate-expiry")?.status).toBe("ok");
    expect(r.checks.get("certificate-expiry")?.detail).toMatch(/^valid for (89|90)\.\d more days/);

    // A certificate for another key (the key was replaced) and close to expiry.
    const other = await webcrypto.subtle.generateKey(alg, true, ["sign", "verify"]);
    const otherSpki = Buffer.from(await webcrypto.subtle.exportKey("spki", other.publicKey)).toString(
      "base64",
    );
    await enrol(
      await certFor(`-----BEGIN PUBLIC KEY-----\n${otherSpki}\n-----END PUBLIC KEY-----`, 2),
      init.thumbprint,
    );
    const bad = await doctor(config);
    expect(bad.checks.get("key-matches-certificate")).toMatchObject({
      status: "fail",
      // The recovery path of a replaced key (docs/operations.md): the operator allows, then enrol again.
      hint: expect.stringMatching(/m2m-registrar devices allow-reenrol dev-1.*m2m-agent enroll --force/),
    });
    // A fresh short-lived certificate is not "late": renewal is due at 2/3 of its lifetime (issue 12:
    // every fresh 7-day certificate used to warn "renewal should have happened").
    expect(bad.checks.get("certificate-expiry")?.status).toBe("ok");
    expect(bad.checks.get("certificate-expiry")?.detail).toMatch(/renewal due 20/);
  });

  it("loose permissions on the state dir and the PIN file fail with chmod hints", async () => {
    const loosePin = join(dir, "loose.pin");
    await writeFile(loosePin, hsm.pin.reveal());
    await chmod(loosePin, 0o644);
    await chmod(stateDir, 0o755);
    const config = join(dir, "loose.toml");
    await writeFile(config, configText(loosePin));
    const r = await doctor(config);
    expect(r.checks.get("state-dir-permissions")).toMatchObject({
      status: "fail",
      hint: `chmod 700 ${stateDir}`,
    });
    expect(r.checks.get("secret-file-permissions")?.status).toBe("fail");
    expect(r.checks.get("secret-file-permissions")?.detail).toContain(`${loosePin} mode 644`);
    // The provider itself refuses the readable PIN file.
    expect(r.checks.get("key-present")?.status).toBe("fail");
    await chmod(stateDir, 0o700);
  });

  it("a malformed config is one failed check naming file and key", async () => {
    const config = join(dir, "broken.toml");
    await writeFile(config, "[keys.tpm]\nkey_handle = 0x01\n");
    const r = await doctor(config);
    expect([...r.checks.values()]).toEqual([
      expect.objectContaining({
        name: "config-well-formed",
        status: "fail",
        detail: `${config}: keys.tpm.key_handle: expected an owner-range handle 0x81000000-0x8100FFFF`,
      }),
    ]);
  });
});
