/**
 * The source seam: something that hands messages to the outbox. A source acknowledges to its
 * producer only after `Outbox.append` resolved (durable). Implementations: `api/` (POST /v1/messages
 * on the local Unix-socket API), `mqtt/` (subscriptions on a local broker).
 */
export interface Source {
  readonly name: string;
  start(): Promise<void>;
  stop(): Promise<void>;
}
