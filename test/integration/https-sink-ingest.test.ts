import { rm } from "node:fs/promises";
import { gzipSync } from "node:zlib";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestCa, type TestCa } from "../../hw/mosquitto.js";
import { ingestRoutes } from "../../src/registrar/ingest/routes.js";
import { newMessageId } from "../../src/relay/ids.js";
import { createSoftwareDpop, createTokenIssuer, startRouteHost } from "./relay-helpers.js";

const AUD = "https://ingest.test";

/**
 * The reference ingest endpoint's checks, one tampered field at a time: each refusal carries its own
 * code, so removing any single check makes exactly its row fail.
 */
describe("reference ingest endpoint: tamper table", () => {
  let ca: TestCa;
  let issuer: Awaited<ReturnType<typeof createTokenIssuer>>;
  let otherIssuer: Awaited<ReturnType<typeof createTokenIssuer>>;
  let device: Awaited<ReturnType<typeof createSoftwareDpop>>;
  let thief: Awaited<ReturnType<typeof createSoftwareDpop>>;
  let host: Awaited<ReturnType<typeof startRouteHost>>;
  let agent: Agent;
  let ingest: ReturnType<typeof ingestRoutes>;

  beforeAll(async () => {
    ca = await createTestCa();
    issuer = await createTokenIssuer();
    otherIssuer = await createTokenIssuer();
    device = await createSoftwareDpop();
    thief = await createSoftwareDpop();
    let url = "";
    ingest = ingestRoutes({
      verifyAccessToken: (t) => issuer.verify(t),
      audience: AUD,
      publicUrl: () => url,
    });
    host = await startRouteHost(ca, ingest.routes);
    url = host.url;
    agent = new Agent({ connect: { ca: ca.caPem } });
  });
  afterAll(async () => {
    await agent?.close();
    await host?.close();
    if (ca !== undefined) await rm(ca.dir, { recursive: true, force: true });
  });

  /** A token for dev-t bound to the device key: valid unless a field is overridden. */
  const deviceToken = (
    over: { scope?: string; aud?: string; ttlSec?: number } = {},
    by = issuer,
  ): Promise<string> =>
    by.issue({ sub: "dev-t", scope: "telemetry:write", aud: AUD, jkt: device.jkt, ttlSec: 60, ...over });

  const body = (topic = "devices/dev-t/temp"): string =>
    JSON.stringify({
      messages: [
        {
          id: newMessageId(),
          topic,
          channel: "temp",
          ts: 1,
          content_type: "application/json",
          payload: { c: 1 },
        },
      ],
    });

  interface Variant {
    token?: string | null;
    scheme?: string;
    proof?: string | null;
    raw?: Buffer;
    encoding?: string;
    topic?: string;
  }

  const send = async (
    v: Variant = {},
  ): Promise<{ status: number; code: string | undefined; json: Record<string, unknown> }> => {
    const token = v.token === undefined ? await deviceToken() : v.token;
    const proof =
      v.proof === undefined && token !== null ? await device.signer.proof("POST", host.url, token) : v.proof;
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (token !== null) headers.authorization = `${v.scheme ?? "DPoP"} ${token}`;
    if (proof !== null && proof !== undefined) headers.dpop = proof;
    if (v.encoding !== undefined) headers["content-encoding"] = v.encoding;
    const res = await request(host.url, {
      method: "POST",
      dispatcher: agent,
      headers,
      body: v.raw ?? body(v.topic),
    });
    const json = (await res.body.json()) as { error?: { code?: string } } & Record<string, unknown>;
    return { status: res.statusCode, code: json.error?.code, json };
  };

  it("a valid DPoP-bound request is accepted", async () => {
    const r = await send();
    expect([r.status, r.json.accepted]).toEqual([200, 1]);
  });

  it.each<[string, () => Promise<Variant>, number, string]>([
    ["no Authorization", async () => ({ token: null, proof: null }), 401, "ERR_INGEST_NO_TOKEN"],
    [
      "token signed by another issuer key",
      async () => ({
        token: await deviceToken({}, otherIssuer),
      }),
      401,
      "ERR_ACCESS_TOKEN_INVALID",
    ],
    [
      "token for another audience",
      async () => ({
        token: await deviceToken({ aud: "https://other" }),
      }),
      401,
      "ERR_INGEST_AUDIENCE",
    ],
    [
      "expired token",
      async () => ({
        token: await deviceToken({ ttlSec: -120 }),
      }),
      401,
      "ERR_ACCESS_TOKEN_INVALID",
    ],
    [
      "token without telemetry:write",
      async () => ({
        token: await deviceToken({ scope: "telemetry:read" }),
      }),
      403,
      "ERR_INGEST_SCOPE",
    ],
    [
      "un-bound (Bearer) token where DPoP is required",
      async () => ({
        token: await issuer.issue({ sub: "dev-t", scope: "telemetry:write", aud: AUD, ttlSec: 60 }),
        scheme: "Bearer",
        proof: null,
      }),
      401,
      "ERR_INGEST_DPOP_REQUIRED",
    ],
    [
      "DPoP-bound token sent with the Bearer scheme",
      async () => ({ scheme: "Bearer" }),
      401,
      "ERR_INGEST_DPOP_SCHEME",
    ],
    ["no DPoP proof", async () => ({ proof: null }), 401, "ERR_INGEST_DPOP_MISSING"],
    [
      "proof by another key (stolen token)",
      async () => {
        const token = await deviceToken();
        return { token, proof: await thief.signer.proof("POST", host.url, token) };
      },
      401,
      "ERR_DPOP_KEY_MISMATCH",
    ],
    [
      "proof for another URL",
      async () => {
        const token = await deviceToken();
        return { token, proof: await device.signer.proof("POST", `${host.origin}/v1/other`, token) };
      },
      401,
      "ERR_DPOP_HTU",
    ],
    [
      "proof for another method",
      async () => {
        const token = await deviceToken();
        return { token, proof: await device.signer.proof("GET", host.url, token) };
      },
      401,
      "ERR_DPOP_HTM",
    ],
    [
      "proof made for another access token (ath)",
      async () => {
        const token = await deviceToken();
        return { token, proof: await device.signer.proof("POST", host.url, "some-other-token") };
      },
      401,
      "ERR_DPOP_ATH",
    ],
    [
      "gzip that expands beyond the cap (zip bomb)",
      async () => ({ raw: gzipSync(Buffer.alloc(20 * 1024 * 1024, 0x20)), encoding: "gzip" }),
      400,
      "ERR_INGEST_ENCODING",
    ],
    [
      "body that is not the schema",
      async () => ({ raw: Buffer.from('{"messages":[{"id":"x"}]}') }),
      400,
      "ERR_SCHEMA",
    ],
  ])("%s → refused with its own code", async (_name, variant, status, code) => {
    const before = ingest.store.messages.size;
    const r = await send(await variant());
    expect([r.status, r.code]).toEqual([status, code]);
    expect(ingest.store.messages.size).toBe(before);
  });

  it("a replayed proof is refused", async () => {
    const token = await deviceToken();
    const proof = await device.signer.proof("POST", host.url, token);
    expect((await send({ token, proof })).status).toBe(200);
    const again = await send({ token, proof });
    expect([again.status, again.code]).toEqual([401, "ERR_DPOP_REPLAY"]);
  });

  it("a message for another device's topic is rejected by id; the device's own messages are stored", async () => {
    const r = await send({ topic: "devices/dev-other/temp" });
    expect(r.status).toBe(200);
    expect(r.json.accepted).toBe(0);
    expect((r.json.rejected as { code: string }[])[0]?.code).toBe("ERR_INGEST_TOPIC_NOT_OWNED");
  });
});
