import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { DeviceKeyOwner, type DeviceKeySlots } from "../../src/keys/device-key.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import { KEY_ROTATION_STATE_FILE } from "../../src/keys/rotation.js";

/** DeviceKeyOwner over software keys: which key is current, the switch order, restart after a rotation. */
describe("DeviceKeyOwner", () => {
  let dir: string;
  let store: FakeKeyStore;
  const slots = (): DeviceKeySlots => ({
    kind: "fake",
    home: "dev",
    names: ["dev", "dev-alt"],
    stateFile: join(dir, KEY_ROTATION_STATE_FILE),
    make: (name) => new FakeKeyProvider({ store, label: name }),
  });

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-owner-"));
    store = new FakeKeyStore();
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("subscribers switch while the old key still exists; then it is destroyed; a restart keeps the new key", async () => {
    const owner = await DeviceKeyOwner.open(slots());
    const first = await owner.current.createOrOpen();
    const seen: string[] = [];
    owner.subscribe(async ({ previous, current, key }) => {
      // Make-before-break: the old key can still sign while subscribers move over.
      seen.push(
        `old-present=${store.keys.has("dev")} new=${(await key.open()).thumbprint === current.thumbprint}`,
      );
      expect(previous?.thumbprint).toBe(first.thumbprint);
      expect(owner.current).toBe(key);
    });
    const next = await owner.prepare();
    const nextInfo = await next.open();
    await expect(owner.current.open()).resolves.toMatchObject({ thumbprint: first.thumbprint });
    await owner.commit(next);
    expect(seen).toEqual(["old-present=true new=true"]);
    expect(store.keys.has("dev")).toBe(false);
    expect((await owner.info()).thumbprint).toBe(nextInfo.thumbprint);
    expect(owner.currentName).toBe("dev-alt");
    expect(JSON.parse(await readFile(join(dir, KEY_ROTATION_STATE_FILE), "utf8"))).toEqual({
      v: 1,
      current: "dev-alt",
    });
    const restarted = await DeviceKeyOwner.open(slots());
    expect((await restarted.current.open()).thumbprint).toBe(nextInfo.thumbprint);
  });

  it("a subscriber that fails or hangs does not stop the rotation (bounded by switchTimeoutMs)", async () => {
    const owner = await DeviceKeyOwner.open(slots(), { switchTimeoutMs: 50 });
    await owner.current.createOrOpen();
    owner.subscribe(() => Promise.reject(new Error("boom")));
    owner.subscribe(() => new Promise<void>(() => undefined));
    const next = await owner.prepare();
    await owner.commit(next);
    expect(store.keys.has("dev")).toBe(false);
    expect(owner.currentName).toBe("dev-alt");
  });

  it("a crash between prepare and commit: the pending key is reopened, never a second one made", async () => {
    const owner = await DeviceKeyOwner.open(slots());
    await owner.current.createOrOpen();
    const pending = await (await owner.prepare()).open();
    const again = await DeviceKeyOwner.open(slots());
    expect(await again.hasPending()).toBe(true);
    expect(again.currentName).toBe("dev");
    expect((await (await again.prepare()).open()).thumbprint).toBe(pending.thumbprint);
  });

  it("without rotation the owner answers the configured key and refuses to rotate", async () => {
    const owner = await DeviceKeyOwner.open({ ...slots(), names: undefined });
    expect(owner.rotates).toBe(false);
    await expect(owner.prepare()).rejects.toMatchObject({ code: "ERR_CONFIG" });
  });
});
