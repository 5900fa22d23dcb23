import { randomBytes } from "node:crypto";
import type { SecureContext } from "node:tls";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { type Clock, systemClock } from "../../../core/clock.js";
import type { ErrorCode } from "../../../core/error-codes.js";
import { asM2mError, M2mError } from "../../../core/errors.js";
import { type Logger, silentLogger } from "../../../core/log.js";
import type { Secret } from "../../../core/secret.js";
import { tlsVerifyError } from "../../../core/tls-diagnosis.js";
import type { TlsClientKey, TlsTunnel } from "../../../keys/capabilities.js";
import { expandTopic } from "../../channel.js";
import type { OutboxMessage } from "../../outbox/outbox.js";
import { urlReachable } from "../probe.js";
import type { DeliveryOutcome, RefreshableTokenSource, Sink } from "../sink.js";

/** How the gateway proves who it is to the broker. TLS server verification is always on. */
export type MqttAuth =
  /** mTLS, device key in a PEM (tests, or a gateway without a token). */
  | { readonly kind: "mtls-file"; readonly certPem: string; readonly keyPem: Secret }
  /**
   * mTLS with the hardware device key (its `tlsClient` capability: PKCS#11 engine, TPM via
   * tpm2-pkcs11). `identity` is asked at every connect, so a renewed certificate or a rotated key is
   * picked up; `rekey()` moves the live connection over (make-before-break).
   */
  | { readonly kind: "mtls-key"; readonly identity: () => Promise<MtlsIdentity> }
  /** username = device id, password = access token (renewed make-before-break before expiry). */
  | { readonly kind: "token"; readonly username: string; readonly tokens: RefreshableTokenSource };

/** The device's TLS client identity right now: a certificate and the key it was issued for. */
export interface MtlsIdentity {
  readonly certPem: string;
  readonly key: TlsClientKey;
  /** Names the key (e.g. its JWK thumbprint): a context is reused only for the same cert AND key. */
  readonly keyId: string;
}

export interface MqttSinkOptions {
  readonly name?: string;
  /** `mqtts://host:port` URLs; tried in order, the last good one first (clustered brokers). */
  readonly urls: readonly string[];
  /** CA bundle that must sign the broker certificate. */
  readonly caPem: string;
  /** Expected broker name when it differs from the URL host. */
  readonly servername?: string;
  readonly auth: MqttAuth;
  readonly deviceId: string;
  /** Default `devices/{deviceId}/{channel}`. */
  readonly topicTemplate?: string;
  /** Client id prefix; a random suffix per connection lets make-before-break overlap. */
  readonly clientIdPrefix?: string;
  readonly maxInFlight?: number;
  readonly maxBatch?: number;
  readonly connectTimeoutMs?: number;
  readonly keepaliveSeconds?: number;
  /** Reconnect with a fresh token this long before it expires. Default 60 s. */
  readonly renewBeforeMs?: number;
  /** Old connection gets this long to settle its PUBACKs after a token switch. */
  readonly drainTimeoutMs?: number;
  readonly clock?: Clock;
  readonly logger?: Logger;
}

/** PUBACK reason codes that refuse this message for good: dead-letter it, let the rest flow. */
const DEAD_LETTER_CODES: Readonly<Record<number, ErrorCode>> = {
  135: "ERR_MQTT_NOT_AUTHORIZED",
  144: "ERR_MQTT_TOPIC_NAME_INVALID",
  153: "ERR_MQTT_PAYLOAD_FORMAT_INVALID",
  149: "ERR_MQTT_PACKET_TOO_LARGE",
};
/** Reason codes that mean "not now": back off and keep the message. */
const BACKOFF_CODES: Readonly<Record<number, ErrorCode>> = {
  151: "ERR_MQTT_QUOTA_EXCEEDED",
  137: "ERR_MQTT_SERVER_BUSY",
  150: "ERR_MQTT_RATE_TOO_HIGH",
};

