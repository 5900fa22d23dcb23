import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { type Clock, systemClock } from "../../../core/clock.js";
import { asM2mError } from "../../../core/errors.js";
import { type Logger, silentLogger } from "../../../core/log.js";
import { backoffDelay, defaultRetryPolicy, type RetryPolicy } from "../../../core/retry.js";
import { isValidChannel } from "../../channel.js";
import type { Outbox } from "../../outbox/outbox.js";
import type { Source } from "../source.js";

export interface MqttSourceOptions {
  /** The local broker sensors publish to, e.g. `mqtt://127.0.0.1:1883`. */
  readonly url: string;
  /** Topic filters to subscribe to (QoS 1). */
  readonly topics: readonly string[];
  readonly outbox: Outbox;
  /** Maps a local topic to a channel; default: the topic minus `stripPrefix`. */
  readonly channelFor?: (topic: string) => string;
  readonly stripPrefix?: string;
  /** Fixed client id: the persistent session makes the broker redeliver what we never PUBACKed. */
  readonly clientId?: string;
  readonly username?: string;
  readonly caPem?: string;
  readonly retry?: RetryPolicy;
  readonly clock?: Clock;
  readonly logger?: Logger;
}

/** MQTT 5 PUBACK reason codes we answer with. */
const RC_TOPIC_INVALID = 0x90;
const RC_QUOTA = 0x97;

/**
 * Relays messages from a local broker into the outbox. Each QoS 1 message is PUBACKed only after the
 * outbox made it durable (mqtt.js `customHandleAcks`). mqtt.js handles incoming publishes one at a
 * time while an ack is pending, so this path does one group commit per message (≈ fsync rate);
 * producers that need throughput use the socket API with batches.
 *
 * - topic that cannot be a channel → PUBACK 0x90 (counted; the broker drops it);
 * - outbox full under refuse-new → PUBACK 0x97 (counted);
 * - storage failure → no PUBACK: the connection is dropped and re-made after a backoff, and the
 *   broker redelivers from the persistent session (at-least-once).
 */
export class MqttSource implements Source {
  readonly name = "mqtt-source";
  readonly #o: MqttSourceOptions;
  readonly #clock: Clock;
  readonly #log: Logger;
  #client: MqttClient | undefined;
  #stopped = false;
  #failures = 0;
  readonly #abort = new AbortController();
  readonly counters = { accepted: 0, invalidTopic: 0, refused: 0, storageFailures: 0, connects: 0 };

  constructor(options: MqttSourceOptions) {
    this.#o = options;
    this.#clock = options.clock ?? systemClock;
    this.#log = (options.logger ?? silentLogger).child({ source: this.name });
  }

  #channel(topic: string): string {
    if (this.#o.channelFor !== undefined) return this.#o.channelFor(topic);
    const p = this.#o.stripPrefix;
    return p !== undefined && topic.startsWith(p) ? topic.slice(p.length) : topic;
  }

  async start(): Promise<void> {
    await this.#connect();
  }

  async #connect(): Promise<void> {
    const opts: IClientOptions = {
      protocolVersion: 5,
      reconnectPeriod: 0,
      clean: false,
      clientId: this.#o.clientId ?? "m2m-agent-source",
      properties: { sessionExpiryInterval: 24 * 3600 },
      ...(this.#o.username === undefined ? {} : { username: this.#o.username }),
      ...(this.#o.caPem === undefined ? {} : { ca: this.#o.caPem, rejectUnauthorized: true }),
      customHandleAcks: (topic, message, packet, done) => {
        this.#onMessage(topic, message, packet as { properties?: { contentType?: string } }, done);
      },
    };
    const client = await mqtt.connectAsync(this.#o.url, opts, false);
    this.counters.connects++;
    this.#client = client;
    client.on("close", () => {
      if (this.#client === client) this.#client = undefined;
      if (!this.#stopped) this.#reconnectLater();
    });
    client.on("error", (err) =>
      this.#log.warn("local broker error", { err: asM2mError(err, "ERR_MQTT_SOURCE") }),
    );
    await client.subscribeAsync([...this.#o.topics], { qos: 1 });
  }

  #reconnectLater(): void {
    this.#failures++;
    const policy = this.#o.retry ?? defaultRetryPolicy;
    const delay = backoffDelay(policy, this.#failures);
    this.#clock.sleep(delay, this.#abort.signal).then(
      () =>
        this.#connect().then(
          () => {
            this.#failures = 0;
          },
          (err: unknown) => {
            this.#log.warn("local broker connect failed", { err: asM2mError(err, "ERR_MQTT_SOURCE") });
            this.#reconnectLater();
          },
        ),
      () => undefined,
    );
  }

  #onMessage(
    topic: string,
    message: Buffer,
    packet: { properties?: { contentType?: string } },
    done: (error: Error | number, code?: number) => void,
  ): void {
    const channel = this.#channel(topic);
    // A topic that cannot be a channel would escape the device namespace upstream: refuse it.
    if (!isValidChannel(channel)) {
      this.counters.invalidTopic++;
      done(RC_TOPIC_INVALID);
      return;
    }
    const contentType = packet.properties?.contentType ?? "application/octet-stream";
    this.#o.outbox.append([{ channel, payload: message, contentType }]).then(
      () => {
        this.counters.accepted++;
        done(0);
      },
      (err: unknown) => {
        const e = asM2mError(err);
        if (e.code === "ERR_OUTBOX_FULL" || e.code === "ERR_OUTBOX_MESSAGE_TOO_LARGE") {
          this.counters.refused++;
          done(RC_QUOTA);
          return;
        }
        // Not stored: never acknowledge. Drop the connection; the session redelivers later.
        this.counters.storageFailures++;
        this.#log.error("could not store a local message; reconnecting for redelivery", { err: e });
        this.#client?.end(true);
      },
    );
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#abort.abort();
    const c = this.#client;
    this.#client = undefined;
    if (c !== undefined) await c.endAsync(false).catch(() => c.end(true));
  }
}
