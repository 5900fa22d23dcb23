import { M2mError } from "../core/errors.js";

export const MAX_CHANNEL_LENGTH = 128;
const CHANNEL_RE = /^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/;

/**
 * Validates a channel (the topic suffix a local producer names). Letters, digits, `_`, `-` and `/`
 * between non-empty levels; no MQTT wildcards, no leading/trailing `/`, bounded length.
 * @throws ERR_CHANNEL_INVALID (permanent)
 */
export function validateChannel(channel: unknown): string {
  // A channel becomes part of an upstream topic: wildcards or empty levels would let a local
  // producer address topics outside its device's namespace or publish to a filter.
  if (typeof channel !== "string" || channel.length === 0 || channel.length > MAX_CHANNEL_LENGTH) {
    throw new M2mError(
      "ERR_CHANNEL_INVALID",
      "permanent",
      `channel must be 1-${MAX_CHANNEL_LENGTH} characters`,
    );
  }
  if (!CHANNEL_RE.test(channel)) {
    throw new M2mError(
      "ERR_CHANNEL_INVALID",
      "permanent",
      "channel may contain only A-Z a-z 0-9 _ - and / between non-empty levels",
    );
  }
  return channel;
}

export function isValidChannel(channel: unknown): boolean {
  return typeof channel === "string" && channel.length <= MAX_CHANNEL_LENGTH && CHANNEL_RE.test(channel);
}

/**
 * Expands a topic template such as `devices/{deviceId}/{channel}`.
 * @throws ERR_TOPIC_TEMPLATE when a placeholder is unknown.
 */
export function expandTopic(template: string, vars: Readonly<Record<string, string>>): string {
  return template.replace(/\{([a-zA-Z]+)\}/g, (_m, name: string) => {
    const v = vars[name];
    if (v === undefined) {
      throw new M2mError(
        "ERR_TOPIC_TEMPLATE",
        "permanent",
        `unknown placeholder {${name}} in topic template`,
      );
    }
    return v;
  });
}
