import "reflect-metadata";
import { randomBytes } from "node:crypto";
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { base64url, decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { ManualClock } from "../../src/core/clock.js";
import { M2mError } from "../../src/core/errors.js";
import { type EstAuth, EstClient } from "../../src/credentials/est/est-client.js";
import { tpmEvidenceSource } from "../../src/credentials/oauth/attestation.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { type EnrollConfig, runEnroll, tpmEnrollOps } from "../../src/enroll/index.js";
import { createCsr } from "../../src/keys/csr.js";
import { signCompactJws } from "../../src/keys/jws.js";
import type { KeyInfo } from "../../src/keys/key-provider.js";
import { AkQuoter, quoteWithAk, TpmAttestationOps } from "../../src/keys/tpm/endorsement.js";
import { TpmRunner } from "../../src/keys/tpm/runner.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../../src/registrar/admin.js";
import { type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { challengeOf } from "../../src/registrar/attestation/gate.js";
import {
  approveFromDevice,
  attestationReport,
  setAttestationPolicy,
} from "../../src/registrar/attestation/policy.js";
import { verifyQuote } from "../../src/registrar/attestation/quote-verifier.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { type EventToEncode, encodeEventLog } from "../../src/tpm/event-log.js";
import { quoteQualifyingData, WIRE_VERSION } from "../../src/wire/v1/index.js";

/**
 * Continuous attestation on swtpm, real quotes end to end: the registrar app with a group policy, an
 * enrolled TPM device whose "firmware" (this test) extends PCRs 0 and 7 and writes a matching event
 * log, the agent's OAuth client answering attestation challenges with TPM2_Quote.
 */
describe("continuous attestation (swtpm + registrar app)", () => {
  let tpm: SwtpmHandle;
  let dir: string;
  let clock: ManualClock;
  let store: SqliteRegistrarStore;
  let app: RunningRegistrarApp;
  let keys: TpmKeyProvider;
  let info: KeyInfo;
  let deviceId: string;
  let oauth: OAuthClient;
  let logPath: string;
  let caPem: string;
  const events: EventToEncode[] = [];

  /** The simulated firmware: measure an event into the TPM and append it to the event log. */
  const measure = async (pcrIndex: number, text: string): Promise<void> => {
    const ev: EventToEncode = { pcrIndex, eventType: 0x80000001, data: Buffer.from(text) };
    const log = encodeEventLog([0x000b], [ev]);
    // The digest encodeEventLog computed (sha256 of the data), extended exactly as the firmware would.
    const { createHash } = await import("node:crypto");
    await tpm.tpm("tpm2_pcrextend", [
      `${pcrIndex}:sha256=${createHash("sha256").update(ev.data).digest("hex")}`,
    ]);
    expect(log.length).toBeGreaterThan(0);
    events.push(ev);
    await writeFile(logPath, encodeEventLog([0x000b], events));
  };
  const boot = async (): Promise<void> => {
    events.length = 0;
    await measure(0, "firmware v1.0");
    await measure(7, "secure boot: enabled, db=fleet");
  };

  beforeAll(async () => {
    tpm = await startSwtpm();
    clock = new ManualClock(new Date(Date.now() + 1000));
    dir = await mkdtemp(join(tmpdir(), "m2m-attest-"));
    logPath = join(dir, "binary_bios_measurements");
    const trustDir = join(dir, "ek-trust");
    await mkdir(trustDir);
    await copyFile(tpm.rootCaPemPath, join(trustDir, "root.pem"));
    await copyFile(tpm.intermediateCaPemPath, join(trustDir, "intermediate.pem"));
    const paths = await initCa({ dir: join(dir, "ca"), clock });
    caPem = await readFile(caPaths(paths.dir).caCert, "utf8");
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port: await freeLoopbackPort() },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
        cert_lifetime: "1h",
        oauth: {
          rules: [{ scope: "telemetry:write" }, { scope: "firmware:read", attested: true }, { scope: "est" }],
        },
      },
      dir,
      "registrar.toml",
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir, clock), clock });
    addEnrolmentGroup(
      store,
      { name: "gw", role: "gateway", attributes: {}, methods: ["tpm"], ekTrustDir: trustDir },
      clock,
    );
    await boot();
    keys = new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 });
    info = await keys.createOrOpen();
    const enrollCfg: EnrollConfig = {
      registrarUrl: app.url,
      registrarCaFile: caPaths(paths.dir).caCert,
      method: "tpm",
      group: "gw",
      hardwareSerial: "GW-ATT",
      stateDir: join(dir, "agent-state"),
    };
    deviceId = (await runEnroll(enrollCfg, { keyProvider: keys, tpm: tpmEnrollOps(keys), clock })).state
      .deviceId;
    await setAttestationPolicy(store, { group: "gw", pcrs: "sha256:0,1,2,3,7", maxQuoteAgeSec: 300 }, clock);
    oauth = new OAuthClient(
      { clientId: deviceId, issuer: app.issuer, caPem, dpop: true },
      { keys, clock, attestation: tpmEvidenceSource(keys.attestation, { eventLogPath: logPath }) },
    );
  }, 90_000);

  afterAll(async () => {
    await oauth?.close();
    await keys?.close();
    await app?.close();
    await store?.close();
    await tpm?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const refusal = async (p: Promise<unknown>): Promise<M2mError> => {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(M2mError);
    return err as M2mError;
  };

  it("TOFU is never silent: the first quote is recorded but refused until the operator approves; then tokens carry the claim", async () => {
    const err = await refusal(oauth.getToken());
    expect(err.code).toBe("ERR_ATTESTATION_REFUSED");
    expect(err.message).toContain("no approved PCR values");
    const rec = await store.getDeviceAttestation(deviceId);
    expect(rec).toMatchObject({ outcome: "refused", code: "ERR_QUOTE_NO_GOLDEN" });
    expect(Object.keys(rec?.pcrs ?? {})).toEqual(["0", "1", "2", "3", "7"]);
    const policy = await approveFromDevice(store, deviceId, clock);
    expect(policy.goldenSource).toBe(`device:${deviceId}`);
    clock.advance(1500); // past the registrar's 1 s policy cache
    const t = await oauth.getToken();
    const claims = decodeJwt(t.token.reveal());
    expect(claims.attested).toEqual({ at: clock.nowSeconds(), policy: `gw#${policy.version}` });
    // ABAC: the attested-only rule grants its scope to this (attested) request.
    expect(String(claims.scope).split(" ")).toContain("firmware:read");
    expect((await store.getDeviceAttestation(deviceId))?.anomaly).toBeUndefined();
  }, 60_000);

  it("tpm2_pcrextend after enrolment: the next token is refused and says which PCR; the operator approves: tokens again", async () => {
    await measure(7, "secure boot: db updated by an attacker");
    oauth.invalidate();
    const err = await refusal(oauth.getToken());
    expect(err.code).toBe("ERR_ATTESTATION_REFUSED");
    expect(err.message).toBe("attestation refused: PCR 7 differs from the policy");
    const rec = await store.getDeviceAttestation(deviceId);
    expect(rec?.anomaly).toMatchObject({ code: "ERR_QUOTE_PCR_MISMATCH" });
    const audit = await store.listAudit(20);
    expect(audit.some((a) => a.event === "attestation.refused" && a.code === "ERR_QUOTE_PCR_MISMATCH")).toBe(
      true,
    );
    const report = await attestationReport(store, deviceId);
    expect(report.differing.map((d) => d.pcr)).toEqual([7]);
    expect(report.differing[0]?.event?.description).toContain("db updated by an attacker");
    const policy = await approveFromDevice(store, deviceId, clock);
    clock.advance(1500);
    const t = await oauth.getToken();
    expect(decodeJwt(t.token.reveal()).attested).toMatchObject({ policy: `gw#${policy.version}` });
  }, 60_000);

  /** A raw token request at the service (no HTTP): a client assertion signed by the device key. */
  const form = async (extra: Record<string, string> = {}): Promise<URLSearchParams> => {
    const now = clock.nowSeconds();
    const assertion = await signCompactJws(
      keys,
      info,
      { typ: "JWT" },
      {
        iss: deviceId,
        sub: deviceId,
        aud: app.tokenService.tokenEndpoint,
        jti: base64url.encode(randomBytes(12)),
        iat: now,
        exp: now + 60,
      },
    );
    return new URLSearchParams({
      grant_type: "client_credentials",
      client_id: deviceId,
      client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
      client_assertion: assertion,
      ...extra,
    });
  };
  const challenge = async () => {
    const err = await refusal(
      app.tokenService.token({
        form: new URLSearchParams({ grant_type: "client_credentials", client_id: deviceId }),
      }),
    );
    expect(err.code).toBe("ERR_QUOTE_NONCE_REQUIRED");
    const c = challengeOf(err);
    if (c === undefined) throw new Error("no challenge");
    return c;
  };
  const evidence = async (
    nonce: string,
    opts: { pcrs?: number[]; akHandle?: number; log?: Uint8Array } = {},
  ): Promise<string> => {
    const pcrs = opts.pcrs ?? [0, 1, 2, 3, 7];
    const q = await quoteWithAk(
      keys.runner,
      opts.akHandle ?? keys.akHandle,
      quoteQualifyingData(nonce),
      "sha256",
      pcrs,
    );
    const values: Record<string, string> = {};
    pcrs.forEach((p, i) => {
      values[String(p)] = Buffer.from(q.values[i] ?? []).toString("hex");
    });
    const json = {
      v: WIRE_VERSION,
      nonce,
      quote: base64url.encode(q.attest),
      signature: base64url.encode(q.signature),
      pcrs: { bank: "sha256", values },
      eventLog: base64url.encode(opts.log ?? (await readFile(logPath))),
    };
    return base64url.encode(JSON.stringify(json));
  };
  const codeOf = async (att: string): Promise<string> =>
    (await refusal(app.tokenService.token({ form: await form({ attestation: att }) }))).code;

  it("an honest quote passes; a replayed quote, another AK, another PCR selection, a stale nonce, a tampered event log: each refused with its own code", async () => {
    const honest = await evidence((await challenge()).nonce);
    const ok = await app.tokenService.token({ form: await form({ attestation: honest }) });
    expect(ok.body.access_token).toBeTruthy();
    expect(await codeOf(honest)).toBe("ERR_QUOTE_NONCE_REPLAYED");

    const otherAk = 0x81000007;
    await new TpmAttestationOps(keys.runner, { akHandle: otherAk }).createAk();
    expect(await codeOf(await evidence((await challenge()).nonce, { akHandle: otherAk }))).toBe(
      "ERR_QUOTE_SIGNATURE",
    );

    expect(await codeOf(await evidence((await challenge()).nonce, { pcrs: [0, 1, 2, 3] }))).toBe(
      "ERR_QUOTE_PCR_SELECTION",
    );

    const stale = await challenge();
    clock.advance(301_000);
    expect(await codeOf(await evidence(stale.nonce))).toBe("ERR_QUOTE_NONCE_EXPIRED");

    const log = new Uint8Array(await readFile(logPath));
    const lastData = events[events.length - 1]?.data.length ?? 0;
    const at = log.length - lastData - 4 - 16; // inside the last event's sha256 digest
    log[at] = (log[at] ?? 0) ^ 0xff;
    expect(await codeOf(await evidence((await challenge()).nonce, { log }))).toBe("ERR_EVENTLOG_REPLAY");

    // None of the refusals was the device's platform changing: an honest quote still passes.
    const again = await app.tokenService.token({
      form: await form({ attestation: await evidence((await challenge()).nonce) }),
    });
    expect(again.body.access_token).toBeTruthy();
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81000007"]);
  }, 120_000);

  it("TPM restart (reboot): PCRs re-measured to the same values pass and the reboot is recorded; without re-measuring, refused", async () => {
    const before = await store.getDeviceAttestation(deviceId);
    await tpm.restart();
    await boot();
    // The golden values include the extra PCR 7 event approved above: the firmware measures it again.
    await measure(7, "secure boot: db updated by an attacker");
    oauth.invalidate();
    clock.advance(1000);
    const t = await oauth.getToken();
    expect(decodeJwt(t.token.reveal()).attested).toBeDefined();
    const after = await store.getDeviceAttestation(deviceId);
    // hw/swtpm restart = tpm2_shutdown (SU_STATE) + Startup(CLEAR): a TPM Restart (restartCount + 1,
    // PCRs cleared); a power cut would be a TPM Reset (resetCount + 1). Both are a reboot.
    expect(after?.clock?.resetCount).toBe(before?.clock?.resetCount);
    expect(after?.clock?.restartCount).toBe((before?.clock?.restartCount ?? 0) + 1);
    expect(after?.reboots).toBe((before?.reboots ?? 0) + 1);
    expect(
      (await store.listAudit(50)).some((a) => a.event === "attestation.reboot" && a.reboot === "restart"),
    ).toBe(true);

    await tpm.restart(); // reboot into a platform that measured nothing
    events.length = 0;
    await writeFile(logPath, encodeEventLog([0x000b], []));
    oauth.invalidate();
    const err = await refusal(oauth.getToken());
    expect(err.message).toBe("attestation refused: PCRs 0, 7 differ from the policy");
  }, 120_000);

  it("the agent quotes with one raw TPM2_Quote while the PCRs are unchanged; an extended PCR falls back to tpm2_quote", async () => {
    const tools: string[] = [];
    const runner = new TpmRunner({ tcti: tpm.tcti, onLatency: (s) => tools.push(s.tool) });
    const quoter = new AkQuoter(runner, keys.akHandle);
    const sel = [0, 1, 2, 3, 7, 23];
    const dev = await store.getDevice(deviceId);
    const ev = dev?.evidence as { akPublic: string; ekPublic: string };
    const check = (q: Awaited<ReturnType<AkQuoter["quote"]>>, nonce: Uint8Array) => {
      const reported = new Map(sel.map((p, i) => [p, q.values[i] ?? new Uint8Array()]));
      // The registrar's verifier: signature, nonce, selection and the reported values' digest.
      return verifyQuote({
        akPublic: Buffer.from(ev.akPublic, "base64url"),
        ekPublic: Buffer.from(ev.ekPublic, "base64url"),
        quote: q.attest,
        signature: q.signature,
        qualifyingData: nonce,
        selection: { bank: "sha256", pcrs: sel },
        reported,
        reportedBank: "sha256",
        golden: reported,
        previousClock: undefined,
        eventLog: undefined,
      });
    };
    const n1 = randomBytes(32);
    const q1 = await quoter.quote(n1, "sha256", sel);
    check(q1, n1);
    expect(tools).toEqual(["tpm2_quote"]); // first time: the values are read with the quote
    tools.length = 0;
    const n2 = randomBytes(32);
    const q2 = await quoter.quote(n2, "sha256", sel);
    check(q2, n2);
    expect(tools).toEqual(["tpm2_send"]); // unchanged PCRs: one raw command
    tools.length = 0;
    await tpm.tpm("tpm2_pcrextend", [`23:sha256=${"ab".repeat(32)}`]);
    const n3 = randomBytes(32);
    const q3 = await quoter.quote(n3, "sha256", sel);
    check(q3, n3);
    expect(tools).toEqual(["tpm2_send", "tpm2_quote"]); // digest mismatch: re-read with a full quote
    expect(Buffer.from(q3.values[5] ?? []).equals(Buffer.from(q1.values[5] ?? []))).toBe(false);
    await tpm.tpm("tpm2_pcrreset", ["23"]);
    await runner.close();
  }, 60_000);

  it("requireForRenewal: EST renews with a recently attested token; without one, or with a stale one, it is refused (ERR_ATTESTATION_RENEWAL) and audited", async () => {
    // Back to the approved platform state after the previous test's unmeasured reboot.
    await tpm.restart();
    await boot();
    await measure(7, "secure boot: db updated by an attacker");
    await setAttestationPolicy(
      store,
      { group: "gw", pcrs: "sha256:0,1,2,3,7", maxQuoteAgeSec: 60, requireForRenewal: true },
      clock,
    );
    clock.advance(1500); // past the registrar's policy cache
    oauth.invalidate();
    const dpop = await oauth.dpopSigner();
    if (dpop === undefined) throw new Error("no DPoP signer");
    const csr = await createCsr(keys, info, { commonName: deviceId });
    const estWith = (auth: EstAuth) => new EstClient({ baseUrl: app.issuer, caPem }, auth, clock);

    // A token minted after a verified quote: renewed.
    const fresh = await estWith({ kind: "token", tokens: oauth, dpop }).simplereenroll(csr);
    expect(fresh.length).toBeGreaterThan(0);
    expect(decodeJwt((await oauth.getToken("est")).token.reveal()).attested).toBeDefined();

    // The same (cached, still valid) token 61 s later: its quote is older than the policy's max age.
    clock.advance(61_000);
    const cachedOnly = { getToken: (scope?: string) => oauth.getToken(scope) }; // cannot refresh
    const stale = await refusal(estWith({ kind: "token", tokens: cachedOnly, dpop }).simplereenroll(csr));
    expect(stale.code).toBe("ERR_EST_REFUSED");
    expect(stale.details.serverCode).toBe("ERR_ATTESTATION_RENEWAL");
    // The agent's EST client drops such a token, gets a new one (a new quote) and renews.
    const renewed = await estWith({ kind: "token", tokens: oauth, dpop }).simplereenroll(csr);
    expect(renewed.length).toBeGreaterThan(0);

    // A token without the claim (tokens do not require a quote in this policy; renewals still do).
    await setAttestationPolicy(
      store,
      { group: "gw", pcrs: "sha256:0,1,2,3,7", requireForTokens: false },
      clock,
    );
    clock.advance(1500);
    const plain = new OAuthClient(
      { clientId: deviceId, issuer: app.issuer, caPem, dpop: true },
      { keys, clock },
    );
    try {
      const t = await plain.getToken("est");
      expect(decodeJwt(t.token.reveal()).attested).toBeUndefined();
      const plainDpop = await plain.dpopSigner();
      if (plainDpop === undefined) throw new Error("no DPoP signer");
      const none = await refusal(
        estWith({ kind: "token", tokens: plain, dpop: plainDpop }).simplereenroll(csr),
      );
      expect(none.details.serverCode).toBe("ERR_ATTESTATION_RENEWAL");
    } finally {
      await plain.close();
    }
    const audit = (await store.listAudit(50)).filter((a) => a.event === "attestation.renewal_refused");
    expect(audit.map((a) => a.reason)).toEqual(
      expect.arrayContaining([
        "no attested token",
        expect.stringMatching(/^attested 6\d s ago \(max 60 s\)$/),
      ]),
    );
    expect(audit.every((a) => a.code === "ERR_ATTESTATION_RENEWAL" && a.deviceId === deviceId)).toBe(true);
    // The agent's status view of its latest quote.
    expect(oauth.attestationStatus()).toMatchObject({ result: "verified", selection: "sha256:0,1,2,3,7" });
  }, 120_000);
});
