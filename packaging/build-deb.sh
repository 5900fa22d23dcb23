#!/usr/bin/env bash
# npm run package: builds m2m-agent_<version>_<arch>.deb and m2m-registrar_<version>_<arch>.deb with
# Debian's dpkg-deb (and dpkg-shlibdeps for the native addons' library dependencies), from a clean
# checkout. Each package carries the compiled JavaScript and the production node_modules with the
# native addons (pkcs11js, better-sqlite3, unix-dgram) already built, so gateways need no compiler.
#
# Env: M2M_DEB_VERSION (default: package.json version), M2M_DEB_OUT (default: dist/deb).
# Needs: node/npm (the build machine's Node 20 is the ABI the addons are built for), dpkg-dev, fakeroot.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

for tool in dpkg-deb dpkg-shlibdeps fakeroot node npm gzip; do
	command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg-dev fakeroot)" >&2; exit 1; }
done

UPSTREAM=$(node -p 'require("./package.json").version')
VERSION=${M2M_DEB_VERSION:-$UPSTREAM}
ARCH=$(dpkg --print-architecture)
OUT=${M2M_DEB_OUT:-$REPO/dist/deb}
NODE_ABI=$(node -p 'process.versions.modules')

WORK=$(mktemp -d "${TMPDIR:-/tmp}/m2m-deb-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Compile TypeScript (devDependencies needed: a clean checkout gets them from the lockfile).
[ -x node_modules/.bin/tsc ] || npm ci --no-audit --no-fund
npm run build --silent

# 2. Production dependencies, native addons compiled here, against this Node's ABI.
APP=$WORK/app
mkdir -p "$APP"
cp package.json package-lock.json "$APP/"
# Compiling the addons takes minutes on a small machine: the pruned tree is cached, keyed by the
# lockfile, the prune rules (bump prune1 when they change), the Node version and the architecture (M2M_DEB_CACHE=off disables it).
CACHE_DIR=${M2M_DEB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/m2m-agent-deb}
KEY=$(sha256sum <package-lock.json | cut -c1-16)-prune1-node$(node -p process.version)-$ARCH
if [ "$CACHE_DIR" != off ] && [ -s "$CACHE_DIR/node_modules-$KEY.tar" ]; then
	tar -C "$APP" -xf "$CACHE_DIR/node_modules-$KEY.tar"
else
(cd "$APP" && npm ci --omit=dev --no-audit --no-fund --loglevel=error)
# Keep only what runs: addon build trees shrink to their .node files; typings, maps, docs and
# sources of the addons go.
for build in "$APP"/node_modules/*/build "$APP"/node_modules/@*/*/build; do
	[ -d "$build/Release" ] || continue
	find "$build" -mindepth 1 -maxdepth 1 ! -name Release -exec rm -rf {} +
	find "$build/Release" -mindepth 1 ! -name '*.node' -exec rm -rf {} +
	addon=$(dirname "$build")
	rm -rf "$addon/deps" "$addon/src" "$addon/binding.gyp" "$build/Release/test_extension.node"
done
find "$APP/node_modules" \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \
	-o -iname 'README*' -o -iname 'CHANGELOG*' -o -iname 'HISTORY*' -o -name '*.markdown' \
	-o -name '.github' -o -name '*.tsbuildinfo' \) -prune -exec rm -rf {} +
rm -rf "$APP/node_modules/.bin" "$APP/node_modules/.package-lock.json"
	if [ "$CACHE_DIR" != off ]; then
		mkdir -p "$CACHE_DIR"
		tar -C "$APP" -cf "$CACHE_DIR/node_modules-$KEY.tar.tmp" node_modules
		mv "$CACHE_DIR/node_modules-$KEY.tar.tmp" "$CACHE_DIR/node_modules-$KEY.tar"
	fi
