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
