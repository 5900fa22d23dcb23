import { describe, expect, it } from "vitest";
import { attestationLine } from "../../src/cli/agent/status.js";
import { buildQuoteCommand } from "../../src/keys/tpm/endorsement.js";
import type { AgentStatus } from "../../src/wire/v1/index.js";

describe("agent side of continuous attestation", () => {
  it("buildQuoteCommand: TPM2_Quote with one password session, inScheme NULL, one sha256 selection", () => {
    const qd = new Uint8Array(32).fill(0xaa);
    const cmd = Buffer.from(buildQuoteCommand(0x81000003, qd, 0x000b, [0, 1, 7, 23]));
    expect(cmd.readUInt16BE(0)).toBe(0x8002); // TPM_ST_SESSIONS
    expect(cmd.readUInt32BE(2)).toBe(cmd.length);
    expect(cmd.readUInt32BE(6)).toBe(0x158); // TPM_CC_Quote
    expect(cmd.readUInt32BE(10)).toBe(0x81000003);
    expect(cmd.readUInt32BE(14)).toBe(9); // authorization size: one TPM_RS_PW session
    expect(cmd.readUInt32BE(18)).toBe(0x40000009);
    let o = 27;
    expect(cmd.readUInt16BE(o)).toBe(32);
    expect(cmd.subarray(o + 2, o + 34).equals(Buffer.from(qd))).toBe(true);
    o += 34;
    expect(cmd.readUInt16BE(o)).toBe(0x0010); // TPM_ALG_NULL: the AK's own scheme
    expect(cmd.readUInt32BE(o + 2)).toBe(1); // one bank
    expect(cmd.readUInt16BE(o + 6)).toBe(0x000b);
    expect([...cmd.subarray(o + 8, o + 12)]).toEqual([3, 0b10000011, 0, 0b10000000]);
    expect(o + 12).toBe(cmd.length);
  });

  const status = (attestation: unknown): AgentStatus =>
    ({ stages: { credentials: { clientId: "d", attestation } } }) as unknown as AgentStatus;

  it("status: one line with the latest quote, its outcome and the last verified time", () => {
    expect(attestationLine(status(null))).toBe("no quote requested yet");
    expect(
      attestationLine(
        status({
          lastQuoteAt: "2026-12-06T20:00:00.000Z",
          selection: "sha256:0,7",
          result: "refused",
          code: "attestation_failed",
          detail: "PCR 7 differs from the policy",
          lastVerifiedAt: "2026-12-06T19:55:00.000Z",
        }),
      ),
    ).toBe(
      "last quote 2026-12-06T20:00:00.000Z over sha256:0,7: refused (attestation_failed: PCR 7 differs from the policy); last verified 2026-12-06T19:55:00.000Z",
    );
    expect(
      attestationLine(
        status({ lastQuoteAt: "2026-12-06T20:00:00.000Z", selection: "sha256:0,7", result: "verified" }),
      ),
    ).toBe("last quote 2026-12-06T20:00:00.000Z over sha256:0,7: verified");
    // A key that cannot quote: no line at all.
    expect(attestationLine({ stages: { credentials: {} } } as unknown as AgentStatus)).toBeUndefined();
  });
});