fi
# Compiled code: src only (no tests, benchmarks or the hw test kit), without source maps.
mkdir -p "$APP/dist"
cp -a dist/src "$APP/dist/src"
find "$APP/dist" -name '*.map' -delete
# The addons must load on this Node: fail the build, not the gateway.
(cd "$APP" && node -e 'require("better-sqlite3"); require("pkcs11js"); require("unix-dgram")')

# Library dependencies of the addons, as Debian computes them.
mkdir -p "$WORK/shlibs/debian"
printf 'Source: m2m-agent\n\nPackage: m2m-agent\nArchitecture: any\n' >"$WORK/shlibs/debian/control"
mapfile -t ADDONS < <(find "$APP/node_modules" -name '*.node' -type f)
SHLIBS=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O "${ADDONS[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || { echo "build-deb: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }

COMMON_DEPENDS="nodejs (>= 20.18), $SHLIBS, systemd, init-system-helpers (>= 1.54), procps"
GEN=packaging/generated

# stage PACKAGE: the common tree (code + node_modules + docs) under /usr/lib/PACKAGE.
stage() {
	local pkg=$1 root=$WORK/$1
	mkdir -p "$root/DEBIAN" "$root/usr/lib/$pkg" "$root/usr/bin" "$root/usr/share/doc/$pkg" \
		"$root/lib/systemd/system" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" \
		"$root/usr/share/man/man8" "$root/usr/share/bash-completion/completions"
	cp -a "$APP/dist" "$APP/node_modules" "$APP/package.json" "$root/usr/lib/$pkg/"
	# An explicit interpreter path: the unit's and a shell's PATH cannot pick another node.
	printf '#!/bin/sh\nexec /usr/bin/node /usr/lib/%s/dist/src/cli/%s.js "$@"\n' "$pkg" "$pkg" >"$root/usr/bin/$pkg"
	chmod 755 "$root/usr/bin/$pkg"
	gzip -9n <"$GEN/$pkg.8" >"$root/usr/share/man/man8/$pkg.8.gz"
	cp "$GEN/completions/$pkg" "$root/usr/share/bash-completion/completions/$pkg"
	{
		echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
		echo "Upstream-Name: m2m-agent"
		echo "Comment: bundles the npm packages under /usr/lib/$pkg/node_modules, each under its own license (see its package.json)."
		echo
		echo "Files: *"
		echo "Copyright: m2m-agent authors"
		echo "License: Apache-2.0"
		echo " On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0."
	} >"$root/usr/share/doc/$pkg/copyright"
	printf '%s (%s) stable; urgency=medium\n\n  * Built from the m2m-agent repository.\n\n -- m2m-agent maintainers <m2m-agent@localhost>  %s\n' \
		"$pkg" "$VERSION" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" |
		gzip -9n >"$root/usr/share/doc/$pkg/changelog.Debian.gz"
	install -m 755 "packaging/debian/$pkg/postinst" "packaging/debian/$pkg/prerm" "packaging/debian/$pkg/postrm" "$root/DEBIAN/"
}

