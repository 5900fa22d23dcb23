import type { RegistrarConfig } from "../config.js";
import { PgRegistrarStore, redactStoreUrl } from "./pg-store.js";
import { SqliteRegistrarStore } from "./sqlite-store.js";
import type { RegistrarStore } from "./store.js";

/**
 * The one place a registrar store is chosen from config: `[store] url` (or M2M_REGISTRAR_STORE_URL)
 * → PostgreSQL, else SQLite in data_dir. SQLite always migrates at open (embedded); PostgreSQL
 * migrates when `migrate` is true (default: `[store] auto_migrate`), otherwise it refuses a database
 * whose schema is behind (ERR_STORE_SCHEMA_OLD).
 */
export async function openRegistrarStore(
  config: RegistrarConfig,
  options: { readonly migrate?: boolean } = {},
): Promise<RegistrarStore> {
  const s = config.store;
  if (s.kind === "sqlite") return new SqliteRegistrarStore(s.path);
  return PgRegistrarStore.open(s.url, {
    migrate: options.migrate ?? s.autoMigrate,
    poolMax: s.poolMax,
    statementTimeoutMs: s.statementTimeoutMs,
  });
}

/** `m2m-registrar db migrate`: applies pending migrations under the backend's lock. */
export async function migrateRegistrarStore(
  config: RegistrarConfig,
): Promise<{ backend: "sqlite" | "postgres"; location: string; from: number; to: number }> {
  const s = config.store;
  if (s.kind === "sqlite") {
    const store = new SqliteRegistrarStore(s.path);
    try {
      // The constructor migrated already; migrate() again reports the now-current version.
      const r = store.migrate();
      return { backend: "sqlite", location: s.path, from: r.from, to: r.to };
    } finally {
      await store.close();
    }
  }
  const store = await PgRegistrarStore.open(s.url, { migrate: true, poolMax: 2 });
  try {
    const m = store.lastMigration ?? { from: 0, to: 0 };
    return { backend: "postgres", location: redactStoreUrl(s.url.reveal()), from: m.from, to: m.to };
  } finally {
    await store.close();
  }
}
