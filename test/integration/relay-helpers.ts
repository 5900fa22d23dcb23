import mqtt, { type MqttClient } from "mqtt";

export interface Received {
  readonly topic: string;
  readonly payload: string;
  readonly id: string | undefined;
}

/** A subscriber on the broker's plain local listener that records everything under `filter`. */
export async function startSubscriber(
  url: string,
  filter = "devices/#",
): Promise<{
  client: MqttClient;
  received: Received[];
  waitFor(pred: (r: Received[]) => boolean, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}> {
  const client = await mqtt.connectAsync(url, { protocolVersion: 5, reconnectPeriod: 500, clean: true });
  const received: Received[] = [];
  client.on("message", (topic, payload, packet) => {
    const up = packet.properties?.userProperties?.["m2m-id"];
    received.push({ topic, payload: payload.toString("utf8"), id: Array.isArray(up) ? up[0] : up });
  });
  await client.subscribeAsync(filter, { qos: 1 });
  return {
    client,
    received,
    async waitFor(pred, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      while (!pred(received)) {
        if (Date.now() > deadline) throw new Error(`timed out waiting; received ${received.length}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    },
    async close() {
      await client.endAsync(true);
    },
  };
}

/** Polls until `pred()` is true (integration tests wait on observable state, never on fixed sleeps). */
export async function until(
  pred: () => boolean | Promise<boolean>,
  timeoutMs = 30_000,
  what = "condition",
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
