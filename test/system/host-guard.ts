import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * What a careless systemd boot changes on the host (docs/packaging.md, hardware notes "Real systemd"):
 * /tmp and /var/tmp emptied by systemd-tmpfiles, /dev node modes, sysctls written by systemd-sysctl,
 * /etc/nsswitch.conf edited by libnss-mymachines, cgroups left at the hierarchy roots.
 * `snapshotHost()` before the boot, `diffHost()` after the teardown: the test fails on any difference.
 */
export interface HostSnapshot {
  readonly sentinels: readonly string[];
  readonly nsswitch: string;
  readonly devModes: ReadonlyMap<string, string>;
  readonly sysctls: ReadonlyMap<string, string>;
  readonly cgroups: ReadonlySet<string>;
}

const sha = (path: string): string => createHash("sha256").update(readFileSync(path)).digest("hex");

function devModes(): Map<string, string> {
  const out = new Map<string, string>();
  for (const name of readdirSync("/dev")) {
    try {
      const st = statSync(join("/dev", name));
      if (st.isCharacterDevice() || st.isBlockDevice())
        out.set(`/dev/${name}`, `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid}`);
    } catch {
      // vanished while listing
    }
  }
  return out;
}

/** Every sysctl a sysctl.d file in the container root names (what systemd-sysctl would write). */
export function sysctlKeys(root: string): string[] {
  const keys = new Set<string>();
  for (const line of existsSync(join(root, "etc/sysctl.conf"))
    ? readFileSync(join(root, "etc/sysctl.conf"), "utf8").split("\n")
    : []) {
    const m = /^\s*-?([a-z0-9_.*/-]+)\s*=/.exec(line);
    if (m?.[1] !== undefined && !m[1].includes("*")) keys.add(m[1]);
  }
  for (const dir of ["usr/lib/sysctl.d", "lib/sysctl.d", "etc/sysctl.d"]) {
    const d = join(root, dir);
    if (!existsSync(d)) continue;
    for (const f of readdirSync(d)) {
      if (!f.endsWith(".conf")) continue;
      let text: string;
      try {
        text = readFileSync(join(d, f), "utf8");
      } catch {
        continue; // e.g. 99-sysctl.conf → /etc/sysctl.conf, an absolute link read below inside the root
      }
      for (const line of text.split("\n")) {
        const m = /^\s*-?([a-z0-9_.*/-]+)\s*=/.exec(line);
        if (m?.[1] !== undefined && !m[1].includes("*")) keys.add(m[1]);
      }
    }
  }
  // Always watched, whatever the root names: the ones the notes saw changed or that nspawn touches.
  for (const k of ["kernel.sysrq", "kernel.core_pattern", "fs.protected_regular", "net.ipv4.ip_forward"])
    keys.add(k);
  return [...keys].sort();
}

function sysctls(keys: readonly string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const k of keys) {
    const p = join("/proc/sys", k.replaceAll(".", "/"));
    try {
      out.set(k, readFileSync(p, "utf8").trim());
    } catch {
      // not present on this kernel
    }
  }
  return out;
}

function cgroups(): Set<string> {
  const out = new Set<string>();
  for (const h of readdirSync("/sys/fs/cgroup")) {
    const d = join("/sys/fs/cgroup", h);
    try {
      for (const c of readdirSync(d, { withFileTypes: true })) if (c.isDirectory()) out.add(`${h}/${c.name}`);
    } catch {
      // not a directory
    }
  }
  return out;
}

/** Sentinels in /tmp and /var/tmp: one 40 days old (tmpfiles' age cleanup would take it), one fresh. */
function plantSentinels(tag: string): string[] {
  const paths: string[] = [];
  for (const dir of ["/tmp", "/var/tmp"]) {
    for (const age of ["old", "new"]) {
      const p = join(dir, `.m2m-systest-sentinel-${tag}-${age}`);
      writeFileSync(p, "host file: must survive the container boot\n");
      if (age === "old") {
        const t = new Date(Date.now() - 40 * 86_400_000);
        utimesSync(p, t, t);
      }
      paths.push(p);
    }
  }
  return paths;
}

export function snapshotHost(root: string, tag: string): HostSnapshot {
  return {
    sentinels: plantSentinels(tag),
    nsswitch: sha("/etc/nsswitch.conf"),
    devModes: devModes(),
    sysctls: sysctls(sysctlKeys(root)),
    cgroups: cgroups(),
  };
}

/** Differences between the snapshot and the host now (empty = untouched); removes the sentinels. */
export function diffHost(before: HostSnapshot): string[] {
  const diff: string[] = [];
  for (const s of before.sentinels) {
    if (!existsSync(s)) diff.push(`${s} was deleted`);
  }
  if (sha("/etc/nsswitch.conf") !== before.nsswitch) diff.push("/etc/nsswitch.conf changed");
  const dev = devModes();
  for (const [p, m] of before.devModes) {
    const now = dev.get(p);
    if (now !== undefined && now !== m) diff.push(`${p}: mode/owner ${m} -> ${now}`);
  }
  const now = sysctls([...before.sysctls.keys()]);
  for (const [k, v] of before.sysctls) if (now.get(k) !== v) diff.push(`sysctl ${k}: ${v} -> ${now.get(k)}`);
  for (const c of cgroups()) if (!before.cgroups.has(c)) diff.push(`cgroup /sys/fs/cgroup/${c} left behind`);
  return diff;
}
