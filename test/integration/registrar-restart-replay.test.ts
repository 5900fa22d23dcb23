import { randomUUID } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { request } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SignJWT } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../hw/swtpm.js";
import { loadRegistrarConfig } from "../../src/registrar/config.js";
import { openRegistrarStore } from "../../src/registrar/store/index.js";
import { type DevicePrivateKey, registerTokenDevice } from "../kit/registered-device.js";
import {
  cliEnv,
  ensureBuilt,
  type RegistrarProcess,
  type RegistrarSetup,
  setupRegistrar,
  startRegistrarProcess,
} from "./e2e-kit.js";

/**
 * Issue 15 (4th case): the token endpoint's jti record lived in process memory, so a captured client
 * assertion could be replayed once the registrar restarted. jti records now live in the registrar
 * store; this drives a real `m2m-registrar serve` process over HTTPS on SQLite and restarts it.
 */
describe("registrar restart", () => {
  let work: string;
  let setup: RegistrarSetup;
  let port: number;
  let ca: string;
  let running: RegistrarProcess | undefined;
  const deviceId = "dev-restart-1";
  let privateKey: DevicePrivateKey;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-restart-"));
    const env = cliEnv();
    setup = await setupRegistrar({
      work,
      env,
      groups: [{ name: "gw", role: "gateway", methods: "pkcs11" }],
    });
    // A fixed port and public_url: the assertion's audience must stay the same across the restart.
    port = await freeLoopbackPort();
    const toml = await readFile(setup.regConfig, "utf8");
    await writeFile(
      setup.regConfig,
      `public_url = "https://127.0.0.1:${port}"\n${toml.replace("port = 0", `port = ${port}`)}`,
    );
    ca = await readFile(setup.caCert, "utf8");
    // Register the device in the registrar's own database (enrolment is tested elsewhere).
    const store = await openRegistrarStore(await loadRegistrarConfig(setup.regConfig));
    try {
      privateKey = await registerTokenDevice(store, {
        deviceId,
        group: "gw",
        role: "gateway",
        hardwareSerial: "SN-R",
      });
    } finally {
      await store.close();
    }
  });

  afterAll(async () => {
    await running?.stop();
    await rm(work, { recursive: true, force: true });
  });

  const assertion = (): Promise<string> =>
    new SignJWT({})
      .setProtectedHeader({ alg: "ES256", typ: "JWT" })
      .setIssuer(deviceId)
      .setSubject(deviceId)
      .setAudience(`https://127.0.0.1:${port}/oauth2/token`)
      .setIssuedAt()
      .setExpirationTime("60s")
      .setJti(randomUUID())
      .sign(privateKey);

  const tokenRequest = (jwt: string): Promise<{ status: number; body: Record<string, unknown> }> =>
    new Promise((resolve, reject) => {
      const body = new URLSearchParams({
        grant_type: "client_credentials",
        client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion: jwt,
      }).toString();
      const req = request(
        `https://127.0.0.1:${port}/oauth2/token`,
        { method: "POST", ca, headers: { "content-type": "application/x-www-form-urlencoded" } },
        (res) => {
          let text = "";
          res.on("data", (c: Buffer) => {
            text += c.toString();
          });
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as Record<string, unknown> }),
          );
        },
      );
      req.on("error", reject);
      req.end(body);
    });

  it("client assertion replayed after a registrar restart is refused", async () => {
    running = await startRegistrarProcess(setup.regConfig, setup.env);
    const captured = await assertion();
    const first = await tokenRequest(captured);
    expect(first.status, JSON.stringify(first.body)).toBe(200);
    expect(typeof first.body.access_token).toBe("string");
    // Replay without a restart: refused (as before).
    expect((await tokenRequest(captured)).status).toBe(401);

    await running.stop();
    running = await startRegistrarProcess(setup.regConfig, setup.env);

    const replayed = await tokenRequest(captured);
    expect(replayed.status).toBe(401);
    expect(replayed.body.error).toBe("invalid_client");
    // The device itself is fine: a fresh assertion after the restart gets a token.
    const fresh = await tokenRequest(await assertion());
    expect(fresh.status, JSON.stringify(fresh.body)).toBe(200);
  });
});
