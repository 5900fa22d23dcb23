import { createHash, generateKeyPairSync, randomBytes, sign } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { M2mError } from "../../src/core/errors.js";
import {
  pcrCompositeDigest,
  QUOTE_ERRORS,
  type QuoteInput,
  QuoteRefusal,
  selectionBitmap,
  verifyQuote,
} from "../../src/registrar/attestation/quote-verifier.js";
import { akQualifiedNameUnderEk } from "../../src/registrar/verifier/tpm-verifier.js";
import { encodeTpmsAttest, type TpmsAttest } from "../../src/tpm/attest.js";
import { TPMA_OBJECT as A, TPM_ALG, TPM_GENERATED_VALUE, TPM_ST } from "../../src/tpm/constants.js";
import { encodeEventLog, parseEventLog, replayEventLog } from "../../src/tpm/event-log.js";
import { encodeTpm2bPublic, publicAreaFromKey } from "../../src/tpm/public.js";
import { encodeTpmtSignature } from "../../src/tpm/signature.js";

/**
 * The event-log parser on random and mutated logs (only success or ERR_TPM_STRUCT_MALFORMED), and the
 * quote verifier's tamper table on software-signed quotes: each field flipped fails with its own code.
 */
const log = encodeEventLog(
  [TPM_ALG.SHA1, TPM_ALG.SHA256],
  [
    { pcrIndex: 0, eventType: 3, data: Buffer.concat([Buffer.from("StartupLocality\0"), Buffer.from([3])]) },
    { pcrIndex: 0, eventType: 0x80000008, data: Buffer.from("firmware") },
    { pcrIndex: 7, eventType: 0x800000e0, data: Buffer.from("secure boot") },
  ],
);

function malformedOr<T>(fn: () => T): T | undefined {
  try {
    return fn();
  } catch (err) {
    if (err instanceof M2mError && err.code === "ERR_TPM_STRUCT_MALFORMED") return undefined;
    throw new Error(
      `unexpected failure: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`,
    );
  }
}

describe("fuzz: event log parser", () => {
  it("parses and replays a valid log (StartupLocality sets PCR 0's initial value)", () => {
    const parsed = parseEventLog(log);
    expect(parsed.events).toHaveLength(3);
    const pcrs = replayEventLog(parsed, TPM_ALG.SHA256).pcrs;
    const init = Buffer.alloc(32);
    init[31] = 3;
    const d = createHash("sha256").update("firmware").digest();
    expect(Buffer.from(pcrs.get(0) ?? []).toString("hex")).toBe(
      createHash("sha256").update(init).update(d).digest("hex"),
    );
  });

  it("random bytes and mutated logs: success or ERR_TPM_STRUCT_MALFORMED, nothing else", () => {
    const mutated = fc
      .tuple(
        fc.array(fc.tuple(fc.nat(log.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        fc.nat(log.length),
      )
      .map(([flips, cut]) => {
        const b = Uint8Array.from(log);
        for (const [i, v] of flips) b[i] = v;
        return b.subarray(0, cut);
      });
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 512 }), mutated), (b) => {
        const parsed = malformedOr(() => parseEventLog(b));
        if (parsed !== undefined) malformedOr(() => replayEventLog(parsed, TPM_ALG.SHA256));
      }),
      { numRuns: 5000 },
    );
  });

  it("refuses absurd counts without allocating them", () => {
    const b = Uint8Array.from(log);
    // numberOfAlgorithms sits after signature(16)+platformClass(4)+4 version bytes in the header event.
    const off = 32 + 16 + 4 + 4;
    b.set([0xff, 0xff, 0xff, 0x7f], off);
    expect(() => parseEventLog(b)).toThrow(/numberOfAlgorithms/);
  });
});