/** Classifies a failed QoS 1 publish into an outcome. Exported for unit tests. */
export function classifyPublishError(id: string, err: unknown): DeliveryOutcome {
  const code = (err as { code?: unknown }).code;
  if (typeof code === "number") {
    const dead = DEAD_LETTER_CODES[code];
    if (dead !== undefined)
      return { id, kind: "dead-letter", code: dead, detail: `reasonCode=0x${code.toString(16)}` };
    const backoff = BACKOFF_CODES[code];
    if (backoff !== undefined) return { id, kind: "retry", code: backoff };
    return { id, kind: "retry", code: "ERR_MQTT_PUBACK_REFUSED" };
  }
  return { id, kind: "retry", code: "ERR_MQTT_CONNECTION_LOST" };
}

interface Conn {
  readonly client: MqttClient;
  readonly url: string;
  readonly clientId: string;
  /** Settles every publish still waiting when the connection dies (mqtt.js does not, with reconnect off). */
  readonly pending: Set<(err: Error) => void>;
  closed: boolean;
  /** When the token used to connect expires (token auth). */
  readonly expiresAt?: number;
  /** The TLS connection the key made itself (`TlsClientKey.connect`), if any. */
  readonly tunnel?: TlsTunnel;
}

/**
 * An MQTT client over a TLS connection the key made itself (`TlsClientKey.connect`): resolves on
 * CONNACK, rejects on an error or a close before it (what `connectAsync(url, opts, false)` does).
 */
function connectOverStream(tunnel: TlsTunnel, opts: IClientOptions): Promise<MqttClient> {
  return new Promise((resolve, reject) => {
    const client = new mqtt.MqttClient(() => tunnel.stream, opts);
    const done = (): void => {
      client.off("connect", onConnect);
      client.off("error", onError);
      client.off("close", onClose);
    };
    const onConnect = (): void => {
      done();
      resolve(client);
    };
    const onError = (err: Error): void => {
      done();
      client.end(true);
      reject(err);
    };
    const onClose = (): void => onError(new Error("Couldn't connect to server"));
    client.on("connect", onConnect);
    client.on("error", onError);
    client.on("close", onClose);
  });
}

const MQTT_DEBUG = /mqttjs/.test(process.env.DEBUG ?? "");
const noopLog = (): void => undefined;

/**
 * MQTT 5 sink (mqtt.js): QoS 1, stable id as user property `m2m-id`, topic from a template, a bounded
 * window, and reconnects driven by the relay's backoff (mqtt.js reconnectPeriod: 0). A message counts
 * as delivered only on a successful PUBACK.
 */
export class MqttSink implements Sink {
  readonly name: string;
  readonly maxBatch: number;
  readonly maxInFlight: number;
  readonly #o: MqttSinkOptions;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #template: string;
  readonly #topics = new Map<string, string>();
  #conn: Conn | undefined;
  readonly #live = new Set<Conn>();
  #connecting: Promise<Conn> | undefined;
  #urlIndex = 0;
  #renewTimer: AbortController | undefined;
  #tlsContext: SecureContext | undefined;
  #tlsContextFor: string | undefined;
  #tlsError: M2mError | undefined;
  #tlsErrorFor: string | undefined;
  #closed = false;
  /** Counters for metrics. */
  readonly counters = {
    connects: 0,
    connectFailures: 0,
    published: 0,
    deadLettered: 0,
    renewals: 0,
    /** TLS contexts built with the device key (each loads the key: a token login, a TPM load). */
    engineLoads: 0,
    /** Live connections moved to a new key/certificate by `rekey()`. */
    rekeys: 0,
  };

  constructor(options: MqttSinkOptions) {
    if (options.urls.length === 0)
      throw new M2mError("ERR_MQTT_CONFIG", "permanent", "no broker URL configured");
    for (const u of options.urls) {
      // Transport security is not optional: plain mqtt:// would expose tokens and data.
      if (!u.startsWith("mqtts://")) {
        throw new M2mError("ERR_MQTT_CONFIG", "permanent", "broker URLs must use mqtts:// (TLS)");
      }
    }
    this.#o = options;
    this.name = options.name ?? "mqtt";
    this.maxInFlight = options.maxInFlight ?? 100;
    // Several smaller batches in flight make the window slide (a batch frees its slots only when all
    // of its PUBACKs are in); one window-sized batch would be stop-and-wait.
    this.maxBatch = options.maxBatch ?? Math.max(1, Math.ceil(this.maxInFlight / 4));
    this.#clock = options.clock ?? systemClock;
    this.#log = (options.logger ?? silentLogger).child({ sink: this.name });
    this.#template = options.topicTemplate ?? "devices/{deviceId}/{channel}";
  }

