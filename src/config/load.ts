import { readdir, readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { parse as parseToml, TomlError } from "smol-toml";
import type { z } from "zod";
import { M2mError } from "../core/errors.js";
import { type AgentConfig, agentConfigSchema } from "./schema.js";

export const DEFAULT_CONFIG_PATH = "/etc/m2m-agent/agent.toml";
export const ENV_PREFIX = "M2M_AGENT_";

export interface LoadConfigOptions {
  /** Main file. Default /etc/m2m-agent/agent.toml (absent is fine: built-in defaults apply). */
  readonly path?: string;
  /** True when the path came from the operator (--config): a missing file is then an error. */
  readonly explicit?: boolean;
  /** Drop-in directory; default `<dirname(path)>/agent.d`. */
  readonly dropInDir?: string;
  /** Environment to read M2M_AGENT_* overrides from; default process.env. */
  readonly env?: NodeJS.ProcessEnv;
}

export interface LoadedConfig {
  readonly config: AgentConfig;
  /** Files actually read, in precedence order (main file first). */
  readonly sources: readonly string[];
  /** Environment variable names that overrode something (names only, never values). */
  readonly envOverrides: readonly string[];
}

type Plain = Record<string, unknown>;

function isPlain(v: unknown): v is Plain {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Date);
}

/** Where each key path got its value from (last writer wins), to name the culprit in errors. */
class Provenance {
  readonly #map = new Map<string, string>();

  record(path: readonly string[], source: string): void {
    this.#map.set(path.join("."), source);
  }

  /** The source for a path: exact, else the nearest parent that was set, else a child's source. */
  sourceOf(path: readonly (string | number)[], fallback: string): string {
    const parts = path.map(String);
    for (let i = parts.length; i > 0; i--) {
      const hit = this.#map.get(parts.slice(0, i).join("."));
      if (hit !== undefined) return hit;
    }
    const prefix = parts.length === 0 ? "" : `${parts.join(".")}.`;
    for (const [k, v] of this.#map) if (k.startsWith(prefix)) return v;
    return fallback;
  }
}

/** Deep merge: tables merge key by key, arrays and scalars replace. */
function mergeInto(target: Plain, source: Plain, src: string, prov: Provenance, path: string[] = []): void {
  for (const [key, value] of Object.entries(source)) {
    const p = [...path, key];
    prov.record(p, src);
    const existing = target[key];
    if (isPlain(value) && isPlain(existing)) {
      mergeInto(existing, value, src, prov, p);
    } else if (isPlain(value)) {
      const fresh: Plain = {};
      target[key] = fresh;
      mergeInto(fresh, value, src, prov, p);
    } else {
      target[key] = value;
    }
  }
}

async function readToml(file: string, required: boolean): Promise<Plain | undefined> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT" && !required) return undefined;
    throw new M2mError("ERR_CONFIG", "permanent", `${file}: cannot read config file`, {
      cause: err,
      hint: "check the path given with --config and that the agent can read it",
      details: { file },
    });
  }
  try {
    return parseToml(text) as Plain;
  } catch (err) {
    const where = err instanceof TomlError ? ` at line ${err.line}, column ${err.column}` : "";
    throw new M2mError("ERR_CONFIG", "permanent", `${file}: TOML syntax error${where}`, {
      cause: err,
      hint: "fix the TOML syntax (https://toml.io)",
      details: { file },
    });
  }
}

async function dropInFiles(dir: string): Promise<string[]> {
  try {
    const names = await readdir(dir);
    // Lexical byte order (like systemd drop-ins): 10-x.toml before 20-y.toml regardless of locale.
    return names
      .filter((n) => n.endsWith(".toml") && !n.startsWith("."))
      .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
      .map((n) => join(dir, n));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw new M2mError("ERR_CONFIG", "permanent", `${dir}: cannot read drop-in directory`, {
      cause: err,
      details: { file: dir },
    });
  }
}

interface ZodDefView {
  readonly type: string;
  readonly shape?: Record<string, z.ZodType>;
  readonly innerType?: z.ZodType;
  readonly in?: z.ZodType;
  readonly element?: z.ZodType;
  readonly valueType?: z.ZodType;
  readonly options?: readonly z.ZodType[];
  readonly values?: readonly unknown[];
}

function defOf(schema: z.ZodType): ZodDefView {
  return (schema as unknown as { _zod: { def: ZodDefView } })._zod.def;
}

type LeafKind = "number" | "boolean" | "array" | "string";

/** What type the schema expects at `path`, so env strings can be coerced before validation. */
function leafKind(schema: z.ZodType, path: readonly string[]): LeafKind {
  let s: z.ZodType | undefined = schema;
  let i = 0;
  for (;;) {
    if (s === undefined) return "string";
    const def = defOf(s);
    switch (def.type) {
      case "optional":
      case "default":
      case "prefault":
      case "nullable":
        s = def.innerType;
        continue;
      case "pipe":
        s = def.in;
        continue;
      case "object": {
        const key = path[i++];
        if (key === undefined) return "string";
        s = def.shape?.[key];
        continue;
      }
      case "record":
        if (i++ >= path.length) return "string";
        s = def.valueType;
        continue;
      case "number":
        return "number";
      case "boolean":
        return "boolean";
      case "array":
        return "array";
      case "literal":
        return typeof def.values?.[0] === "number" ? "number" : "string";
      case "union": {
        const kinds = (def.options ?? []).map((o) => leafKind(o, path.slice(i)));
        return kinds.every((k) => k === "number") ? "number" : "string";
      }
      default:
        return "string";
    }
  }
}

