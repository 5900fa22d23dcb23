import type { ApiHandler, ApiRequest, ApiResponse, HttpMethod } from "../../api/server.js";
import { errorResponse } from "../../api/server.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import { TOKEN_PATH, type TokenResponseBody } from "../../wire/v1/local-api.js";
import type { DpopSigner, TokenSource } from "./token-source.js";

export interface TokenRoute {
  readonly method: HttpMethod;
  readonly path: string;
  readonly handler: ApiHandler;
}

export interface TokenRoutesOptions {
  /** The DPoP signer, so local apps can get a proof for a DPoP-bound token (the key stays here). */
  readonly dpop?: DpopSigner;
  /** When set, only these scopes may be asked for over the local API. */
  readonly allowScopes?: readonly string[];
}

/** The JSON body of `GET /v1/token`: the wire type shared with its clients. */
export type { TokenResponseBody } from "../../wire/v1/local-api.js";

/**
 * Local API routes: `GET /v1/token?scope=S[&htm=POST&htu=URL]` returns a valid access token for a
 * co-located application (the socket's file mode restricts who may ask), plus a DPoP proof for one
 * request when `htm`/`htu` are given. Register with `api.route(r.method, r.path, r.handler)`.
 */
export function tokenRoutes(tokens: TokenSource, options: TokenRoutesOptions = {}): TokenRoute[] {
  const handler = async (req: ApiRequest): Promise<ApiResponse> => {
    try {
      const scope = req.query.get("scope") ?? undefined;
      if (scope !== undefined && options.allowScopes !== undefined) {
        const asked = scope.split(" ").filter((s) => s !== "");
        // Security: the local API may be configured to hand out only some of the device's scopes.
        if (asked.some((s) => !options.allowScopes?.includes(s))) {
          throw new M2mError("ERR_API_TOKEN_SCOPE", "permanent", "scope not available over the local API", {
            details: { httpStatus: 403 },
          });
        }
      }
      const t = await tokens.getToken(scope);
      const htm = req.query.get("htm");
      const htu = req.query.get("htu");
      let proof: string | undefined;
      if (htm !== null && htu !== null && t.tokenType === "DPoP") {
        if (options.dpop === undefined || !/^[A-Z]{3,7}$/.test(htm) || !URL.canParse(htu)) {
          throw new M2mError(
            "ERR_API_INVALID_DPOP_REQUEST",
            "permanent",
            "htm must be an HTTP method and htu a URL",
          );
        }
        proof = await options.dpop.proof(htm, htu, t.token);
      }
      const now = Date.now();
      const body: TokenResponseBody = {
        access_token: t.token.reveal(),
        token_type: t.tokenType,
        expires_at: t.expiresAt.toISOString(),
        expires_in: Math.max(0, Math.floor((t.expiresAt.getTime() - now) / 1000)),
        scope: t.scope,
        ...(proof === undefined ? {} : { dpop_proof: proof }),
      };
      return { status: 200, json: body, headers: { "cache-control": "no-store" } };
    } catch (err) {
      const e = asM2mError(err);
      if (e.code === "ERR_OAUTH_CLIENT_REVOKED" || e.code === "ERR_OAUTH_SCOPE") {
        return errorResponse(new M2mError(e.code, e.retry, e.message, { details: { httpStatus: 403 } }));
      }
      return errorResponse(e);
    }
  };
  return [{ method: "GET", path: TOKEN_PATH, handler }];
}
