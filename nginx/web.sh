# Sourced by nginx/serve.sh for WEB=nginx (the default): writes the nginx
# configuration for this run (the shipped nginx/kiwispray.conf rewritten for
# ROOT, PORT, the handler's socket and the checkout's ui/) and starts nginx in the foreground,
# adding its pid to `pids`. Uses here, ROOT, PORT, RUN_DIR and sock from
# serve.sh.

command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || die "nginx is not installed (make serve installs it)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# nginx, with the shipped server block rewritten for this root, port and socket.
sed -e "s#/srv/kiwispray#$ROOT#g" \
    -e "s#unix:/run/kiwispray/fcgi.sock#unix:$sock#" \
    -e "s#/usr/share/kiwispray/ui/#$here/ui/#" \
    -e "s#^\(\s*listen\s\+\)5000;#\1$PORT;#" \
    -e "s#^\(\s*listen\s\+\)\[::\]:5000;#\1[::]:$PORT;#" \
    -e "s#access_log /var/log/nginx/kiwispray.access.log;#access_log $RUN_DIR/access.log;#" \
    "$here/nginx/kiwispray.conf" > "$RUN_DIR/kiwispray.conf"
if [ ! -e /proc/net/if_inet6 ]; then
    sed -i '/listen\s\+\[::\]/d' "$RUN_DIR/kiwispray.conf"
fi
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat > "$RUN_DIR/nginx.conf" <<EOF
$user_line
worker_processes 2;
daemon off;
pid $RUN_DIR/nginx.pid;
error_log $RUN_DIR/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $RUN_DIR/tmp/body;
    proxy_temp_path $RUN_DIR/tmp/proxy;
    fastcgi_temp_path $RUN_DIR/tmp/fastcgi;
    uwsgi_temp_path $RUN_DIR/tmp/uwsgi;
    scgi_temp_path $RUN_DIR/tmp/scgi;
    keepalive_requests 100000;
    include $RUN_DIR/kiwispray.conf;
}
EOF
"$NGINX" -t -q -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" || die "nginx rejected $RUN_DIR/nginx.conf"
"$NGINX" -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" &
pids+=($!)
