import type { JWK } from "jose";

/** The device facts the token and EST services need. RegistrarStore satisfies this structurally. */
export interface DirectoryDevice {
  readonly deviceId: string;
  readonly status: "active" | "revoked";
  readonly role: string;
  readonly attributes: Readonly<Record<string, string>>;
  readonly publicJwk: JWK;
  readonly group: string;
}

export interface DeviceDirectory {
  getDevice(deviceId: string): DirectoryDevice | undefined | Promise<DirectoryDevice | undefined>;
}

/** An in-memory directory (tests, benchmarks, demos). */
export class InMemoryDeviceDirectory implements DeviceDirectory {
  readonly #devices = new Map<string, DirectoryDevice>();

  put(device: DirectoryDevice): void {
    this.#devices.set(device.deviceId, device);
  }

  revoke(deviceId: string): void {
    const d = this.#devices.get(deviceId);
    if (d !== undefined) this.#devices.set(deviceId, { ...d, status: "revoked" });
  }

  getDevice(deviceId: string): DirectoryDevice | undefined {
    return this.#devices.get(deviceId);
  }
}

/** A device source that can announce changes (RegistrarStore satisfies it). */
export interface WatchableDirectory {
  getDevice(deviceId: string): Promise<DirectoryDevice | undefined>;
  onDeviceChange(listener: (deviceId: string) => void): () => void;
}

/**
 * A read-through cache in front of the store for the token endpoint's per-request device lookup.
 * Staleness bound: an entry is served for at most `ttlMs` (default 1000 ms) after it was read, so a
 * revocation committed by any replica is honoured here within `ttlMs` even if notifications are lost
 * (the poll fallback); with the store's change notifications (PostgreSQL LISTEN/NOTIFY) the entry is
 * dropped as soon as the change commits. Only found devices are cached.
 */
export class CachedDeviceDirectory implements DeviceDirectory {
  readonly #source: WatchableDirectory;
  readonly #ttlMs: number;
  readonly #max: number;
  readonly #now: () => number;
  readonly #entries = new Map<string, { at: number; device: DirectoryDevice }>();
  readonly #unsubscribe: () => void;
  /** Bumped by every change notification: a read that started before it must not be cached. */
  #generation = 0;

  constructor(
    source: WatchableDirectory,
    options: { readonly ttlMs?: number; readonly maxEntries?: number; readonly monotonicMs: () => number },
  ) {
    this.#source = source;
    this.#ttlMs = options.ttlMs ?? 1000;
    this.#max = options.maxEntries ?? 100_000;
    this.#now = options.monotonicMs;
    this.#unsubscribe = source.onDeviceChange((id) => {
      this.#generation++;
      this.#entries.delete(id);
    });
  }

  async getDevice(deviceId: string): Promise<DirectoryDevice | undefined> {
    const now = this.#now();
    const hit = this.#entries.get(deviceId);
    if (hit !== undefined && now - hit.at < this.#ttlMs) return hit.device;
    const generation = this.#generation;
    const device = await this.#source.getDevice(deviceId);
    if (device !== undefined && generation === this.#generation && this.#ttlMs > 0) {
      if (this.#entries.size >= this.#max) this.#entries.clear();
      this.#entries.set(deviceId, { at: now, device });
    } else {
      this.#entries.delete(deviceId);
    }
    return device;
  }

  close(): void {
    this.#unsubscribe();
    this.#entries.clear();
  }
}
