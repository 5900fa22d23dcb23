import { createPublicKey, X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { AgentConfig } from "../../config/index.js";
import { systemClock } from "../../core/clock.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import { backoffDelay, defaultRetryPolicy } from "../../core/retry.js";
import { deviceCertPath } from "../../credentials/est/device-cert.js";
import type { DpopSigner } from "../../credentials/oauth/token-source.js";
import { registrarCaPem } from "../../credentials/registrar-ca.js";
import type { DeviceKeyOwner } from "../../keys/device-key.js";
import type { NewMessage, Outbox, OutboxStats } from "../../relay/outbox/outbox.js";
import type { MtlsIdentity } from "../../relay/sinks/mqtt/mqtt-sink.js";
import type { RefreshableTokenSource, Sink } from "../../relay/sinks/sink.js";
import type { MqttSource } from "../../relay/sources/mqtt/mqtt-source.js";
import type { RelayStack } from "../../relay/stack.js";
import type { AgentStage, StageContext, StageHandle } from "../compose.js";

/** Default outbox file inside the state directory. */
export const OUTBOX_FILE = "outbox.db";

/**
 * How long (ms) a sink may deliver nothing while it has work before the daemon is degraded:
 * `relay.unhealthy_after_s` (default 10 s). `M2M_RELAY_UNHEALTHY_AFTER_MS` in the environment still
 * overrides it (kept for existing service drop-ins).
 */
function unhealthyAfterMs(
  config: AgentConfig,
  env: NodeJS.ProcessEnv | Readonly<Record<string, string | undefined>>,
): number {
  const v = Number(env.M2M_RELAY_UNHEALTHY_AFTER_MS);
  return Number.isFinite(v) && v > 0 ? v : Math.round(config.relay.unhealthy_after_s * 1000);
}

function outboxPath(config: AgentConfig): string {
  return config.relay.outbox.path ?? join(config.agent.state_dir, OUTBOX_FILE);
}

/** Config templates say `{device_id}` (snake_case like every key); the relay expands `{deviceId}`. */
function topicTemplate(t: string): string {
  return t.replaceAll("{device_id}", "{deviceId}");
}

/**
 * The owner's CURRENT key with the certificate on disk, read at every MQTT connect. A certificate
 * issued for another key is refused (transient: a rotation is between "certificate written" and
 * "key switched" and settles within moments) rather than paired with the wrong key.
 */
async function currentIdentity(keys: DeviceKeyOwner, certFile: string): Promise<MtlsIdentity> {
  const key = keys.current;
  const tls = key.tlsClient;
  if (tls === undefined)
    throw new M2mError("ERR_TLS_KEY_UNAVAILABLE", "permanent", "the device key cannot do TLS");
  const [certPem, info] = await Promise.all([readFile(certFile, "utf8"), keys.info()]);
  // Security: the broker would see a certificate whose key did not sign the handshake (it fails), or
  // worse a destroyed key paired with a new certificate; only a matching pair is ever used.
  if (!new X509Certificate(certPem).publicKey.equals(createPublicKey(info.spkiPem)))
    throw new M2mError(
      "ERR_TLS_CERT_KEY_MISMATCH",
      "transient",
      "the device certificate is not for the current key yet",
    );
  return { certPem, key: tls, keyId: info.thumbprint };
}

async function buildSinks(
  ctx: StageContext,
  deviceId: string,
  onStop: (fn: () => void) => void,
): Promise<Sink[]> {
  const { config } = ctx;
  const sinks: Sink[] = [];
  const tokens = ctx.services.get("tokenSource") as RefreshableTokenSource | undefined;
  const dpop = ctx.services.get("dpopSigner") as DpopSigner | undefined;
  const registrarCa = await registrarCaPem(config, ctx.enrolment);
  const needTokens = (what: string): RefreshableTokenSource => {
    if (tokens === undefined)
      throw new M2mError(
        "ERR_CONFIG",
        "permanent",
        `${what} needs access tokens: the credentials stage is not running`,
      );
    return tokens;
  };

  const h = config.relay.https;
  if (h !== undefined) {
    const { HttpsSink } = await import("../../relay/sinks/https/https-sink.js");
    sinks.push(
      new HttpsSink({
        url: h.url,
        ...(registrarCa === undefined ? {} : { caPem: registrarCa }),
        tokens: needTokens("relay.https"),
        ...(dpop === undefined ? {} : { dpop }),
        deviceId,
        maxBatch: h.batch_max,
        // Time-bounded batching: a partial batch waits at most batch_ms for more messages.
        lingerMs: h.batch_ms,
        clock: ctx.clock,
        logger: ctx.log,
      }),
    );
  }

  const m = config.relay.mqtt;
  if (m !== undefined) {
    const { MqttSink } = await import("../../relay/sinks/mqtt/mqtt-sink.js");
    const caPem = m.ca_file === undefined ? registrarCa : await readFile(m.ca_file, "utf8");
    if (caPem === undefined)
      throw new M2mError("ERR_CONFIG", "permanent", "relay.mqtt.ca_file is required (no fleet CA known yet)");
    let auth: ConstructorParameters<typeof MqttSink>[0]["auth"];
    if (m.auth === "mtls-pkcs11" || m.auth === "mtls-tpm") {
      // The key signs the TLS handshake where it lives (its `tlsClient` capability): a PKCS#11 token
      // through the OpenSSL engine, or the attested TPM key through tpm2-pkcs11 (keys/tpm/tls.ts).
      if (ctx.keys.current.tlsClient === undefined)
        throw new M2mError(
          "ERR_CONFIG",
          "permanent",
          m.auth === "mtls-pkcs11"
            ? 'relay.mqtt.auth = "mtls-pkcs11" needs a device key usable for TLS: keys.provider = "pkcs11" with keys.pkcs11.pin = { file = … } or { credential = … }'
            : 'relay.mqtt.auth = "mtls-tpm" needs a device key usable for TLS: keys.provider = "tpm" with keys.tpm.tls_pin_file and a resource-manager tcti (device:/dev/tpmrm0)',
        );
      const certFile = deviceCertPath(config);
      await readFile(certFile, "utf8"); // fail at start (ERR_*) rather than at the first connect
      const keys = ctx.keys;
      auth = { kind: "mtls-key", identity: () => currentIdentity(keys, certFile) };
    } else {
      auth = { kind: "token", username: deviceId, tokens: needTokens("relay.mqtt token auth") };
    }
    const sink = new MqttSink({
      urls: m.urls,
      caPem,
      auth,
      deviceId,
      topicTemplate: topicTemplate(m.topic_template),
      maxInFlight: m.inflight,
      clock: ctx.clock,
      logger: ctx.log,
    });
    // A committed key rotation: the live connection moves to the new key and certificate before the
    // owner destroys the old key (make-before-break).
    if (auth.kind === "mtls-key") onStop(ctx.keys.subscribe(() => sink.rekey()));
    sinks.push(sink);
  }
  return sinks;
}

/**
 * The relay: a durable SQLite outbox in the state directory (in a worker thread unless
 * `relay.outbox.thread = "main"`), `POST /v1/messages` on the daemon's local API, and the configured
 * sinks (MQTT 5 with PKCS#11-engine mTLS or token auth; HTTPS with DPoP). Status reports outbox depth, drops and per-sink counters; stop drains in-flight deliveries.
 */
export const relayStage: AgentStage = {
  name: "relay",
  sections: ["relay"],
  enabled: (config) => config.relay.mqtt !== undefined || config.relay.https !== undefined,
  async start(ctx: StageContext): Promise<StageHandle> {
    const { config } = ctx;
    const deviceId = ctx.enrolment?.deviceId ?? config.credentials.oauth?.client_id;
    if (deviceId === undefined)
      throw new M2mError("ERR_NOT_ENROLLED", "permanent", "the relay needs a device identity (not enrolled)");
    const cleanups: (() => void)[] = [];
    const sinks = await buildSinks(ctx, deviceId, (fn) => cleanups.push(fn));
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
        ctx.health.set("relay.outbox", `corrupt outbox quarantined to ${movedTo}`);
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
        onCrash: (err) => ctx.health.set("relay.outbox", `outbox worker stopped (${err.code})`),
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
            : // Stable text (no running duration): the board re-applies only when the reason changes.
              `sink ${s.name} cannot deliver (${t.code}) for over ${Math.round(unhealthyAfter / 1000)} s`,
        );
      }
    };
    const healthTimer = setInterval(sinkHealth, 1000);
    healthTimer.unref();
    if (ctx.api !== undefined) {
      const { mountMessagesRoute } = await import("../../relay/sources/api/messages-route.js");
      // Accepted messages also feed the per-channel rate-change detector (anomaly flags in status).
      const observed: Pick<Outbox, "append"> = {
        append: async (batch: readonly NewMessage[]) => {
          const ids = await outbox.append(batch);
          const perChannel = new Map<string, number>();
          for (const m of batch) perChannel.set(m.channel, (perChannel.get(m.channel) ?? 0) + 1);
          for (const [channel, n] of perChannel) ctx.anomalies.observe(channel, n);
          return ids;
        },
      };
      mountMessagesRoute(ctx.api, {
        outbox: new Proxy(outbox, {
          get: (t, p) => {
            if (p === "append") return observed.append;
            const v: unknown = Reflect.get(t, p, t);
            // Bound to the real outbox: its private fields do not exist on the proxy.
            return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(t) : v;
          },
        }),
      });
    } else {
      ctx.health.set("relay.ingest", "local API unavailable: POST /v1/messages is not served");
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
            ctx.health.set("relay.sources.mqtt", `local broker unreachable: ${asM2mError(err).code}`);
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
