import { join } from "node:path";
import type { AgentConfig } from "../config/index.js";
import type { Clock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { DeviceKeyOwner, type DeviceKeySlots } from "./device-key.js";
import type { KeyProvider } from "./key-provider.js";
import { KEY_ROTATION_STATE_FILE, pkcs11RotationLabels } from "./rotation.js";

export interface DeviceKeyDeps {
  readonly log: Logger;
  readonly clock?: Clock;
  readonly env?: NodeJS.ProcessEnv;
  /** Applied to every provider the owner hands out (the daemon's metrics + hang watch). */
  readonly wrap?: (p: KeyProvider) => KeyProvider;
}

/**
 * Builds the device-key owner for `[keys]` (and `credentials.est.rotate_key`). The ONE place that
 * constructs key backends; each backend module is imported dynamically, only when configured.
 * @throws ERR_CONFIG for an unsupported provider; backend constructors throw ERR_KEY_CONFIG;
 *   ERR_KEY_ROTATION_STATE when the rotation state is invalid.
 */
export async function deviceKeyFromConfig(config: AgentConfig, deps: DeviceKeyDeps): Promise<DeviceKeyOwner> {
  const slots = await slotsFromConfig(config, deps);
  return DeviceKeyOwner.open(slots, {
    log: deps.log.child({ component: "device-key" }),
    ...(deps.clock === undefined ? {} : { clock: deps.clock }),
    ...(deps.wrap === undefined ? {} : { wrap: deps.wrap }),
  });
}

async function slotsFromConfig(config: AgentConfig, deps: DeviceKeyDeps): Promise<DeviceKeySlots> {
  const k = config.keys;
  const rotates = config.credentials.est?.rotate_key === true;
  const stateFile = join(config.agent.state_dir, KEY_ROTATION_STATE_FILE);
  switch (k.provider) {
    case "tpm": {
      const [{ TpmKeyProvider, ownerPersistentHandle }, { TpmRunner }, { tpmRotationNames }] =
        await Promise.all([
          import("./tpm/tpm-provider.js"),
          import("./tpm/runner.js"),
          import("./tpm/rotation.js"),
        ]);
      const h = {
        keyHandle: ownerPersistentHandle(k.tpm.key_handle, "keys.tpm.key_handle"),
        srkHandle: ownerPersistentHandle(k.tpm.srk_handle, "keys.tpm.srk_handle"),
        akHandle: ownerPersistentHandle(k.tpm.ak_handle, "keys.tpm.ak_handle"),
      };
      // One runner (one serial TPM queue) for every key the owner ever opens: the current key, the
      // pending one during a rotation, the leftover it destroys, and their attestation.
      const ownerAuthRef = k.tpm.owner_auth;
      const { resolveSecret } = await import("../config/secrets.js");
      const runner = new TpmRunner({
        tcti: k.tpm.tcti,
        timeoutMs: k.tpm.timeout_ms,
        // Read on every owner-hierarchy use: a rotated file or credential needs no restart.
        ...(ownerAuthRef === undefined
          ? {}
          : {
              ownerAuth: () =>
                resolveSecret(ownerAuthRef, {
                  ...(deps.env === undefined ? {} : { env: deps.env }),
                  maxBytes: 1024,
                }),
            }),
        ...(deps.clock === undefined ? {} : { clock: deps.clock }),
      });
      const names = tpmRotationNames(h);
      // TLS with the TPM key (relay.mqtt.auth = "mtls-tpm", or a configured token PIN file): keys keep
      // their blobs and offer the tlsClient capability through tpm2-pkcs11 (keys/tpm/tls.ts).
      const wantsTls = config.relay.mqtt?.auth === "mtls-tpm" || k.tpm.tls_pin_file !== undefined;
      const keyBlobDir =
        k.tpm.key_blob_dir ?? (wantsTls ? join(config.agent.state_dir, "tpm-key-blobs") : undefined);
      const tls =
        wantsTls && k.tpm.tls_pin_file !== undefined
          ? new (await import("./tpm/tls.js")).TpmTlsKeys({
              storeDir: k.tpm.tls_store_dir ?? join(config.agent.state_dir, "tpm2-pkcs11"),
              tcti: k.tpm.tcti,
              srkHandle: h.srkHandle,
              userPinFile: k.tpm.tls_pin_file,
            })
          : undefined;
      return {
        kind: "tpm",
        home: names[0],
        names: rotates ? names : undefined,
        stateFile,
        make: (name) =>
          new TpmKeyProvider({
            runner,
            srkHandle: h.srkHandle,
            akHandle: h.akHandle,
            keyHandle: name,
            algorithm: k.tpm.algorithm,
            ...(keyBlobDir === undefined ? {} : { keyBlobDir }),
            ...(tls === undefined ? {} : { tls }),
          }),
        closeShared: () => runner.close(),
      };
    }
    case "pkcs11": {
      const p = k.pkcs11;
      // The schema requires these for provider = "pkcs11"; re-checked here for a precise error.
      if (p.module === undefined || p.token_label === undefined || p.pin === undefined) {
        throw new M2mError(
          "ERR_CONFIG",
          "permanent",
          "keys.pkcs11: module, token_label and pin are required",
        );
      }
      const { module, token_label, pin } = p;
      const { Pkcs11KeyProvider } = await import("./pkcs11/index.js");
      return {
        kind: "pkcs11",
        home: p.key_label,
        // Rotation alternates key_label and key_label-alt; the state names the current one.
        names: rotates ? pkcs11RotationLabels(p.key_label) : undefined,
        stateFile,
        make: (label) =>
          new Pkcs11KeyProvider({
            modulePath: module,
            tokenLabel: token_label,
            keyLabel: label,
            // A key id pins the configured key only; rotated keys are found by label.
            ...(p.key_id === undefined || label !== p.key_label ? {} : { keyId: p.key_id }),
            algorithm: p.algorithm,
            pin,
            logger: deps.log.child({ component: "pkcs11" }),
            ...(deps.clock === undefined ? {} : { clock: deps.clock }),
            ...(deps.env === undefined ? {} : { env: deps.env }),
          }),
      };
    }
    default: {
      const never: never = k.provider;
      throw new M2mError("ERR_CONFIG", "permanent", `keys.provider: unsupported provider ${String(never)}`);
    }
  }
}
