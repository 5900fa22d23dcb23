import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { firstDifferingEvent, parseEventLog } from "../../tpm/event-log.js";
import { type PcrBank, type PcrSelection, parsePcrSelection } from "../../wire/v1/index.js";
import type { AttestationPolicy, DeviceAttestation, RegistrarStore } from "../store/index.js";
import { BANK_ALG } from "./quote-verifier.js";

/**
 * Operator side of continuous attestation: set a group's policy, approve golden values (given by the
 * operator, or taken from a device's latest authentic quote — trust on first use, but only by an
 * explicit operator command), and explain a device's state (which PCRs, which events differ).
 */

const policyError = (message: string, hint?: string): M2mError =>
  new M2mError("ERR_ATTESTATION_POLICY", "permanent", message, hint === undefined ? {} : { hint });

const BANK_HEX: Readonly<Record<PcrBank, number>> = { sha1: 40, sha256: 64, sha384: 96 };

export interface PolicyInput {
  readonly group: string;
  /** `sha256:0,1,2,3,7` */
  readonly pcrs: string;
  readonly maxQuoteAgeSec?: number;
  readonly requireForTokens?: boolean;
  readonly requireForRenewal?: boolean;
  readonly nonAttestable?: "claimless" | "refuse";
  /** Golden values `index=hex` given by the operator; omitted → keep the current ones if the selection is unchanged. */
  readonly golden?: Readonly<Record<string, string>>;
}

export const DEFAULT_MAX_QUOTE_AGE_SEC = 300;

/** Validates a selection string. @throws ERR_ATTESTATION_POLICY */
export function selectionOf(text: string): PcrSelection {
  const s = parsePcrSelection(text);
  if (s === undefined) {
    throw policyError(
      `invalid PCR selection ${JSON.stringify(text.slice(0, 64))}`,
      "e.g. sha256:0,1,2,3,7 (PCRs 0-23)",
    );
  }
  return s;
}

/** Checks golden values against a selection: exactly one value per selected PCR, of the bank's size. */
function checkGolden(
  selection: PcrSelection,
  golden: Readonly<Record<string, string>>,
): Record<string, string> {
  const out: Record<string, string> = {};
  const keys = Object.keys(golden).map(Number);
  if (keys.length !== selection.pcrs.length || !selection.pcrs.every((p) => keys.includes(p))) {
    throw policyError(`golden values must cover exactly PCRs ${selection.pcrs.join(",")}`);
  }
  for (const p of selection.pcrs) {
    const v = (golden[String(p)] ?? "").toLowerCase().replace(/^0x/, "");
    if (!new RegExp(`^[0-9a-f]{${BANK_HEX[selection.bank]}}$`).test(v)) {
      throw policyError(`golden value of PCR ${p} is not a ${selection.bank} digest in hex`);
    }
    out[String(p)] = v;
  }
  return out;
}

/** Creates or updates a group's policy. @throws ERR_ATTESTATION_POLICY, ERR_GROUP_UNKNOWN */
export async function setAttestationPolicy(
  store: RegistrarStore,
  input: PolicyInput,
  clock: Clock,
): Promise<AttestationPolicy> {
  const selection = selectionOf(input.pcrs);
  const maxAge = input.maxQuoteAgeSec ?? DEFAULT_MAX_QUOTE_AGE_SEC;
  if (!Number.isInteger(maxAge) || maxAge < 10 || maxAge > 86_400) {
    throw policyError("max quote age must be between 10 s and 24 h");
  }
  const prev = await store.getAttestationPolicy(input.group);
  const sameSelection = prev !== undefined && JSON.stringify(prev.selection) === JSON.stringify(selection);
  const golden =
    input.golden !== undefined
      ? checkGolden(selection, input.golden)
      : sameSelection
        ? prev?.golden
        : undefined;
  return store.putAttestationPolicy({
    group: input.group,
    selection,
    golden,
    goldenEventLog: input.golden !== undefined ? undefined : sameSelection ? prev?.goldenEventLog : undefined,
    goldenSource: input.golden !== undefined ? "operator" : sameSelection ? prev?.goldenSource : undefined,
    maxQuoteAgeSec: maxAge,
    requireForTokens: input.requireForTokens ?? prev?.requireForTokens ?? true,
    requireForRenewal: input.requireForRenewal ?? prev?.requireForRenewal ?? false,
    nonAttestable: input.nonAttestable ?? prev?.nonAttestable ?? "refuse",
    updatedAt: clock.now(),
  });
}

