import { pathToFileURL } from "node:url";
import { bundleEntry } from "../integration/relay-helpers.js";

let bundled: Promise<URL> | undefined;

/**
 * The WorkerOutbox worker entry bundled to plain ESM (Node 20 cannot run TypeScript in a worker);
 * bare imports such as the native better-sqlite3 stay external. Built once per test file.
 */
export function outboxWorkerUrl(): Promise<URL> {
  bundled ??= bundleEntry(
    new URL("../../src/relay/outbox/worker/outbox-worker.ts", import.meta.url).pathname,
    "outbox-worker",
  ).then((file) => pathToFileURL(file));
  return bundled;
}
