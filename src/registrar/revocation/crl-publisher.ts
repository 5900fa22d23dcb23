import { readFile } from "node:fs/promises";
import { writeFileAtomic } from "../../core/atomic-file.js";
import type { Clock } from "../../core/clock.js";
import { type Logger, silentLogger } from "../../core/log.js";
import { crlNumberOf, type FleetCa, type SignedCrl } from "../ca/index.js";
import type { RegistrarStore, RevokedCertificate } from "../store/index.js";
import type { HookEvent, RevocationHook } from "./hook.js";

/**
 * Publishes the fleet CA's CRL: keeps the current one in memory for `GET /v1/crl` and writes it as
 * PEM to `crl_file` (atomically, 0644), and runs the revocation hook.
 *
 * A new CRL is signed when the set of revoked, unexpired certificates changes or when the current
 * one is older than `refresh` (so relying parties never see one past nextUpdate while the registrar
 * runs). Revocations are picked up by `check()`: called on a timer (`check_interval_ms`, which
 * bounds the delay for revocations made by the CLI or another replica) and at once by the routes of
 * this process that revoke (`trigger()`).
 *
 * CRL numbers are the signing time in milliseconds, and at least one more than the number of the
 * CRL already in `crl_file`: monotonic across restarts, and across replicas whose clocks agree,
 * without a shared counter.
 */

export interface CrlPublisherOptions {
  readonly store: RegistrarStore;
  readonly ca: FleetCa;
  readonly clock: Clock;
  readonly log?: Logger;
  /** PEM output; undefined = memory only. */
  readonly file: string | undefined;
  readonly validitySeconds: number;
  readonly refreshSeconds: number;
  readonly checkIntervalMs: number;
  readonly hook?: RevocationHook | undefined;
}

export interface PublishedCrl extends SignedCrl {
  /** Serials on this CRL, sorted. */
  readonly serials: readonly string[];
}

export class CrlPublisher {
  readonly #o: CrlPublisherOptions;
  readonly #log: Logger;
  #current: PublishedCrl | undefined;
  /** deviceId → serials on the current CRL. */
  #devices = new Map<string, readonly string[]>();
  #key = "";
  #lastNumber = 0n;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #again = false;
  #closed = false;

  constructor(options: CrlPublisherOptions) {
    this.#o = options;
    this.#log = options.log ?? silentLogger;
  }

  /** The CRL being published (after `start`). */
  get current(): PublishedCrl | undefined {
    return this.#current;
  }

  /**
   * Signs and writes the first CRL (the hook gets `crl-updated`), then checks on a timer.
   * @throws ERR_STATE_WRITE when the CRL file cannot be written.
   */
  async start(): Promise<PublishedCrl> {
    if (this.#o.file !== undefined) {
      const existing = await readFile(this.#o.file, "utf8").catch(() => undefined);
      const n = existing === undefined ? undefined : crlNumberOf(existing);
      if (n !== undefined) this.#lastNumber = n;
    }
    await this.#check(true);
    this.#timer = setInterval(() => this.trigger(), this.#o.checkIntervalMs);
    this.#timer.unref();
    const c = this.#current;
    if (c === undefined) throw new Error("unreachable: the first check publishes a CRL");
    return c;
  }

  /**
   * Checks the store now (coalesced with a check already running); resolves when the CRL reflects
   * every revocation committed before the call. Never rejects: failures are logged and retried on
   * the next tick.
   */
  trigger(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    if (this.#running !== undefined) {
      // A check is running; it may have read the store before this call: run once more after it.
      this.#again = true;
      return this.#running;
    }
    const run = (async () => {
      try {
        do {
          this.#again = false;
          await this.#check(false).catch((err: unknown) => {
            this.#log.error("CRL check failed; retrying on the next tick", { error: err });
          });
        } while (this.#again && !this.#closed);
      } finally {
        this.#running = undefined;
      }
    })();
    this.#running = run;
    return run;
  }

  async close(): Promise<void> {
    this.#closed = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    await this.#running;
    await this.#o.hook?.idle();
  }

  async #check(first: boolean): Promise<void> {
    const now = this.#o.clock.now();
    const entries = await this.#o.store.listRevokedCertificates(now);
    const key = entries.map((e) => e.serial).join(",");
    const cur = this.#current;
    const stale =
      cur === undefined || now.getTime() - cur.thisUpdate.getTime() >= this.#o.refreshSeconds * 1000;
    if (!first && key === this.#key && !stale) return;

    const published = await this.#publish(entries, now);
    const devices = groupByDevice(entries);
    const newlyRevoked = first ? [] : [...devices.keys()].filter((d) => !this.#devices.has(d));
    this.#current = published;
    this.#key = key;
    this.#devices = devices;
    this.#log.info("CRL published", {
      crlNumber: published.crlNumber.toString(),
      entries: published.entries,
      nextUpdate: published.nextUpdate.toISOString(),
      newlyRevoked: newlyRevoked.length,
    });

    const hook = this.#o.hook;
    if (hook === undefined) return;
    const file = this.#o.file ?? "";
    const events: HookEvent[] =
      newlyRevoked.length === 0
        ? [{ kind: "crl-updated", crlFile: file, crlNumber: published.crlNumber }]
        : newlyRevoked.map((deviceId) => ({
            kind: "revoked",
            deviceId,
            serials: devices.get(deviceId) ?? [],
            revokedAt: entries.find((e) => e.deviceId === deviceId)?.revokedAt ?? now,
            crlFile: file,
            crlNumber: published.crlNumber,
          }));
    // Not awaited: a slow hook must not delay the next CRL; runs stay in order inside the hook.
    for (const e of events) void hook.run(e);
  }

  async #publish(entries: readonly RevokedCertificate[], now: Date): Promise<PublishedCrl> {
    const byTime = BigInt(now.getTime());
    const crlNumber = byTime > this.#lastNumber ? byTime : this.#lastNumber + 1n;
    // One second back: a relying party whose clock is slightly behind still accepts thisUpdate.
    const thisUpdate = new Date(Math.floor(now.getTime() / 1000) * 1000 - 1000);
    const signed = await this.#o.ca.signCrl({
      entries: entries.map((e) => ({ serial: e.serial, revokedAt: e.revokedAt })),
      thisUpdate,
      nextUpdate: new Date(thisUpdate.getTime() + this.#o.validitySeconds * 1000),
      crlNumber,
    });
    // A CRL is public: 0644, so a broker running as another user can read it.
    if (this.#o.file !== undefined) await writeFileAtomic(this.#o.file, signed.pem, 0o644);
    this.#lastNumber = crlNumber;
    return { ...signed, serials: entries.map((e) => e.serial) };
  }
}

function groupByDevice(entries: readonly RevokedCertificate[]): Map<string, readonly string[]> {
  const m = new Map<string, string[]>();
  for (const e of entries) {
    const list = m.get(e.deviceId);
    if (list === undefined) m.set(e.deviceId, [e.serial]);
    else list.push(e.serial);
  }
  return m;
}
