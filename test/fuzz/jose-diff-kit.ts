import { createHash, createHmac, generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import fc from "fast-check";
import { decodeJwt, EmbeddedJWK, type JWK, jwtVerify } from "jose";
import { ManualClock } from "../../src/core/clock.js";
import { isM2mError } from "../../src/core/errors.js";
import { verifyClientAssertion } from "../../src/registrar/oauth/client-assertion.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { verifyDpopProof } from "../../src/registrar/oauth/dpop-verify.js";
import { ALLOWED_ALGS } from "../../src/registrar/oauth/jws-util.js";
import { ReplayCache } from "../../src/registrar/oauth/replay-cache.js";

/**
 * Differential testing of the registrar's own JOSE verification (client assertions, DPoP proofs)
 * against `jose` v6 configured the same way. Shared by the CI test (test/fuzz/jose-differential.test.ts,
 * a few thousand cases) and the long run (`npm run fuzz:jose`, JOSE_FUZZ_RUNS cases).
 *
 * A case is a *recipe* (plain data, so fast-check can shrink and print it): header and claims objects,
 * how their JSON and base64url are spelt, which key signs with which algorithm, and one mutation after
 * signing. `build()` turns it into a compact JWS; both verifiers then decide.
 */

// ------------------------------------------------------------------------------------------- setup

/** 2026-03-01T12:00:00Z: the fixed "now" of every case. */
export const NOW = 1_772_366_400;
export const ISSUER = "https://registrar.test";
export const TOKEN_URL = `${ISSUER}/oauth2/token`;
/** Same policy on both sides (the registrar's defaults). */
export const SKEW_SEC = 30;
export const ASSERTION_MAX_LIFETIME_SEC = 300;
export const DPOP_MAX_AGE_SEC = 60;
export const ACCESS_TOKEN = "at-0123456789abcdef";

type KeyPair = { publicKey: KeyObject; privateKey: KeyObject };
const ec = generateKeyPairSync("ec", { namedCurve: "P-256" });
const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
export const KEYS = {
  ec,
  rsa,
  ec2: generateKeyPairSync("ec", { namedCurve: "P-256" }),
  p384: generateKeyPairSync("ec", { namedCurve: "P-384" }),
  rsa1024: generateKeyPairSync("rsa", { modulusLength: 1024 }),
} satisfies Record<string, KeyPair>;
export type KeySlot = keyof typeof KEYS;

export function publicJwkOf(slot: KeySlot): JWK {
  const j = KEYS[slot].publicKey.export({ format: "jwk" }) as JWK;
  return j.kty === "EC" ? { kty: "EC", crv: j.crv, x: j.x, y: j.y } : { kty: "RSA", n: j.n, e: j.e };
}
const privateJwkOf = (slot: KeySlot): JWK => KEYS[slot].privateKey.export({ format: "jwk" }) as JWK;

/** Registered clients: one EC and one RSA device (the registrar's directory and jose's key lookup). */
export const DEVICE_OF: Readonly<Record<"ec" | "rsa", string>> = { ec: "dev-ec", rsa: "dev-rsa" };
export const directory = new InMemoryDeviceDirectory();
for (const slot of ["ec", "rsa"] as const) {
  directory.put({
    deviceId: DEVICE_OF[slot],
    status: "active",
    role: "r",
    attributes: {},
    publicJwk: publicJwkOf(slot),
    group: "g",
  });
}

// ------------------------------------------------------------------------------------------ recipe

/** How a JSON object is spelt: every style but "canonical" re-encodes it (same meaning or not). */
export type JsonStyle =
  | "canonical"
  | "spaced"
  | "unicodeEscapes"
  | "dupKeyFirst"
  | "dupKeyLast"
  | "bom"
  | "badUtf8"
  | "validUtf8"
  | "loneSurrogateEscape"
  | "trailingGarbage"
  | "array"
  | "hugeNumber"
  | "numberRespelt";
export const BAD_UTF8 = [
  [0xff],
  [0x80],
  [0xc0, 0xaf],
  [0xed, 0xa0, 0x80],
  [0xf4, 0x90, 0x80, 0x80],
  [0xe2, 0x82],
];

/** How one base64url segment is spelt (header/claims: before signing; signature: after). */
export type B64Style = "padded" | "plusSlash" | "space" | "newline" | "trailingBits" | "invalidChar";

export type SignAlg = "ES256" | "ES256-DER" | "RS256" | "PS256" | "PS256-salt0" | "HS256-pubkey" | "none";

export type PostMutation =
  | { readonly op: "none" }
  | { readonly op: "flipBit"; readonly seg: 0 | 1 | 2; readonly at: number; readonly bit: number }
  | { readonly op: "flipChar"; readonly at: number }
  | { readonly op: "swap"; readonly a: 0 | 1 | 2; readonly b: 0 | 1 | 2 }
  | { readonly op: "emptySig" }
  | { readonly op: "truncSig" }
  | { readonly op: "extendSig" }
  | { readonly op: "extraSegment" }
  | { readonly op: "twoSegments" }
  | { readonly op: "surroundingSpace" };

export interface Recipe {
  readonly kind: "assertion" | "dpop";
  /** Assertion: the client (device) key; DPoP: the key embedded as `jwk`. */
  readonly keySlot: KeySlot;
  /** The key that actually signs (usually keySlot). */
  readonly signSlot: KeySlot;
  readonly signAlg: SignAlg;
  readonly header: Readonly<Record<string, unknown>>;
  readonly claims: Readonly<Record<string, unknown>>;
  readonly headerStyle: JsonStyle;
  readonly claimsStyle: JsonStyle;
  readonly styleArg: number;
  readonly b64: { readonly seg: 0 | 1 | 2; readonly style: B64Style } | null;
  readonly post: PostMutation;
  /** DPoP only: the access token presented with the proof (ath must match). */
  readonly accessToken: string | null;
  /** DPoP only: the request URL the server sees. */
  readonly requestUrl: string;
}

/** Placeholder in a DPoP header: replaced by the public JWK of `keySlot` plus `jwkExtra`. */
export const JWK_SLOT = "<jwk of keySlot>";

const b64u = (b: Uint8Array): string => Buffer.from(b).toString("base64url");

function lastQuote(bytes: Uint8Array): number {
  return bytes.lastIndexOf(0x22);
}

function insertAt(bytes: Uint8Array, at: number, ins: readonly number[]): Uint8Array {
  if (at < 0) return Uint8Array.from([...bytes, ...ins]);
  return Uint8Array.from([...bytes.subarray(0, at), ...ins, ...bytes.subarray(at)]);
}

export function spell(obj: Readonly<Record<string, unknown>>, style: JsonStyle, arg: number): Uint8Array {
  const text = JSON.stringify(obj);
  const utf8 = (s: string): Uint8Array => new Uint8Array(Buffer.from(s, "utf8"));
  const keys = Object.keys(obj);
  const someKey = keys[arg % Math.max(1, keys.length)];
  switch (style) {
    case "canonical":
      return utf8(text);
    case "spaced":
      return utf8(` ${JSON.stringify(obj, null, 1 + (arg % 3))}\n\t`);
    case "unicodeEscapes":
      return utf8(
        text.replace(/"((?:[^"\\]|\\.)*)"/g, (_m, inner: string) => {
          const esc = inner.replace(
            /[A-Za-z]/g,
            (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
          );
          return `"${esc}"`;
        }),
      );
    case "dupKeyFirst":
    case "dupKeyLast": {
      if (someKey === undefined) return utf8(text);
      const decoy = JSON.stringify([null, 1, "none", NOW - 10_000, ["x"], {}][arg % 6]);
      const member = `${JSON.stringify(someKey)}:${decoy}`;
      return utf8(
        style === "dupKeyFirst" ? `{${member},${text.slice(1)}` : `${text.slice(0, -1)},${member}}`,
      );
    }
    case "bom":
      return Uint8Array.from([0xef, 0xbb, 0xbf, ...utf8(text)]);
    case "badUtf8": {
      const b = utf8(text);
      return insertAt(b, lastQuote(b), BAD_UTF8[arg % BAD_UTF8.length] ?? [0xff]);
    }
    case "validUtf8": {
      const b = utf8(text);
      return insertAt(b, lastQuote(b), [...utf8(["é", "€", "😀", "\u2028"][arg % 4] ?? "é")]);
    }
    case "loneSurrogateEscape": {
      const b = utf8(text);
      return insertAt(b, lastQuote(b), [...utf8("\\ud800")]);
    }
    case "trailingGarbage":
      return utf8(`${text}${[" x", "\u0000", "}", "[]"][arg % 4]}`);
    case "array":
      return utf8(`[${text}]`);
    case "hugeNumber": {
      // A JSON number beyond a double parses to Infinity (JSON.stringify cannot write one).
      const nums = [...text.matchAll(/:(-?\d+(?:\.\d+)?)(?=[,}])/g)];
      const m = nums[arg % Math.max(1, nums.length)];
      if (m?.index === undefined) return utf8(text);
      return utf8(
        `${text.slice(0, m.index)}:${arg % 2 === 0 ? "1e400" : "-1e400"}${text.slice(m.index + m[0].length)}`,
      );
    }
    case "numberRespelt":
      // Same values, other spellings: 1772366400 as 1772366400.0, 1.7723664e9, 17723664000E-1.
      return utf8(
        text.replace(/:(\d+)(?=[,}])/g, (_m, n: string) => `:${[`${n}.0`, `${n}e0`, `${n}0E-1`][arg % 3]}`),
      );
  }
}

