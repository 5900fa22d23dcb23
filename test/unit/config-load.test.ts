import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { configKeys, loadConfig, resolveSecret } from "../../src/config/index.js";
import type { M2mError } from "../../src/core/errors.js";
import { rejectionOf } from "../kit/m2m-error.js";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "m2m-config-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

let n = 0;
/** A fresh config dir with agent.toml and optional drop-ins. */
async function setup(main: string | undefined, dropIns: Record<string, string> = {}): Promise<string> {
  const d = join(dir, `c${n++}`);
  await mkdir(join(d, "agent.d"), { recursive: true });
  if (main !== undefined) await writeFile(join(d, "agent.toml"), main);
  for (const [name, text] of Object.entries(dropIns)) await writeFile(join(d, "agent.d", name), text);
  return join(d, "agent.toml");
}

const configError = (p: Promise<unknown>): Promise<M2mError> => rejectionOf(p, "a config error");

describe("config: defaults", () => {
  it("an absent default file gives the built-in defaults", async () => {
    const path = await setup(undefined);
    const { config, sources } = await loadConfig({ path, env: {} });
    expect(sources).toEqual([]);
    expect(config.agent.state_dir).toBe("/var/lib/m2m-agent");
    expect(config.keys.provider).toBe("tpm");
    expect(config.keys.tpm.tcti).toBe("device:/dev/tpmrm0");
    expect(config.keys.tpm.key_handle).toBe(0x81000002);
    expect(config.api.socket).toBe("/run/m2m-agent/api.sock");
    expect(config.api.mode).toBe(0o660);
    expect(config.metrics).toEqual({ enabled: false, listen: "127.0.0.1:9464" });
    expect(config.relay.outbox.drop_policy).toBe("oldest");
  });

  it("an explicit --config that does not exist is an error naming the file", async () => {
    const path = join(dir, "nope.toml");
    const err = await configError(loadConfig({ path, explicit: true, env: {} }));
    expect(err.code).toBe("ERR_CONFIG");
    expect(err.message).toContain(path);
  });
});

describe("config: precedence file < drop-in < env", () => {
  it("later layers win key by key; tables merge, arrays replace", async () => {
    const path = await setup(
      `
[agent]
log_level = "warn"
state_dir = "/srv/a"
[keys.tpm]
key_handle = 0x81000010
timeout_ms = 5000
[relay.mqtt]
urls = ["mqtts://a:8883", "mqtts://b:8883"]
`,
      {
        "20-later.toml": `[keys.tpm]\nkey_handle = 0x81000030\n`,
        "10-first.toml": `[keys.tpm]\nkey_handle = 0x81000020\n[relay.mqtt]\nurls = ["mqtts://c:8883"]\n`,
      },
    );
    const { config, sources } = await loadConfig({
      path,
      env: { M2M_AGENT_AGENT__LOG_LEVEL: "debug", M2M_AGENT_METRICS__ENABLED: "true", UNRELATED: "x" },
    });
    expect(sources.map((s) => s.split("/").pop())).toEqual(["agent.toml", "10-first.toml", "20-later.toml"]);
    expect(config.keys.tpm.key_handle).toBe(0x81000030); // 20-later wins over 10-first over the file
    expect(config.keys.tpm.timeout_ms).toBe(5000); // untouched keys of a merged table stay
    expect(config.relay.mqtt?.urls).toEqual(["mqtts://c:8883"]); // arrays replace
    expect(config.agent.state_dir).toBe("/srv/a");
    expect(config.agent.log_level).toBe("debug"); // env wins over the file
    expect(config.metrics.enabled).toBe(true); // coerced to boolean per schema
  });

  it("env values are coerced per schema: numbers, hex handles, arrays, octal modes", async () => {
    const path = await setup(undefined);
    const { config, envOverrides } = await loadConfig({
      path,
      env: {
        M2M_AGENT_KEYS__TPM__TIMEOUT_MS: "2500",
        M2M_AGENT_KEYS__TPM__KEY_HANDLE: "0x81000005",
        M2M_AGENT_RELAY__MQTT__URLS: "mqtt://x:1883, mqtt://y:1883",
        M2M_AGENT_RELAY__MQTT__QOS: "2",
        M2M_AGENT_API__MODE: "0640",
      },
    });
    expect(config.keys.tpm.timeout_ms).toBe(2500);
    expect(config.keys.tpm.key_handle).toBe(0x81000005);
    expect(config.relay.mqtt?.urls).toEqual(["mqtt://x:1883", "mqtt://y:1883"]);
    expect(config.relay.mqtt?.qos).toBe(2);
    expect(config.api.mode).toBe(0o640);
    expect(envOverrides).toContain("M2M_AGENT_KEYS__TPM__TIMEOUT_MS");
  });
});