  topicFor(channel: string): string {
    let t = this.#topics.get(channel);
    if (t === undefined) {
      t = expandTopic(this.#template, { deviceId: this.#o.deviceId, channel });
      // Bounded: channels are few in practice; a producer inventing many only costs re-expansion.
      if (this.#topics.size >= 4096) this.#topics.clear();
      this.#topics.set(channel, t);
    }
    return t;
  }

  /**
   * The connections still open, with the serial of the client certificate each presented in its
   * handshake (mTLS): what the broker authenticated. During a make-before-break switch there are two.
   */
  liveConnections(): { clientId: string; url: string; certSerial: string | undefined }[] {
    const out: { clientId: string; url: string; certSerial: string | undefined }[] = [];
    for (const c of this.#live) {
      if (c.closed) continue;
      const stream = c.client.stream as { getCertificate?: () => { serialNumber?: string } | null };
      out.push({ clientId: c.clientId, url: c.url, certSerial: stream.getCertificate?.()?.serialNumber });
    }
    return out;
  }

  /** True while a connection is up (health). */
  get connected(): boolean {
    return this.#conn !== undefined && !this.#conn.closed;
  }

  async deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]> {
    if (batch.length === 0) return [];
    let conn: Conn;
    try {
      conn = await this.#ensureConnected();
    } catch (err) {
      const e = asM2mError(err);
      return batch.map((m) => ({ id: m.id, kind: "retry", code: e.code }));
    }
    // One promise per batch (not per message): the publishes go out in one tick (one corked write)
    // and each PUBACK fills its slot.
    return new Promise<DeliveryOutcome[]>((resolve) => {
      const out = new Array<DeliveryOutcome>(batch.length);
      let left = batch.length;
      const fill = (i: number, o: DeliveryOutcome): void => {
        out[i] = o;
        if (--left === 0) resolve(out);
      };
      for (let i = 0; i < batch.length; i++) this.#publish(conn, batch[i] as OutboxMessage, i, fill);
    });
  }

  #publish(conn: Conn, m: OutboxMessage, i: number, fill: (i: number, o: DeliveryOutcome) => void): void {
    let settled = false;
    const settle = (err: Error | undefined): void => {
      if (settled) return;
      settled = true;
      conn.pending.delete(settle);
      if (err === undefined) {
        this.counters.published++;
        fill(i, { id: m.id, kind: "ok" });
      } else {
        const o = classifyPublishError(m.id, err);
        if (o.kind === "dead-letter") this.counters.deadLettered++;
        fill(i, o);
      }
    };
    if (conn.closed) {
      settle(new Error("connection closed"));
      return;
    }
    conn.pending.add(settle);
    conn.client.publish(
      this.topicFor(m.channel),
      Buffer.from(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength),
      {
        qos: 1,
        properties: {
          contentType: m.contentType,
          userProperties: { "m2m-id": m.id, "m2m-ts": String(m.ts) },
        },
      },
      (err) => settle(err ?? undefined),
    );
  }

