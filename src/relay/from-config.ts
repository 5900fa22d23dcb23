import { readFile } from "node:fs/promises";
import type { AgentConfig } from "../config/index.js";
import type { Clock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { deviceCertPath } from "../credentials/est/device-cert.js";
import type { DpopSigner } from "../credentials/oauth/token-source.js";
import { registrarCaPem } from "../credentials/registrar-ca.js";
import type { EnrolmentState } from "../enroll/state.js";
import type { DeviceKeyOwner } from "../keys/device-key.js";
import { currentIdentity } from "./sinks/mqtt/device-identity.js";
import type { RefreshableTokenSource, Sink } from "./sinks/sink.js";

/** Maps the agent config onto the relay: sinks, topic templates, health thresholds. */

/**
 * How long (ms) a sink may deliver nothing while it has work before the daemon is degraded:
 * `relay.unhealthy_after_s` (default 10 s). `M2M_RELAY_UNHEALTHY_AFTER_MS` in the environment still
 * overrides it (kept for existing service drop-ins).
 */
export function unhealthyAfterMs(
  config: AgentConfig,
  env: NodeJS.ProcessEnv | Readonly<Record<string, string | undefined>>,
): number {
  const v = Number(env.M2M_RELAY_UNHEALTHY_AFTER_MS);
  return Number.isFinite(v) && v > 0 ? v : Math.round(config.relay.unhealthy_after_s * 1000);
}

/** Config templates say `{device_id}` (snake_case like every key); the relay expands `{deviceId}`. */
function topicTemplate(t: string): string {
  return t.replaceAll("{device_id}", "{deviceId}");
}

/** What the sinks need from the credentials feature (the credentials stage provides it). */
export interface SinkCredentials {
  readonly tokens: RefreshableTokenSource | undefined;
  readonly dpop: DpopSigner | undefined;
}

/** What building the sinks needs from the daemon. */
export interface SinkContext {
  readonly config: AgentConfig;
  readonly log: Logger;
  readonly clock: Clock;
  readonly enrolment: EnrolmentState | undefined;
  readonly keys: DeviceKeyOwner;
}

/**
 * The sinks of `[relay.mqtt]` / `[relay.https]`. An mTLS MQTT sink follows the device key: it asks
 * the owner for the current key at every connect and `rekey()`s (make-before-break) when the owner
 * switches keys; `onStop` receives the unsubscribe.
 */
export async function sinksFromConfig(
  ctx: SinkContext,
  { tokens, dpop }: SinkCredentials,
  deviceId: string,
  onStop: (fn: () => void) => void,
): Promise<Sink[]> {
  const { config } = ctx;
  const sinks: Sink[] = [];
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
    const { HttpsSink } = await import("./sinks/https/https-sink.js");
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
    const { MqttSink } = await import("./sinks/mqtt/mqtt-sink.js");
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
