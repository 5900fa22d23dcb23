import { createRequire } from "node:module";

/** A real Unix datagram socket bound by a test, standing in for systemd's $NOTIFY_SOCKET. */
export interface NotifyListener {
  readonly path: string;
  /** Every datagram received so far, in order. */
  readonly messages: string[];
  /** Resolves with the first datagram (from index `from`) that matches, waiting for it if needed. */
  waitFor(match: (msg: string) => boolean, from?: number, timeoutMs?: number): Promise<string>;
  close(): void;
}

interface Sock {
  on(ev: "message", l: (buf: Buffer) => void): void;
  on(ev: "error", l: (err: Error) => void): void;
  on(ev: "listening", l: () => void): void;
  bind(path: string): void;
  close(): void;
}

const require = createRequire(import.meta.url);

export function bindNotifyListener(path: string): Promise<NotifyListener> {
  const mod = require("unix-dgram") as { createSocket(t: "unix_dgram"): Sock };
  const sock = mod.createSocket("unix_dgram");
  const messages: string[] = [];
  const waiters = new Set<() => void>();
  sock.on("message", (buf) => {
    messages.push(buf.toString("utf8"));
    for (const w of waiters) w();
  });
  return new Promise((resolve, reject) => {
    sock.on("error", reject);
    sock.on("listening", () =>
      resolve({
        path,
        messages,
        waitFor(match, from = 0, timeoutMs = 20_000) {
          return new Promise((res, rej) => {
            const check = (): boolean => {
              const hit = messages.slice(from).find(match);
              if (hit === undefined) return false;
              waiters.delete(check);
              clearTimeout(timer);
              res(hit);
              return true;
            };
            const timer = setTimeout(() => {
              waiters.delete(check);
              rej(new Error(`no matching notify datagram; got ${JSON.stringify(messages.slice(from))}`));
            }, timeoutMs);
            waiters.add(check);
            check();
          });
        },
        close() {
          try {
            sock.close();
          } catch {}
        },
      }),
    );
    sock.bind(path);
  });
}
