import type { ApiServer } from "../../../api/server.js";
import { MESSAGES_PATH, type MessagesResponse } from "../../../wire/v1/local-api.js";
import type { NewMessage, Outbox } from "../../outbox/outbox.js";
import { defaultParseLimits, type ParseLimits, parseMessages } from "./parse.js";

export interface MessagesRouteOptions {
  readonly outbox: Outbox;
  readonly limits?: Partial<ParseLimits>;
  /** Whole-body cap for the route (413). Default 4 MiB. */
  readonly maxBodyBytes?: number;
  /**
   * Called once a batch is durable (after the outbox append, before the answer): metrics, anomaly
   * detection. Must not throw; it cannot refuse the batch.
   */
  readonly onAccepted?: (batch: readonly NewMessage[], ids: readonly string[]) => void;
}

/**
 * Mounts `POST /v1/messages`: answers `200 { ids }` only after the outbox made the batch durable
 * (fsynced). Errors: 400 (schema, with code and `details.index`), 413 (size), 415 (media type),
 * 429 + Retry-After (outbox full under refuse-new), 503 (storage failure).
 */
export function mountMessagesRoute(api: ApiServer, options: MessagesRouteOptions): void {
  const limits = { ...defaultParseLimits, ...(options.limits ?? {}) };
  api.route(
    "POST",
    MESSAGES_PATH,
    async (req) => {
      const body = await req.body();
      const messages = parseMessages(body, req.headers["content-type"], limits);
      const ids = await options.outbox.append(messages);
      options.onAccepted?.(messages, ids);
      const answer: MessagesResponse = { ids: [...ids] };
      return { status: 200, json: answer };
    },
    { maxBodyBytes: options.maxBodyBytes ?? 4 * 1024 * 1024 },
  );
}
