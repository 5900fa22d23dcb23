import { type Clock, systemClock } from "../core/clock.js";
import { asM2mError, M2mError } from "../core/errors.js";
import { type Logger, silentLogger } from "../core/log.js";
import type { KeyInfo, KeyProvider } from "./key-provider.js";
import { AlternatingKeyRotation, type KeyRotation } from "./rotation.js";

/** Where the device key lives over time: one fixed key, or two names a rotation alternates between. */
export interface DeviceKeySlots {
  readonly kind: KeyProvider["kind"];
  /** The configured key's name (PKCS#11 label, TPM handle `0x…`). */
  readonly home: string;
  /** The two names rotation alternates between (home first); undefined when rotation is off. */
  readonly names?: readonly [string, string] | undefined;
  /** `<state_dir>/key-rotation.json` (KEY_ROTATION_STATE_FILE). */
  readonly stateFile: string;
  /** A fresh provider for a key name, sharing the backend's resources (one TPM queue). */
  make(name: string): KeyProvider;
  /** Releases what the providers share (the TPM runner), after every provider is closed. */
  closeShared?(): Promise<void>;
}

/** What subscribers hear after a rotation committed and before the old key is destroyed. */
export interface DeviceKeyChange {
  readonly previous: KeyInfo | undefined;
  readonly current: KeyInfo;
  /** The new current key (the same object `owner.current` returns from now on). */
  readonly key: KeyProvider;
}

/**
 * Called when the current key changes. The owner awaits it (bounded by `switchTimeoutMs`) BEFORE it
 * destroys the old key: a subscriber moves its connections to the new key while the old one can
 * still finish what is in flight (make-before-break). A failure is logged and does not stop the
 * rotation (the new certificate is already on disk; reconnecting later uses the new key).
 */
export type DeviceKeyListener = (change: DeviceKeyChange) => Promise<void> | void;

export interface DeviceKeyOwnerOptions {
  /** Applied to every provider handed out (the daemon adds metrics and the hang watch). */
  readonly wrap?: (p: KeyProvider) => KeyProvider;
  readonly clock?: Clock;
  readonly log?: Logger;
  /** How long subscribers get to switch over before the old key is destroyed. Default 30 s. */
  readonly switchTimeoutMs?: number;
}

/**
 * The ONE owner of the device key across rotations (after SPIRE's key manager): it answers "which key
 * is current", runs a rotation (prepare → new key certified by the caller → commit → old key
 * destroyed) with the crash recovery of `AlternatingKeyRotation`, and tells subscribers about the
 * switch. Built once from config (`deviceKeyFromConfig`); nothing else decides which key is current.
 *
 * It implements `KeyRotation`, so `CertificateRenewer` drives rotations through it.
 */
export class DeviceKeyOwner implements KeyRotation {
  readonly #slots: DeviceKeySlots;
  readonly #wrap: (p: KeyProvider) => KeyProvider;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #switchTimeoutMs: number;
  readonly #rotation: AlternatingKeyRotation | undefined;
  readonly #listeners = new Set<DeviceKeyListener>();
  #current: KeyProvider;
  #currentName: string;
  #info: KeyInfo | undefined;
  #closed = false;

  private constructor(slots: DeviceKeySlots, name: string, options: DeviceKeyOwnerOptions) {
    this.#slots = slots;
    this.#wrap = options.wrap ?? ((p) => p);
    this.#clock = options.clock ?? systemClock;
    this.#log = options.log ?? silentLogger;
    this.#switchTimeoutMs = options.switchTimeoutMs ?? 30_000;
    this.#rotation =
      slots.names === undefined
        ? undefined
        : new AlternatingKeyRotation({ names: slots.names, stateFile: slots.stateFile, make: slots.make });
    this.#currentName = name;
    this.#current = this.#wrap(slots.make(name));
  }

