import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type PostgresHandle, startPostgres } from "../../hw/postgres.js";
import { registrarConfigFrom, STORE_URL_ENV } from "../../src/registrar/config.js";
import { SCHEMA_VERSION } from "../../src/registrar/store/migrations.js";
import {
  cliEnv,
  ensureBuilt,
  REGISTRAR_CLI,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
} from "./e2e-kit.js";

/**
 * The operator's PostgreSQL path through the built CLI: `db migrate` (and again: nothing to do),
 * groups and tokens in PostgreSQL, `serve` on it, the URL's password never printed, signing keys
 * from `keys new-signing-key` and `keys show`. Plus config validation of [store] and credential: paths.
 */
describe("m2m-registrar on PostgreSQL (CLI)", () => {
  let work: string;
  let pgh: PostgresHandle;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-db-cli-"));
    pgh = await startPostgres({ durable: false });
  });
  afterAll(async () => {
    await pgh?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("db migrate, enrolment admin and serve run against the database named by M2M_REGISTRAR_STORE_URL; the password is never printed", async () => {
    // trust auth ignores the password, which makes it a good canary for leaks.
    const url = pgh.url.replace("postgresql://m2m@", "postgresql://m2m:canary-s3cret@");
    const env = cliEnv({ [STORE_URL_ENV]: url });
    const setup = await setupRegistrar({ work, env, groups: [] });
    const first = await setup.reg(["db", "migrate"]);
    expect(first.code, first.stderr).toBe(0);
    expect(JSON.parse(first.stdout)).toMatchObject({ backend: "postgres", from: 0, to: SCHEMA_VERSION });
    const again = await setup.reg(["db", "migrate"]);
    expect(JSON.parse(again.stdout)).toMatchObject({ from: SCHEMA_VERSION, to: SCHEMA_VERSION });
    for (const out of [first, again]) {
      expect(out.stdout + out.stderr).not.toContain("canary-s3cret");
      expect(out.stdout).toContain("***");
    }
    const added = await setup.reg([
      "enrollment",
      "group",
      "add",
      "gw",
      "--role",
      "gateway",
      "--methods",
      "pkcs11",
    ]);
    expect(added.code, added.stderr).toBe(0);
    const groups = await setup.reg(["enrollment", "group", "list"]);
    expect(JSON.parse(groups.stdout)).toEqual([expect.objectContaining({ name: "gw" })]);
    // Nothing went to SQLite: the registry is in PostgreSQL.
    await expect(stat(join(work, "registrar-data", "registrar.db"))).rejects.toMatchObject({
      code: "ENOENT",
    });

    const key = join(work, "next.pem");
    const made = await runNode(REGISTRAR_CLI, ["--json", "keys", "new-signing-key", "--out", key], env);
    expect(made.code, made.stderr).toBe(0);
    expect((await stat(key)).mode & 0o777).toBe(0o600);
    const kid = (JSON.parse(made.stdout) as { kid: string }).kid;
    const refusedOverwrite = await runNode(
      REGISTRAR_CLI,
      ["--json", "keys", "new-signing-key", "--out", key],
      env,
    );
    expect(refusedOverwrite.code).toBe(2);
    expect(refusedOverwrite.stdout + refusedOverwrite.stderr).toContain("ERR_OAUTH_SIGNING_KEY");
    await writeFile(
      setup.regConfig,
      `${await readFile(setup.regConfig, "utf8")}\n[keys]\npublished_keys = ["${key}"]\n`,
    );

    const running = await startRegistrarProcess(setup.regConfig, env);
    try {
      const shown = await setup.reg(["keys", "show"]);
      const keys = JSON.parse(shown.stdout) as { signing: string; published: string[] };
      expect(keys.published).toEqual([keys.signing, kid]);
      const dispatcher = new Agent({ connect: { ca: await readFile(setup.caCert, "utf8") } });
      try {
        const res = await fetch(`${running.url}/jwks`, { dispatcher });
        const jwks = (await res.json()) as { keys: { kid: string }[] };
        expect(jwks.keys.map((k) => k.kid)).toEqual([keys.signing, kid]);
      } finally {
        await dispatcher.close();
      }
    } finally {
      await running.stop();
    }
  });

  it("[store] and credential: paths are validated with the key named and the value never echoed", () => {
    const base = { data_dir: "/var/lib/x", tls: { insecure_http: true } };
    const bad = (() => {
      try {
        registrarConfigFrom({ ...base, store: { url: "mysql://u:topsecret@h/db" } }, "/etc", "r.toml");
      } catch (err) {
        return err as { code: string; message: string; details: Record<string, string> };
      }
      return undefined;
    })();
    expect(bad).toMatchObject({ code: "ERR_CONFIG_INVALID", details: { key: "store.url" } });
    expect(JSON.stringify(bad) + String(bad?.message)).not.toContain("topsecret");
    const fromEnv = registrarConfigFrom(base, "/etc", "r.toml", {
      [STORE_URL_ENV]: "postgres://u:pw@db/m2m",
    });
    expect(fromEnv.store).toMatchObject({ kind: "postgres", poolMax: 10, autoMigrate: true });
    expect(JSON.stringify(fromEnv.store)).not.toContain("pw@");
    expect(() => registrarConfigFrom(base, "/etc", "r.toml", { [STORE_URL_ENV]: "not a url" })).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        details: expect.objectContaining({ key: STORE_URL_ENV }),
      }),
    );
    expect(registrarConfigFrom(base, "/etc", "r.toml").store).toEqual({
      kind: "sqlite",
      path: "/var/lib/x/registrar.db",
    });
    const cred = registrarConfigFrom(
      { ...base, ca_dir: "credential:", keys: { signing_key: "credential:oauth-key" } },
      "/etc",
      "r.toml",
      { CREDENTIALS_DIRECTORY: "/run/credentials/m2m-registrar.service" },
    );
    expect(cred.caDir).toBe("/run/credentials/m2m-registrar.service");
    expect(cred.keys.signingKey).toBe("/run/credentials/m2m-registrar.service/oauth-key");
    expect(() =>
      registrarConfigFrom({ ...base, keys: { signing_key: "credential:oauth-key" } }, "/etc", "r.toml", {}),
    ).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        details: expect.objectContaining({ key: "keys.signing_key" }),
      }),
    );
  });
});
