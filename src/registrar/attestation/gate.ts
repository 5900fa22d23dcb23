import type { Clock } from "../../core/clock.js";
import { type ErrorCode, M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import {
  ATTESTATION_OAUTH_ERRORS,
  type AttestationEvidence,
  type AttestedClaim,
  attestationEvidenceSchema,
  formatPcrSelection,
} from "../../wire/v1/index.js";
import type { OAuthErrorValue } from "../oauth/errors.js";
import type { AttestationPolicy, DeviceAttestation, DeviceRecord, RegistrarStore } from "../store/index.js";
import { QUOTE_NONCE_ERRORS, type QuoteNonceIssuer } from "./nonce.js";
import { type QuoteFacts, QuoteRefusal, verifyQuote } from "./quote-verifier.js";

/** What the token endpoint sends with a response so the next request can carry a quote. */
export interface AttestationChallenge {
  readonly nonce: string;
  /** `sha256:0,1,7` */
  readonly pcrs: string;
  readonly maxAgeSec: number;
}

/** The gate's verdict for a token request that may be issued. */
export interface GateResult {
  /** Present when a quote was verified: goes into the token as the `attested` claim. */
  readonly claim: AttestedClaim | undefined;
  /** The next nonce (attestable device in a group with a policy). */
  readonly challenge: AttestationChallenge | undefined;
}

type GateStore = Pick<
  RegistrarStore,
  | "getAttestationPolicy"
  | "getDevice"
  | "getDeviceAttestation"
  | "putDeviceAttestation"
  | "consumeOnce"
  | "appendAudit"
>;

export interface AttestationGateDeps {
  readonly store: GateStore;
  readonly nonces: QuoteNonceIssuer;
  readonly clock: Clock;
  readonly log?: Logger;
  /**
   * The token endpoint's cached device lookup (group and status): lets requests of groups without a
   * policy pass with no extra store read. Default: the store.
   */
  readonly directory?: {
    getDevice(id: string): Promise<{ readonly group: string; readonly status: string } | undefined>;
  };
  /** How long a group's policy is served from memory (default 1000 ms; approvals show up within it). */
  readonly policyCacheMs?: number;
}

const b = (s: string): Buffer => Buffer.from(s, "base64url");
const hexMap = (r: Readonly<Record<string, string>>): Map<number, Uint8Array> =>
  new Map(Object.entries(r).map(([k, v]) => [Number(k), new Uint8Array(Buffer.from(v, "hex"))]));

/** A challenge flattened into M2mError details (which hold primitives only). */
export function challengeDetails(c: AttestationChallenge | undefined): Record<string, string | number> {
  return c === undefined
    ? {}
    : { challengeNonce: c.nonce, challengePcrs: c.pcrs, challengeMaxAge: c.maxAgeSec };
}

/** The challenge carried by an error from this gate, if any. */
export function challengeOf(err: unknown): AttestationChallenge | undefined {
  if (!(err instanceof M2mError)) return undefined;
  const d = err.details;
  if (typeof d.challengeNonce !== "string" || typeof d.challengePcrs !== "string") return undefined;
  return { nonce: d.challengeNonce, pcrs: d.challengePcrs, maxAgeSec: Number(d.challengeMaxAge) };
}

/** A token-endpoint refusal carrying the OAuth error, a device-safe reason and the next challenge. */
export function attestationRefusal(
  code: ErrorCode,
  oauthError: OAuthErrorValue,
  reason: string,
  challenge: AttestationChallenge | undefined,
  cause?: unknown,
): M2mError {
  return new M2mError(code, "permanent", reason, {
    details: { oauthError, ...challengeDetails(challenge) },
    ...(cause === undefined ? {} : { cause }),
  });
}

/** The evidence on record a device needs to quote: its enrolled AK and EK. */
function quoteKeys(device: DeviceRecord): { ak: Uint8Array; ek: Uint8Array } | undefined {
  const ev = device.evidence;
  if (device.method !== "tpm" || ev === undefined) return undefined;
  const ak = ev.akPublic;
  const ek = ev.ekPublic;
  if (typeof ak !== "string" || typeof ek !== "string") return undefined;
  return { ak: b(ak), ek: b(ek) };
}

/**
 * Continuous attestation at the token endpoint (docs/attestation.md). For a device whose group has an
 * attestation policy: hands out nonces, verifies the quote a token request carries (quote-verifier.ts),
 * records the outcome per device (latest PCRs, clock state, anomaly flag), audits refusals, and returns
 * the `attested` claim. Devices that cannot quote follow the policy's `nonAttestable` rule.
 */
export class AttestationGate {
  readonly #deps: AttestationGateDeps;
  readonly #log: Logger;
  readonly #policies = new Map<string, { at: number; policy: AttestationPolicy | undefined }>();

  constructor(deps: AttestationGateDeps) {
    this.#deps = deps;
    this.#log = deps.log ?? silentLogger;
  }

  async #policy(group: string): Promise<AttestationPolicy | undefined> {
    const now = this.#deps.clock.monotonicMs();
    const hit = this.#policies.get(group);
    if (hit !== undefined && now - hit.at < (this.#deps.policyCacheMs ?? 1000)) return hit.policy;
    const policy = await this.#deps.store.getAttestationPolicy(group);
    if (this.#policies.size > 10_000) this.#policies.clear();
    this.#policies.set(group, { at: now, policy });
    return policy;
  }

  #challenge(deviceId: string, policy: AttestationPolicy): AttestationChallenge {
    return {
      nonce: this.#deps.nonces.issue(deviceId),
      pcrs: formatPcrSelection(policy.selection),
      maxAgeSec: policy.maxQuoteAgeSec,
    };
  }

  /**
   * Before client authentication, for a request without evidence: the challenge to answer with when
   * the device (by its claimed client_id) must quote. Undefined when no quote is needed (the request
   * then goes on and is decided as usual). Issuing is stateless: an unauthenticated caller learns a
   * nonce only the device's AK can use.
   */
  async challengeIfRequired(clientId: string | null): Promise<AttestationChallenge | undefined> {
    if (clientId === null || clientId.length > 128) return undefined;
    const cached = await (this.#deps.directory ?? this.#deps.store).getDevice(clientId);
    if (cached === undefined || cached.status !== "active") return undefined;
    const policy = await this.#policy(cached.group);
    if (policy === undefined || !policy.requireForTokens) return undefined;
    const device = await this.#deps.store.getDevice(clientId);
    if (device === undefined || quoteKeys(device) === undefined) return undefined;
    return this.#challenge(device.deviceId, policy);
  }

  /**
   * Decides an authenticated token request. @returns the claim (if a quote was verified) and the next
   * challenge. @throws M2mError with `details.oauthError` (`use_attestation_nonce` or
   * `attestation_failed`), a device-safe one-line message and `details.challenge`.
   */
  async evaluate(deviceId: string, group: string, evidenceParam: string | null): Promise<GateResult> {
    // Groups without a policy cost one cached lookup, no store read.
    const policy = await this.#policy(group);
    if (policy === undefined) return { claim: undefined, challenge: undefined };
    const device = await this.#deps.store.getDevice(deviceId);
    if (device === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", "no such device");
    const keys = quoteKeys(device);
    if (keys === undefined) {
      // Why: a PKCS#11 key (or a record without an AK) cannot prove platform state; the operator's
      // policy decides whether such devices get tokens without the claim or none.
      if (policy.requireForTokens && policy.nonAttestable === "refuse") {
        await this.#audit(device, "ERR_ATTESTATION_NOT_ATTESTABLE", "the device cannot quote");
        throw attestationRefusal(
          "ERR_ATTESTATION_NOT_ATTESTABLE",
          ATTESTATION_OAUTH_ERRORS.failed,
          "this device cannot attest and its group requires attestation",
          undefined,
        );
      }
      return { claim: undefined, challenge: undefined };
    }
    const next = this.#challenge(device.deviceId, policy);
    if (evidenceParam === null) {
      if (!policy.requireForTokens) return { claim: undefined, challenge: next };
      throw attestationRefusal(
        "ERR_QUOTE_NONCE_REQUIRED",
        ATTESTATION_OAUTH_ERRORS.useNonce,
        "a TPM quote with the attestation nonce is required",
        next,
      );
    }
    const evidence = parseEvidence(evidenceParam, next);
    let nonce: ReturnType<QuoteNonceIssuer["check"]>;
    try {
      nonce = this.#deps.nonces.check(evidence.nonce, device.deviceId, policy.maxQuoteAgeSec);
    } catch (err) {
      // A stale or foreign nonce is routine (a cached nonce outlived max-age): answer with a fresh one.
      const code = err instanceof M2mError ? err.code : QUOTE_NONCE_ERRORS.INVALID;
      this.#log.info("attestation nonce refused", { deviceId, code });
      throw attestationRefusal(
        code,
        ATTESTATION_OAUTH_ERRORS.useNonce,
        "the attestation nonce is not valid",
        next,
        err,
      );
    }
    const now = this.#deps.clock.now();
    // Why: single use across replicas; consumed before verification so two concurrent presentations of
    // one quote cannot both pass.
    const fresh = await this.#deps.store.consumeOnce(
      nonce.onceKey,
      new Date((nonce.issuedAt + policy.maxQuoteAgeSec + 60) * 1000),
      now,
    );
    const prev = await this.#deps.store.getDeviceAttestation(device.deviceId);
    if (!fresh) {
      return this.#refuse(
        device,
        policy,
        prev,
        new QuoteRefusal(QUOTE_NONCE_ERRORS.REPLAYED, "the attestation nonce was already used"),
        next,
      );
    }
    let facts: QuoteFacts;
    try {
      facts = verifyQuote({
        akPublic: keys.ak,
        ekPublic: keys.ek,
        quote: b(evidence.quote),
        signature: b(evidence.signature),
        qualifyingData: nonce.qualifyingData,
        selection: policy.selection,
        reported: hexMap(evidence.pcrs.values),
        reportedBank: evidence.pcrs.bank,
        golden: policy.golden === undefined ? undefined : hexMap(policy.golden),
        previousClock: prev?.clock,
        eventLog: evidence.eventLog === undefined ? undefined : b(evidence.eventLog),
      });
    } catch (err) {
      if (err instanceof QuoteRefusal) return this.#refuse(device, policy, prev, err, next, evidence);
      throw err;
    }
    const record: DeviceAttestation = {
      deviceId: device.deviceId,
      at: now,
      outcome: "verified",
      code: undefined,
      reason: undefined,
      policyVersion: policy.version,
      bank: evidence.pcrs.bank,
      pcrs: evidence.pcrs.values,
      differing: [],
      clock: facts.clock,
      eventLog: evidence.eventLog,
      lastVerifiedAt: now,
      anomaly: undefined,
      reboots: (prev?.reboots ?? 0) + (facts.reboot === "none" ? 0 : 1),
    };
    await this.#deps.store.putDeviceAttestation(record);
    if (prev?.anomaly !== undefined || facts.reboot !== "none") {
      await this.#deps.store.appendAudit({
        ts: now.toISOString(),
        event: facts.reboot !== "none" ? "attestation.reboot" : "attestation.recovered",
        outcome: "success",
        deviceId: device.deviceId,
        group: device.group,
        policy: `${policy.group}#${policy.version}`,
        ...(facts.reboot === "none" ? {} : { reboot: facts.reboot }),
      });
    }
    return {
      claim: { at: Math.floor(now.getTime() / 1000), policy: `${policy.group}#${policy.version}` },
      challenge: next,
    };
  }

  /** Records the refusal (anomaly flag, latest authentic PCRs), audits it, and throws the OAuth error. */
  async #refuse(
    device: DeviceRecord,
    policy: AttestationPolicy,
    prev: DeviceAttestation | undefined,
    err: QuoteRefusal,
    next: AttestationChallenge,
    evidence?: AttestationEvidence,
  ): Promise<never> {
    const now = this.#deps.clock.now();
    const facts = err.facts;
    const record: DeviceAttestation = {
      deviceId: device.deviceId,
      at: now,
      outcome: "refused",
      code: err.code,
      reason: err.message,
      policyVersion: policy.version,
      // Only an authentic quote's values and clock are kept (they are the TPM's, not the agent's claim).
      bank: facts === undefined ? prev?.bank : evidence?.pcrs.bank,
      pcrs: facts === undefined ? prev?.pcrs : evidence?.pcrs.values,
      differing: err.pcrs,
      clock: facts?.clock ?? prev?.clock,
      eventLog:
        facts?.eventLog !== undefined && err.code !== "ERR_EVENTLOG_REPLAY"
          ? evidence?.eventLog
          : prev?.eventLog,
      lastVerifiedAt: prev?.lastVerifiedAt,
      anomaly: { code: err.code, reason: err.message, at: now },
      reboots: (prev?.reboots ?? 0) + (facts === undefined || facts.reboot === "none" ? 0 : 1),
    };
    await this.#deps.store.putDeviceAttestation(record);
    await this.#audit(device, err.code, err.message, err.pcrs);
    this.#log.warn("attestation refused", {
      deviceId: device.deviceId,
      group: device.group,
      code: err.code,
      reason: err.message,
      error: err,
    });
    throw attestationRefusal(err.code, ATTESTATION_OAUTH_ERRORS.failed, err.message, next, err);
  }

  async #audit(
    device: DeviceRecord,
    code: string,
    reason: string,
    pcrs: readonly number[] = [],
  ): Promise<void> {
    await this.#deps.store.appendAudit({
      ts: this.#deps.clock.now().toISOString(),
      event: "attestation.refused",
      outcome: "failure",
      code,
      deviceId: device.deviceId,
      group: device.group,
      reason,
      ...(pcrs.length === 0 ? {} : { pcrs: [...pcrs] }),
    });
  }
}

function parseEvidence(param: string, next: AttestationChallenge): AttestationEvidence {
  const bad = (cause?: unknown) =>
    attestationRefusal(
      "ERR_QUOTE_MALFORMED",
      "invalid_request",
      "the attestation parameter is malformed",
      next,
      cause,
    );
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(param, "base64url").toString("utf8"));
  } catch (err) {
    throw bad(err);
  }
  const parsed = attestationEvidenceSchema.safeParse(json);
  if (!parsed.success) throw bad(parsed.error);
  return parsed.data;
}
