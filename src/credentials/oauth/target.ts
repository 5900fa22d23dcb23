import type { AgentConfig } from "../../config/index.js";
import type { EnrolmentState } from "../../enroll/state.js";
import { registrarCaPem } from "../registrar-ca.js";

/** Where the agent gets tokens: explicit `[credentials.oauth]`, else the enrolment's endpoints. */
export interface OAuthTarget {
  readonly clientId: string;
  readonly issuer?: string;
  readonly tokenEndpoint?: string;
  readonly scope: string;
  readonly dpop: boolean;
  readonly refreshFraction: number;
  readonly cacheFile?: string;
  /** Trust anchor for the authorization server's TLS (the fleet CA when it is our registrar). */
  readonly caPem?: string;
}

function sameOrigin(a: string | undefined, b: string | undefined): boolean {
  if (a === undefined || b === undefined) return false;
  try {
    return new URL(a).origin === new URL(b).origin;
  } catch {
    return false;
  }
}

/** Resolves the OAuth client settings. @returns undefined when there is no client identity yet. */
export async function oauthTarget(
  config: AgentConfig,
  enrolment: EnrolmentState | undefined,
): Promise<OAuthTarget | undefined> {
  const o = config.credentials.oauth;
  const clientId = o?.client_id ?? enrolment?.deviceId;
  if (clientId === undefined) return undefined;
  const ca = await registrarCaPem(config, enrolment);
  if (o !== undefined) {
    const ours = sameOrigin(o.issuer, enrolment?.registrarUrl ?? config.enroll.registrar_url);
    return {
      clientId,
      issuer: o.issuer,
      ...(o.token_endpoint === undefined ? {} : { tokenEndpoint: o.token_endpoint }),
      scope: o.scopes.join(" "),
      dpop: o.dpop,
      refreshFraction: o.refresh_fraction,
      ...(o.cache_file === undefined ? {} : { cacheFile: o.cache_file }),
      // Another authorization server is verified against the system store.
      ...(ours && ca !== undefined ? { caPem: ca } : {}),
    };
  }
  if (enrolment === undefined) return undefined;
  return {
    clientId,
    tokenEndpoint: enrolment.endpoints.token,
    scope: "",
    dpop: true,
    refreshFraction: 0.8,
    ...(ca === undefined ? {} : { caPem: ca }),
  };
}
