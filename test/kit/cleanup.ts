import { afterAll } from "vitest";

/** Registers a closer: it runs once, in the enclosing `describe`'s `afterAll`. */
export type Defer = (close: () => unknown) => void;

/**
 * Go's `t.Cleanup` for a `describe` block: call `defer(close)` right after acquiring something (a
 * swtpm, a registrar, a daemon). In `afterAll` the closers run one at a time, last deferred first, so a
 * daemon stops before the registrar it talks to and the work directory goes last; only what was
 * acquired is released (no `x?.stop()` for a `beforeAll` that failed half-way). Every closer runs even
 * when one throws; the first error is rethrown at the end.
 */
export function useCleanup(): Defer {
  const closers: (() => unknown)[] = [];
  afterAll(async () => {
    let first: unknown;
    let failed = false;
    for (const close of closers.splice(0).reverse()) {
      try {
        await close();
      } catch (e) {
        if (!failed) first = e;
        failed = true;
      }
    }
    if (failed) throw first;
  });
  return (close) => {
    closers.push(close);
  };
}
