import { outboxPath } from "../../config/index.js";
import { systemClock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { backoffDelay, defaultRetryPolicy } from "../../core/retry.js";
import { type SinkCredentials, sinksFromConfig, unhealthyAfterMs } from "../../relay/from-config.js";
import type { Outbox, OutboxStats } from "../../relay/outbox/outbox.js";
import type { MqttSource } from "../../relay/sources/mqtt/mqtt-source.js";
import type { RelayStack } from "../../relay/stack.js";
import { healthReasonOf } from "../health.js";
import type { AgentStage, StageContext, StageStarted } from "../stage-types.js";

/**
 * The relay: a durable SQLite outbox in the state directory (in a worker thread unless
 * `relay.outbox.thread = "main"`), `POST /v1/messages` on the daemon's local API, and the configured
 * sinks (MQTT 5 with PKCS#11-engine mTLS or token auth; HTTPS with DPoP). Status reports outbox depth, drops and per-sink counters; stop drains in-flight deliveries.
 */
export const relayStage: AgentStage<SinkCredentials> = {
  name: "relay",
  sections: ["relay"],
  enabled: (config) => config.relay.mqtt !== undefined || config.relay.https !== undefined,
  async start(ctx: StageContext, credentials: SinkCredentials): Promise<StageStarted<void>> {
    const { config } = ctx;
    const deviceId = ctx.enrolment?.deviceId ?? config.credentials.oauth?.client_id;
    if (deviceId === undefined)
      throw new M2mError("ERR_NOT_ENROLLED", "permanent", "the relay needs a device identity (not enrolled)");
    const cleanups: (() => void)[] = [];
    const sinks = await sinksFromConfig(ctx, credentials, deviceId, (fn) => cleanups.push(fn));
    const o = config.relay.outbox;
    const outboxOptions = {
      path: outboxPath(config),
      sinks: sinks.map((s) => s.name),
      limits: {
        maxBytes: o.max_bytes,
        maxCount: o.max_count,
        ttlMs: o.max_age_s * 1000,
        dropPolicy: o.drop_policy === "refuse" ? ("refuse-new" as const) : ("drop-oldest" as const),
      },
      // TTL drops are decisions on wall time: none while the clock is below its floor (wrong RTC at boot).
      clockTrusted: () => ctx.clockSanity.check().trusted,
      logger: ctx.log.child({ component: "outbox" }),
      onQuarantine: (movedTo: string) => {
        ctx.health.set("relay.outbox", `ERR_OUTBOX_CORRUPT: corrupt outbox quarantined to ${movedTo}`);
        ctx.log.error("outbox quarantined", { movedTo });
      },
    };
    let outbox: Outbox;
    // The worker's SqliteOutbox runs on the system clock (a clock object cannot cross threads): with an
    // injected clock (tests use ManualClock) the outbox stays in this thread so TTL follows that clock.
    const thread = o.thread === "worker" && ctx.clock === systemClock ? "worker" : "main";
    if (thread === "worker") {
      const { WorkerOutbox } = await import("../../relay/outbox/worker/worker-outbox.js");
      outbox = await WorkerOutbox.open({
        ...outboxOptions,
        onCrash: (err) => ctx.health.set("relay.outbox", `${err.code}: outbox worker stopped`),
      });
    } else {
      const { SqliteOutbox } = await import("../../relay/outbox/sqlite/sqlite-outbox.js");
      outbox = SqliteOutbox.open({ ...outboxOptions, clock: ctx.clock });
    }
    ctx.log.info("outbox open", { thread, depth: outbox.stats().depth });
    const { startRelayStack } = await import("../../relay/stack.js");
    const unhealthyAfter = unhealthyAfterMs(config, ctx.env);
    const stack: RelayStack = await startRelayStack({
      outbox,
      sinks,
      unhealthyAfterMs: unhealthyAfter,
      // Why: a sink opens TLS (mTLS with the device certificate, or a token signed on our clock);
      // below the time floor nothing is leased, sent or probed, and messages wait in the outbox.
      hold: () => ctx.clockSanity.untrusted(),
      clock: ctx.clock,
      logger: ctx.log,
    });
    // A sink that cannot deliver degrades the daemon with a reason naming it; delivery clears it.
    const sinkHealth = (): void => {
      const trouble = new Map(stack.relay.unhealthy().map((t) => [t.sink, t]));
      for (const s of sinks) {
        const t = trouble.get(s.name);
        ctx.health.set(
          `relay.sink.${s.name}`,
          t === undefined
            ? undefined
            : t.held === true
              ? `${t.code}: sink ${s.name} holds messages in the outbox until the clock is trusted`
              : // Stable text (no running duration): the board re-applies only when the reason changes.
                `${t.code}: sink ${s.name} cannot deliver for over ${Math.round(unhealthyAfter / 1000)} s`,
        );
      }
    };
    const healthTimer = setInterval(sinkHealth, 1000);
    healthTimer.unref();
    if (ctx.api !== undefined) {
      const { mountMessagesRoute } = await import("../../relay/sources/api/messages-route.js");
      mountMessagesRoute(ctx.api, {
        outbox,
        // Accepted (durable) messages also feed the per-channel rate-change detector (anomaly flags).
        onAccepted: (batch) => {
          const perChannel = new Map<string, number>();
          for (const m of batch) perChannel.set(m.channel, (perChannel.get(m.channel) ?? 0) + 1);
          for (const [channel, n] of perChannel) ctx.anomalies.observe(channel, n);
        },
      });
    } else {
      ctx.health.set(
        "relay.ingest",
        "ERR_API_UNAVAILABLE: local API unavailable: POST /v1/messages is not served",
      );
    }
    // Local MQTT source: sensors already publishing to a broker on the gateway.
    const sourceAbort = new AbortController();
    let source: MqttSource | undefined;
    const src = config.relay.sources.mqtt;
    if (src !== undefined) {
      const { MqttSource } = await import("../../relay/sources/mqtt/mqtt-source.js");
      const s = new MqttSource({
        url: src.url,
        topics: src.topics,
        outbox,
        // A stable id per device: the broker keeps our session and redelivers what we never PUBACKed.
        clientId: `m2m-agent-${deviceId}`.slice(0, 64),
        clock: ctx.clock,
        logger: ctx.log,
      });
      source = s;
      // The first connect may fail (local broker not up yet): retry with backoff until stopped.
      void (async () => {
        for (let attempt = 1; !sourceAbort.signal.aborted; attempt++) {
          try {
            await s.start();
            ctx.health.set("relay.sources.mqtt", undefined);
            return;
          } catch (err) {
            ctx.health.set(
              "relay.sources.mqtt",
              healthReasonOf(err, "local broker unreachable: ", "ERR_MQTT_SOURCE"),
            );
            const delay = backoffDelay({ ...defaultRetryPolicy, baseMs: 1000, capMs: 30_000 }, attempt);
            try {
              await ctx.clock.sleep(delay, sourceAbort.signal);
            } catch {
              return;
            }
          }
        }
      })();
    }

    // Metrics: gauges from the outbox, counters advanced by the deltas since the last sample.
    const seenDrops: Record<string, number> = {};
    const seenDelivered: Record<string, number> = {};
    let last: OutboxStats | undefined;
    const sample = (): void => {
      try {
        const s = outbox.stats();
        last = s;
        ctx.metrics.outboxDepth.set(s.depth);
        ctx.metrics.outboxBytes.set(s.bytes);
        ctx.metrics.outboxOldestAge.set(Math.round(s.oldestAgeMs / 1000));
        for (const [reason, n] of Object.entries(s.drops)) {
          const d = n - (seenDrops[reason] ?? 0);
          if (d > 0) ctx.metrics.outboxDrops.inc({ reason }, d);
          seenDrops[reason] = n;
        }
      } catch {
        // Closed while sampling (stop): nothing to report.
      }
      for (const [sink, c] of Object.entries(stack.relay.counters)) {
        const d = c.delivered - (seenDelivered[sink] ?? 0);
        if (d > 0) ctx.metrics.relayed.inc({ sink }, d);
        seenDelivered[sink] = c.delivered;
      }
    };
    sample();
    const timer = setInterval(sample, 5_000);
    timer.unref();

    return {
      status: () => {
        sample();
        return {
          outbox: last === undefined ? null : { path: outboxPath(config), ...last },
          sinks: Object.fromEntries(
            Object.entries(stack.relay.counters).map(([name, c]) => [name, { ...c }]),
          ),
          ...(source === undefined ? {} : { sources: { mqtt: { ...source.counters } } }),
        };
      },
      async stop(signal: AbortSignal): Promise<void> {
        for (const fn of cleanups) fn();
        clearInterval(timer);
        clearInterval(healthTimer);
        // Stop taking new local messages first; what the broker did not get a PUBACK for is redelivered.
        sourceAbort.abort();
        await source?.stop().catch(() => undefined);
        // In-flight deliveries settle (acked or nacked) before the outbox closes; the deadline wins.
        await Promise.race([
          stack.stop(),
          new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true })),
        ]);
        sample();
      },
    };
  },
};
