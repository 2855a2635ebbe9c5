#!/bin/sh
# provision.sh — set up the "greeter" service on a Debian host:
#   - a system user "greeter" with no login shell,
#   - /etc/greeter/greeter.conf (mode 640, root:greeter) holding the port,
#   - /var/lib/greeter/index.html, the page it serves,
#   - /etc/systemd/system/greeter.service, enabled and started.
# Idempotent: a second run with the same arguments changes nothing, restarts
# nothing, and prints no "changed:" line.
#
# Usage: provision.sh [PORT]   (default 8080; must run as root)
set -eu

PORT="${1:-8080}"
NAME=greeter
CONF_DIR=/etc/$NAME
CONF=$CONF_DIR/$NAME.conf
STATE=/var/lib/$NAME
UNIT=/etc/systemd/system/$NAME.service

[ "$(id -u)" -eq 0 ] || { echo "provision.sh: must run as root" >&2; exit 1; }
case "$PORT" in
    ''|*[!0-9]*) echo "provision.sh: bad port: $PORT" >&2; exit 2 ;;
esac

changed() { echo "changed: $*"; }

# ensure_dir MODE OWNER GROUP PATH
ensure_dir() {
    if [ "$(stat -c '%a %U %G' "$4" 2>/dev/null)" != "$1 $2 $3" ]; then
        install -d -m "$1" -o "$2" -g "$3" "$4"
        changed "$4"
    fi
}

# ensure_file MODE OWNER GROUP PATH CONTENT: sets did=yes if it had to write
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
ensure_file() {
    printf '%s\n' "$5" >"$tmp"
    did=no
    if [ -f "$4" ] && cmp -s "$tmp" "$4" && [ "$(stat -c '%a %U %G' "$4")" = "$1 $2 $3" ]; then
        return 0
    fi
    install -m "$1" -o "$2" -g "$3" "$tmp" "$4"
    changed "$4"
    did=yes
}

if ! getent passwd "$NAME" >/dev/null; then
    useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$NAME"
    changed "user $NAME"
fi

ensure_dir 750 root "$NAME" "$CONF_DIR"
ensure_dir 755 "$NAME" "$NAME" "$STATE"

restart=no
ensure_file 640 root "$NAME" "$CONF" "PORT=$PORT"
[ "$did" = no ] || restart=yes
ensure_file 644 "$NAME" "$NAME" "$STATE/index.html" "hello from $NAME"

unit=$(cat <<UNIT
[Unit]
Description=Greeter: serves $STATE over HTTP
After=network.target

[Service]
User=$NAME
Group=$NAME
EnvironmentFile=$CONF
ExecStart=/usr/bin/python3 -m http.server \${PORT} --bind 127.0.0.1 --directory $STATE
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
)
ensure_file 644 root root "$UNIT" "$unit"
if [ "$did" = yes ]; then
    systemctl daemon-reload
    restart=yes
fi

if ! systemctl is-enabled --quiet "$NAME"; then
    systemctl enable --quiet "$NAME"
    changed "enabled $NAME"
fi
if ! systemctl is-active --quiet "$NAME"; then
    systemctl start "$NAME"
    changed "started $NAME"
elif [ "$restart" = yes ]; then
    systemctl restart "$NAME"
    changed "restarted $NAME"
fi
