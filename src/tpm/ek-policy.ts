import { createHash } from "node:crypto";
import { TPM_ALG } from "./constants.js";

/**
 * TCG EK Credential Profile (2.3+) authorization policies of endorsement keys, and which session a
 * USER-role use of an EK (TPM2_ActivateCredential, TPM2_Create under it) needs.
 *
 * - PolicyA = PolicySecret(TPM_RH_ENDORSEMENT): low-range templates (L-1 RSA-2048 at NV 0x01c00002,
 *   L-2 ECC P-256 at 0x01c0000a); userWithAuth is clear, so PolicyA is the only way in.
 * - PolicyC = PolicyAuthorizeNV(EK policy NV index 0x01c07f01/02/03), PolicyB = PolicyOR(PolicyA,
 *   PolicyC): high-range templates (H-1 RSA-2048 0x01c00012, H-2 P-256 0x01c00014, H-3 P-384
 *   0x01c00016, …). They set userWithAuth, but a TPM vendor or an operator may clear it, and the
 *   endorsement auth may be set: the policy is what the template guarantees, so it is used.
 *
 * The policy hash algorithm is the EK's nameAlg (authPolicy is a digest of that algorithm).
 */

export type EkPolicyHash = "sha256" | "sha384" | "sha512";

const TPM_CC_POLICY_SECRET = 0x00000151;
const TPM_CC_POLICY_OR = 0x00000171;
const TPM_RH_ENDORSEMENT = 0x4000000b;

/** PolicyC digests as published (TCG EK Credential Profile, B.6.4): they depend on the NV index's Name. */
const POLICY_C_HEX: Record<EkPolicyHash, string> = {
  sha256: "3767e2edd43ff45a3a7e1eaefcef78643dca964632e7aad82c673a30d8633fde",
  sha384: "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165",
  sha512:
    "589ee1e146544716e8deafe6db247b01b81e9f9c7dd16b814aa159138749105fba5388dd1dea702f35240c184933121e2c61b8f50d3ef91393a49a38c3f73fc8",
};

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function size(h: EkPolicyHash): number {
  return h === "sha256" ? 32 : h === "sha384" ? 48 : 64;
}

/** PolicyA: PolicySecret(TPM_RH_ENDORSEMENT) with an empty policyRef, from a zero digest. */
export function ekPolicyA(h: EkPolicyHash): Uint8Array {
  const first = createHash(h)
    .update(Buffer.alloc(size(h)))
    .update(u32(TPM_CC_POLICY_SECRET))
    .update(u32(TPM_RH_ENDORSEMENT))
    .digest();
  return new Uint8Array(createHash(h).update(first).digest());
}

/** PolicyC: PolicyAuthorizeNV of the EK policy NV index (published constant). */
export function ekPolicyC(h: EkPolicyHash): Uint8Array {
  return new Uint8Array(Buffer.from(POLICY_C_HEX[h], "hex"));
}

/** PolicyOR of `branches`, from a zero digest (TPM 2.0 Part 3, TPM2_PolicyOR). */
export function policyOr(h: EkPolicyHash, branches: readonly Uint8Array[]): Uint8Array {
  const hash = createHash(h)
    .update(Buffer.alloc(size(h)))
    .update(u32(TPM_CC_POLICY_OR));
  for (const b of branches) hash.update(b);
  return new Uint8Array(hash.digest());
}

/** PolicyB = PolicyOR(PolicyA, PolicyC). */
export function ekPolicyB(h: EkPolicyHash): Uint8Array {
  return policyOr(h, [ekPolicyA(h), ekPolicyC(h)]);
}

/** How a USER-role use of an EK is authorized. */
export type EkAuthorization =
  /** Policy session: PolicySecret(endorsement). */
  | { readonly kind: "policy-a"; readonly hash: EkPolicyHash }
  /** Policy session: PolicySecret(endorsement), then PolicyOR over `branches` (PolicyA, PolicyC). */
  | { readonly kind: "policy-b"; readonly hash: EkPolicyHash; readonly branches: readonly Uint8Array[] }
  /** Empty password (userWithAuth set, unknown policy). */
  | { readonly kind: "password" };

function hashOf(nameAlg: number): EkPolicyHash | undefined {
  return nameAlg === TPM_ALG.SHA256
    ? "sha256"
    : nameAlg === TPM_ALG.SHA384
      ? "sha384"
      : nameAlg === TPM_ALG.SHA512
        ? "sha512"
        : undefined;
}

const USER_WITH_AUTH = 0x40;

/**
 * Picks the authorization for an EK from its public area: the template's policy when authPolicy is
 * PolicyA or PolicyB in the EK's nameAlg, else the empty password when userWithAuth is set, else
 * undefined (the EK cannot be used by this agent).
 */
export function ekAuthorizationOf(ek: {
  readonly nameAlg: number;
  readonly objectAttributes: number;
  readonly authPolicy: Uint8Array;
}): EkAuthorization | undefined {
  const h = hashOf(ek.nameAlg);
  if (h !== undefined) {
    const policy = Buffer.from(ek.authPolicy);
    if (policy.equals(Buffer.from(ekPolicyA(h)))) return { kind: "policy-a", hash: h };
    if (policy.equals(Buffer.from(ekPolicyB(h)))) {
      return { kind: "policy-b", hash: h, branches: [ekPolicyA(h), ekPolicyC(h)] };
    }
  }
  return (ek.objectAttributes & USER_WITH_AUTH) !== 0 ? { kind: "password" } : undefined;
}
