import { chmod, mkdtemp, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import { M2mError } from "../../src/core/errors.js";
import { readPin } from "../../src/keys/pkcs11/pin.js";
import { useTempDir } from "../kit/temp-dir.js";

const PIN = "31415926";
const dir = useTempDir("m2m-pin-");

async function code(p: Promise<unknown>): Promise<M2mError> {
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(M2mError);
  const m = e as M2mError;
  // Whatever went wrong, the PIN itself is never part of the error.
  expect(JSON.stringify(m) + String(m.stack) + inspect(m)).not.toContain(PIN);
  return m;
}

// PIN sources: real files with real modes on disk.
describe("readPin", () => {
  it("reads a 0600 file and trims exactly one trailing newline; the Secret never prints", async () => {
    const f = join(dir(), "a.pin");
    await writeFile(f, `${PIN}\n\n`, { mode: 0o600 });
    const s = await readPin({ file: f });
    expect(s.reveal()).toBe(`${PIN}\n`);
    await writeFile(f, `${PIN}\r\n`, { mode: 0o600 });
    expect((await readPin({ file: f })).reveal()).toBe(PIN);
    expect(`${s}${JSON.stringify({ s })}${inspect(s)}`).not.toContain(PIN);
  });

  it("accepts 0400, refuses group- or world-readable files (mode & 0o077)", async () => {
    const f = join(dir(), "b.pin");
    await writeFile(f, PIN, { mode: 0o400 });
    expect((await readPin({ file: f })).reveal()).toBe(PIN);
    for (const mode of [0o640, 0o604, 0o644, 0o660, 0o606]) {
      await chmod(f, mode);
      const e = await code(readPin({ file: f }));
      expect(e.code).toBe("ERR_PIN_FILE_PERMISSIONS");
      expect(e.hint).toContain("chmod 600");
    }
  });

  it("refuses a missing file, a directory, a symlink and an empty PIN", async () => {
    expect((await code(readPin({ file: join(dir(), "missing") }))).code).toBe("ERR_PIN_FILE");
    expect((await code(readPin({ file: dir() }))).code).toBe("ERR_PIN_FILE");
    const target = join(dir(), "t.pin");
    await writeFile(target, PIN, { mode: 0o600 });
    const link = join(dir(), "link.pin");
    await symlink(target, link);
    expect((await code(readPin({ file: link }))).code).toBe("ERR_PIN_FILE");
    const empty = join(dir(), "empty.pin");
    await writeFile(empty, "\n", { mode: 0o600 });
    expect((await code(readPin({ file: empty }))).code).toBe("ERR_PIN_EMPTY");
  });

  it("env: missing or empty variable is ERR_PIN_ENV_MISSING; set variable is read", async () => {
    expect((await code(readPin({ env: "M2M_PIN" }, {}))).code).toBe("ERR_PIN_ENV_MISSING");
    expect((await code(readPin({ env: "M2M_PIN" }, { M2M_PIN: "" }))).code).toBe("ERR_PIN_ENV_MISSING");
    expect((await readPin({ env: "M2M_PIN" }, { M2M_PIN: `${PIN}\n` })).reveal()).toBe(PIN);
  });

  it("credential: needs CREDENTIALS_DIRECTORY, a plain name, and an existing file", async () => {
    expect((await code(readPin({ credential: "m2m-pin" }, {}))).code).toBe("ERR_PIN_CREDENTIAL");
    const creds = await mkdtemp(join(dir(), "creds-"));
    await writeFile(join(creds, "m2m-pin"), PIN, { mode: 0o400 });
    const env = { CREDENTIALS_DIRECTORY: creds };
    expect((await readPin({ credential: "m2m-pin" }, env)).reveal()).toBe(PIN);
    expect((await code(readPin({ credential: "../a.pin" }, env))).code).toBe("ERR_PIN_CREDENTIAL");
    expect((await code(readPin({ credential: "absent" }, env))).code).toBe("ERR_PIN_CREDENTIAL");
  });
});
