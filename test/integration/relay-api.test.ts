import { mkdtemp, rm, stat } from "node:fs/promises";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiServer } from "../../src/api/server.js";
import { sendMessage } from "../../src/cli/agent/send.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { mountMessagesRoute } from "../../src/relay/sources/api/messages-route.js";
import { call } from "./relay-helpers.js";

describe("local API: POST /v1/messages on the Unix socket", () => {
  let dir: string;
  let api: ApiServer;
  let outbox: SqliteOutbox;
  let sock: string;
  const releases: (() => void)[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-api-"));
    sock = join(dir, "api.sock");
    outbox = SqliteOutbox.open({ path: join(dir, "o.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    api = new ApiServer({ socketPath: sock, maxConcurrentRequests: 3, bodyIdleTimeoutMs: 300 });
    mountMessagesRoute(api, {
      outbox,
      maxBodyBytes: 64 * 1024,
      limits: { maxMessages: 100, maxPayloadBytes: 1024 },
    });
    api.route("GET", "/v1/status", async () => ({ status: 200, json: { state: "running" } }));
    api.route("POST", "/test/block", async () => {
      await new Promise<void>((r) => {
        releases.push(r);
      });
      return { status: 204 };
    });
    await api.listen();
  });
  afterAll(async () => {
    await api?.close();
    await outbox?.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** POST /v1/messages on the API socket. */
  const postMessages = (body: string, contentType?: string) =>
    call(sock, "POST", "/v1/messages", body, contentType);

  it("socket is created 0660 (owner + group only)", async () => {
    const st = await stat(sock);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o660);
  });

  it("one message → 200 with its id, stored durably with channel, payload and content type", async () => {
    const r = await postMessages(
      JSON.stringify({ channel: "sensors/temp", payload: { c: 21.5 }, ts: 1700000000000 }),
    );
    expect(r.status).toBe(200);
    expect(r.json.ids).toHaveLength(1);
    const [m] = await outbox.lease("mqtt", 1);
    expect(m?.id).toBe(r.json.ids?.[0]);
    expect(m?.channel).toBe("sensors/temp");
    expect(Buffer.from(m?.payload ?? []).toString()).toBe('{"c":21.5}');
    expect(m?.ts).toBe(1700000000000);
    await outbox.ack("mqtt", [m?.id ?? ""]);
  });

  it("a JSON array and NDJSON batch; base64 payload with a content type", async () => {
    const arr = await postMessages(
      JSON.stringify([
        { channel: "a", payload: 1 },
        {
          channel: "b",
          payload: Buffer.from([0, 1, 2]).toString("base64"),
          content_type: "application/octet-stream",
        },
      ]),
    );
    expect(arr.status).toBe(200);
    expect(arr.json.ids).toHaveLength(2);
    const nd = await postMessages(
      '{"channel":"a","payload":2}\n{"channel":"a","payload":3}\n',
      "application/x-ndjson",
    );
    expect(nd.status).toBe(200);
    expect(nd.json.ids).toHaveLength(2);
    const leased = await outbox.lease("mqtt", 10);
    expect(leased.map((m) => Buffer.from(m.payload).toString("hex"))).toEqual([
      Buffer.from("1").toString("hex"),
      "000102",
      Buffer.from("2").toString("hex"),
      Buffer.from("3").toString("hex"),
    ]);
    expect(leased[1]?.contentType).toBe("application/octet-stream");
    await outbox.ack(
      "mqtt",
      leased.map((m) => m.id),
    );
  });

  it.each([
    ["bad JSON", "{nope", "ERR_API_INVALID_JSON"],
    ["wildcard channel", JSON.stringify({ channel: "a/+/b", payload: 1 }), "ERR_CHANNEL_INVALID"],
    ["leading slash", JSON.stringify({ channel: "/a", payload: 1 }), "ERR_CHANNEL_INVALID"],
    ["hash", JSON.stringify({ channel: "a/#", payload: 1 }), "ERR_CHANNEL_INVALID"],
    ["too long channel", JSON.stringify({ channel: "x".repeat(129), payload: 1 }), "ERR_CHANNEL_INVALID"],
    ["missing payload", JSON.stringify({ channel: "a" }), "ERR_API_INVALID_PAYLOAD"],
    [
      "non-base64 binary",
      JSON.stringify({ channel: "a", payload: "%%%", content_type: "image/png" }),
      "ERR_API_INVALID_PAYLOAD",
    ],
    ["unknown field", JSON.stringify({ channel: "a", payload: 1, topic: "x" }), "ERR_API_INVALID_MESSAGE"],
    ["bad ts", JSON.stringify({ channel: "a", payload: 1, ts: "yesterday" }), "ERR_API_INVALID_MESSAGE"],
    ["empty batch", "[]", "ERR_API_INVALID_MESSAGE"],
  ])("%s → 400 with code %s, nothing stored", async (_name, body, code) => {
    const depth = outbox.stats().depth;
    const r = await postMessages(body);
    expect(r.status).toBe(400);
    expect(r.json.error?.code).toBe(code);
    expect(outbox.stats().depth).toBe(depth);
  });

  it("one bad message refuses the whole batch (atomic) and names its index", async () => {
    const r = await postMessages(
      JSON.stringify([
        { channel: "a", payload: 1 },
        { channel: "a/#", payload: 2 },
      ]),
    );
    expect(r.status).toBe(400);
    expect(r.json.error?.details?.index).toBe(1);
    expect(outbox.stats().depth).toBe(0);
  });

  it("size limits: body → 413, payload → 413, message count → 413, media type → 415", async () => {
    expect((await postMessages("x".repeat(70 * 1024))).status).toBe(413);
    const big = await postMessages(JSON.stringify({ channel: "a", payload: "y".repeat(2000) }));
    expect([big.status, big.json.error?.code]).toEqual([413, "ERR_API_PAYLOAD_TOO_LARGE"]);
    const many = await postMessages(
      JSON.stringify(Array.from({ length: 101 }, () => ({ channel: "a", payload: 1 }))),
    );
    expect([many.status, many.json.error?.code]).toEqual([413, "ERR_API_TOO_MANY_MESSAGES"]);
    expect((await postMessages("a=b", "application/x-www-form-urlencoded")).status).toBe(415);
    // Refusals are counted by code.
    expect(api.counters.refused.ERR_API_BODY_TOO_LARGE).toBe(1);
    expect(api.counters.refused.ERR_API_PAYLOAD_TOO_LARGE).toBe(1);
    expect(api.counters.refused.ERR_API_UNSUPPORTED_MEDIA_TYPE).toBe(1);
  });

  it("unknown path → 404, wrong method → 405; other features' routes mount on the same server", async () => {
    expect((await call(sock, "GET", "/nope")).status).toBe(404);
    expect((await call(sock, "GET", "/v1/messages")).status).toBe(405);
    const st = await call(sock, "GET", "/v1/status");
    expect([st.status, st.json.state]).toEqual([200, "running"]);
    expect(() => api.route("GET", "/v1/status", async () => ({ status: 200 }))).toThrow(
      expect.objectContaining({ code: "ERR_API_ROUTE_EXISTS" }),
    );
  });

  it("too many concurrent requests → 503 ERR_API_BUSY with Retry-After", async () => {
    const blocked = [
      call(sock, "POST", "/test/block", "{}"),
      call(sock, "POST", "/test/block", "{}"),
      call(sock, "POST", "/test/block", "{}"),
    ];
    // Wait until all three are parked in the handler.
    for (let i = 0; i < 200 && api.inFlight < 3; i++) await new Promise((r) => setTimeout(r, 10));
    const r = await call(sock, "GET", "/v1/status");
    expect([r.status, r.json.error?.code, r.headers["retry-after"]]).toEqual([503, "ERR_API_BUSY", "1"]);
    expect(api.counters.refused.ERR_API_BUSY).toBe(1);
    for (const rel of releases.splice(0)) rel();
    const done = await Promise.all(blocked);
    expect(done.every((d) => d.status === 204)).toBe(true);
  });

  it("a client that stalls mid-body is cut off (408 or closed), and the server keeps serving", async () => {
    const outcome = await new Promise<string>((resolve) => {
      const s = connect(sock);
      let data = "";
      s.on("data", (d) => {
        data += d.toString();
      });
      s.on("close", () => resolve(data));
      s.write(
        'POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"chan',
      );
    });
    expect(outcome === "" || outcome.startsWith("HTTP/1.1 408")).toBe(true);
    expect((await call(sock, "GET", "/v1/status")).status).toBe(200);
  });

  it("m2m-agent send's client: returns ids; maps agent errors to their codes", async () => {
    const ids = await sendMessage({ socketPath: sock, channel: "cli", data: Buffer.from('{"v":1}') });
    expect(ids).toHaveLength(1);
    await expect(
      sendMessage({ socketPath: sock, channel: "bad/#", data: Buffer.from("1") }),
    ).rejects.toMatchObject({
      code: "ERR_CHANNEL_INVALID",
    });
    await expect(
      sendMessage({ socketPath: join(dir, "missing.sock"), channel: "a", data: Buffer.from("1") }),
    ).rejects.toMatchObject({
      code: "ERR_SEND_AGENT_UNREACHABLE",
    });
    const leased = await outbox.lease("mqtt", 10);
    await outbox.ack(
      "mqtt",
      leased.map((m) => m.id),
    );
  });
});

describe("local API: socket lifecycle and a full outbox", () => {
  it("removes a stale socket (left by a kill -9); refuses to steal a live one", async () => {
    const dir = await mkdtemp(join(tmpdir(), "m2m-api-sock-"));
    const sock = join(dir, "api.sock");
    const squatter = createServer();
    await new Promise<void>((r) => squatter.listen(sock, () => r()));
    const live = new ApiServer({ socketPath: sock });
    await expect(live.listen()).rejects.toMatchObject({ code: "ERR_API_SOCKET_IN_USE" });
    await new Promise<void>((r) => squatter.close(() => r()));
    // A process killed with SIGKILL leaves its socket file behind, with nobody accepting.
    const child = execa(
      process.execPath,
      ["-e", `require("net").createServer().listen(${JSON.stringify(sock)}, () => console.log("up"))`],
      {
        timeout: 10_000,
        reject: false,
      },
    );
    for (let i = 0; i < 400; i++) {
      if ((await stat(sock).catch(() => undefined))?.isSocket()) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill("SIGKILL");
    await child;
    expect((await stat(sock)).isSocket()).toBe(true);
    const a = new ApiServer({ socketPath: sock });
    await a.listen();
    expect((await call(sock, "GET", "/v1/anything")).status).toBe(404);
    await a.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("outbox full under refuse-new → 429 ERR_OUTBOX_FULL with Retry-After, counted", async () => {
    const dir = await mkdtemp(join(tmpdir(), "m2m-api-full-"));
    const outbox = SqliteOutbox.open({
      path: join(dir, "o.db"),
      sinks: ["mqtt"],
      ttlCheckMs: 0,
      limits: { maxCount: 2, dropPolicy: "refuse-new" },
      refuseRetryAfterMs: 3000,
    });
    const api = new ApiServer({ socketPath: join(dir, "api.sock") });
    mountMessagesRoute(api, { outbox });
    await api.listen();
    const body = JSON.stringify([
      { channel: "a", payload: 1 },
      { channel: "a", payload: 2 },
    ]);
    expect((await call(api.socketPath, "POST", "/v1/messages", body)).status).toBe(200);
    const r = await call(
      api.socketPath,
      "POST",
      "/v1/messages",
      JSON.stringify({ channel: "a", payload: 3 }),
    );
    expect([r.status, r.json.error?.code, r.headers["retry-after"]]).toEqual([429, "ERR_OUTBOX_FULL", "3"]);
    expect(outbox.stats().drops.refused).toBe(1);
    await api.close();
    await outbox.close();
    await rm(dir, { recursive: true, force: true });
  });
});
