import { existsSync } from "node:fs";
import pg from "pg";
import { describe, expect, it } from "vitest";
import { startPostgres } from "../../hw/postgres.js";

describe("hw/postgres test kit", () => {
  it("starts a private cluster on a Unix socket (and optionally loopback TCP), creates databases, and removes everything on stop", async () => {
    const h = await startPostgres({ tcp: true, durable: false });
    try {
      expect(existsSync(h.socketDir)).toBe(true);
      for (const u of [h.url, h.tcpUrl ?? ""]) {
        const c = new pg.Client({ connectionString: u });
        await c.connect();
        const row = (await c.query<{ db: string }>("SELECT current_database() AS db")).rows[0];
        expect(row?.db).toBe("m2m");
        await c.end();
      }
      const other = await h.createDatabase("other");
      const c = new pg.Client({ connectionString: other });
      await c.connect();
      expect((await c.query<{ db: string }>("SELECT current_database() AS db")).rows[0]?.db).toBe("other");
      await c.end();
    } finally {
      await h.stop();
    }
    expect(existsSync(h.socketDir)).toBe(false);
    await h.stop();
  });

  it("without tcp the server has no TCP listener", async () => {
    const h = await startPostgres({ durable: false });
    try {
      expect(h.tcpUrl).toBeUndefined();
      const c = new pg.Client({ connectionString: h.url });
      await c.connect();
      const r = await c.query<{ l: string }>("SELECT current_setting('listen_addresses') AS l");
      expect(r.rows[0]?.l).toBe("");
      await c.end();
    } finally {
      await h.stop();
    }
  });
});
