import { request } from "node:http";
import type { Command } from "commander";
import { toErrorCode } from "../../core/error-codes.js";
import { M2mError } from "../../core/errors.js";
import { isJsonContentType } from "../../relay/sources/api/parse.js";
import { action, EXIT, globalOptions, loadCliConfig, output, usageError } from "./common.js";

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
    let payload: unknown;
    try {
      payload = JSON.parse(text);
    } catch {
      payload = text;
    }
    return JSON.stringify({
      channel,
      payload,
      ...(contentType === "application/json" ? {} : { content_type: contentType }),
    });
  }
  return JSON.stringify({ channel, payload: data.toString("base64"), content_type: contentType });
}

/**
 * Sends one message to the local agent over its Unix socket; resolves with the message ids once the
 * agent has stored it durably.
 * @throws M2mError with the agent's code (ERR_OUTBOX_FULL, ERR_CHANNEL_INVALID, ...) or ERR_SEND_AGENT_UNREACHABLE
 */
export function sendMessage(o: SendOptions): Promise<string[]> {
  const body = messageBody(o.channel, o.data, o.contentType);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: o.socketPath,
        path: "/v1/messages",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        timeout: o.timeoutMs ?? 30_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          let parsed: {
            ids?: unknown;
            error?: { code?: unknown; message?: unknown; retry?: unknown; hint?: unknown };
          };
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString("utf8"));
          } catch {
            parsed = {};
          }
          if (res.statusCode === 200 && Array.isArray(parsed.ids)) return resolve(parsed.ids.map(String));
          const e = parsed.error;
          reject(
            new M2mError(
              toErrorCode(e?.code, "ERR_SEND_FAILED"),
              e?.retry === "transient" || res.statusCode === 429 ? "transient" : "permanent",
              typeof e?.message === "string" ? e.message : `agent answered HTTP ${res.statusCode ?? 0}`,
              typeof e?.hint === "string" ? { hint: e.hint } : {},
            ),
          );
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", (err) =>
      reject(
        new M2mError("ERR_SEND_AGENT_UNREACHABLE", "transient", "cannot reach the agent's local API", {
          cause: err,
          hint: "is m2m-agent running, and may this user open its socket (group)?",
        }),
      ),
    );
    req.end(body);
  });
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
