//! `kiwispray-fcgi`: the boot service. Speaks FastCGI on a listening socket
//! passed as fd 0 (spawn-fcgi, systemd with `StandardInput=socket`), on
//! systemd's `LISTEN_FDS` socket, or on one it binds itself (`--bind`); or
//! answers a single CGI request when run by a web server as CGI. With
//! `--tftp ADDR[:PORT]` it is the read-only TFTP front end instead
//! (`kiwispray::tftp`).

use clap::Parser;
use kiwispray::api::Service;
use kiwispray::config::Config;
use kiwispray::fcgi;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "kiwispray-fcgi",
    version,
    about = "KIWIspray boot service (FastCGI, CGI or TFTP)",
    long_about = "Answers /bootstrap, /post-install, /finish, /state, /update and /hosts \
                  behind a web server.\n\nWith no --bind it serves FastCGI on the listening \
                  socket passed as fd 0 (or systemd's LISTEN_FDS); run by a web server as CGI \
                  (GATEWAY_INTERFACE set, no socket on fd 0) it answers one request. With \
                  --tftp ADDR[:PORT] it is the read-only TFTP front end of the same service."
)]
struct Args {
    /// Deployment root (templates/, images/, known_hosts.json).
    #[arg(long, env = "KIWISPRAY_ROOT", default_value = ".")]
    root: PathBuf,
    /// Settings file (default: <root>/kiwispray.json if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Register new machines in state `discover,new`.
    #[arg(long)]
    discover: bool,
    /// Bind a socket instead of using fd 0: `unix:/path/to.sock` or `HOST:PORT`.
    #[arg(long, value_name = "ADDRESS")]
    bind: Option<String>,
    /// Permissions of a Unix socket created by --bind (octal).
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Most FastCGI connections served at once; more wait for one (503 with Retry-After after 1 s).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Serve TFTP (read-only) on this address instead of FastCGI; port 69
    /// unless given. Repeat for more addresses. Never a default wildcard.
    #[arg(long, value_name = "ADDR[:PORT]")]
    tftp: Vec<String>,
    /// The web server the machines reach, `HOST:PORT` (templates' server
    /// address and port); default: `server` from kiwispray.json, else the
    /// TFTP address with port 80.
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<String>,
    /// Most TFTP transfers at once; more requests get "busy, try again".
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    tftp_max_transfers: u64,
    /// Largest TFTP block size granted (RFC 2348: 8..65464).
    #[arg(long, default_value_t = 1468, value_parser = clap::value_parser!(u16).range(8..=65464))]
    tftp_max_blksize: u16,
    /// Seconds before a TFTP packet is sent again, unless the client
    /// negotiates its own timeout.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=255))]
    tftp_timeout: u64,
    /// Sends of one TFTP packet before the transfer is given up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    tftp_tries: u32,
    /// Answer one CGI request even if fd 0 is a socket.
    #[arg(long)]
    cgi: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    generate_man: bool,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|_| format!("{s:?} is not an octal mode"))
}

enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
    Inherited(RawFd),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Inherited(fd) => *fd,
        }
    }
}

fn bind(address: &str, mode: u32) -> Result<Listener, String> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                // A stale socket from an earlier run.
                let _ = std::fs::remove_file(&path);
            } else {
                return Err(format!("{} exists and is not a socket", path.display()));
            }
        }
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set permissions of {}: {e}", path.display()))?;
        Ok(Listener::Unix(l))
    } else {
        let l = std::net::TcpListener::bind(address)
            .map_err(|e| format!("cannot bind {address}: {e}"))?;
        Ok(Listener::Tcp(l))
    }
}

/// Whether `fd` is an open socket.
fn is_socket(fd: RawFd) -> bool {
    // Borrow the descriptor without closing it afterwards.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    file.metadata()
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// The socket systemd passed with `LISTEN_FDS`, if it is meant for us.
fn systemd_socket() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (pid == std::process::id() && fds >= 1 && is_socket(3)).then_some(3)
}

/// The TFTP front end: binds every `--tftp` address and serves until killed.
fn serve_tftp(args: &Args, config: Config) -> ExitCode {
    let mut listen = Vec::new();
    for a in &args.tftp {
        let addr = match kiwispray::tftp::parse_listen(a) {
            Ok(addr) => addr,
            Err(e) => {
                eprintln!("kiwispray-fcgi: --tftp {e}");
                return ExitCode::from(2);
            }
        };
        let http = args
            .http
            .clone()
            .or_else(|| config.server.clone())
            .unwrap_or_else(|| kiwispray::tftp::host_port(addr.ip(), 80));
        listen.push(kiwispray::tftp::Listen { addr, http });
    }
    let limits = kiwispray::tftp::Limits {
        max_transfers: args.tftp_max_transfers as usize,
        max_blksize: args.tftp_max_blksize,
        timeout: std::time::Duration::from_secs(args.tftp_timeout),
        tries: args.tftp_tries,
    };
    let service = Arc::new(Service::new(config));
    let message = format!(
        "kiwispray-fcgi: serving {} over TFTP on {} (web server {}, at most {} transfers, \
         blksize up to {})",
        service.config.root.display(),
        listen
            .iter()
            .map(|l| l.addr.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        listen[0].http,
        limits.max_transfers,
        limits.max_blksize
    );
    kiwispray::metrics::start_flusher(service.metrics_file());
    match kiwispray::tftp::serve(service, listen, limits, || eprintln!("{message}")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiwispray-fcgi: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.generate_man {
        let command = <Args as clap::CommandFactory>::command();
        print!("{}", kiwispray::cli::man::render(&command, "8"));
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&args.root, args.config.as_deref()) {
        Ok(mut c) => {
            c.discover |= args.discover;
            if let Some(m) = args.max_connections {
                c.max_connections = m.clamp(1, 4096);
            }
            c
        }
        Err(e) => {
            eprintln!("kiwispray-fcgi: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.tftp.is_empty() {
        if args.bind.is_some() || args.cgi {
            eprintln!(
                "kiwispray-fcgi: --tftp runs the TFTP front end alone; drop --bind and --cgi"
            );
            return ExitCode::from(2);
        }
        return serve_tftp(&args, config);
    }
    let cgi = args.cgi
        || (args.bind.is_none()
            && std::env::var_os("GATEWAY_INTERFACE").is_some()
            && !is_socket(0));
    let service = Service::new(config);
    if cgi {
        return match fcgi::serve_cgi(&service) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiwispray-fcgi: cannot write the CGI response: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let listener = match &args.bind {
        Some(a) => match bind(a, args.socket_mode) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("kiwispray-fcgi: {e}");
                return ExitCode::from(2);
            }
        },
        None => match systemd_socket() {
            Some(fd) => Listener::Inherited(fd),
            None if is_socket(0) => Listener::Inherited(0),
            None => {
                eprintln!(
                    "kiwispray-fcgi: no listening socket on fd 0; use --bind unix:/path or \
                     HOST:PORT, start it with spawn-fcgi or systemd socket activation, \
                     or run it as CGI"
                );
                return ExitCode::from(2);
            }
        },
    };
    eprintln!(
        "kiwispray-fcgi: serving {} (database {}, discover {}, at most {} connections)",
        service.config.root.display(),
        service.store.path().display(),
        if service.config.discover { "on" } else { "off" },
        service.config.max_connections
    );
    let max = service.config.max_connections;
    let service = Arc::new(service);
    kiwispray::api::overdue::start_watch(&service);
    kiwispray::metrics::start_flusher(service.metrics_file());
    fcgi::serve_fastcgi(service, listener.fd(), max);
    drop(listener);
    ExitCode::SUCCESS
}
