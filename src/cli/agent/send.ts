import type { Command } from "commander";
import { M2mError } from "../../core/errors.js";
import { isJsonContentType } from "../../relay/sources/api/parse.js";
import { MESSAGES_PATH, type MessageInput, messagesResponseSchema } from "../../wire/v1/local-api.js";
import { action, EXIT, globalOptions, loadCliConfig, output, usageError } from "./common.js";
import { answerOf, callAgent } from "./local-api.js";

export interface SendOptions {
  readonly socketPath: string;
  readonly channel: string;
  readonly data: Buffer;
  readonly contentType?: string;
  readonly timeoutMs?: number;
}

/**
 * Builds the `POST /v1/messages` body for one message. With a JSON content type (default) DATA is
 * sent as JSON when it parses, else as a JSON string; other content types travel as base64.
 */
export function messageBody(channel: string, data: Buffer, contentType = "application/json"): string {
  if (isJsonContentType(contentType)) {
    const text = data.toString("utf8").trim();
    let payload: MessageInput["payload"];
    try {
      payload = JSON.parse(text);
    } catch {
      payload = text;
    }
    const message: MessageInput = {
      channel,
      payload,
      ...(contentType === "application/json" ? {} : { content_type: contentType }),
    };
    return JSON.stringify(message);
  }
  const message: MessageInput = { channel, payload: data.toString("base64"), content_type: contentType };
  return JSON.stringify(message);
}

/**
 * Sends one message to the local agent over its Unix socket; resolves with the message ids once the
 * agent has stored it durably.
 * @throws M2mError with the agent's code (ERR_OUTBOX_FULL, ERR_CHANNEL_INVALID, ...) or ERR_SEND_AGENT_UNREACHABLE
 */
export async function sendMessage(o: SendOptions): Promise<string[]> {
  const body = messageBody(o.channel, o.data, o.contentType);
  const answer = await callAgent({
    socketPath: o.socketPath,
    method: "POST",
    path: MESSAGES_PATH,
    body,
    timeoutMs: o.timeoutMs ?? 30_000,
  }).catch((err: unknown) => {
    throw new M2mError("ERR_SEND_AGENT_UNREACHABLE", "transient", "cannot reach the agent's local API", {
      cause: err,
      hint: "is m2m-agent running, and may this user open its socket (group)?",
    });
  });
  return answerOf(answer, messagesResponseSchema, "ERR_SEND_FAILED").ids;
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** `m2m-agent send [--topic T] [--content-type CT] [--socket PATH] [DATA | -]` */
export function register(program: Command): void {
  program
    .command("send")
    .description("hand one message to the local agent (answers once it is stored durably)")
    .argument("[data]", "the payload; `-` or absent reads standard input")
    .option("-t, --topic <channel>", "channel (topic suffix), e.g. sensors/temp", "default")
    .option(
      "--content-type <type>",
      "payload media type (non-JSON types are sent as raw bytes)",
      "application/json",
    )
    .option("--socket <path>", "agent API socket (default: api.socket from the config)")
    .action(
      action(async (cmd, data: string | undefined) => {
        const opts = globalOptions(cmd);
        const local = cmd.opts<{ topic: string; contentType: string; socket?: string }>();
        const socketPath = local.socket ?? (await loadCliConfig(opts)).config.api.socket;
        const bytes = data === undefined || data === "-" ? await readStdin() : Buffer.from(data, "utf8");
        if (bytes.length === 0) throw usageError("nothing to send", "pass DATA or pipe it on standard input");
        const ids = await sendMessage({
          socketPath,
          channel: local.topic,
          data: bytes,
          contentType: local.contentType,
        });
        output(opts, { ids }, () => ids.join("\n"));
        return EXIT.ok;
      }),
    );
}
