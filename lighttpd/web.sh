# Sourced by nginx/serve.sh for WEB=lighttpd: writes the lighttpd
# configuration for this run (the shipped lighttpd/kiwispray.conf rewritten
# for ROOT, PORT, the handler's socket and the checkout's ui/) and starts lighttpd in the
# foreground, adding its pid to `pids`. Uses here, ROOT, PORT, RUN_DIR and
# sock from serve.sh.

command -v lighttpd >/dev/null || [ -x /usr/sbin/lighttpd ] || die "lighttpd is not installed (make serve WEB=lighttpd installs it)"
LIGHTTPD=$(command -v lighttpd || echo /usr/sbin/lighttpd)

# lighttpd, with the shipped snippet rewritten for this root, port and socket.
esc_root=${ROOT//\"/\\\"}
sed -e "s#^var\.kiwispray_root = .*#var.kiwispray_root = \"$esc_root\"#" \
    -e "s#^var\.kiwispray_socket = .*#var.kiwispray_socket = \"$sock\"#" \
    -e "s#:5000\"#:$PORT\"#g" \
    -e "s#:5000\\$\"#:$PORT\$\"#" \
    -e "s#/var/log/lighttpd/kiwispray.access.log#$RUN_DIR/access.log#" \
    -e "s#/usr/share/kiwispray/ui/#$here/ui/#" \
    "$here/lighttpd/kiwispray.conf" > "$RUN_DIR/kiwispray.conf"
grep -q "^var.kiwispray_socket = \"$sock\"" "$RUN_DIR/kiwispray.conf" \
    || die "cannot rewrite lighttpd/kiwispray.conf for this run"
if [ ! -e /proc/net/if_inet6 ]; then
    sed -i '/^\$SERVER\["socket"\] == "\[::\]/d' "$RUN_DIR/kiwispray.conf"
fi
# The main configuration's own socket is a Unix socket in RUN_DIR, so that
# only the snippet's $SERVER["socket"] blocks listen on the network.
cat > "$RUN_DIR/lighttpd.conf" <<EOF2
server.document-root = "$RUN_DIR/tmp"
server.bind = "$RUN_DIR/main.sock"
server.pid-file = "$RUN_DIR/lighttpd.pid"
server.errorlog = "$RUN_DIR/error.log"
server.upload-dirs = ( "$RUN_DIR/tmp" )
server.max-connections = 4096
server.max-keep-alive-requests = 100000
mimetype.assign = ( ".html" => "text/html", "" => "application/octet-stream" )
include "$RUN_DIR/kiwispray.conf"
EOF2
"$LIGHTTPD" -tt -f "$RUN_DIR/lighttpd.conf" || die "lighttpd rejected $RUN_DIR/lighttpd.conf"
"$LIGHTTPD" -D -f "$RUN_DIR/lighttpd.conf" &
pids+=($!)
