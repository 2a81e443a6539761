//! The benchmark's ceiling (`make bench`): a FastCGI responder on the
//! vendored `fastcgi` crate, with the limits `kiwispray-fcgi` uses, that
//! answers every request with the same bytes and does nothing else. Its
//! throughput through nginx is what this architecture allows; the boot
//! service's finished-host `/bootstrap` is measured against it.
//!
//! Usage: noop-fcgi SOCKET_PATH BODY_FILE [MAX_CONNECTIONS]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: noop-fcgi SOCKET_PATH BODY_FILE [MAX_CONNECTIONS]");
        std::process::exit(2);
    }
    let body = std::fs::read(&args[2]).unwrap_or_else(|e| {
        eprintln!("noop-fcgi: cannot read {}: {e}", args[2]);
        std::process::exit(1)
    });
    let max_connections = args
        .get(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(kiwispray::config::DEFAULT_MAX_CONNECTIONS);
    let _ = std::fs::remove_file(&args[1]);
    let listener = UnixListener::bind(&args[1]).unwrap_or_else(|e| {
        eprintln!("noop-fcgi: cannot bind {}: {e}", args[1]);
        std::process::exit(1)
    });
    let _ = std::fs::set_permissions(&args[1], std::fs::Permissions::from_mode(0o666));
    let mut answer = format!(
        "Status: 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let limits = fastcgi::Limits {
        max_connections,
        ..fastcgi::Limits::default()
    };
    fastcgi::run_raw_with(
        move |mut r: fastcgi::Request| {
            let _ = r.stdout().write_all(&answer);
        },
        listener.as_raw_fd(),
        limits,
    );
}
