/**
 * RFC 7512 `pkcs11:` URIs. Path attribute values are percent-encoded except for the characters RFC 7512
 * allows literally in a path value (`pk11-pchar`): unreserved (ALPHA DIGIT - . _ ~) and
 * `: [ ] @ ! $ ' ( ) * + , =`. `;` `/` `?` `&` `#` `%` and space are always encoded. Non-ASCII is
 * encoded as its UTF-8 bytes. `id` is raw bytes and is percent-encoded entirely (RFC 7512 §2.3).
 */

const PCHAR_LITERAL = /^[A-Za-z0-9\-._~:[\]@!$'()*+,=]$/;

function hex2(b: number): string {
  return `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
}

/** Percent-encodes a path attribute value (token, object, manufacturer, ...). */
export function pctEncodePathValue(value: string): string {
  let out = "";
  for (const ch of value) {
    if (PCHAR_LITERAL.test(ch)) out += ch;
    else for (const b of new TextEncoder().encode(ch)) out += hex2(b);
  }
  return out;
}

/** Percent-encodes every byte (for `id`). */
export function pctEncodeBytes(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += hex2(b);
  return out;
}

export type Pkcs11ObjectType = "private" | "public" | "cert" | "secret-key" | "data";

export interface Pkcs11UriParts {
  readonly token?: string;
  readonly object?: string;
  readonly id?: Uint8Array;
  readonly type?: Pkcs11ObjectType;
}

/** Builds `pkcs11:token=…;object=…;id=…;type=…` (attributes in that order, absent ones omitted). */
export function formatPkcs11Uri(parts: Pkcs11UriParts): string {
  const attrs: string[] = [];
  if (parts.token !== undefined) attrs.push(`token=${pctEncodePathValue(parts.token)}`);
  if (parts.object !== undefined) attrs.push(`object=${pctEncodePathValue(parts.object)}`);
  if (parts.id !== undefined && parts.id.length > 0) attrs.push(`id=${pctEncodeBytes(parts.id)}`);
  if (parts.type !== undefined) attrs.push(`type=${parts.type}`);
  return `pkcs11:${attrs.join(";")}`;
}

function pctDecodeToBytes(value: string): Uint8Array {
  const bytes: number[] = [];
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c === 0x25) {
      const h = value.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(h)) throw new Error("invalid percent-encoding in pkcs11 URI");
      bytes.push(Number.parseInt(h, 16));
      i += 2;
    } else {
      for (const b of new TextEncoder().encode(value[i] ?? "")) bytes.push(b);
    }
  }
  return Uint8Array.from(bytes);
}

/**
 * Parses the path part of a `pkcs11:` URI (query attributes such as `pin-source` are ignored).
 * @throws Error on a malformed URI.
 */
export function parsePkcs11Uri(
  uri: string,
): Pkcs11UriParts & { readonly attributes: Record<string, string> } {
  if (!uri.startsWith("pkcs11:")) throw new Error("not a pkcs11 URI");
  const path = uri.slice("pkcs11:".length).split("?")[0] ?? "";
  const attributes: Record<string, string> = {};
  let id: Uint8Array | undefined;
  for (const part of path.length === 0 ? [] : path.split(";")) {
    const eq = part.indexOf("=");
    if (eq <= 0) throw new Error("malformed pkcs11 URI attribute");
    const name = part.slice(0, eq);
    const raw = part.slice(eq + 1);
    if (name in attributes) throw new Error(`duplicate pkcs11 URI attribute ${name}`);
    const bytes = pctDecodeToBytes(raw);
    if (name === "id") id = bytes;
    attributes[name] = new TextDecoder("utf-8", { fatal: name !== "id" }).decode(bytes);
  }
  const type = attributes.type as Pkcs11ObjectType | undefined;
  return {
    attributes,
    ...(attributes.token === undefined ? {} : { token: attributes.token }),
    ...(attributes.object === undefined ? {} : { object: attributes.object }),
    ...(id === undefined ? {} : { id }),
    ...(type === undefined ? {} : { type }),
  };
}