function respell(seg: string, style: B64Style, arg: number): string {
  const mid = seg.length === 0 ? 0 : arg % seg.length;
  switch (style) {
    case "padded":
      return seg + "=".repeat((4 - (seg.length % 4)) % 4 || 2);
    case "plusSlash":
      return seg.replace(/-/g, "+").replace(/_/g, "/");
    case "space":
      return `${seg.slice(0, mid)} ${seg.slice(mid)}`;
    case "newline":
      return `${seg.slice(0, mid)}\n${seg.slice(mid)}`;
    case "trailingBits": {
      const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
      const last = seg.at(-1);
      if (last === undefined || seg.length % 4 === 0) return seg;
      // Why this spelling: the final character's low bits are padding bits; setting one gives a
      // non-canonical spelling of the same bytes (lenient decoders ignore it).
      return seg.slice(0, -1) + alphabet[alphabet.indexOf(last) | 1];
    }
    case "invalidChar":
      return `${seg.slice(0, mid)}!${seg.slice(mid)}`;
  }
}

function signInput(input: string, r: Recipe): string {
  const priv = KEYS[r.signSlot].privateKey;
  const data = Buffer.from(input, "latin1");
  switch (r.signAlg) {
    case "ES256":
      return b64u(sign("sha256", data, { key: priv, dsaEncoding: "ieee-p1363" }));
    case "ES256-DER":
      return b64u(sign("sha256", data, { key: priv, dsaEncoding: "der" }));
    case "RS256":
      return b64u(sign("sha256", data, { key: priv }));
    case "PS256":
      return b64u(sign("sha256", data, { key: priv, padding: 6, saltLength: 32 }));
    case "PS256-salt0":
      return b64u(sign("sha256", data, { key: priv, padding: 6, saltLength: 0 }));
    case "HS256-pubkey": {
      // The classic alg-confusion forgery: HMAC keyed with the victim's public key.
      const secret = Buffer.from(JSON.stringify(publicJwkOf(r.keySlot)));
      return b64u(createHmac("sha256", secret).update(input).digest());
    }
    case "none":
      return "";
  }
}

