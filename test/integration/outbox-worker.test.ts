import { getEventListeners } from "node:events";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isM2mError, M2mError } from "../../src/core/errors.js";
import { createLogger } from "../../src/core/log.js";
import type { NewMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { WorkerOutbox, type WorkerOutboxOptions } from "../../src/relay/outbox/worker/worker-outbox.js";
import { outboxWorkerUrl } from "../contract/outbox-worker-bundle.js";

const enc = new TextEncoder();
const msg = (channel: string, n: number | string): NewMessage => ({
  channel,
  payload: enc.encode(JSON.stringify(n)),
});

describe("WorkerOutbox: the SqliteOutbox in a worker thread (real SQLite, real worker)", () => {
  let root: string;
  let workerUrl: URL;
  let n = 0;
  const fresh = async (): Promise<string> => mkdtemp(join(root, `t${n++}-`));
  const open = async (dir: string, extra: Partial<WorkerOutboxOptions> = {}): Promise<WorkerOutbox> =>
    WorkerOutbox.open({ path: join(dir, "outbox.db"), sinks: ["s"], ttlCheckMs: 0, workerUrl, ...extra });

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), "m2m-outbox-worker-"));
    workerUrl = await outboxWorkerUrl();
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it("errors cross the thread with code, retry class, details and hint", async () => {
    const ob = await open(await fresh(), {
      limits: { maxCount: 2, maxBytes: 1000, dropPolicy: "refuse-new" },
      refuseRetryAfterMs: 1234,
    });
    await ob.append([msg("a", 1), msg("a", 2)]);
    const full = await ob.append([msg("a", 3)]).catch((e: unknown) => e);
    expect(full).toBeInstanceOf(M2mError);
    expect(full).toMatchObject({
      code: "ERR_OUTBOX_FULL",
      retry: "transient",
      details: { retryAfterMs: 1234 },
    });
    expect(isM2mError(full) && typeof full.hint).toBe("string");
    expect(ob.stats().drops.refused).toBe(1);

    const big = await ob.append([{ channel: "a", payload: new Uint8Array(1001) }]).catch((e: unknown) => e);
    expect(big).toBeInstanceOf(M2mError);
    expect(big).toMatchObject({ code: "ERR_OUTBOX_MESSAGE_TOO_LARGE", retry: "permanent" });

    await expect(ob.lease("nope", 1)).rejects.toMatchObject({ code: "ERR_OUTBOX_SINK_UNKNOWN" });
    expect(() => ob.ack("nope", [])).toThrow(expect.objectContaining({ code: "ERR_OUTBOX_SINK_UNKNOWN" }));
    await ob.close();
    await expect(ob.lease("s", 1)).rejects.toMatchObject({ code: "ERR_OUTBOX_CLOSED", retry: "permanent" });
    expect(() => ob.append([msg("a", 1)])).toThrow(expect.objectContaining({ code: "ERR_OUTBOX_CLOSED" }));
    expect(() => ob.retryNow("s")).toThrow(expect.objectContaining({ code: "ERR_OUTBOX_CLOSED" }));
  });

  it("open errors reject open() with the code SqliteOutbox throws; a missing worker file is ERR_OUTBOX_OPEN", async () => {
    const dir = await fresh();
    // No sinks: a config error (SqliteOutbox.open reports it as ERR_OUTBOX_OPEN with the cause).
    let inThread: unknown;
    try {
      SqliteOutbox.open({ path: join(dir, "direct.db"), sinks: [], ttlCheckMs: 0 });
    } catch (e) {
      inThread = e;
    }
    expect(isM2mError(inThread)).toBe(true);
    const viaWorker = await open(dir, { sinks: [] }).catch((e: unknown) => e);
    expect(viaWorker).toBeInstanceOf(M2mError);
    expect(viaWorker).toMatchObject({
      code: isM2mError(inThread) ? inThread.code : "?",
      retry: isM2mError(inThread) ? inThread.retry : "?",
    });
    // A directory where the database file should be: SQLite cannot open it.
    await expect(WorkerOutbox.open({ path: dir, sinks: ["s"], workerUrl })).rejects.toMatchObject({
      code: "ERR_OUTBOX_OPEN",
    });
    await expect(open(dir, { workerUrl: new URL("./does-not-exist.mjs", workerUrl) })).rejects.toMatchObject({
      code: "ERR_OUTBOX_OPEN",
    });
  });

  it("a corrupt file is quarantined: onQuarantine and the worker's log arrive on the main side", async () => {
    const dir = await fresh();
    await writeFile(join(dir, "outbox.db"), Buffer.from("not a database, a torn write ".repeat(300)));
    const logs: string[] = [];
    const moved: string[] = [];
    const ob = await open(dir, {
      logger: createLogger({ write: (l) => logs.push(l) }),
      onQuarantine: (to) => moved.push(to),
    });
    const aside = (await readdir(dir)).find((f) => f.startsWith("outbox.db.corrupt-"));
    expect(aside).toBeDefined();
    expect(moved).toEqual([join(dir, aside ?? "")]);
    expect(ob.stats().quarantined).toBe(1);
    expect(logs.some((l) => l.includes("ERR_OUTBOX_CORRUPT") && l.includes("quarantined"))).toBe(true);
    const ids = await ob.append([msg("a", 1)]);
    expect((await ob.lease("s", 1))[0]?.id).toBe(ids[0]);
    await ob.close();
  });

  it("stats are exact after each awaited call; oldestAgeMs grows between snapshots; leased payloads are Buffers", async () => {
    const ob = await open(await fresh(), { sinks: ["mqtt", "https"] });
    // A pooled Buffer (a view on a shared slab) must arrive as just its bytes.
    const pooled = Buffer.from("pooled-payload");
    await ob.append([msg("a", 1), { channel: "b", payload: pooled }]);
    expect(ob.stats()).toMatchObject({ depth: 2, bytes: 1 + pooled.byteLength, appended: 2 });
    const l = await ob.lease("mqtt", 10);
    expect(ob.stats().leased).toEqual({ mqtt: 2, https: 0 });
    const p1 = l[1]?.payload;
    expect(p1).toBeInstanceOf(Buffer);
    expect(p1 instanceof Buffer && p1.toString("utf8")).toBe("pooled-payload");
    await ob.ack("mqtt", [l[0]?.id ?? ""]);
    expect(ob.stats().leased).toEqual({ mqtt: 1, https: 0 });
    expect(ob.stats().depth).toBe(2);
    const age1 = ob.stats().oldestAgeMs;
    await sleep(60);
    expect(ob.stats().oldestAgeMs).toBeGreaterThanOrEqual(age1 + 50);
    await ob.close();
  });

  it("TTL drops by the worker's timer reach stats() without a request; clockTrusted gates expire()", async () => {
    let trusted = false;
    const ob = await open(await fresh(), {
      limits: { ttlMs: 100 },
      ttlCheckMs: 50,
      statsPushMs: 50,
      clockTrusted: () => trusted,
    });
    await ob.append([msg("a", "old")]);
    await sleep(200);
    // Untrusted clock: neither the timer nor expire() drops anything.
    expect(await ob.expire()).toBe(0);
    expect(ob.stats().depth).toBe(1);
    trusted = true;
    // The main side sends the answer with the next append/expire and once per second; wait for the
    // timer sweep in the worker and the pushed snapshot, with no request of ours in between.
    const until = Date.now() + 5000;
    while (ob.stats().drops.ttl === 0 && Date.now() < until) await sleep(25);
    expect(ob.stats().drops.ttl).toBe(1);
    expect(ob.stats().depth).toBe(0);
    expect(ob.stats().oldestAgeMs).toBe(0);
    await ob.close();
  });

  it("waitForWork: 10 000 abort cycles leave no waiter in the worker and no request pending here", async () => {
    const ob = await open(await fresh());
    for (let i = 0; i < 10_000; i++) {
      const ctl = new AbortController();
      const w = ob.waitForWork("s", ctl.signal);
      if (i % 2 === 0) await Promise.resolve();
      ctl.abort();
      await w;
    }
    expect(ob.pendingRequests).toBe(0);
    // Messages are ordered: every cancel was handled before this request.
    expect((await ob.debug()).waits).toBe(0);
    // A long-lived signal: waits that end by an append remove their abort listener.
    const ctl = new AbortController();
    for (let i = 0; i < 200; i++) {
      const w = ob.waitForWork("s", ctl.signal);
      const [id] = await ob.append([msg("a", i)]);
      await w;
      await ob.lease("s", 1);
      await ob.ack("s", [id ?? ""]);
    }
    expect(getEventListeners(ctl.signal, "abort")).toHaveLength(0);
    expect((await ob.debug()).waits).toBe(0);
    // Still answering waits after all that.
    const w = ob.waitForWork("s");
    await ob.append([msg("a", "last")]);
    await w;
    await ob.close();
  });

  it("the worker dying rejects pending and later calls with ERR_OUTBOX_IO (transient); waits resolve", async () => {
    const logs: string[] = [];
    const crashes: M2mError[] = [];
    const ob = await open(await fresh(), {
      logger: createLogger({ write: (l) => logs.push(l) }),
      onCrash: (e) => crashes.push(e),
    });
    await ob.append([msg("a", 1)]);
    const wait = ob.waitForWork("s", new AbortController().signal);
    // Posted in order: the worker exits on the first and never answers the others.
    const exit = ob.debug("exit").catch((e: unknown) => e);
    const pendingAppend = ob.append([msg("a", 2)]).catch((e: unknown) => e);
    const pendingLease = ob.lease("s", 10).catch((e: unknown) => e);
    for (const e of [await exit, await pendingAppend, await pendingLease]) {
      expect(e).toBeInstanceOf(M2mError);
      expect(e).toMatchObject({ code: "ERR_OUTBOX_IO", retry: "transient" });
    }
    await wait;
    await expect(ob.lease("s", 1)).rejects.toMatchObject({ code: "ERR_OUTBOX_IO" });
    await expect(ob.append([msg("a", 3)])).rejects.toMatchObject({ code: "ERR_OUTBOX_IO" });
    expect(crashes).toHaveLength(1);
    expect(logs.some((l) => l.includes("outbox worker stopped"))).toBe(true);
    expect(ob.pendingRequests).toBe(0);
    await ob.close();
    expect(() => ob.append([msg("a", 4)])).toThrow(expect.objectContaining({ code: "ERR_OUTBOX_CLOSED" }));
  });

  it("SIGKILL-style: every acknowledged append survives the worker dying without close (reopened in-thread)", async () => {
    const dir = await fresh();
    const ob = await open(dir);
    const ids = (
      await Promise.all(Array.from({ length: 100 }, (_, i) => ob.append([msg(`c${i % 7}`, i), msg("x", i)])))
    ).flat();
    // Leased but never acked: must come back after the crash.
    expect(await ob.lease("s", 50)).toHaveLength(50);
    await ob.debug("exit").catch(() => undefined);
    const again = SqliteOutbox.open({ path: join(dir, "outbox.db"), sinks: ["s"], ttlCheckMs: 0 });
    expect(again.stats().depth).toBe(200);
    const back = await again.lease("s", 1000);
    expect(new Set(back.map((m) => m.id))).toEqual(new Set(ids));
    await again.close();
    await ob.close();
  });
});
