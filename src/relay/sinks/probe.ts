import { connect as netConnect } from "node:net";

/**
 * True when a TCP connection to `host:port` opens within `timeoutMs` (then closed at once: no TLS,
 * no login, cheap for both sides). Sinks use it as their `probe()` during backoff. Never rejects.
 */
export function tcpReachable(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const sock = netConnect({ host: host.replace(/^\[|\]$/g, ""), port });
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      sock.removeAllListeners();
      sock.on("error", () => undefined);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.once("connect", () => done(true));
    sock.once("error", () => done(false));
  });
}

/** `tcpReachable` for a URL, with the scheme's default port. False for an unparsable URL. */
export function urlReachable(u: string, defaultPort: number, timeoutMs: number): Promise<boolean> {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    return Promise.resolve(false);
  }
  return tcpReachable(url.hostname, Number(url.port || defaultPort), timeoutMs);
}