function resolveHeader(r: Recipe): Record<string, unknown> {
  const h: Record<string, unknown> = { ...r.header };
  if (h.jwk === JWK_SLOT)
    h.jwk = { ...publicJwkOf(r.keySlot), ...((h.jwkExtra as object | undefined) ?? {}) };
  else if (h.jwk === "<private jwk>") h.jwk = privateJwkOf(r.keySlot);
  delete h.jwkExtra;
  return h;
}

/** The compact JWS a recipe describes. */
export function build(r: Recipe): string {
  let h = b64u(spell(resolveHeader(r), r.headerStyle, r.styleArg));
  let p = b64u(spell(r.claims, r.claimsStyle, r.styleArg));
  if (r.b64 !== null && r.b64.seg === 0) h = respell(h, r.b64.style, r.styleArg);
  if (r.b64 !== null && r.b64.seg === 1) p = respell(p, r.b64.style, r.styleArg);
  let s = signInput(`${h}.${p}`, r);
  if (r.b64 !== null && r.b64.seg === 2) s = respell(s, r.b64.style, r.styleArg);
  const segs = [h, p, s];
  const post = r.post;
  switch (post.op) {
    case "none":
      break;
    case "flipBit": {
      const bytes = Buffer.from(segs[post.seg] ?? "", "base64url");
      if (bytes.length > 0) {
        const i = post.at % bytes.length;
        bytes[i] = (bytes[i] ?? 0) ^ (1 << post.bit);
      }
      segs[post.seg] = bytes.toString("base64url");
      break;
    }
    case "flipChar": {
      const all = segs.join(".");
      const i = post.at % all.length;
      const c = all.charCodeAt(i);
      const flipped = c === 0x2e ? "A" : String.fromCharCode(c === 0x41 ? 0x42 : 0x41);
      return all.slice(0, i) + flipped + all.slice(i + 1);
    }
    case "swap": {
      const t = segs[post.a] ?? "";
      segs[post.a] = segs[post.b] ?? "";
      segs[post.b] = t;
      break;
    }
    case "emptySig":
      segs[2] = "";
      break;
    case "truncSig":
      segs[2] = Buffer.from(segs[2] ?? "", "base64url")
        .subarray(0, -1)
        .toString("base64url");
      break;
    case "extendSig":
      segs[2] = Buffer.concat([Buffer.from(segs[2] ?? "", "base64url"), Buffer.of(0)]).toString("base64url");
      break;
    case "extraSegment":
      segs.push(segs[2] ?? "");
      break;
    case "twoSegments":
      segs.pop();
      break;
    case "surroundingSpace":
      return ` ${segs.join(".")}\n`;
  }
  return segs.join(".");
}

// --------------------------------------------------------------------------------------- arbitraries

/** The base value most of the time (so many cases are valid), one of the variants otherwise. */
function mostly<T>(base: T, ...variants: T[]): fc.Arbitrary<T> {
  return fc.oneof(
    { weight: 7, arbitrary: fc.constant(base) },
    { weight: 1, arbitrary: fc.constantFrom(...variants) },
  );
}
/** As `mostly`, rarer variants (header members: several of them, each would otherwise drown the rest). */
function rarely<T>(base: T, ...variants: T[]): fc.Arbitrary<T> {
  return fc.oneof(
    { weight: 20, arbitrary: fc.constant(base) },
    { weight: 1, arbitrary: fc.constantFrom(...variants) },
  );
}
const ABSENT = "<absent>";
/** Drops members whose value is the ABSENT marker. */
function present(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== ABSENT));
}
const rel = (deltas: readonly number[]): unknown[] => deltas.map((d) => NOW + d);

