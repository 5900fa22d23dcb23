import { createECDH, createPrivateKey, createPublicKey, type KeyObject } from "node:crypto";

/**
 * A P-256 key pair without `generateKeyPair(Sync)`. Why: on Node 20.20 a process that generates
 * thousands of keys with `generateKeyPairSync` and exports them as JWK deadlocks: GC finalises a
 * KeyGenJob (weak callback) while `KeyObjectHandle::ExportJWK` holds the key's mutex, and the job's
 * destructor waits for that mutex forever (seen in the fleet simulator after ≈ 2,000 devices: main
 * thread in `__lll_lock_wait` under `~KeyGenJob` inside `ExportJWKEcKey`). ECDH key generation plus a
 * JWK import creates no KeyGenJob.
 */
export function generateP256KeyPair(): { privateKey: KeyObject; publicKey: KeyObject } {
  const ecdh = createECDH("prime256v1");
  ecdh.generateKeys();
  const point = ecdh.getPublicKey(); // 0x04 ‖ X(32) ‖ Y(32)
  const d = Buffer.alloc(32);
  const raw = ecdh.getPrivateKey();
  raw.copy(d, 32 - raw.length);
  const privateKey = createPrivateKey({
    key: {
      kty: "EC",
      crv: "P-256",
      x: point.subarray(1, 33).toString("base64url"),
      y: point.subarray(33, 65).toString("base64url"),
      d: d.toString("base64url"),
    },
    format: "jwk",
  });
  return { privateKey, publicKey: createPublicKey(privateKey) };
}
