import type { ClientMetadata } from "oidc-provider";

/**
 * node-oidc-provider client metadata for a device that authenticates with a private_key_jwt client
 * assertion (ES256) and only uses the client_credentials grant (no redirects, no id tokens).
 */
export const DEVICE_CLIENT_METADATA: Partial<ClientMetadata> = {
  token_endpoint_auth_method: "private_key_jwt",
  token_endpoint_auth_signing_alg: "ES256",
  id_token_signed_response_alg: "ES256",
  grant_types: ["client_credentials"],
  response_types: [],
  redirect_uris: [],
};