const styleArb: fc.Arbitrary<JsonStyle> = mostly<JsonStyle>(
  "canonical",
  "spaced",
  "unicodeEscapes",
  "dupKeyFirst",
  "dupKeyLast",
  "bom",
  "badUtf8",
  "badUtf8",
  "validUtf8",
  "loneSurrogateEscape",
  "trailingGarbage",
  "array",
  "hugeNumber",
  "hugeNumber",
  "numberRespelt",
);
const b64Arb = fc.oneof(
  { weight: 12, arbitrary: fc.constant(null) },
  {
    weight: 1,
    arbitrary: fc.record({
      seg: fc.constantFrom<0 | 1 | 2>(0, 1, 2),
      style: fc.constantFrom<B64Style>(
        "padded",
        "plusSlash",
        "space",
        "newline",
        "trailingBits",
        "invalidChar",
      ),
    }),
  },
);
const postArb: fc.Arbitrary<PostMutation> = fc.oneof(
  { weight: 14, arbitrary: fc.constant<PostMutation>({ op: "none" }) },
  {
    weight: 3,
    arbitrary: fc.record({
      op: fc.constant("flipBit" as const),
      seg: fc.constantFrom<0 | 1 | 2>(0, 1, 2),
      at: fc.nat(),
      bit: fc.integer({ min: 0, max: 7 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("flipChar" as const), at: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.constantFrom<PostMutation>(
      { op: "swap", a: 0, b: 1 },
      { op: "swap", a: 1, b: 2 },
      { op: "swap", a: 0, b: 2 },
      { op: "emptySig" },
      { op: "truncSig" },
      { op: "extendSig" },
      { op: "extraSegment" },
      { op: "twoSegments" },
      { op: "surroundingSpace" },
    ),
  },
);
const jtiArb = mostly<unknown>("jti-0123456789abcdef", ABSENT, "short", "", 12345, "x".repeat(300), null, [
  "a",
]);

/** The natural algorithm for a key slot, and a few wrong ones. */
function algsFor(slot: KeySlot): fc.Arbitrary<{ alg: string; signAlg: SignAlg }> {
  const natural =
    slot === "rsa" || slot === "rsa1024"
      ? fc.constantFrom(
          { alg: "RS256", signAlg: "RS256" as SignAlg },
          { alg: "PS256", signAlg: "PS256" as SignAlg },
        )
      : fc.constant({ alg: "ES256", signAlg: "ES256" as SignAlg });
  const wrong = fc.constantFrom<{ alg: string; signAlg: SignAlg }>(
    { alg: "ES256", signAlg: "ES256-DER" },
    { alg: "PS256", signAlg: "PS256-salt0" },
    { alg: "RS256", signAlg: "PS256" },
    { alg: "PS256", signAlg: "RS256" },
    { alg: "HS256", signAlg: "HS256-pubkey" },
    { alg: "none", signAlg: "none" },
    { alg: "ES384", signAlg: "ES256" },
    { alg: "es256", signAlg: "ES256" },
    { alg: "RS256", signAlg: "RS256" },
    { alg: "ES256", signAlg: "ES256" },
  );
  return fc.oneof({ weight: 8, arbitrary: natural }, { weight: 1, arbitrary: wrong });
}

const common = {
  headerStyle: styleArb,
  claimsStyle: styleArb,
  styleArg: fc.nat({ max: 1000 }),
  b64: b64Arb,
  post: postArb,
};

export const assertionRecipe: fc.Arbitrary<Recipe> = fc
  .tuple(
    mostly<KeySlot>("ec", "rsa", "ec", "rsa"),
    mostly<"same" | KeySlot>("same", "ec2", "rsa", "ec", "p384"),
  )
  .chain(([keySlot, sign]) => {
    const signSlot: KeySlot = sign === "same" ? keySlot : sign;
    const dev = DEVICE_OF[keySlot === "rsa" ? "rsa" : "ec"];
    const otherDev = DEVICE_OF[keySlot === "rsa" ? "ec" : "rsa"];
    return fc.record({
      kind: fc.constant("assertion" as const),
      keySlot: fc.constant(keySlot),
      signSlot: fc.constant(signSlot),
      algs: algsFor(signSlot),
      headerExtra: fc.record({
        typ: rarely<unknown>(ABSENT, "JWT", "dpop+jwt", "at+jwt", "application/at+jwt", "JOSE", 5),
        kid: rarely<unknown>(ABSENT, "k1", "", 7, "../../etc/passwd"),
        jwk: rarely<unknown>(ABSENT, publicJwkOf(keySlot), publicJwkOf("ec2")),
        jku: rarely<unknown>(ABSENT, "https://evil.test/jwks"),
        x5c: rarely<unknown>(ABSENT, ["MIIB"]),
        x5t: rarely<unknown>(ABSENT, "abc"),
        crit: rarely<unknown>(ABSENT, ["b64"], ["exp"], [], "b64", ["b64", "b64"]),
        b64: rarely<unknown>(ABSENT, true, false, "false"),
      }),
      claims: fc.record({
        iss: mostly<unknown>(dev, otherDev, ABSENT, "", "nobody", 5),
        sub: mostly<unknown>(dev, otherDev, ABSENT, "", "nobody", 5, null),
        aud: mostly<unknown>(
          TOKEN_URL,
          ISSUER,
          [TOKEN_URL],
          ["https://other.test", TOKEN_URL],
          ["https://other.test"],
          "https://other.test",
          [],
          ABSENT,
          5,
          [5, ISSUER],
          `${TOKEN_URL}/`,
          TOKEN_URL.toUpperCase(),
        ),
        exp: mostly<unknown>(
          NOW + 60,
          ...rel([-31, -30, -29, -1, 0, 1, 299, 300, 329, 330, 331, 10_000]),
          NOW - 29.5,
          NOW + 330.5,
          ABSENT,
          null,
          String(NOW + 60),
          1.7e308,
        ),
        iat: mostly<unknown>(
          NOW,
          ...rel([-331, -330, -329, -300, -60, 29, 30, 31]),
          NOW + 30.5,
          ABSENT,
          "now",
          null,
        ),
        nbf: mostly<unknown>(ABSENT, ...rel([-100, 0, 29, 30, 31]), NOW + 30.5, "later", null),
        jti: jtiArb,
        extra: mostly<unknown>(ABSENT, { nested: true }, "x".repeat(20_000)),
      }),
      ...common,
      accessToken: fc.constant(null),
      requestUrl: fc.constant(TOKEN_URL),
    });
  })
  .map((o) => ({
    kind: o.kind,
    keySlot: o.keySlot,
    signSlot: o.signSlot,
    signAlg: o.algs.signAlg,
    header: present({ alg: o.algs.alg, ...o.headerExtra }),
    claims: present(o.claims),
    headerStyle: o.headerStyle,
    claimsStyle: o.claimsStyle,
    styleArg: o.styleArg,
    b64: o.b64,
    post: o.post,
    accessToken: o.accessToken,
    requestUrl: o.requestUrl,
  }));

export const dpopRecipe: fc.Arbitrary<Recipe> = fc
  .tuple(
    mostly<KeySlot>("ec", "rsa", "ec", "rsa", "p384", "rsa1024", "ec2"),
    mostly<"same" | KeySlot>("same", "ec2", "rsa", "ec"),
  )
  .chain(([keySlot, sign]) => {
    const signSlot: KeySlot = sign === "same" ? keySlot : sign;
    return fc.record({
      kind: fc.constant("dpop" as const),
      keySlot: fc.constant(keySlot),
      signSlot: fc.constant(signSlot),
      algs: algsFor(signSlot),
      headerExtra: fc.record({
        typ: mostly<unknown>("dpop+jwt", "DPoP+JWT", "application/dpop+jwt", "JWT", ABSENT, "dpop+jwt ", 5),
        jwk: mostly<unknown>(JWK_SLOT, ABSENT, "<private jwk>", "a string", {
          kty: "OKP",
          crv: "Ed25519",
          x: "AA",
        }),
        jwkExtra: mostly<unknown>(
          ABSENT,
          { use: "sig" },
          { use: "enc" },
          { use: 1 },
          { alg: "ES256" },
          { alg: "RS256" },
          { alg: "PS256" },
          { alg: "ES384" },
          { key_ops: ["verify"] },
          { key_ops: ["sign"] },
          { key_ops: [] },
          { key_ops: ["verify", "sign"] },
          { key_ops: ["verify", "verify"] },
          { key_ops: "verify" },
          { key_ops: ["encrypt"] },
          { ext: true },
          { ext: false },
          { ext: "yes" },
          { kid: "k1", x5c: ["MIIB"] },
          { d: "" },
          { crv: "P-384" },
          { kty: "RSA" },
        ),
        kid: rarely<unknown>(ABSENT, "k1", 5),
        jku: rarely<unknown>(ABSENT, "https://evil.test/jwks"),
        x5c: rarely<unknown>(ABSENT, ["MIIB"]),
        x5u: rarely<unknown>(ABSENT, "https://evil.test/cert"),
        crit: rarely<unknown>(ABSENT, ["b64"], ["htm"], [], ["b64", "b64"]),
        b64: rarely<unknown>(ABSENT, true, false),
      }),
      claims: fc.record({
        jti: jtiArb,
        htm: mostly<unknown>("POST", "post", "GET", ABSENT, ["POST"], " POST"),
        htu: mostly<unknown>(
          TOKEN_URL,
          `${TOKEN_URL}?q=1`,
          `${TOKEN_URL}#frag`,
          "HTTPS://REGISTRAR.TEST/oauth2/token",
          "https://registrar.test:443/oauth2/token",
          "https://registrar.test:8443/oauth2/token",
          "https://user@registrar.test/oauth2/token",
          "https://user:pw@registrar.test/oauth2/token",
          `${TOKEN_URL}/`,
          "https://registrar.test/oauth2/x/../token",
          "https://registrar.test/OAUTH2/token",
          "https://registrar.test/oauth2/%74oken",
          "http://registrar.test/oauth2/token",
          "https://registrar.test./oauth2/token",
          "/oauth2/token",
          "not a url",
          ABSENT,
          5,
        ),
        iat: mostly<unknown>(
          NOW,
          ...rel([-91, -90, -89, -60, 29, 30, 31]),
          NOW - 90.5,
          NOW + 30.5,
          ABSENT,
          "now",
        ),
        exp: mostly<unknown>(ABSENT, ...rel([-31, -30, -29, 0, 60]), NOW - 29.5, "soon", null, 1.7e308),
        nbf: mostly<unknown>(ABSENT, ...rel([-10, 29, 30, 31]), NOW + 30.5, "later", null),
        ath: mostly<unknown>(
          ABSENT,
          createHash("sha256").update(ACCESS_TOKEN).digest("base64url"),
          createHash("sha256").update("other").digest("base64url"),
          5,
        ),
        nonce: mostly<unknown>(ABSENT, "n-1"),
      }),
      ...common,
      accessToken: mostly<string | null>(null, ACCESS_TOKEN),
      requestUrl: mostly(TOKEN_URL, `${TOKEN_URL}?x=1`, "https://registrar.test:443/oauth2/token"),
    });
  })
  .map((o) => {
    const claims = present(o.claims);
    // With an access token, a valid proof carries its ath: give it one most of the time.
    if (o.accessToken !== null && claims.ath === undefined && o.styleArg % 5 !== 0) {
      claims.ath = createHash("sha256").update(o.accessToken).digest("base64url");
    }
    return {
      kind: o.kind,
      keySlot: o.keySlot,
      signSlot: o.signSlot,
      signAlg: o.algs.signAlg,
      header: present({ alg: o.algs.alg, ...o.headerExtra }),
      claims,
      headerStyle: o.headerStyle,
      claimsStyle: o.claimsStyle,
      styleArg: o.styleArg,
      b64: o.b64,
      post: o.post,
      accessToken: o.accessToken,
      requestUrl: o.requestUrl,
    };
  });

export const anyRecipe: fc.Arbitrary<Recipe> = fc.oneof(assertionRecipe, dpopRecipe);

// ------------------------------------------------------------------------------------------ verdicts

export type Verdict = { readonly ok: true } | { readonly ok: false; readonly code: string };

const clock = new ManualClock(new Date(NOW * 1000));

/** The registrar's decision (fresh replay cache: replay is stateful and not what is compared). */
export async function registrarVerdict(r: Recipe, token: string): Promise<Verdict> {
  try {
    if (r.kind === "assertion") {
      await verifyClientAssertion(token, undefined, {
        directory,
        replay: new ReplayCache(),
        clock,
        policy: {
          audiences: [TOKEN_URL, ISSUER],
          maxLifetimeSec: ASSERTION_MAX_LIFETIME_SEC,
          skewSec: SKEW_SEC,
        },
      });
    } else {
      await verifyDpopProof(
        token,
        {
          method: "POST",
          url: r.requestUrl,
          ...(r.accessToken === null ? {} : { accessToken: r.accessToken }),
        },
        {
          replay: new ReplayCache(),
          clock,
          policy: { maxAgeSec: DPOP_MAX_AGE_SEC, skewSec: SKEW_SEC },
        },
      );
    }
    return { ok: true };
  } catch (err) {
    return { ok: false, code: isM2mError(err) ? err.code : `UNCODED:${String(err)}` };
  }
}

const currentDate = new Date(NOW * 1000);

/** RFC 9449 §4.3 item 9: htu equals the request URI, ignoring query and fragment. */
function htuMatches(htu: unknown, requestUrl: string): boolean {
  if (typeof htu !== "string") return false;
  try {
    const a = new URL(htu);
    const b = new URL(requestUrl);
    for (const u of [a, b]) {
      u.search = "";
      u.hash = "";
    }
    return a.href === b.href;
  } catch {
    return false;
  }
}

/**
 * jose's decision, configured as the registrar is: the same algorithms, audiences, issuer = subject =
 * the registered client, required claims, maximum age and clock tolerance; DPoP keys through
 * `EmbeddedJWK`, then the RFC 9449 checks jose does not know (htm, htu, ath).
 */
export async function joseVerdict(r: Recipe, token: string): Promise<Verdict> {
  const algorithms = [...ALLOWED_ALGS];
  try {
    if (r.kind === "assertion") {
      const sub = decodeJwt(token).sub;
      const device = typeof sub === "string" ? directory.getDevice(sub) : undefined;
      if (device === undefined || sub === undefined) return { ok: false, code: "unknown client" };
      await jwtVerify(token, device.publicJwk, {
        algorithms,
        issuer: sub,
        subject: sub,
        audience: [TOKEN_URL, ISSUER],
        requiredClaims: ["exp", "iat", "jti"],
        maxTokenAge: ASSERTION_MAX_LIFETIME_SEC,
        clockTolerance: SKEW_SEC,
        currentDate,
      });
      return { ok: true };
    }
    const { payload } = await jwtVerify(token, EmbeddedJWK, {
      algorithms,
      typ: "dpop+jwt",
      requiredClaims: ["iat", "jti", "htm", "htu"],
      maxTokenAge: DPOP_MAX_AGE_SEC,
      clockTolerance: SKEW_SEC,
      currentDate,
    });
    if (payload.htm !== "POST") return { ok: false, code: "htm" };
    if (!htuMatches(payload.htu, r.requestUrl)) return { ok: false, code: "htu" };
    if (r.accessToken !== null) {
      const ath = createHash("sha256").update(r.accessToken).digest("base64url");
      if (payload.ath !== ath) return { ok: false, code: "ath" };
    }
    return { ok: true };
  } catch (err) {
    return { ok: false, code: err instanceof Error ? ("code" in err && String(err.code)) || err.name : "?" };
  }
}

// ----------------------------------------------------------------------------------- fixed recipes

/** A valid client assertion by the EC device, with `over` applied. */
export function assertionCase(over: Partial<Recipe> = {}): Recipe {
  return {
    kind: "assertion",
    keySlot: "ec",
    signSlot: "ec",
    signAlg: "ES256",
    header: { alg: "ES256", typ: "JWT" },
    claims: {
      iss: DEVICE_OF.ec,
      sub: DEVICE_OF.ec,
      aud: TOKEN_URL,
      iat: NOW,
      exp: NOW + 60,
      jti: "jti-0123456789abcdef",
    },
    headerStyle: "canonical",
    claimsStyle: "canonical",
    styleArg: 0,
    b64: null,
    post: { op: "none" },
    accessToken: null,
    requestUrl: TOKEN_URL,
    ...over,
  };
}

/** A valid DPoP proof with an embedded EC key, with `over` applied. */
export function dpopCase(over: Partial<Recipe> = {}): Recipe {
  return {
    kind: "dpop",
    keySlot: "ec",
    signSlot: "ec",
    signAlg: "ES256",
    header: { alg: "ES256", typ: "dpop+jwt", jwk: JWK_SLOT },
    claims: { jti: "jti-0123456789abcdef", htm: "POST", htu: TOKEN_URL, iat: NOW },
    headerStyle: "canonical",
    claimsStyle: "canonical",
    styleArg: 0,
    b64: null,
    post: { op: "none" },
    accessToken: null,
    requestUrl: TOKEN_URL,
    ...over,
  };
}

const dpopClaims = dpopCase().claims;
const dpopWithJwk = (jwkExtra: Record<string, unknown>, slot: KeySlot = "ec", alg = "ES256"): Recipe =>
  dpopCase({
    keySlot: slot,
    signSlot: slot,
    signAlg: alg as SignAlg,
    header: { alg, typ: "dpop+jwt", jwk: JWK_SLOT, jwkExtra },
  });

/**
 * The issue-15 cases (the registrar accepted them, jose refused), with the code the registrar must now
 * refuse each with. Run as regression tests and as fixed examples ahead of every differential run.
 */
export const ISSUE_15_CASES: ReadonlyArray<{ name: string; recipe: Recipe; code: string }> = [
  ...BAD_UTF8.flatMap((_bytes, i) => [
    {
      name: `assertion claims, bad UTF-8 #${i}`,
      recipe: assertionCase({ claimsStyle: "badUtf8", styleArg: i }),
      code: "ERR_ASSERTION_UTF8",
    },
    {
      name: `assertion header, bad UTF-8 #${i}`,
      recipe: assertionCase({ headerStyle: "badUtf8", styleArg: i }),
      code: "ERR_ASSERTION_UTF8",
    },
    {
      name: `DPoP claims, bad UTF-8 #${i}`,
      recipe: dpopCase({ claimsStyle: "badUtf8", styleArg: i }),
      code: "ERR_DPOP_UTF8",
    },
    {
      name: `DPoP header, bad UTF-8 #${i}`,
      recipe: dpopCase({ headerStyle: "badUtf8", styleArg: i }),
      code: "ERR_DPOP_UTF8",
    },
  ]),
  {
    name: "DPoP exp = now − tolerance",
    recipe: dpopCase({ claims: { ...dpopClaims, exp: NOW - SKEW_SEC } }),
    code: "ERR_DPOP_EXPIRED",
  },
  {
    name: "DPoP exp long past",
    recipe: dpopCase({ claims: { ...dpopClaims, exp: NOW - 3600 } }),
    code: "ERR_DPOP_EXPIRED",
  },
  {
    name: "DPoP exp not a number",
    recipe: dpopCase({ claims: { ...dpopClaims, exp: String(NOW + 60) } }),
    code: "ERR_DPOP_EXP",
  },
  {
    name: "DPoP nbf = now + tolerance + 1",
    recipe: dpopCase({ claims: { ...dpopClaims, nbf: NOW + SKEW_SEC + 1 } }),
    code: "ERR_DPOP_NBF",
  },
  {
    name: "DPoP nbf far future",
    recipe: dpopCase({ claims: { ...dpopClaims, nbf: NOW + 3600 } }),
    code: "ERR_DPOP_NBF",
  },
  {
    name: "DPoP nbf not a number",
    recipe: dpopCase({ claims: { ...dpopClaims, nbf: "later" } }),
    code: "ERR_DPOP_NBF",
  },
  { name: 'DPoP jwk use "enc"', recipe: dpopWithJwk({ use: "enc" }), code: "ERR_DPOP_JWK_USE" },
  { name: "DPoP jwk use not a string", recipe: dpopWithJwk({ use: 1 }), code: "ERR_DPOP_JWK_USE" },
  { name: "DPoP EC jwk with alg RS256", recipe: dpopWithJwk({ alg: "RS256" }), code: "ERR_DPOP_JWK_ALG" },
  { name: "DPoP EC jwk with alg ES384", recipe: dpopWithJwk({ alg: "ES384" }), code: "ERR_DPOP_JWK_ALG" },
  {
    name: "DPoP RSA jwk alg PS256, header RS256",
    recipe: dpopWithJwk({ alg: "PS256" }, "rsa", "RS256"),
    code: "ERR_DPOP_JWK_ALG",
  },
  {
    name: 'DPoP jwk key_ops ["sign"]',
    recipe: dpopWithJwk({ key_ops: ["sign"] }),
    code: "ERR_DPOP_JWK_KEY_OPS",
  },
  { name: "DPoP jwk key_ops []", recipe: dpopWithJwk({ key_ops: [] }), code: "ERR_DPOP_JWK_KEY_OPS" },
  {
    name: 'DPoP jwk key_ops ["encrypt"]',
    recipe: dpopWithJwk({ key_ops: ["encrypt"] }),
    code: "ERR_DPOP_JWK_KEY_OPS",
  },
  {
    name: 'DPoP jwk key_ops ["verify","sign"]',
    recipe: dpopWithJwk({ key_ops: ["verify", "sign"] }),
    code: "ERR_DPOP_JWK_KEY_OPS",
  },
  {
    name: 'DPoP jwk key_ops ["verify","verify"]',
    recipe: dpopWithJwk({ key_ops: ["verify", "verify"] }),
    code: "ERR_DPOP_JWK_KEY_OPS",
  },
  {
    name: 'DPoP jwk key_ops "verify" (not an array)',
    recipe: dpopWithJwk({ key_ops: "verify" }),
    code: "ERR_DPOP_JWK_KEY_OPS",
  },
  { name: 'DPoP jwk ext "yes"', recipe: dpopWithJwk({ ext: "yes" }), code: "ERR_DPOP_JWK" },
  {
    name: "DPoP htu with userinfo",
    recipe: dpopCase({ claims: { ...dpopClaims, htu: "https://user@registrar.test/oauth2/token" } }),
    code: "ERR_DPOP_HTU",
  },
];

/** Near-misses of ISSUE_15_CASES that both verifiers accept (the checks are not over-broad). */
export const ISSUE_15_CONTROLS: ReadonlyArray<{ name: string; recipe: Recipe }> = [
  {
    name: "assertion claims, valid multi-byte UTF-8",
    recipe: assertionCase({ claimsStyle: "validUtf8", styleArg: 2 }),
  },
  {
    name: "DPoP header, valid multi-byte UTF-8",
    recipe: dpopCase({ headerStyle: "validUtf8", styleArg: 1 }),
  },
  {
    name: "DPoP exp = now − tolerance + 1",
    recipe: dpopCase({ claims: { ...dpopClaims, exp: NOW - SKEW_SEC + 1 } }),
  },
  {
    name: "DPoP nbf = now + tolerance",
    recipe: dpopCase({ claims: { ...dpopClaims, nbf: NOW + SKEW_SEC } }),
  },
  { name: 'DPoP jwk use "sig"', recipe: dpopWithJwk({ use: "sig" }) },
  { name: "DPoP jwk alg ES256", recipe: dpopWithJwk({ alg: "ES256" }) },
  { name: "DPoP RSA jwk alg PS256, header PS256", recipe: dpopWithJwk({ alg: "PS256" }, "rsa", "PS256") },
  { name: 'DPoP jwk key_ops ["verify"]', recipe: dpopWithJwk({ key_ops: ["verify"] }) },
  { name: "DPoP jwk ext false", recipe: dpopWithJwk({ ext: false }) },
];
