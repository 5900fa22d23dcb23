import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "../core/atomic-file.js";
import type { Clock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";

/**
 * The earliest time a correct clock can show on a device running this build. Bumped at release time
 * (a gateway with a dead RTC boots in 1970 or at the firmware's build date).
 */
export const BUILD_TIME_FLOOR = new Date("2026-11-01T00:00:00Z");

export const CLOCK_FLOOR_FILE = "clock-floor.json";

export interface ClockVerdict {
  readonly trusted: boolean;
  readonly now: string;
  readonly floor: string;
  /** Which input set the floor: build, persisted, certificate. */
  readonly floorSource: "build" | "persisted" | "certificate";
  readonly reason?: string;
}

/**
 * Clock sanity at boot and while running: the wall clock must not be below a floor =
 * max(build time, last persisted time, certificate notBefore). Below the floor, no credential
 * decision (expiry, renewal, JWT iat/exp) is made: a clock in 1970 would make every certificate look
 * not-yet-valid, and one rolled back could make a revoked/expired credential look fresh.
 */
export class ClockSanity {
  readonly #clock: Clock;
  readonly #file: string;
  readonly #log: Logger;
  readonly #build: Date;
  #persisted: Date | undefined;
  /**
   * (wall, monotonic) at the first trusted check of this process: the floor written later is at most
   * anchor wall + monotonic elapsed, so a later forward step of the wall clock is never persisted.
   */
  #anchor: { readonly wallMs: number; readonly monoMs: number } | undefined;
  /** wall − monotonic at the last `noteStep()`: a change is a wall-clock step. */
  #offsetMs: number | undefined;
  #certNotBefore: Date | undefined;
  #timer: NodeJS.Timeout | undefined;

  constructor(options: { clock: Clock; stateDir: string; log: Logger; buildTime?: Date }) {
    this.#clock = options.clock;
    this.#file = join(options.stateDir, CLOCK_FLOOR_FILE);
    this.#log = options.log;
    this.#build = options.buildTime ?? BUILD_TIME_FLOOR;
  }

  /** Reads the persisted floor (a missing or corrupt file just means "no persisted floor"). */
  async load(): Promise<void> {
    try {
      const parsed = JSON.parse(await readFile(this.#file, "utf8")) as { lastSeen?: unknown };
      const d = typeof parsed.lastSeen === "string" ? new Date(parsed.lastSeen) : undefined;
      if (d !== undefined && !Number.isNaN(d.getTime())) this.#persisted = d;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT")
        this.#log.warn("clock floor file unreadable; ignoring it", { file: this.#file, error: err });
    }
  }

  /** Raises the floor to a certificate's notBefore (a valid cert cannot predate the real time). */
  setCertificateNotBefore(notBefore: Date | undefined): void {
    this.#certNotBefore = notBefore;
  }

  /** The verdict now. The first trusted verdict also records the (wall, monotonic) anchor for `persist`. */
  check(): ClockVerdict {
    const now = this.#clock.now();
    let floor = this.#build;
    let floorSource: ClockVerdict["floorSource"] = "build";
    if (this.#persisted !== undefined && this.#persisted > floor) {
      floor = this.#persisted;
      floorSource = "persisted";
    }
    if (this.#certNotBefore !== undefined && this.#certNotBefore > floor) {
      floor = this.#certNotBefore;
      floorSource = "certificate";
    }
    const trusted = now.getTime() >= floor.getTime();
    if (trusted && this.#anchor === undefined)
      this.#anchor = { wallMs: now.getTime(), monoMs: this.#clock.monotonicMs() };
    return {
      trusted,
      now: now.toISOString(),
      floor: floor.toISOString(),
      floorSource,
      ...(trusted
        ? {}
        : {
            reason: `untrusted clock: ${now.toISOString()} is before the ${floorSource} time floor ${floor.toISOString()}`,
          }),
    };
  }

  /**
   * The clock gate every credential path shares (token source, EST, enrolment, the relay's sinks):
   * undefined while trusted, else the `ERR_CLOCK_UNTRUSTED` error to refuse with. A comparison, no
   * I/O: cheap enough to poll every second.
   */
  untrusted(): M2mError | undefined {
    const v = this.check();
    if (v.trusted) return undefined;
    return new M2mError("ERR_CLOCK_UNTRUSTED", "transient", v.reason ?? "untrusted clock", {
      hint: "fix time synchronisation (systemd-timesyncd / chrony) or the RTC; the agent resumes by itself",
      details: { now: v.now, floor: v.floor },
    });
  }

  /** For credential code paths. @throws ERR_CLOCK_UNTRUSTED (transient: NTP may fix it). */
  assertTrusted(): void {
    const e = this.untrusted();
    if (e !== undefined) throw e;
  }

  /**
   * How far (ms, signed) the wall clock stepped against the monotonic clock since the previous call,
   * when that exceeds `thresholdMs`; else undefined. The first call only records the offset.
   */
  noteStep(thresholdMs = 60_000): number | undefined {
    const offset = this.#clock.now().getTime() - this.#clock.monotonicMs();
    const prev = this.#offsetMs;
    this.#offsetMs = offset;
    if (prev === undefined) return undefined;
    const step = offset - prev;
    return Math.abs(step) > thresholdMs ? step : undefined;
  }

  /**
   * Persists the current time as the new floor, only when the clock is trusted and moving forward
   * (never lowers the floor; atomic write so a power cut leaves the old or new value). The value is
   * capped at the first trusted (wall, monotonic) pair of this process plus monotonic time elapsed,
   * so a forward step of the wall clock is not persisted.
   */
  async persist(): Promise<boolean> {
    const v = this.check();
    if (!v.trusted) return false;
    let next = this.#clock.now();
    // Why: a wall clock stepped years forward (bad NTP answer, RTC glitch) must not become the floor:
    // once corrected, the device would refuse every credential until that date. The floor advances
    // no faster than monotonic time since the first trusted check (a wall-clock step does not move
    // it); the cap can only make the floor lower, never stricter.
    const a = this.#anchor;
    if (a !== undefined) {
      const cap = a.wallMs + Math.max(0, this.#clock.monotonicMs() - a.monoMs);
      if (next.getTime() > cap) next = new Date(cap);
    }
    if (this.#persisted !== undefined && next <= this.#persisted) return false;
    await writeFileAtomic(this.#file, `${JSON.stringify({ lastSeen: next.toISOString() })}\n`);
    this.#persisted = next;
    return true;
  }

  /** Persists every `intervalMs` (timer unref'd: never keeps the process alive). */
  startPeriodic(intervalMs: number): void {
    this.stop();
    this.#timer = setInterval(() => {
      this.persist().catch((err: unknown) => this.#log.warn("could not persist clock floor", { error: err }));
    }, intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }
}

/**
 * The clock gate for one-shot CLI commands that sign or send (`enroll`, `token --direct`,
 * `decommission`): the persisted floor, and the enrolled certificate's notBefore when given.
 * @throws ERR_CLOCK_UNTRUSTED
 */
export async function assertClockTrustedForCli(options: {
  stateDir: string;
  log: Logger;
  clock: Clock;
  certificatePem?: string;
}): Promise<void> {
  const cs = new ClockSanity({ clock: options.clock, stateDir: options.stateDir, log: options.log });
  await cs.load();
  if (options.certificatePem !== undefined) {
    try {
      const { X509Certificate } = await import("node:crypto");
      cs.setCertificateNotBefore(new Date(new X509Certificate(options.certificatePem).validFrom));
    } catch {
      // An unreadable certificate only means no certificate floor here (the command reports it).
    }
  }
  cs.assertTrusted();
}
