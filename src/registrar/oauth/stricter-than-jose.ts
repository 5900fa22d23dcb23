/**
 * Where the registrar's own JOSE verification (client assertions, DPoP proofs) deliberately refuses
 * what `jose` v6, configured the same way, accepts. The one list of such cases, keyed by the refusal
 * code: the differential test (test/fuzz/jose-differential.test.ts) fails on any refusal where jose
 * accepts whose code is not here, and on any acceptance jose refuses, whatever its code.
 * docs/registrar-jose.md shows this table.
 */
export const STRICTER_THAN_JOSE: Readonly<Record<string, string>> = {
  ERR_ASSERTION_MALFORMED:
    "Strict base64url only (RFC 7515 §2): no padding, whitespace or '+'/'/' in any segment (jose's decoder " +
    "strips whitespace and accepts padding and the base64 alphabet), no UTF-8 byte-order mark (jose strips it), " +
    "16 KiB at most. One spelling per token: what is parsed is exactly what was signed.",
  ERR_DPOP_MALFORMED:
    "As ERR_ASSERTION_MALFORMED: strict base64url segments, no byte-order mark, 16 KiB at most.",
  ERR_ASSERTION_CRIT:
    'Any `crit` or `b64` header is refused. jose accepts `crit: ["b64"]` with `b64: true` and ignores `b64` ' +
    "without `crit`; we implement no extension, so neither can mean anything but confusion.",
  ERR_DPOP_CRIT: "As ERR_ASSERTION_CRIT.",
  ERR_ASSERTION_HEADER_KEY:
    "An assertion header carrying or pointing to a key (jwk, jku, x5c, x5u, x5t, x5t#S256) is refused: the " +
    "client's key comes from the registry only. jose, given the registered key, ignores these members.",
  ERR_DPOP_HEADER_KEY:
    "A proof header with jku, x5c or x5u beside its jwk is refused (two key sources are ambiguous). " +
    "EmbeddedJWK ignores them.",
  ERR_ASSERTION_TYP:
    "An assertion typed as another kind of JWT (dpop+jwt, at+jwt, application/at+jwt) is refused: explicit " +
    "typing keeps one JWT from being used as another (RFC 8725 §3.11). jose checks typ only when asked.",
  ERR_DPOP_TYP:
    'typ must be exactly "dpop+jwt" (RFC 9449 §4.2). jose compares media types case-insensitively and ' +
    'accepts "application/dpop+jwt" and "DPoP+JWT".',
  ERR_ASSERTION_EXP:
    "exp must be a finite number: a number too large for a double (1e400) parses to Infinity, which jose " +
    "accepts as never expiring.",
  ERR_ASSERTION_EXP_TOO_LONG:
    "exp at most 300 s (plus 30 s tolerance) ahead: a long-lived assertion would outlive the bounded replay " +
    "cache (RFC 7523 §3 allows refusing an unreasonably far exp). jose has no upper bound on exp.",
  ERR_ASSERTION_IAT:
    "Besides jose's iat window, exp − iat may not exceed the maximum lifetime (plus tolerance): the " +
    "assertion's declared lifetime is bounded too, not only its age.",
  ERR_ASSERTION_JTI:
    "jti must be a string of 8 to 256 characters: it keys the replay cache (too short collides, too long " +
    "bloats it). jose only checks that jti is present.",
  ERR_DPOP_JTI: "As ERR_ASSERTION_JTI, for the proof replay cache.",
};