describe("config: errors name the file and the key", () => {
  it("an unknown key in a drop-in names that drop-in and the key path", async () => {
    const path = await setup(`[keys.tpm]\ntcti = "swtpm:port=2321"\n`, {
      "10-x.toml": `[keys.tpm]\nkey_handel = 0x81000002\n`,
    });
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.code).toBe("ERR_CONFIG");
    expect(err.message).toBe(`${join(path, "..", "agent.d", "10-x.toml")}: keys.tpm.key_handel: unknown key`);
    expect(err.details.key).toBe("keys.tpm.key_handel");
  });

  it("an unknown section in the main file names the main file", async () => {
    const path = await setup(`[agnet]\nlog_level = "info"\n`);
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toBe(`${path}: agnet: unknown key`);
  });

  it("a handle outside the owner range is refused with the range in the message", async () => {
    const path = await setup(undefined, { "10-x.toml": `[keys.tpm]\nkey_handle = 0x81010001\n` });
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toBe(
      `${join(path, "..", "agent.d", "10-x.toml")}: keys.tpm.key_handle: expected an owner-range handle 0x81000000-0x8100FFFF`,
    );
  });

  it("a bad env override names the variable", async () => {
    const path = await setup(undefined);
    const err = await configError(loadConfig({ path, env: { M2M_AGENT_KEYS__TPM__KEY_HANDLE: "0x1" } }));
    expect(err.message).toBe(
      "env M2M_AGENT_KEYS__TPM__KEY_HANDLE: keys.tpm.key_handle: expected an owner-range handle 0x81000000-0x8100FFFF",
    );
  });

  it("a TOML syntax error names the file and line", async () => {
    const path = await setup(`[agent]\nlog_level = \n`);
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toMatch(
      new RegExp(`^${path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: TOML syntax error at line 2`),
    );
  });

  it("every problem is reported, not only the first", async () => {
    const path = await setup(`[agent]\nlog_level = "loud"\n[metrics]\nlisten = "0.0.0.0:9464"\n`);
    const err = await configError(loadConfig({ path, env: {} }));
    const lines = err.message.split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/: agent\.log_level: /);
    expect(lines[1]).toMatch(/: metrics\.listen: expected a loopback address/);
  });

  it("pkcs11 provider requires module, token label and pin", async () => {
    const path = await setup(`[keys]\nprovider = "pkcs11"\n`);
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toContain('keys.pkcs11.module: required when provider = "pkcs11"');
    expect(err.message).toContain("keys.pkcs11.pin: required");
  });
});

describe("config: secrets only by reference", () => {
  it("a literal PIN is refused with a hint, and the value is not echoed", async () => {
    const path = await setup(
      `[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "t"\npin = "s3cr3t-1234"\n`,
    );
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toContain(`${path}: keys.pkcs11.pin: a literal secret value is not allowed`);
    expect(err.message).toContain('{ file = "/path" }');
    expect(err.message).not.toContain("s3cr3t-1234");
  });

  it("a literal bootstrap token from env is refused too", async () => {
    const path = await setup(undefined);
    const err = await configError(
      loadConfig({ path, env: { M2M_AGENT_ENROLL__BOOTSTRAP_TOKEN: "tok-abc" } }),
    );
    expect(err.message).toContain(
      "env M2M_AGENT_ENROLL__BOOTSTRAP_TOKEN: enroll.bootstrap_token: a literal secret",
    );
    expect(err.message).not.toContain("tok-abc");
  });

  it("references are accepted (file, credential, env) and resolved into Secret values", async () => {
    const pinFile = join(dir, "pin");
    await writeFile(pinFile, "4321\n", { mode: 0o600 });
    const path = await setup(
      `[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin = { file = "${pinFile}" }\n[enroll]\nbootstrap_token = { credential = "bootstrap-token" }\n`,
    );
    const { config } = await loadConfig({
      path,
      env: { M2M_AGENT_CREDENTIALS__OAUTH__ISSUER: "https://as.example" },
    });
    expect(config.keys.pkcs11.pin).toEqual({ file: pinFile });
    expect(config.enroll.bootstrap_token).toEqual({ credential: "bootstrap-token" });
    const pin = await resolveSecret({ file: pinFile });
    expect(pin.reveal()).toBe("4321");
    expect(String(pin)).toBe("<redacted>");
    const credDir = join(dir, "creds");
    await mkdir(credDir, { recursive: true });
    await writeFile(join(credDir, "bootstrap-token"), "bt-1");
    const bt = await resolveSecret(
      { credential: "bootstrap-token" },
      { env: { CREDENTIALS_DIRECTORY: credDir } },
    );
    expect(bt.reveal()).toBe("bt-1");
    expect((await resolveSecret({ env: "MY_PIN" }, { env: { MY_PIN: "9" } })).reveal()).toBe("9");
  });

  it("a group/world-readable secret file is refused", async () => {
    const f = join(dir, "open-pin");
    await writeFile(f, "1111");
    await chmod(f, 0o644);
    await expect(resolveSecret({ file: f })).rejects.toMatchObject({ code: "ERR_SECRET_PERMISSIONS" });
  });

  it("a credential name with a path is refused at config time", async () => {
    const path = await setup(`[enroll]\nbootstrap_token = { credential = "../etc/shadow" }\n`);
    const err = await configError(loadConfig({ path, env: {} }));
    expect(err.message).toContain("enroll.bootstrap_token: credential: expected a plain credential name");
  });

  it("configKeys lists key paths, never values", async () => {
    const path = await setup(`[keys.pkcs11]\npin = { env = "PIN_VAR" }\n[agent]\nlog_level = "warn"\n`);
    const { config } = await loadConfig({ path, env: {} });
    const keys = configKeys(config);
    expect(keys).toContain("keys.pkcs11.pin");
    expect(keys).toContain("agent.log_level");
    expect(keys.join(",")).not.toContain("PIN_VAR");
    expect(keys.join(",")).not.toContain("warn");
  });
});