  /**
   * TCP reachability of any broker URL (no TLS handshake, no login: cheap for both sides). The relay
   * calls it during backoff to notice a broker that came back before the backoff ran out.
   */
  async probe(): Promise<boolean> {
    if (this.connected) return true;
    const timeoutMs = Math.min(this.#o.connectTimeoutMs ?? 10_000, 2000);
    const results = await Promise.all(this.#o.urls.map((u) => urlReachable(u, 8883, timeoutMs)));
    return results.some((r) => r);
  }

  async #ensureConnected(): Promise<Conn> {
    if (this.#closed) throw new M2mError("ERR_MQTT_CLOSED", "permanent", "sink closed");
    if (this.#conn !== undefined && !this.#conn.closed) return this.#conn;
    this.#connecting ??= this.#connectAny().finally(() => {
      this.#connecting = undefined;
    });
    const conn = await this.#connecting;
    return conn;
  }

  /** One pass over the broker URLs, starting with the last good one. The relay backs off between passes. */
  async #connectAny(): Promise<Conn> {
    let last: unknown;
    const n = this.#o.urls.length;
    for (let i = 0; i < n; i++) {
      const idx = (this.#urlIndex + i) % n;
      const url = this.#o.urls[idx] as string;
      try {
        const conn = await this.#connect(url);
        this.#urlIndex = idx;
        this.#install(conn);
        return conn;
      } catch (err) {
        last =
          tlsVerifyError(err, url, {
            description: "relay.mqtt.ca_file (default: the fleet CA)",
            key: "relay.mqtt.ca_file",
          }) ?? err;
        this.counters.connectFailures++;
        this.#log.warn("broker connect failed", { url, err: asM2mError(last, "ERR_MQTT_CONNECT") });
      }
    }
    throw asM2mError(last, "ERR_MQTT_CONNECT");
  }

  async #connect(url: string, forceRefresh = false): Promise<Conn> {
    const o = this.#o;
    const opts: IClientOptions = {
      protocolVersion: 5,
      // Our relay drives reconnects (jittered backoff that survives flaps); mqtt.js's is fixed-interval.
      reconnectPeriod: 0,
      clean: true,
      clientId: `${o.clientIdPrefix ?? o.deviceId}-${randomBytes(4).toString("hex")}`,
      connectTimeout: o.connectTimeoutMs ?? 10_000,
      keepalive: o.keepaliveSeconds ?? 30,
      ca: o.caPem,
      // Always verify the broker: a gateway must not hand data and tokens to an impostor.
      rejectUnauthorized: true,
      ...(o.servername === undefined ? {} : { servername: o.servername }),
      queueQoSZero: false,
      resubscribe: false,
      // Keepalive pings on their fixed period instead of re-arming a timer after every packet sent
      // (≈ 2 % of the relay's CPU at full rate); the broker still hears from us within `keepalive`.
      reschedulePings: false,
      // mqtt.js formats a `debug` call several times per publish (≈ 3 % of CPU at full rate); keep
      // its tracing only when an operator asked for it with DEBUG=mqttjs*.
      ...(MQTT_DEBUG ? {} : { log: noopLog }),
    };
    let expiresAt: number | undefined;
    let tunnel: TlsTunnel | undefined;
    switch (o.auth.kind) {
      case "mtls-file":
        opts.cert = o.auth.certPem;
        opts.key = o.auth.keyPem.reveal();
        break;
      case "mtls-key": {
        const id = await o.auth.identity();
        const forKey = `${id.keyId}\u0000${id.certPem}`;
        // A failed key load (wrong PIN, missing key) is never retried with the same inputs: each
        // attempt is a login, and repeated failed logins lock the token (or count towards TPM DA).
        if (this.#tlsError !== undefined && this.#tlsErrorFor === forKey) throw this.#tlsError;
        if (id.key.connect !== undefined) {
          // The key makes the TLS connection itself (TPM: a child process per connection).
          const u = new URL(url);
          this.counters.engineLoads++;
          try {
            tunnel = await id.key.connect({
              certPem: id.certPem,
              caPem: o.caPem,
              host: u.hostname.replace(/^\[(.*)\]$/, "$1"),
              port: u.port === "" ? 8883 : Number(u.port),
              ...(o.servername === undefined ? {} : { servername: o.servername }),
              timeoutMs: o.connectTimeoutMs ?? 10_000,
            });
          } catch (err) {
            const e = asM2mError(err, "ERR_TLS_ENGINE_KEY");
            if (e.retry === "permanent") {
              this.#tlsError = e;
              this.#tlsErrorFor = forKey;
            }
            throw e;
          }
          this.#tlsError = undefined;
          break;
        }
        if (this.#tlsContext === undefined || this.#tlsContextFor !== forKey) {
          this.counters.engineLoads++;
          try {
            this.#tlsContext = await id.key.secureContext({ certPem: id.certPem, caPem: o.caPem });
          } catch (err) {
            this.#tlsError = asM2mError(err, "ERR_TLS_ENGINE_KEY");
            this.#tlsErrorFor = forKey;
            throw this.#tlsError;
          }
          this.#tlsError = undefined;
          this.#tlsContextFor = forKey;
        }
        // mqtt.js passes unknown options through to tls.connect, which accepts a SecureContext.
        (opts as IClientOptions & { secureContext?: SecureContext }).secureContext = this.#tlsContext;
        break;
      }
      case "token": {
        if (forceRefresh) o.auth.tokens.invalidate?.();
        const t = await o.auth.tokens.getToken();
        opts.username = o.auth.username;
        opts.password = t.token.reveal();
        expiresAt = t.expiresAt.getTime();
        break;
      }
    }
    let client: MqttClient;
    try {
      client =
        tunnel === undefined
          ? await mqtt.connectAsync(url, opts, false)
          : await connectOverStream(tunnel, opts);
    } catch (err) {
      tunnel?.close();
      const code = (err as { code?: unknown }).code;
      // CONNACK 0x86/0x87: the token may have been revoked or expired early: one forced refresh.
      if (
        o.auth.kind === "token" &&
        !forceRefresh &&
        (code === 0x86 || code === 0x87 || code === 134 || code === 135)
      ) {
        return this.#connect(url, true);
      }
      throw new M2mError(
        code === 0x86 || code === 0x87 ? "ERR_MQTT_AUTH" : "ERR_MQTT_CONNECT",
        "transient",
        "cannot connect to the broker",
        { cause: err, details: { url } },
      );
    }
    this.counters.connects++;
    const conn: Conn = {
      client,
      url,
      clientId: String(opts.clientId),
      pending: new Set(),
      closed: false,
      ...(expiresAt === undefined ? {} : { expiresAt }),
      ...(tunnel === undefined ? {} : { tunnel }),
    };
    this.#live.add(conn);
    client.on("close", () => this.#onClose(conn));
    client.on("error", (err) =>
      this.#log.warn("mqtt client error", { err: asM2mError(err, "ERR_MQTT_CLIENT") }),
    );
    return conn;
  }

  #onClose(conn: Conn): void {
    this.#live.delete(conn);
    if (conn.closed) return;
    conn.closed = true;
    const err = new Error("connection closed");
    for (const settle of [...conn.pending]) settle(err);
    conn.client.end(true);
    if (this.#conn === conn) {
      this.#conn = undefined;
      this.#log.warn("broker connection lost", { url: conn.url });
    }
  }

  #install(conn: Conn): void {
    this.#conn = conn;
    // The serial of the client certificate this connection presented (mTLS): which identity the
    // broker authenticated, e.g. the new certificate after a key rotation. Safe to log.
    const stream = conn.client.stream as { getCertificate?: () => { serialNumber?: string } | null };
    const certSerial = stream.getCertificate?.()?.serialNumber;
    this.#log.info("broker connected", {
      url: conn.url,
      clientId: conn.clientId,
      ...(certSerial === undefined ? {} : { certSerial }),
    });
    if (conn.expiresAt !== undefined) this.#scheduleRenewal(conn);
  }

  /**
   * Make-before-break: before the token expires, connect a second client with a fresh token, switch
   * new publishes to it, then let the old one settle its PUBACKs and disconnect it cleanly.
   */
  #scheduleRenewal(conn: Conn): void {
    this.#renewTimer?.abort();
    const ctl = new AbortController();
    this.#renewTimer = ctl;
    const renewBefore = this.#o.renewBeforeMs ?? 60_000;
    const wait = Math.max(0, (conn.expiresAt ?? 0) - this.#clock.now().getTime() - renewBefore);
    this.#clock.sleep(wait, ctl.signal).then(
      () => this.#renew(conn),
      () => undefined,
    );
  }

  async #renew(old: Conn): Promise<void> {
    if (this.#closed || this.#conn !== old) return;
    const later = (): void => {
      const ctl = new AbortController();
      this.#renewTimer = ctl;
      this.#clock.sleep(5_000, ctl.signal).then(
        () => this.#renew(old),
        () => undefined,
      );
    };
    const auth = this.#o.auth;
    if (auth.kind === "token" && old.expiresAt !== undefined) {
      // The source has nothing fresher than the token this connection uses (it refreshes on its own,
      // monotonic schedule): a new CONNECT would gain nothing. This is what a wall clock stepped
      // forward looks like (every token seems due); without this check it is a reconnect storm.
      const t = await auth.tokens.getToken().catch(() => undefined);
      if (t !== undefined && t.expiresAt.getTime() <= old.expiresAt) {
        later();
        return;
      }
    }
    let fresh: Conn;
    try {
      fresh = await this.#connect(old.url);
    } catch (err) {
      this.#log.warn("make-before-break reconnect failed; retrying shortly", { err: asM2mError(err) });
      later();
      return;
    }
    if (this.#closed || this.#conn !== old) {
      fresh.client.end(true);
      return;
    }
    this.counters.renewals++;
    this.#install(fresh);
    await this.#drainAndEnd(old);
  }

  /**
   * The device key or its certificate changed (a rotation committed): bring a connection up with the
   * new identity, switch new publishes to it, then let the old one settle its PUBACKs and close
   * (make-before-break). Nothing acknowledged is lost: what the old connection never got a PUBACK
   * for is retried by the relay with the same `m2m-id`. Resolves once the old connection is gone;
   * if the new one cannot be brought up, the old one is closed anyway (the caller is about to
   * destroy its key) and the relay reconnects with the new identity.
   */
  async rekey(): Promise<void> {
    if (this.#closed) return;
    // Serialise with a connect in progress: it may still be using the old identity.
    await this.#connecting?.catch(() => undefined);
    const old = this.#conn;
    if (old === undefined || old.closed) return;
    let fresh: Conn | undefined;
    try {
      fresh = await this.#connect(old.url);
    } catch (err) {
      this.#log.warn("rekey: new connection failed; closing the old one", { err: asM2mError(err) });
    }
    if (this.#closed) {
      fresh?.client.end(true);
      return;
    }
    if (fresh !== undefined) {
      this.counters.rekeys++;
      this.#install(fresh);
    } else if (this.#conn === old) {
      this.#conn = undefined;
    }
    await this.#drainAndEnd(old);
  }

  async #drainAndEnd(old: Conn): Promise<void> {
    const deadline = this.#clock.monotonicMs() + (this.#o.drainTimeoutMs ?? 10_000);
    while (old.pending.size > 0 && !old.closed && this.#clock.monotonicMs() < deadline) {
      await this.#clock.sleep(20);
    }
    if (old.closed) return;
    old.closed = true;
    this.#live.delete(old);
    // Anything still unacknowledged is retried by the relay (at-least-once; same m2m-id).
    const err = new Error("connection replaced");
    for (const settle of [...old.pending]) settle(err);
    await old.client.endAsync(false).catch(() => old.client.end(true));
    if (old.tunnel !== undefined) {
      // Security: the process that holds the old key for this connection is gone before `rekey()`
      // returns, i.e. before the device-key owner destroys that key (bounded: 2 s, then SIGTERM again).
      old.tunnel.close();
      let t: NodeJS.Timeout | undefined;
      await Promise.race([old.tunnel.closed, new Promise<void>((r) => (t = setTimeout(r, 2_000)))]);
      clearTimeout(t);
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#renewTimer?.abort();
    const c = this.#conn;
    this.#conn = undefined;
    if (c !== undefined && !c.closed) {
      c.closed = true;
      for (const settle of [...c.pending]) settle(new Error("sink closed"));
      await c.client.endAsync(true).catch(() => undefined);
    }
    // A connection being drained after a switch goes too.
    for (const o of [...this.#live]) {
      this.#live.delete(o);
      if (!o.closed) {
        o.closed = true;
        for (const settle of [...o.pending]) settle(new Error("sink closed"));
        await o.client.endAsync(true).catch(() => undefined);
      }
    }
  }
}
