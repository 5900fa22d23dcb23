import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runRegistrarCli } from "../../src/cli/m2m-registrar.js";
import { runEnroll } from "../../src/enroll/index.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";

/** Runs the CLI in-process and captures stdout/stderr. */
async function cli(argv: string[]): Promise<{ code: number; out: string[]; err: string[]; json: unknown }> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runRegistrarCli(argv, { out: (t) => out.push(t), err: (t) => err.push(t) });
  let json: unknown;
  try {
    json = JSON.parse(out.join("\n"));
  } catch {
    json = undefined;
  }
  return { code, out, err, json };
}

describe("m2m-registrar CLI (in process)", () => {
  let dir: string;
  let dataDir: string;
  let caDir: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-registrar-cli-"));
    dataDir = join(dir, "data");
    caDir = join(dir, "ca");
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** `enrollment group add NAME --data-dir DATA …args --json` */
  const groupAdd = (name: string, ...args: string[]) =>
    cli(["enrollment", "group", "add", name, "--data-dir", dataDir, ...args, "--json"]);
  /** `enrollment token create --group GROUP …args --data-dir DATA --json` */
  const tokenCreate = (group: string, ...args: string[]) =>
    cli(["enrollment", "token", "create", "--group", group, ...args, "--data-dir", dataDir, "--json"]);

  it("ca init, group add, token create (hash only stored), errors exit 2 with a JSON error", async () => {
    const init = await cli(["ca", "init", "--dir", caDir, "--san", "reg.example", "--json"]);
    expect(init.code).toBe(0);
    expect(init.json).toMatchObject({ caCert: join(caDir, "ca.pem") });
    const again = await cli(["ca", "init", "--dir", caDir, "--json"]);
    expect(again).toMatchObject({ code: 2, json: { error: { code: "ERR_CA_EXISTS" } } });

    const g = await groupAdd(
      "sensors",
      "--role",
      "sensor",
      "--attr",
      "site=plant-1",
      "--attr",
      "line=3",
      "--methods",
      "pkcs11",
    );
    expect(g.code).toBe(0);
    expect(g.json).toMatchObject({
      name: "sensors",
      role: "sensor",
      attributes: { site: "plant-1", line: "3" },
    });
    const tpmNoTrust = await groupAdd("gw", "--role", "gw", "--methods", "tpm");
    expect(tpmNoTrust).toMatchObject({ code: 2, json: { error: { code: "ERR_GROUP_INVALID" } } });
    const dup = await groupAdd("sensors", "--role", "x", "--methods", "pkcs11");
    expect(dup).toMatchObject({ code: 2, json: { error: { code: "ERR_GROUP_EXISTS" } } });

    const t = await tokenCreate("sensors", "--ttl", "1h");
    expect(t.code).toBe(0);
    const token = (t.json as { token: string }).token;
    expect(token).toMatch(/^m2mbt_[A-Za-z0-9_-]{43}$/);
    const db = await readFile(join(dataDir, "registrar.db"));
    const wal = await readFile(join(dataDir, "registrar.db-wal")).catch(() => Buffer.alloc(0));
    expect(db.includes(token)).toBe(false);
    expect(wal.includes(token)).toBe(false);

    expect(await tokenCreate("nope")).toMatchObject({
      code: 2,
      json: { error: { code: "ERR_GROUP_UNKNOWN" } },
    });
    expect(await tokenCreate("sensors", "--ttl", "forever")).toMatchObject({
      code: 2,
      json: { error: { code: "ERR_USAGE" } },
    });
    expect(await cli(["devices", "show", "dev-nope", "--data-dir", dataDir, "--json"])).toMatchObject({
      code: 2,
      json: { error: { code: "ERR_DEVICE_UNKNOWN" } },
    });
    const plain = await cli(["devices", "show", "dev-nope", "--data-dir", dataDir]);
    expect(plain.code).toBe(2);
    expect(plain.err.join("\n")).toContain("ERR_DEVICE_UNKNOWN");
    expect(await cli(["frobnicate", "--json"])).toMatchObject({
      code: 2,
      json: { error: { code: "ERR_USAGE" } },
    });
  });

  it("serve --config; a device enrols; devices list/show/revoke; a revoked device cannot re-enrol", async () => {
    const config = join(dir, "registrar.toml");
    await writeFile(
      config,
      [
        `data_dir = "${dataDir}"`,
        `ca_dir = "${caDir}"`,
        'cert_lifetime = "1d"',
        "[listen]",
        'host = "127.0.0.1"',
        "port = 0",
        "[tls]",
        `cert = "${join(caDir, "server.pem")}"`,
        `key = "${join(caDir, "server.key.pem")}"`,
        "",
      ].join("\n"),
    );
    let stop: () => void = () => undefined;
    const stopped = new Promise<void>((resolve) => {
      stop = resolve;
    });
    const out: string[] = [];
    const serving = runRegistrarCli(["serve", "--config", config, "--json"], {
      out: (t) => out.push(t),
      err: () => undefined,
      stopSignal: () => stopped,
    });
    for (let i = 0; i < 200 && out.length === 0; i++) await new Promise((r) => setTimeout(r, 25));
    const url = (JSON.parse(out[0] ?? "{}") as { url: string }).url;
    expect(url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);

    const provider = new FakeKeyProvider();
    await provider.createOrOpen();
    const enrolWith = async (stateDir: string) => {
      const t = await cli([
        "enrollment",
        "token",
        "create",
        "--group",
        "sensors",
        "--config",
        config,
        "--json",
      ]);
      const tokenFile = join(dir, `token-${Math.random()}`);
      await writeFile(tokenFile, (t.json as { token: string }).token, { mode: 0o600 });
      return runEnroll(
        {
          registrarUrl: url,
          registrarCaFile: join(caDir, "ca.pem"),
          method: "pkcs11",
          bootstrapToken: { file: tokenFile },
          hardwareSerial: "SN-CLI",
          stateDir,
        },
        { keyProvider: provider, force: true },
      );
    };
    try {
      const enrolled = await enrolWith(join(dir, "state"));
      const id = enrolled.state.deviceId;
      const list = await cli(["devices", "list", "--config", config, "--json"]);
      expect(list.json).toEqual([
        expect.objectContaining({ deviceId: id, status: "active", role: "sensor" }),
      ]);
      expect(await cli(["devices", "revoke", id, "--config", config, "--json"])).toMatchObject({
        code: 0,
        json: { deviceId: id, status: "revoked" },
      });
      const show = await cli(["devices", "show", id, "--config", config, "--json"]);
      expect(show.json).toMatchObject({ deviceId: id, status: "revoked", revokedAt: expect.any(String) });
      const listed = await cli(["devices", "list", "--config", config]);
      expect(listed.out.join("\n")).toContain(`${id}\trevoked`);
      await expect(enrolWith(join(dir, "state2"))).rejects.toMatchObject({ code: "ERR_DEVICE_REVOKED" });
    } finally {
      stop();
      expect(await serving).toBe(0);
    }
  });
});
