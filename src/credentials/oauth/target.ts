import { readFile } from "node:fs/promises";
import type { AgentConfig } from "../../config/index.js";
import { M2mError } from "../../core/errors.js";
import type { TrustSource } from "../../core/tls-diagnosis.js";
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
  /** What `caPem` is (or the system store), for TLS error messages. */
  readonly trust: TrustSource;
  /** RFC 8707 resource indicators for token requests. */
  readonly resource: readonly string[];
}

/** The OAuthClient settings a target implies (the daemon and `m2m-agent token` build it alike). */
export function oauthClientSettings(t: OAuthTarget) {
  return {
    clientId: t.clientId,
    ...(t.issuer === undefined ? {} : { issuer: t.issuer }),
    ...(t.tokenEndpoint === undefined ? {} : { tokenEndpoint: t.tokenEndpoint }),
    scope: t.scope,
    dpop: t.dpop,
    refreshFraction: t.refreshFraction,
    ...(t.cacheFile === undefined ? {} : { cacheFile: t.cacheFile }),
    ...(t.caPem === undefined ? {} : { caPem: t.caPem }),
    trust: t.trust,
    resource: t.resource,
  };
}

const FLEET_TRUST: TrustSource = {
  description: "the fleet CA (enroll.registrar_ca_file and the enrolment's CA chain)",
  key: "enroll.registrar_ca_file",
};

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
    let caPem: string | undefined;
    let trust: TrustSource;
    if (o.ca_file !== undefined) {
      try {
        caPem = await readFile(o.ca_file, "utf8");
      } catch (err) {
        throw new M2mError("ERR_CONFIG", "permanent", `cannot read credentials.oauth.ca_file ${o.ca_file}`, {
          cause: err,
          hint: "credentials.oauth.ca_file names a PEM file with the authorization server's CA",
          details: { key: "credentials.oauth.ca_file" },
        });
      }
      trust = { description: `credentials.oauth.ca_file ${o.ca_file}`, key: "credentials.oauth.ca_file" };
    } else if (ours && ca !== undefined) {
      caPem = ca;
      trust = FLEET_TRUST;
    } else {
      trust = { description: "the system CA store", key: "credentials.oauth.ca_file" };
    }
    return {
      clientId,
      issuer: o.issuer,
      ...(o.token_endpoint === undefined ? {} : { tokenEndpoint: o.token_endpoint }),
      scope: o.scopes.join(" "),
      dpop: o.dpop,
      refreshFraction: o.refresh_fraction,
      ...(o.cache_file === undefined ? {} : { cacheFile: o.cache_file }),
      // Another authorization server: credentials.oauth.ca_file, else the system store.
      ...(caPem === undefined ? {} : { caPem }),
      trust,
      resource: o.resource,
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
    trust:
      ca === undefined
        ? { description: "the system CA store", key: "enroll.registrar_ca_file" }
        : FLEET_TRUST,
    resource: [],
  };
}