/**
 * Approves the PCR values of a device's latest authentic quote (and its event log) as the group's
 * golden values: after a planned firmware update, or the first device of a new group (TOFU, never
 * silent). @throws ERR_ATTESTATION_POLICY when the group has no policy or the device no authentic quote.
 */
export async function approveFromDevice(
  store: RegistrarStore,
  deviceId: string,
  clock: Clock,
): Promise<AttestationPolicy> {
  const device = await store.getDevice(deviceId);
  if (device === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", `no device ${deviceId}`);
  const policy = await store.getAttestationPolicy(device.group);
  if (policy === undefined) throw policyError(`group ${device.group} has no attestation policy`);
  const att = await store.getDeviceAttestation(deviceId);
  if (att?.pcrs === undefined || att.bank !== policy.selection.bank) {
    throw policyError(
      `device ${deviceId} has no authentic quote over ${policy.selection.bank} yet`,
      "let the device request a token first (its quote is recorded even when refused)",
    );
  }
  // Why: only values from a quote whose signature, nonce and digest verified are ever approved.
  const golden = checkGolden(policy.selection, att.pcrs);
  return store.putAttestationPolicy({
    ...policy,
    golden,
    goldenEventLog: att.eventLog,
    goldenSource: `device:${deviceId}`,
    updatedAt: clock.now(),
  });
}

/** What `m2m-registrar attestation show DEV` prints. */
export interface AttestationReport {
  readonly deviceId: string;
  readonly group: string;
  readonly policy: string | undefined;
  readonly selection: string | undefined;
  readonly last: DeviceAttestation | undefined;
  /** PCRs whose latest authentic value differs from the golden value (or all, when none approved). */
  readonly differing: readonly {
    readonly pcr: number;
    readonly expected: string | undefined;
    readonly actual: string | undefined;
    /** The first event of this PCR that differs from the approved log, when both logs are known. */
    readonly event?: {
      readonly position: number;
      readonly eventType: number | undefined;
      readonly description: string;
    };
  }[];
}

export async function attestationReport(store: RegistrarStore, deviceId: string): Promise<AttestationReport> {
  const device = await store.getDevice(deviceId);
  if (device === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", `no device ${deviceId}`);
  const policy = await store.getAttestationPolicy(device.group);
  const last = await store.getDeviceAttestation(deviceId);
  const differing: AttestationReport["differing"][number][] = [];
  if (policy !== undefined && last?.pcrs !== undefined) {
    const golden = policy.golden;
    let logs:
      | { expected: ReturnType<typeof parseEventLog>; actual: ReturnType<typeof parseEventLog> }
      | undefined;
    try {
      if (policy.goldenEventLog !== undefined && last.eventLog !== undefined) {
        logs = {
          expected: parseEventLog(Buffer.from(policy.goldenEventLog, "base64url")),
          actual: parseEventLog(Buffer.from(last.eventLog, "base64url")),
        };
      }
    } catch {
      logs = undefined;
    }
    for (const p of policy.selection.pcrs) {
      const expected = golden?.[String(p)];
      const actual = last.pcrs[String(p)];
      if (expected !== undefined && expected === actual) continue;
      const ev =
        logs === undefined
          ? undefined
          : firstDifferingEvent(logs.expected, logs.actual, p, BANK_ALG[policy.selection.bank]);
      differing.push({
        pcr: p,
        expected,
        actual,
        ...(ev === undefined
          ? {}
          : { event: { position: ev.position, eventType: ev.eventType, description: ev.description } }),
      });
    }
  }
  return {
    deviceId,
    group: device.group,
    policy: policy === undefined ? undefined : `${policy.group}#${policy.version}`,
    selection:
      policy === undefined ? undefined : `${policy.selection.bank}:${policy.selection.pcrs.join(",")}`,
    last,
    differing,
  };
}
