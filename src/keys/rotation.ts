import { readFile } from "node:fs/promises";
import { z } from "zod";
import { writeFileAtomic } from "../core/atomic-file.js";
import { M2mError } from "../core/errors.js";
import type { KeyProvider } from "./key-provider.js";

/**
 * Rotation state file name inside the agent's state_dir (which of the two keys is current). The ONE
 * spelling of it: everything else asks `DeviceKeyOwner` or joins this constant.
 */
export const KEY_ROTATION_STATE_FILE = "key-rotation.json";

/**
 * Key rotation seam (used by `CertificateRenewer`). Order is the safety property: the old key is
 * destroyed only after the new certificate is on disk. `DeviceKeyOwner` implements it over
 * `AlternatingKeyRotation` and tells its subscribers about the switch before the old key goes.
 */
export interface KeyRotation {
  /** Creates (or reopens, after a crash) the next key; the current key stays usable. */
  prepare(): Promise<KeyProvider>;
  /** Makes `next` the current key and destroys the old one. Called after the new cert is written. */
  commit(next: KeyProvider): Promise<void>;
  /** Destroys an unused next key after a failed renewal. */
  abort(next: KeyProvider): Promise<void>;
  /** Whether a rotation is under way (a pending key may exist). Enables `issueForPendingKey`. */
  hasPending?(): Promise<boolean>;
}

/** The two PKCS#11 labels the daemon alternates between: `key_label` and `key_label-alt`. */
export function pkcs11RotationLabels(label: string): [string, string] {
  return [label, `${label}-alt`];
}

/**
 * Which of `names` is current per the state file (the first when there is none).
 * @throws ERR_KEY_ROTATION_STATE when the file is invalid or names another key.
 */
export async function currentRotationName(
  stateFile: string,
  names: readonly [string, string],
): Promise<string> {
  return new AlternatingKeyRotation({
    names,
    stateFile,
    make: () => {
      throw new M2mError("ERR_INTERNAL", "permanent", "not used");
    },
  }).currentName();
}

const stateSchema = z.strictObject({
  v: z.literal(1),
  current: z.string().min(1),
  pending: z.string().min(1).optional(),
});
type RotationState = z.infer<typeof stateSchema>;

/**
 * Key rotation between two key names (PKCS#11 labels, or anything a factory maps to a key, e.g. two
 * TPM handles), with a small state file so that a crash at any point is recoverable:
 *
 *   prepare: state {current, pending: other} written BEFORE the new key is created;
 *   commit:  state {current: pending} written, THEN the old key destroyed;
 *   abort:   the pending key destroyed, state {current}.
 *
 * A key found under the other name without a `pending` mark is a leftover (a crash after commit's
 * state write): it is destroyed before a fresh key is made, never reused.
 */
export class AlternatingKeyRotation implements KeyRotation {
  readonly #names: readonly [string, string];
  readonly #stateFile: string;
  readonly #make: (name: string) => KeyProvider;

  constructor(options: {
    names: readonly [string, string];
    stateFile: string;
    make: (name: string) => KeyProvider;
  }) {
    if (options.names[0] === options.names[1]) {
      throw new M2mError("ERR_CONFIG", "permanent", "key rotation needs two distinct key names");
    }
    this.#names = options.names;
    this.#stateFile = options.stateFile;
    this.#make = options.make;
  }

  /** The name of the key currently in use (the first name until a rotation committed). */
  async currentName(): Promise<string> {
    return (await this.#read()).current;
  }

  /** True when a rotation was begun (new key created or about to be) and not yet committed/aborted. */
  async hasPending(): Promise<boolean> {
    return (await this.#read()).pending !== undefined;
  }

  /** The provider for the current key. */
  async current(): Promise<KeyProvider> {
    return this.#make(await this.currentName());
  }

  async prepare(): Promise<KeyProvider> {
    const st = await this.#read();
    if (st.pending !== undefined) {
      // A rotation was under way (crash, or recovery): reopen that key, never make a second one.
      const p = this.#make(st.pending);
      await p.createOrOpen();
      return p;
    }
    const other = this.#other(st.current);
    const leftover = this.#make(other);
    // Security/hygiene: a key under the other name that nobody marked pending is an old key whose
    // destruction was interrupted; it must not come back as "the new key".
    await leftover.destroy();
    await leftover.close();
    await this.#write({ v: 1, current: st.current, pending: other });
    const next = this.#make(other);
    await next.createOrOpen();
    return next;
  }

  /**
   * Commits the pending key: the state names it current, `onSwitched` runs (the owner moves its
   * users to the new key while the old one still exists: make-before-break), then the old key is
   * destroyed. A crash after the state write leaves the old key as a leftover that `prepare`
   * destroys before it makes the next key.
   */
  async commit(next: KeyProvider, onSwitched?: () => Promise<void>): Promise<void> {
    const st = await this.#read();
    if (st.pending === undefined)
      throw new M2mError("ERR_KEY_ROTATION_STATE", "permanent", "no rotation pending");
    const nextInfo = await next.open();
    const pendingInfo = await this.#make(st.pending).open();
    if (nextInfo.thumbprint !== pendingInfo.thumbprint) {
      throw new M2mError(
        "ERR_KEY_ROTATION_STATE",
        "permanent",
        "commit for a key that is not the pending one",
      );
    }
    await this.#write({ v: 1, current: st.pending });
    await onSwitched?.();
    const old = this.#make(st.current);
    await old.destroy();
    await old.close();
  }

  async abort(next: KeyProvider): Promise<void> {
    const st = await this.#read();
    await next.destroy();
    await next.close();
    await this.#write({ v: 1, current: st.current });
  }

  #other(name: string): string {
    return name === this.#names[0] ? this.#names[1] : this.#names[0];
  }

  async #read(): Promise<RotationState> {
    let text: string;
    try {
      text = await readFile(this.#stateFile, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return { v: 1, current: this.#names[0] };
      throw new M2mError("ERR_KEY_ROTATION_STATE", "transient", "cannot read the key rotation state", {
        cause: err,
      });
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch {
      raw = undefined;
    }
    const parsed = stateSchema.safeParse(raw);
    const names: readonly string[] = this.#names;
    if (
      !parsed.success ||
      !names.includes(parsed.data.current) ||
      (parsed.data.pending !== undefined && !names.includes(parsed.data.pending))
    ) {
      throw new M2mError("ERR_KEY_ROTATION_STATE", "permanent", "key rotation state file is invalid", {
        hint: "inspect the file; it names which of the two keys is current",
      });
    }
    return parsed.data;
  }

  async #write(st: RotationState): Promise<void> {
    await writeFileAtomic(this.#stateFile, JSON.stringify(st), 0o600);
  }
}
