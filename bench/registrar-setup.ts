import { join } from "node:path";
import { caPaths, FleetCa, initCa } from "../src/registrar/ca/index.js";
import { type RegistrarConfig, registrarConfigFrom } from "../src/registrar/config.js";
import { SqliteRegistrarStore } from "../src/registrar/store/index.js";

/** What a bench needs to start a registrar: its config, a fresh SQLite registry and CA. */
export interface BenchRegistrarSetup {
  readonly config: RegistrarConfig;
  readonly store: SqliteRegistrarStore;
  readonly ca: FleetCa;
  /** The fleet CA certificate (PEM file) agents trust the registrar's TLS with. */
  readonly caFile: string;
}

/** A fresh CA and SQLite registry under `dir`, and a registrar config on 127.0.0.1:0 using them. */
export async function benchRegistrarSetup(dir: string): Promise<BenchRegistrarSetup> {
  const paths = await initCa({ dir: join(dir, "ca") });
  const config = registrarConfigFrom(
    {
      listen: { host: "127.0.0.1", port: 0 },
      tls: { cert: paths.serverCert, key: paths.serverKey },
      data_dir: join(dir, "data"),
      ca_dir: paths.dir,
    },
    dir,
    "registrar.toml",
  );
  const store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
  return { config, store, ca: await FleetCa.load(paths.dir), caFile: caPaths(paths.dir).caCert };
}
