import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { execa, type ResultPromise } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { bundleEntry, call, startSubscriber } from "./relay-helpers.js";

/**
 * Crash safety: a child process running the relay (outbox + local API + MQTT sink) is killed with
 * SIGKILL at random moments while a producer sends numbered messages through the socket. Every
 * message the API acknowledged must reach the subscriber at least once; copies share the id.
 */
describe("relay crash safety (SIGKILL at random moments)", () => {
  let broker: Mosquitto;
  let dir: string;
  let childJs: string;
  let outboxWorkerJs: string;
  let child: ResultPromise | undefined;

  beforeAll(async () => {
    broker = await startMosquitto();
    dir = await mkdtemp(join(tmpdir(), "m2m-crash-"));
    childJs = await bundleEntry(
      new URL("../../bench/relay-child.ts", import.meta.url).pathname,
      "relay-child",
    );
    // The child's outbox runs in a worker thread (the default): it needs the bundled worker entry.
    outboxWorkerJs = await bundleEntry(
      new URL("../../src/relay/outbox/worker/outbox-worker.ts", import.meta.url).pathname,
      "outbox-worker",
    );
  });
  afterAll(async () => {
    child?.kill("SIGKILL");
    await broker?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  it("every acknowledged message arrives at least once after 8 kills; duplicates share an id", async () => {
    const { certPem, keyPem } = await broker.ca.issueClient("dev-crash");
    const socketPath = join(dir, "api.sock");
    const cfg = JSON.stringify({
      dbPath: join(dir, "outbox.db"),
      socketPath,
      brokerUrl: broker.mtlsUrl,
      caPem: broker.ca.caPem,
      certPem,
      keyPem,
      deviceId: "dev-crash",
      outboxWorkerUrl: pathToFileURL(outboxWorkerJs).href,
    });
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-crash/#");
    const acked = new Map<number, string>();
    let next = 0;

    // Wrapped in an object: an execa ResultPromise is a thenable, returning it from an async function
    // would wait for the process to exit.
    // Kills alternate between the two outbox placements (same database file): in-thread and worker.
    const startChild = async (thread: "main" | "worker"): Promise<{ p: ResultPromise }> => {
      const p = execa(process.execPath, [childJs, cfg], {
        reject: false,
        stdin: "ignore",
        timeout: 120_000,
        env: { RELAY_BENCH_OUTBOX: thread },
      });
      child = p;
      // Ready when the socket answers.
      for (let i = 0; i < 500; i++) {
        const ok = await call(socketPath, "GET", "/ping").then(
          () => true,
          () => false,
        );
        if (ok) return { p };
        await new Promise((r) => setTimeout(r, 20));
      }
      throw new Error("relay child did not start");
    };

    const produce = async (stopAt: () => boolean): Promise<void> => {
      // Four concurrent producers, batches of 10 numbered messages.
      await Promise.all(
        Array.from({ length: 4 }, async () => {
          while (!stopAt()) {
            const nums = Array.from({ length: 10 }, () => next++);
            const body = JSON.stringify(nums.map((n) => ({ channel: "seq", payload: { n } })));
            try {
              const r = await call(socketPath, "POST", "/v1/messages", body);
              if (r.status === 200 && r.json.ids !== undefined) {
                nums.forEach((n, i) => {
                  acked.set(n, r.json.ids?.[i] ?? "");
                });
              }
            } catch {
              // Killed mid-request: not acknowledged, so not promised.
              return;
            }
          }
        }),
      );
    };

    for (let kill = 0; kill < 8; kill++) {
      const { p } = await startChild(kill % 2 === 0 ? "main" : "worker");
      let dead = false;
      const producing = produce(() => dead);
      await new Promise((r) => setTimeout(r, 150 + Math.floor(Math.random() * 450)));
      p.kill("SIGKILL");
      await p;
      dead = true;
      await producing;
    }
    // Last run: no kill; everything acknowledged must drain.
    const { p: last } = await startChild("main");
    expect(acked.size).toBeGreaterThan(100);
    await sub.waitFor(() => {
      const got = new Set(sub.received.map((r) => (JSON.parse(r.payload) as { n: number }).n));
      for (const n of acked.keys()) if (!got.has(n)) return false;
      return true;
    }, 60_000);

    // Duplicates (redelivery after a kill) carry the same id as the acknowledged one.
    for (const r of sub.received) {
      const n = (JSON.parse(r.payload) as { n: number }).n;
      const id = acked.get(n);
      if (id !== undefined) expect(r.id).toBe(id);
    }
    const ids = new Map<number, Set<string | undefined>>();
    for (const r of sub.received) {
      const n = (JSON.parse(r.payload) as { n: number }).n;
      const s = ids.get(n) ?? new Set();
      s.add(r.id);
      ids.set(n, s);
    }
    for (const s of ids.values()) expect(s.size).toBe(1);
    last.kill("SIGTERM");
    await last;
    await sub.close();
  }, 180_000);
});
