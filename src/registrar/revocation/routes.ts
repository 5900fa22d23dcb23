import { HttpError, type Route, type RouteResponse } from "../http/router.js";
import type { CrlPublisher } from "./crl-publisher.js";

/** Where the CRL is served (DER, `application/pkix-crl`, RFC 5280 §4.2.1.13 / RFC 2585). */
export const CRL_PATH = "/v1/crl";

/**
 * `GET /v1/crl`: the current CRL of the fleet CA, DER. Unauthenticated: a CRL is signed and public.
 * Caches must revalidate (the ETag is the CRL number), so a relying party that polls sees a new
 * revocation at its next poll.
 */
export function crlRoute(publisher: CrlPublisher): Route {
  return {
    method: "GET",
    path: CRL_PATH,
    handle: async (): Promise<RouteResponse> => {
      const crl = publisher.current;
      if (crl === undefined) throw new HttpError(503, "ERR_NOT_READY", "the CRL is not published yet");
      return {
        status: 200,
        body: crl.der,
        contentType: "application/pkix-crl",
        headers: {
          "cache-control": "no-cache",
          etag: `"${crl.crlNumber.toString()}"`,
          "last-modified": crl.thisUpdate.toUTCString(),
          expires: crl.nextUpdate.toUTCString(),
        },
      };
    },
  };
}