  /**
   * Opens the owner: with rotation on, the current key is the one the rotation state names (a
   * restart after a rotation keeps the new key). Does not touch the key itself.
   * @throws ERR_KEY_ROTATION_STATE when the state file is unreadable or names another key.
   */
  static async open(slots: DeviceKeySlots, options: DeviceKeyOwnerOptions = {}): Promise<DeviceKeyOwner> {
    const name =
      slots.names === undefined
        ? slots.home
        : await new AlternatingKeyRotation({
            names: slots.names,
            stateFile: slots.stateFile,
            make: slots.make,
          }).currentName();
    return new DeviceKeyOwner(slots, name, options);
  }

  /** An owner of one fixed key that never rotates (test seams, tools that were handed a provider). */
  static fixed(key: KeyProvider, options: DeviceKeyOwnerOptions = {}): DeviceKeyOwner {
    return new DeviceKeyOwner(
      { kind: key.kind, home: "fixed", stateFile: "", make: () => key },
      "fixed",
      options,
    );
  }

  /** The current device key. Ask again after a change: the object is replaced by a rotation. */
  get current(): KeyProvider {
    return this.#current;
  }

  /** The current key's name (PKCS#11 label, TPM handle) — for status and logs. */
  get currentName(): string {
    return this.#currentName;
  }

  get kind(): KeyProvider["kind"] {
    return this.#slots.kind;
  }

  /** Whether this owner rotates keys (`credentials.est.rotate_key`). */
  get rotates(): boolean {
    return this.#rotation !== undefined;
  }

  /** Public facts of the current key (cached until the next change). */
  async info(): Promise<KeyInfo> {
    this.#info ??= await this.#current.open();
    return this.#info;
  }

  /** Subscribes to key changes; returns the unsubscribe function. */
  subscribe(listener: DeviceKeyListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  async hasPending(): Promise<boolean> {
    return this.#rotation === undefined ? false : this.#rotation.hasPending();
  }

  /** Creates (or after a crash reopens) the next key; the current key stays in use. */
  async prepare(): Promise<KeyProvider> {
    return this.#wrap(await this.#needRotation().prepare());
  }

  /**
   * Makes `next` current: state written, subscribers switched (awaited, bounded), THEN the old key
   * destroyed. Call only once the certificate for `next` is on disk.
   */
  async commit(next: KeyProvider): Promise<void> {
    const rotation = this.#needRotation();
    const previous = this.#current;
    const previousInfo = this.#info;
    await rotation.commit(next, async () => {
      this.#current = next;
      this.#currentName = await rotation.currentName();
      this.#info = undefined;
      const current = await this.info();
      this.#log.info("device key switched", { ref: current.ref, thumbprint: current.thumbprint });
      await this.#notify({ previous: previousInfo, current, key: next });
    });
    if (previous !== next) await previous.close().catch(() => undefined);
  }

  /** Destroys an unused next key after a refused renewal; the current key stays. */
  async abort(next: KeyProvider): Promise<void> {
    await this.#needRotation().abort(next);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#current.close().catch(() => undefined);
    await this.#slots.closeShared?.().catch(() => undefined);
  }

  async #notify(change: DeviceKeyChange): Promise<void> {
    const deadline = new AbortController();
    const timeout = this.#clock.sleep(this.#switchTimeoutMs, deadline.signal).then(
      () => "timeout" as const,
      () => "aborted" as const,
    );
    try {
      await Promise.all(
        [...this.#listeners].map(async (listener) => {
          const done = Promise.resolve()
            .then(() => listener(change))
            .then(
              () => "done" as const,
              (err: unknown) => {
                this.#log.warn("key change subscriber failed", { code: asM2mError(err).code });
                return "failed" as const;
              },
            );
          if ((await Promise.race([done, timeout])) === "timeout")
            this.#log.warn("key change subscriber did not finish in time; destroying the old key anyway", {
              timeoutMs: this.#switchTimeoutMs,
            });
        }),
      );
    } finally {
      deadline.abort();
    }
  }

  #needRotation(): AlternatingKeyRotation {
    if (this.#rotation === undefined)
      throw new M2mError("ERR_CONFIG", "permanent", "key rotation is off (credentials.est.rotate_key)");
    return this.#rotation;
  }
}
