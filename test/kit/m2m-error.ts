import { isM2mError, type M2mError } from "../../src/core/errors.js";

/**
 * Awaits `p` and returns the M2mError it rejects with. Throws when `p` resolves ("expected <what>")
 * or rejects with anything that is not an M2mError (rethrown as is).
 */
export async function rejectionOf(p: Promise<unknown>, what = "a failure"): Promise<M2mError> {
  try {
    await p;
  } catch (err) {
    if (isM2mError(err)) return err;
    throw err;
  }
  throw new Error(`expected ${what}`);
}