function coerce(kind: LeafKind, raw: string): unknown {
  switch (kind) {
    case "number": {
      const n = /^0x[0-9a-f]+$/i.test(raw) ? Number.parseInt(raw, 16) : Number(raw);
      return raw.trim() === "" || Number.isNaN(n) ? raw : n;
    }
    case "boolean":
      if (/^(true|1|yes|on)$/i.test(raw)) return true;
      if (/^(false|0|no|off)$/i.test(raw)) return false;
      return raw;
    case "array": {
      const t = raw.trim();
      if (t.startsWith("[")) {
        try {
          return JSON.parse(t) as unknown;
        } catch {
          return raw;
        }
      }
      return t === "" ? [] : t.split(",").map((x) => x.trim());
    }
    case "string":
      return raw;
  }
}

/** M2M_AGENT_KEYS__TPM__KEY_HANDLE=0x81000002 → keys.tpm.key_handle (double underscore = nesting). */
function envLayer(env: NodeJS.ProcessEnv): { layers: { name: string; value: Plain }[] } {
  const layers: { name: string; value: Plain }[] = [];
  const names = Object.keys(env)
    .filter((k) => k.startsWith(ENV_PREFIX) && k.slice(ENV_PREFIX.length).includes("__"))
    .sort();
  for (const name of names) {
    const raw = env[name];
    if (raw === undefined) continue;
    const path = name
      .slice(ENV_PREFIX.length)
      .split("__")
      .map((p) => p.toLowerCase());
    if (path.some((p) => p === "")) continue;
    const value = coerce(leafKind(agentConfigSchema, path), raw);
    const root: Plain = {};
    let cur = root;
    path.forEach((p, idx) => {
      if (idx === path.length - 1) cur[p] = value;
      else {
        const next: Plain = {};
        cur[p] = next;
        cur = next;
      }
    });
    layers.push({ name: `env ${name}`, value: root });
  }
  return { layers };
}

/**
 * Builds the one validated config: main TOML file < agent.d/*.toml drop-ins (lexical order, deep
 * merge, arrays replace) < M2M_AGENT_* environment overrides.
 * @throws ERR_CONFIG naming the file (or env variable) and the key path of every problem.
 */
export async function loadConfig(options: LoadConfigOptions = {}): Promise<LoadedConfig> {
  const path = options.path ?? DEFAULT_CONFIG_PATH;
  const env = options.env ?? process.env;
  const prov = new Provenance();
  const merged: Plain = {};
  const sources: string[] = [];

  const main = await readToml(path, options.explicit ?? false);
  if (main !== undefined) {
    mergeInto(merged, main, path, prov);
    sources.push(path);
  }
  for (const file of await dropInFiles(options.dropInDir ?? join(dirname(path), "agent.d"))) {
    const layer = await readToml(file, true);
    if (layer === undefined) continue;
    mergeInto(merged, layer, file, prov);
    sources.push(file);
  }
  const envOverrides: string[] = [];
  for (const layer of envLayer(env).layers) {
    mergeInto(merged, layer.value, layer.name, prov);
    envOverrides.push(layer.name.slice(4));
  }

  const result = agentConfigSchema.safeParse(merged);
  if (!result.success) {
    const lines: { file: string; key: string; message: string }[] = [];
    for (const issue of result.error.issues) {
      if (issue.code === "unrecognized_keys") {
        for (const k of issue.keys) {
          const p = [...issue.path.map(String), k];
          lines.push({ file: prov.sourceOf(p, path), key: p.join("."), message: "unknown key" });
        }
      } else {
        lines.push({
          file: prov.sourceOf(issue.path.map(String), path),
          key: issue.path.map(String).join(".") || "(root)",
          message: issue.message,
        });
      }
    }
    const first = lines[0];
    throw new M2mError(
      "ERR_CONFIG",
      "permanent",
      lines.map((l) => `${l.file}: ${l.key}: ${l.message}`).join("\n"),
      {
        hint: "fix the named keys (see docs/operations.md for the reference) and retry",
        details: first === undefined ? {} : { file: first.file, key: first.key, problems: lines.length },
      },
    );
  }
  return { config: result.data, sources, envOverrides };
}

/** Lists the leaf key paths that are set (for logs: keys, never values). */
export function configKeys(value: unknown, prefix = ""): string[] {
  if (!isPlain(value)) return prefix === "" ? [] : [prefix];
  const out: string[] = [];
  for (const [k, v] of Object.entries(value)) {
    if (v === undefined) continue;
    const p = prefix === "" ? k : `${prefix}.${k}`;
    // Secret references are leaves: their kind is not a value, but keep the log short.
    if (isPlain(v) && !("file" in v || "credential" in v || "env" in v)) out.push(...configKeys(v, p));
    else out.push(p);
  }
  return out;
}

/** Derived paths with defaults that depend on other keys. */
export function outboxPath(config: AgentConfig): string {
  return config.relay.outbox.path ?? join(config.agent.state_dir, "outbox.db");
}

export function auditLogPath(config: AgentConfig): string {
  return config.agent.audit_log ?? join(config.agent.state_dir, "audit.log");
}