# finish PACKAGE DEPENDS RECOMMENDS SUGGESTS DESCRIPTION: control, conffiles, md5sums, dpkg-deb.
finish() {
	local pkg=$1 root=$WORK/$1
	(cd "$root" && find etc -type f 2>/dev/null | sed 's|^|/|' | sort) >"$root/DEBIAN/conffiles"
	[ -s "$root/DEBIAN/conffiles" ] || rm "$root/DEBIAN/conffiles"
	(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
	local size
	size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
	{
		echo "Package: $pkg"
		echo "Version: $VERSION"
		echo "Architecture: $ARCH"
		echo "Maintainer: m2m-agent maintainers <m2m-agent@localhost>"
		echo "Installed-Size: $size"
		echo "Depends: $2"
		[ -z "$3" ] || echo "Recommends: $3"
		[ -z "$4" ] || echo "Suggests: $4"
		echo "Section: admin"
		echo "Priority: optional"
		echo "Homepage: https://github.com/m2m-agent/m2m-agent"
		echo "Description: $5"
		cat
	} >"$root/DEBIAN/control"
	mkdir -p "$OUT"
	fakeroot dpkg-deb -Zxz --build "$root" "$OUT/${pkg}_${VERSION}_${ARCH}.deb" >/dev/null
	echo "$OUT/${pkg}_${VERSION}_${ARCH}.deb"
}

# ── m2m-agent ──
stage m2m-agent
A=$WORK/m2m-agent
install -m 644 service/m2m-agent.service "$A/lib/systemd/system/"
install -m 644 service/sysusers.d/m2m-agent.conf "$A/usr/lib/sysusers.d/m2m-agent.conf"
install -m 644 service/tmpfiles.d/m2m-agent.conf "$A/usr/lib/tmpfiles.d/m2m-agent.conf"
install -D -m 640 service/agent.toml.example "$A/etc/m2m-agent/agent.toml"
mkdir -p "$A/usr/share/man/man5"
gzip -9n <"$GEN/agent.toml.5" >"$A/usr/share/man/man5/agent.toml.5.gz"
cp docs/operations.md docs/credentials.md docs/outbox.md docs/packaging.md "$A/usr/share/doc/m2m-agent/"
# tpm2-tools: every TPM operation; libengine-pkcs11-openssl: mTLS with the key inside the token
# (OpenSSL pkcs11 engine); procps: ExecReload=/bin/kill; tpm-udev: the tss group of /dev/tpmrm0
# (SupplementaryGroups=tss).
finish m2m-agent "$COMMON_DEPENDS, tpm2-tools, libengine-pkcs11-openssl, tpm-udev" \
	"ca-certificates" \
	"softhsm2, opensc, libtpm2-pkcs11-1, tpm2-abrmd, libtss2-tcti-swtpm0" \
	"hardware-backed device identity agent (TPM 2.0 / PKCS#11)" <<'DESC'
 m2m-agent keeps an IoT gateway's identity key inside a TPM 2.0 or a PKCS#11
 token, enrols with attestation at the fleet registrar, obtains OAuth (DPoP)
 and EST credentials, and relays sensor data over MQTT or HTTPS without
 losing what it acknowledged. Runs as a hardened systemd service.
 .
 Needs Node.js >= 20.18 (Debian 12 has 18: use the NodeSource nodejs 20 repository).
DESC

# ── m2m-registrar ──
stage m2m-registrar
R=$WORK/m2m-registrar
install -m 644 service/registrar/m2m-registrar.service "$R/lib/systemd/system/"
install -m 644 service/registrar/m2m-registrar.sysusers "$R/usr/lib/sysusers.d/m2m-registrar.conf"
install -m 644 service/registrar/m2m-registrar.tmpfiles "$R/usr/lib/tmpfiles.d/m2m-registrar.conf"
install -D -m 640 service/registrar/registrar.toml "$R/etc/m2m-registrar/registrar.toml"
# The revocation hook the docs and registrar.toml name (docs/revocation.md): executable, not a conffile.
install -D -m 755 service/hooks/mosquitto-revoke "$R/usr/share/m2m-registrar/hooks/mosquitto-revoke"
cp docs/registrar.md docs/packaging.md docs/revocation.md docs/registrar-scale.md docs/fleet-load.md \
	"$R/usr/share/doc/m2m-registrar/"
finish m2m-registrar "$COMMON_DEPENDS" "ca-certificates" "" \
	"reference registrar for m2m-agent fleets" <<'DESC'
 The fleet side of m2m-agent: verifies TPM attestation (no TPM needed) and
 PKCS#11 bootstrap-token enrolments, runs the fleet CA, an OAuth token
 service (private_key_jwt, DPoP), EST and an ingest endpoint.
 .
 Needs Node.js >= 20.18 (Debian 12 has 18: use the NodeSource nodejs 20 repository).
DESC
echo "build-deb: Node ABI $NODE_ABI; installed sizes: $(du -sh --exclude=DEBIAN "$A" | cut -f1) (agent), $(du -sh --exclude=DEBIAN "$R" | cut -f1) (registrar)" >&2
