/** Polls `pred` every 2 ms for up to ~4 s (unit tests of in-process loops); throws naming `what`. */
export async function until(pred: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (pred()) return;
    await new Promise((r) => setTimeout(r, 2));
  }
  throw new Error(`timed out: ${what}`);
}
