import { type Agent, fetch } from "undici";

/**
 * POSTs a client_credentials token request authenticated by a private_key_jwt `assertion`
 * (RFC 7523) to `tokenEndpoint`, trusting the registrar CA through `dispatcher`.
 */
export async function postClientAssertion(
  tokenEndpoint: string,
  clientId: string,
  assertion: string,
  dispatcher: Agent,
): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(tokenEndpoint, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "client_credentials",
      client_id: clientId,
      client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
      client_assertion: assertion,
    }).toString(),
    dispatcher,
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}
