/**
 * The evidence the agent reports for a key generated inside a PKCS#11 token (SoftHSM2 here): made on
 * the token, never extractable, always sensitive, and self-asserted (no attestation by a third party).
 */
export const TOKEN_KEY_EVIDENCE = {
  kind: "pkcs11",
  local: true,
  neverExtractable: true,
  alwaysSensitive: true,
  extractable: false,
  sensitive: true,
  selfAsserted: true,
} as const;