describe("quote verifier tamper table (software AK)", () => {
  const ekPair = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const ek = publicAreaFromKey(ekPair.publicKey, {
    objectAttributes:
      A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.restricted | A.decrypt | A.adminWithPolicy,
    symmetric: { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB },
  });
  const akPair = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const ak = publicAreaFromKey(akPair.publicKey, {
    objectAttributes:
      A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.restricted | A.sign,
    scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 },
  });
  const values = [0, 7].map(() => new Uint8Array(randomBytes(32)));
  const nonce = new Uint8Array(randomBytes(32));
  const attest = (
    over: Partial<TpmsAttest> = {},
    quote: Partial<{ sel: number[]; digest: Uint8Array }> = {},
  ): TpmsAttest => ({
    magic: TPM_GENERATED_VALUE,
    type: TPM_ST.ATTEST_QUOTE,
    qualifiedSigner: akQualifiedNameUnderEk(ek, ak),
    extraData: nonce,
    clockInfo: { clock: 5000n, resetCount: 4, restartCount: 1, safe: 1 },
    firmwareVersion: 0n,
    attested: {
      kind: "quote",
      pcrSelect: [{ hash: TPM_ALG.SHA256, pcrSelect: selectionBitmap(quote.sel ?? [0, 7]) }],
      pcrDigest: quote.digest ?? pcrCompositeDigest("sha256", values),
    },
    ...over,
  });
  const input = (a: TpmsAttest, over: Partial<QuoteInput> = {}, signer = akPair.privateKey): QuoteInput => {
    const bytes = encodeTpmsAttest(a);
    const p1363 = sign("sha256", bytes, { key: signer, dsaEncoding: "ieee-p1363" });
    return {
      akPublic: encodeTpm2bPublic(ak),
      ekPublic: encodeTpm2bPublic(ek),
      quote: bytes,
      signature: encodeTpmtSignature({
        sigAlg: TPM_ALG.ECDSA,
        hashAlg: TPM_ALG.SHA256,
        r: p1363.subarray(0, 32),
        s: p1363.subarray(32),
      }),
      qualifyingData: nonce,
      selection: { bank: "sha256", pcrs: [0, 7] },
      reported: new Map([
        [0, values[0] ?? new Uint8Array()],
        [7, values[1] ?? new Uint8Array()],
      ]),
      reportedBank: "sha256",
      golden: new Map([
        [0, values[0] ?? new Uint8Array()],
        [7, values[1] ?? new Uint8Array()],
      ]),
      previousClock: { clock: "4000", resetCount: 4, restartCount: 1, safe: true },
      eventLog: undefined,
      ...over,
    };
  };
  const codeOf = (i: QuoteInput): string => {
    try {
      verifyQuote(i);
      return "ok";
    } catch (err) {
      expect(err).toBeInstanceOf(QuoteRefusal);
      return (err as QuoteRefusal).code;
    }
  };

  it("each tampered field fails with its own code; the honest quote passes", () => {
    const other = generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey;
    const golden7 = new Uint8Array(randomBytes(32));
    const table: [string, QuoteInput, string][] = [
      ["honest", input(attest()), "ok"],
      ["garbage quote", { ...input(attest()), quote: new Uint8Array([1, 2, 3]) }, QUOTE_ERRORS.MALFORMED],
      ["signed by another key", input(attest(), {}, other), QUOTE_ERRORS.SIGNATURE],
      ["magic", input(attest({ magic: 0xff544348 })), QUOTE_ERRORS.MAGIC],
      [
        "type certify",
        input(
          attest({
            type: TPM_ST.ATTEST_CERTIFY,
            attested: { kind: "certify", name: new Uint8Array(34), qualifiedName: new Uint8Array(34) },
          }),
        ),
        QUOTE_ERRORS.TYPE,
      ],
      ["signer", input(attest({ qualifiedSigner: new Uint8Array(34) })), QUOTE_ERRORS.SIGNER],
      ["nonce", input(attest({ extraData: new Uint8Array(32) })), QUOTE_ERRORS.NONCE],
      ["selection", input(attest({}, { sel: [0, 7, 8] })), QUOTE_ERRORS.PCR_SELECTION],
      [
        "reported value",
        input(attest(), {
          reported: new Map([
            [0, values[0] ?? new Uint8Array()],
            [7, golden7],
          ]),
        }),
        QUOTE_ERRORS.PCR_VALUES,
      ],
      [
        "reset count went down",
        input(attest({ clockInfo: { clock: 9000n, resetCount: 3, restartCount: 9, safe: 1 } })),
        QUOTE_ERRORS.CLOCK,
      ],
      [
        "clock went back in one boot",
        input(attest({ clockInfo: { clock: 3000n, resetCount: 4, restartCount: 1, safe: 1 } })),
        QUOTE_ERRORS.CLOCK,
      ],
      ["no golden values", input(attest(), { golden: undefined }), QUOTE_ERRORS.NO_GOLDEN],
      [
        "PCR 7 golden differs",
        input(attest(), {
          golden: new Map([
            [0, values[0] ?? new Uint8Array()],
            [7, golden7],
          ]),
        }),
        QUOTE_ERRORS.PCR_MISMATCH,
      ],
      [
        "event log garbage",
        input(attest(), { eventLog: new Uint8Array([9, 9, 9]) }),
        QUOTE_ERRORS.EVENTLOG_MALFORMED,
      ],
      ["event log replays to other values", input(attest(), { eventLog: log }), QUOTE_ERRORS.EVENTLOG_REPLAY],
    ];
    const got = table.map(([name, i]) => [name, codeOf(i)]);
    expect(got).toEqual(table.map(([name, , want]) => [name, want]));
    // A reboot (resetCount up, clock lower) is a new boot, not a rollback.
    expect(
      verifyQuote(input(attest({ clockInfo: { clock: 10n, resetCount: 5, restartCount: 0, safe: 1 } })))
        .reboot,
    ).toBe("reset");
  });
});
