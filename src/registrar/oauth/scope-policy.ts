/**
 * Least-privilege scope policy: a device gets `requested ∩ allowed`, where allowed comes from its role
 * (RBAC) and from attribute rules (ABAC) declared in the registrar config.
 *
 * ABAC rule example: `{ scope: "site:{site}:write", roles: ["sensor-gateway"], require: { type: "gw" } }`
 * grants `site:plant-7:write` to a sensor-gateway whose attributes are `{ site: "plant-7", type: "gw" }`.
 */
export interface AbacRule {
  /** Scope template; `{name}` is replaced by the device attribute `name` (rule skipped if absent). */
  readonly scope: string;
  /** Roles the rule applies to (all roles when omitted). */
  readonly roles?: readonly string[];
  /** Attribute equality conditions (value or list of accepted values). */
  readonly require?: Readonly<Record<string, string | readonly string[]>>;
  /**
   * Only for requests whose TPM quote was verified at this token request (continuous attestation,
   * docs/attestation.md): the scope is never granted on a key alone.
   */
  readonly attested?: boolean;
}

/** Facts about the request itself (not the device record) that rules may require. */
export interface GrantContext {
  /** A TPM quote was verified for this token request. */
  readonly attested: boolean;
}

export interface ScopePolicyConfig {
  /** role → literal scopes. */
  readonly roles: Readonly<Record<string, readonly string[]>>;
  readonly rules?: readonly AbacRule[];
}

// Attribute values substituted into scopes must not contain scope separators or template syntax.
const SAFE_VALUE = /^[A-Za-z0-9._-]{1,128}$/;
const SCOPE_TOKEN = /^[\x21\x23-\x5B\x5D-\x7E]{1,256}$/;

export class ScopePolicy {
  readonly #config: ScopePolicyConfig;

  constructor(config: ScopePolicyConfig) {
    this.#config = config;
  }

  /** Every scope this device may hold. */
  allowed(
    role: string,
    attributes: Readonly<Record<string, string>>,
    context: GrantContext = { attested: false },
  ): Set<string> {
    const out = new Set<string>(this.#config.roles[role] ?? []);
    for (const rule of this.#config.rules ?? []) {
      if (rule.roles !== undefined && !rule.roles.includes(role)) continue;
      // Security: an attested-only scope needs this request's verified quote, not a past one.
      if (rule.attested === true && !context.attested) continue;
      if (!conditionsHold(rule.require, attributes)) continue;
      const scope = expand(rule.scope, attributes);
      if (scope !== undefined) out.add(scope);
    }
    return out;
  }

  /**
   * Scopes to grant. No `scope` parameter → everything allowed (the role's full grant).
   * @returns undefined when scopes were requested but none is allowed (→ invalid_scope).
   */
  grant(
    requested: string | undefined,
    role: string,
    attributes: Readonly<Record<string, string>>,
    context: GrantContext = { attested: false },
  ): string[] | undefined {
    const allowed = this.allowed(role, attributes, context);
    if (requested === undefined || requested.trim() === "") return [...allowed].sort();
    const asked = parseScope(requested);
    if (asked === undefined) return undefined;
    const granted = asked.filter((s) => allowed.has(s));
    return granted.length === 0 ? undefined : [...new Set(granted)].sort();
  }
}

/** RFC 6749 §3.3 scope syntax; undefined when malformed. */
export function parseScope(scope: string): string[] | undefined {
  const parts = scope.split(" ").filter((s) => s !== "");
  if (parts.length > 64 || parts.some((p) => !SCOPE_TOKEN.test(p))) return undefined;
  return parts;
}

function conditionsHold(require: AbacRule["require"], attributes: Readonly<Record<string, string>>): boolean {
  if (require === undefined) return true;
  for (const [name, want] of Object.entries(require)) {
    const have = attributes[name];
    if (have === undefined) return false;
    if (typeof want === "string" ? have !== want : !want.includes(have)) return false;
  }
  return true;
}

function expand(template: string, attributes: Readonly<Record<string, string>>): string | undefined {
  let ok = true;
  const out = template.replace(/\{([A-Za-z0-9_.-]+)\}/g, (_m, name: string) => {
    const v = attributes[name];
    if (v === undefined || !SAFE_VALUE.test(v)) {
      ok = false;
      return "";
    }
    return v;
  });
  return ok && SCOPE_TOKEN.test(out) ? out : undefined;
}
