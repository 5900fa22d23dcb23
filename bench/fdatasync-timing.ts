/**
 * Preload for the relay process that times every `fs.fdatasync` (the outbox's WAL syncs) and prints
 * one line per second on stderr: `FDSYNC n=… p50=… p99=… max=…` (ms, call to callback). Usage:
 * `RELAY_BENCH_NODE_ARGS="--import ./dist/bench/fdatasync-timing.js" node dist/bench/relay.js`.
 * It patches the builtin before the outbox module binds it (`syncBuiltinESMExports`).
 */
import fs from "node:fs";
import { syncBuiltinESMExports } from "node:module";

const original = fs.fdatasync;
const durations: number[] = [];
const timed = (fd: number, cb: (err: NodeJS.ErrnoException | null) => void): void => {
  const t = performance.now();
  original(fd, (err) => {
    durations.push(performance.now() - t);
    cb(err);
  });
};
(fs as { fdatasync: typeof timed }).fdatasync = timed;
syncBuiltinESMExports();

setInterval(() => {
  const d = durations.splice(0).sort((a, b) => a - b);
  if (d.length === 0) return;
  const at = (q: number): string => (d[Math.min(d.length - 1, Math.floor(q * d.length))] ?? 0).toFixed(1);
  process.stderr.write(`FDSYNC n=${d.length} p50=${at(0.5)} p99=${at(0.99)} max=${at(1)}\n`);
}, 1000).unref();
