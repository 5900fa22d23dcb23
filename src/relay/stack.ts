import { ApiServer, type ApiServerOptions } from "../api/server.js";
import type { Clock } from "../core/clock.js";
import type { Logger } from "../core/log.js";
import type { RetryPolicy } from "../core/retry.js";
import type { Outbox } from "./outbox/outbox.js";
import { Relay, type RelayOptions } from "./relay.js";
import type { Sink } from "./sinks/sink.js";
import { mountMessagesRoute } from "./sources/api/messages-route.js";
import type { ParseLimits } from "./sources/api/parse.js";

export interface RelayStackOptions {
  readonly outbox: Outbox;
  readonly sinks: readonly Sink[];
  /** When given, the stack owns a local API server and mounts POST /v1/messages on it. */
  readonly api?: ApiServerOptions & { readonly parse?: Partial<ParseLimits>; readonly maxBodyBytes?: number };
  /** Or mount on an API server someone else owns (the daemon's). */
  readonly mountOn?: ApiServer;
  readonly retry?: RetryPolicy;
  /** See `RelayOptions.unhealthyAfterMs` / `probeIntervalMs` / `hold`. */
  readonly unhealthyAfterMs?: number;
  readonly probeIntervalMs?: number;
  readonly hold?: RelayOptions["hold"];
  readonly clock?: Clock;
  readonly logger?: Logger;
}

export interface RelayStack {
  readonly relay: Relay;
  readonly api: ApiServer | undefined;
  stop(): Promise<void>;
}

/**
 * Wires outbox → relay → sinks and the local ingest route. Delivery starts before the API listens,
 * so a backlog from before a restart flows at once (no scan, no wait).
 */
export async function startRelayStack(o: RelayStackOptions): Promise<RelayStack> {
  const relay = new Relay({
    outbox: o.outbox,
    sinks: o.sinks,
    ...(o.retry === undefined ? {} : { retry: o.retry }),
    ...(o.unhealthyAfterMs === undefined ? {} : { unhealthyAfterMs: o.unhealthyAfterMs }),
    ...(o.probeIntervalMs === undefined ? {} : { probeIntervalMs: o.probeIntervalMs }),
    ...(o.hold === undefined ? {} : { hold: o.hold }),
    ...(o.clock === undefined ? {} : { clock: o.clock }),
    ...(o.logger === undefined ? {} : { logger: o.logger }),
  });
  relay.start();
  let api: ApiServer | undefined;
  if (o.api !== undefined) {
    api = new ApiServer(o.api);
    mountMessagesRoute(api, {
      outbox: o.outbox,
      ...(o.api.parse === undefined ? {} : { limits: o.api.parse }),
      ...(o.api.maxBodyBytes === undefined ? {} : { maxBodyBytes: o.api.maxBodyBytes }),
    });
    await api.listen();
  } else if (o.mountOn !== undefined) {
    mountMessagesRoute(o.mountOn, { outbox: o.outbox });
  }
  return {
    relay,
    api,
    async stop() {
      await api?.close();
      await relay.stop();
      for (const s of o.sinks) await s.close();
      await o.outbox.close();
    },
  };
}
