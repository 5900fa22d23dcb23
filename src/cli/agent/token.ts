import type { Command } from "commander";
import { systemClock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { silentLogger } from "../../core/log.js";
import { OAuthClient } from "../../credentials/oauth/client.js";
import { TOKEN_PATH, type TokenResponseBody, tokenResponseSchema } from "../../wire/v1/local-api.js";
import { action, globalOptions, loadCliConfig, output } from "./common.js";
import { answerOf, callAgent } from "./local-api.js";

interface TokenOptions {
  readonly scope?: string;
  readonly dpop?: boolean;
  readonly htm?: string;
  readonly htu?: string;
  readonly direct?: boolean;
}

/**
 * `m2m-agent token [--scope S] [--dpop] [--htm M --htu URL] [--direct]`: prints a valid access token
 * (for cron jobs and scripts). Asks the running agent over its local API first (shared cache, the
 * key stays with the daemon); with `--direct`, or when no agent runs, gets one itself with the
 * configured key.
 */
export function register(program: Command): void {
  program
    .command("token")
    .description("print a valid OAuth access token for this device")
    .option("--scope <scopes>", "space-separated scopes (default: credentials.oauth.scopes)")
    .option("--dpop", "ask for a DPoP-bound token (proofs signed by the device key)")
    .option("--htm <method>", "with --dpop: also print a DPoP proof for this HTTP method")
    .option("--htu <url>", "with --dpop: ... and this URL")
    .option("--direct", "do not ask the running agent; use the device key directly")
    .action(
      action(async (cmd: Command) => {
        const g = globalOptions(cmd);
        const o = cmd.opts<TokenOptions>();
        const loaded = await loadCliConfig(g);
        const config = loaded.config;
        let body: TokenResponseBody | undefined;
        if (o.direct !== true) {
          body = await fromAgent(config.api.socket, o).catch((err: unknown) => {
            if (err instanceof M2mError && err.code === "ERR_AGENT_NOT_RUNNING") return undefined;
            throw err;
          });
        }
        body ??= await direct(config, o);
        output(g, body, () => {
          const hint =
            body.token_type === "DPoP"
              ? body.dpop_proof === undefined
                ? "\n# DPoP-bound: send `Authorization: DPoP <token>` plus a fresh `DPoP` proof per request\n# (m2m-agent token --dpop --htm POST --htu https://host/path prints one)"
                : `\n# DPoP proof for ${o.htm ?? ""} ${o.htu ?? ""}:\n${body.dpop_proof}`
              : "";
          // The token itself goes to stdout alone on its first line, so `$(m2m-agent token | head -1)` works.
          if (hint !== "") process.stderr.write(`${hint.trimStart()}\n`);
          return body.access_token;
        });
        return 0;
      }),
    );
}

async function fromAgent(socketPath: string, o: TokenOptions): Promise<TokenResponseBody> {
  const q = new URLSearchParams();
  if (o.scope !== undefined) q.set("scope", o.scope);
  if (o.htm !== undefined && o.htu !== undefined) {
    q.set("htm", o.htm.toUpperCase());
    q.set("htu", o.htu);
  }
  const answer = await callAgent({
    socketPath,
    method: "GET",
    path: `${TOKEN_PATH}?${q.toString()}`,
    timeoutMs: 30_000,
  }).catch((err: unknown) => {
    throw new M2mError("ERR_AGENT_NOT_RUNNING", "transient", `cannot reach the agent at ${socketPath}`, {
      cause: err,
    });
  });
  const body = answerOf(answer, tokenResponseSchema, "ERR_AGENT_TOKEN");
  if (o.dpop === true && body.token_type !== "DPoP") {
    throw new M2mError(
      "ERR_OAUTH_DPOP_NOT_BOUND",
      "permanent",
      "the agent is not configured for DPoP (credentials.oauth.dpop)",
    );
  }
  return body;
}

async function direct(
  config: Awaited<ReturnType<typeof loadCliConfig>>["config"],
  o: TokenOptions,
): Promise<TokenResponseBody> {
  const { deviceKeyFromConfig } = await import("../../keys/from-config.js");
  const { readEnrolmentState } = await import("../../enroll/state.js");
  const { oauthClientSettings, oauthTarget } = await import("../../credentials/oauth/target.js");
  const state = await readEnrolmentState(config.agent.state_dir);
  // Same resolution as the daemon: [credentials.oauth] if set, else the enrolment's token endpoint.
  const target = await oauthTarget(config, state);
  if (target === undefined) {
    throw new M2mError("ERR_NOT_ENROLLED", "permanent", "no client_id: the device is not enrolled", {
      hint: "run `m2m-agent enroll` or set credentials.oauth.client_id",
    });
  }
  // Why: a client assertion signed below the time floor carries a false iat/exp: same gate as the daemon.
  const { assertClockTrustedForCli } = await import("../../daemon/clock-sanity.js");
  await assertClockTrustedForCli({
    clock: systemClock,
    stateDir: config.agent.state_dir,
    log: silentLogger,
    ...(state === undefined ? {} : { certificatePem: state.certificatePem }),
  });
  const owner = await deviceKeyFromConfig(config, { log: silentLogger });
  const keys = owner.current;
  const client = new OAuthClient(
    // Same trust, resource indicators and endpoints as the daemon (no token cache file here).
    { ...oauthClientSettings(target), cacheFile: undefined, dpop: o.dpop === true || target.dpop },
    { keys, clock: systemClock },
  );
  try {
    const t = await client.getToken(o.scope);
    const signer = await client.dpopSigner();
    const proof =
      t.tokenType === "DPoP" && signer !== undefined && o.htm !== undefined && o.htu !== undefined
        ? await signer.proof(o.htm, o.htu, t.token)
        : undefined;
    return {
      access_token: t.token.reveal(),
      token_type: t.tokenType,
      expires_at: t.expiresAt.toISOString(),
      expires_in: Math.max(0, Math.floor((t.expiresAt.getTime() - Date.now()) / 1000)),
      scope: t.scope,
      ...(proof === undefined ? {} : { dpop_proof: proof }),
    };
  } finally {
    await client.close();
    await owner.close();
  }
}
