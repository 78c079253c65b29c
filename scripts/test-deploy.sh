#!/usr/bin/env bash
# The deployment checks of `make test-deploy` (after `make package`): the package's file list and
# conffile, and the systemd unit through `systemd-analyze verify`. Nothing is installed or started.
set -euo pipefail
cd "$(dirname "$0")/.."

deb="$(ls -t target/debian/image-server_*.deb | head -1)"
echo "test-deploy: $deb"
listing="$(dpkg-deb -c "$deb")"
echo "$listing"
for path in ./usr/bin/image-server ./etc/image-server/config.toml \
    ./usr/lib/systemd/system/image-server.service ./usr/share/doc/image-server/examples/image-server.socket \
    ./usr/share/doc/image-server/README.md \
    ./usr/share/doc/image-server/operations.md; do
    grep -q " $path\$" <<<"$listing" || { echo "test-deploy: $path missing from the package" >&2; exit 1; }
done
dpkg-deb -f "$deb" Depends | grep -q libvips || { echo "test-deploy: no libvips in Depends" >&2; exit 1; }
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/image-server/config.toml ||
    { echo "test-deploy: config.toml is not a conffile" >&2; exit 1; }
# The service is enabled on install; the optional socket unit (an example) is not.
postinst="$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst)"
grep -q "image-server.service" <<<"$postinst" || { echo "test-deploy: postinst does not enable the service" >&2; exit 1; }
if grep -q "image-server.socket" <<<"$postinst"; then
    echo "test-deploy: postinst enables the optional socket unit" >&2; exit 1
fi

# The unit as installed, pointed at the freshly built binary (verify checks that ExecStart exists).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for unit in deploy/systemd/image-server.service deploy/socket/image-server.socket; do
    sed "s|/usr/bin/image-server|$PWD/target/release/image-server|g; s|/etc/image-server/config.toml|$PWD/deploy/config.toml|g" \
        "$unit" >"$work/$(basename "$unit")"
done
systemd-analyze verify "$work/image-server.service" "$work/image-server.socket"
"$PWD/target/release/image-server" --config deploy/config.toml check-config
echo "test-deploy: OK"
