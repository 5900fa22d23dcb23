/**
 * Progress display for long operations (key generation, enrolment, backlog drain). On a TTY: one
 * spinner line rewritten in place; otherwise (journald, pipes, CI): plain lines, one per step.
 * Progress goes to stderr so stdout stays clean for results and `--json`.
 */
export interface Progress {
  /** Starts (or moves on to) a step. */
  step(text: string): void;
  /** Ends the current step successfully. */
  done(text?: string): void;
  /** Ends the current step with a failure. */
  fail(text?: string): void;
}

export interface ProgressOptions {
  readonly stream?: NodeJS.WriteStream | { write(s: string): boolean; isTTY?: boolean };
  /** Silent (e.g. --json): nothing is written. */
  readonly quiet?: boolean;
  /** Force TTY mode on or off (default: stream.isTTY). */
  readonly tty?: boolean;
}

const FRAMES = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

export function createProgress(options: ProgressOptions = {}): Progress {
  const stream = options.stream ?? process.stderr;
  if (options.quiet === true) return { step: () => undefined, done: () => undefined, fail: () => undefined };
  const tty = options.tty ?? stream.isTTY === true;
  let current: string | undefined;

  if (!tty) {
    return {
      step(text) {
        current = text;
        stream.write(`... ${text}\n`);
      },
      done(text) {
        stream.write(`ok  ${text ?? current ?? ""}\n`);
        current = undefined;
      },
      fail(text) {
        stream.write(`FAIL ${text ?? current ?? ""}\n`);
        current = undefined;
      },
    };
  }

  let frame = 0;
  let timer: NodeJS.Timeout | undefined;
  const render = (): void => {
    stream.write(`\r\x1b[2K${FRAMES[frame % FRAMES.length]} ${current ?? ""}`);
    frame++;
  };
  const end = (mark: string, text?: string): void => {
    if (timer !== undefined) clearInterval(timer);
    timer = undefined;
    stream.write(`\r\x1b[2K${mark} ${text ?? current ?? ""}\n`);
    current = undefined;
  };
  return {
    step(text) {
      current = text;
      render();
      if (timer === undefined) {
        timer = setInterval(render, 80);
        timer.unref();
      }
    },
    done: (text) => end("✓", text),
    fail: (text) => end("✗", text),
  };
}

/** Runs `fn` as one step: done on success, fail (and rethrow) on error. */
export async function withStep<T>(progress: Progress, text: string, fn: () => Promise<T>): Promise<T> {
  progress.step(text);
  try {
    const r = await fn();
    progress.done();
    return r;
  } catch (err) {
    progress.fail();
    throw err;
  }
}
