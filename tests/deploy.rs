//! Deployment tests: the RPM (`make rpm`; its file list, config files and
//! scriptlets; an install into a scratch root whose binaries then run; the
//! noarch `kiwispray-firstboot` subpackage with the first-boot agent), the
//! systemd units (`systemd-analyze verify`, and the handler on a listening
//! socket passed as fd 0 or as `LISTEN_FDS`, as socket activation does), the
//! dnsmasq configurations (`dnsmasq --test`), the handler as plain CGI under
//! lighttpd's `mod_cgi`, and the whole stack under lighttpd
//! (`WEB=lighttpd nginx/serve.sh`).
//!
//! They need rpm, lighttpd, dnsmasq, systemd, busybox-static and curl
//! (`make test` installs them); a missing tool fails the test with the
//! package to install. The RPM is built from `git archive HEAD`, so it holds
//! the committed tree.

use std::collections::BTreeSet;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FCGI: &str = env!("CARGO_BIN_EXE_kiwispray-fcgi");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The path of a tool, or a failure that names the Debian package.
fn need(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is missing: install the Debian package {package} (make deps-test does)");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "server exited ({status}) before listening on {port}:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "nothing listens on port {port} after 20 s:\n{}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// A child process stopped when the test ends, however it ends.
struct Running {
    child: Child,
    /// SIGTERM first (a script that cleans up), else SIGKILL.
    term: bool,
}

impl Running {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if self.term {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(s)) = self.child.try_wait() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        self.child.wait().ok();
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A response as curl saw it.
struct Http {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Http {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `curl` with extra arguments; the status, headers and body.
fn curl(extra: &[&str], url: &str) -> Http {
    let out = Command::new(need("curl", "curl"))
        .args(["-s", "-S", "-i", "--max-time", "20"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {headers:?}"));
    Http {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn get(url: &str) -> Http {
    curl(&[], url)
}

/// The active lines of a config file (no comments, no blank lines).
fn active_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// A deployment root with the shipped templates and an empty database.
fn deployment_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("templates")).unwrap();
    fs::create_dir_all(root.join("images")).unwrap();
    for entry in fs::read_dir(repo().join("templates")).unwrap() {
        let entry = entry.unwrap();
        let target = root.join("templates").join(entry.file_name());
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
    fs::write(root.join("known_hosts.json"), "[]\n").unwrap();
    root
}

/// Rewrites a shipped lighttpd snippet for a test: root, port and either
/// the FastCGI socket or the CGI binary, and the access log.
fn lighttpd_site(
    snippet: &str,
    root: &Path,
    port: u16,
    socket_or_bin: &Path,
    dir: &Path,
) -> String {
    let mut out = String::new();
    for line in fs::read_to_string(repo().join("lighttpd").join(snippet))
        .unwrap()
        .lines()
    {
        let line = if line.starts_with("var.kiwispray_root = ") {
            format!("var.kiwispray_root = \"{}\"", root.display())
        } else if line.starts_with("var.kiwispray_socket = ")
            || line.starts_with("var.kiwispray_bin = ")
        {
            let name = line.split_whitespace().next().unwrap();
            format!("{name} = \"{}\"", socket_or_bin.display())
        } else {
            line.replace(":5000", &format!(":{port}")).replace(
                "/var/log/lighttpd/kiwispray.access.log",
                &dir.join("access.log").display().to_string(),
            )
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert!(
        out.contains(&format!("== \"0.0.0.0:{port}\"")),
        "port not rewritten:\n{out}"
    );
    if !Path::new("/proc/net/if_inet6").exists() {
        out = out
            .lines()
            .filter(|l| !l.starts_with("$SERVER[\"socket\"] == \"[::]"))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    out
}

/// Starts lighttpd in the foreground with a site snippet.
fn start_lighttpd(dir: &Path, site: &str, port: u16) -> Running {
    let lighttpd = need("lighttpd", "lighttpd");
    fs::write(dir.join("site.conf"), site).unwrap();
    fs::create_dir_all(dir.join("docroot")).unwrap();
    fs::write(
        dir.join("lighttpd.conf"),
        format!(
            "server.document-root = \"{d}/docroot\"\n\
             server.bind = \"{d}/main.sock\"\n\
             server.errorlog = \"{d}/error.log\"\n\
             server.upload-dirs = ( \"{d}\" )\n\
             include \"{d}/site.conf\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    run(Command::new(&lighttpd)
        .arg("-tt")
        .arg("-f")
        .arg(dir.join("lighttpd.conf")));
    let log = dir.join("lighttpd.out");
    let mut child = Command::new(&lighttpd)
        .arg("-D")
        .arg("-f")
        .arg(dir.join("lighttpd.conf"))
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.join("lighttpd.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child, &dir.join("error.log"));
    Running { child, term: false }
}

/// The database with the bootids of the journal beside it.
fn read_db(root: &Path) -> serde_json::Value {
    kiwispray::store::read_json(&root.join("known_hosts.json"))
        .unwrap_or_else(|e| panic!("database does not parse: {e}"))
}

fn host_field(db: &serde_json::Value, id: u64, field: &str) -> String {
    db.as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("no host {id} in {db}"))[field]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The bootid in a rendered install script (`bootid=<32 hex digits>`).
fn bootid_in(script: &str) -> String {
    let at = script
        .find("bootid=")
        .unwrap_or_else(|| panic!("no bootid in:\n{script}"));
    let id: String = script[at + 7..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(id.len(), 32, "bootid {id:?} in:\n{script}");
    id
}

/// Registration, state, an install with its bootid and `/finish`, and the
/// `/hosts` restriction, through a web server on `port`.
fn boot_lifecycle(port: u16, root: &Path) {
    let base = format!("http://127.0.0.1:{port}");
    // An unknown machine registers as host 1 in state new.
    let r = get(&format!(
        "{base}/bootstrap?net0=52-54-00-aa-bb-01&serial=CGI%20%23%201"
    ));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(r.body_text().starts_with("#!ipxe"), "{}", r.body_text());
    let db = read_db(root);
    assert_eq!(host_field(&db, 1, "macs"), "52:54:00:AA:BB:01");
    assert_eq!(host_field(&db, 1, "serial"), "CGI # 1");
    let r = get(&format!("{base}/state?id=1"));
    assert_eq!((r.status, r.body_text()), (200, "new\n".to_string()));
    // A host the operator put into an image state gets a bootid ...
    let mut hosts = db.as_array().unwrap().clone();
    hosts.push(serde_json::json!({
        "id": 2, "macs": "52:54:00:AA:BB:02", "serial": "", "uuid": "",
        "hostname": "web2", "state": "image1", "metadata": {}
    }));
    fs::write(
        root.join("known_hosts.json"),
        serde_json::to_string_pretty(&hosts).unwrap(),
    )
    .unwrap();
    let r = get(&format!("{base}/bootstrap?net0=52:54:00:aa:bb:02"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    let script = r.body_text();
    assert!(script.contains("images/image1"), "{script}");
    let bootid = bootid_in(&script);
    assert_eq!(host_field(&read_db(root), 2, "bootid"), bootid);
    // ... a wrong one changes nothing ...
    let r = get(&format!("{base}/finish?id=2&bootid={}", "0".repeat(32)));
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert_eq!(host_field(&read_db(root), 2, "state"), "image1");
    // ... the right one finishes the install, once.
    let r = get(&format!("{base}/finish?id=2&bootid={bootid}"));
    assert_eq!((r.status, r.body_text()), (200, "finished\n".to_string()));
    let r = get(&format!("{base}/state?id=2"));
    assert_eq!(r.body_text(), "finished\n");
    let r = get(&format!("{base}/finish?id=2&bootid={bootid}"));
    assert!(
        (400..500).contains(&r.status),
        "second /finish: {}",
        r.status
    );
    assert_eq!(host_field(&read_db(root), 2, "state"), "finished");
    // The host list answers this machine, not another address.
    let r = get(&format!("{base}/hosts"));
    assert_eq!(r.status, 200);
    assert!(r.body_text().contains("web2"), "{}", r.body_text());
    let r = curl(&["--interface", "127.0.0.2"], &format!("{base}/hosts"));
    assert_eq!(r.status, 403, "/hosts from 127.0.0.2");
    // Private files and unknown paths are not served.
    for path in [
        "/known_hosts.json",
        "/events.jsonl",
        "/templates/new.tmpl",
        "/",
        "/x/hosts",
    ] {
        assert_eq!(get(&format!("{base}{path}")).status, 404, "{path}");
    }
}

#[test]
fn dnsmasq_full_and_proxy_configs_pass_dnsmasq_syntax_check() {
    let dnsmasq = need("dnsmasq", "dnsmasq");
    let dir = repo().join("dnsmasq");
    for name in [
        "kiwispray.conf",
        "kiwispray-proxy.conf",
        "kiwispray-grub.conf",
    ] {
        let out = run(Command::new(&dnsmasq)
            .arg("--test")
            .arg(format!("--conf-file={}", dir.join(name).display())));
        let said = format!("{}{}", text(&out), String::from_utf8_lossy(&out.stderr));
        assert!(said.contains("syntax check OK"), "{name}: {said}");
    }
    let proxy = active_lines(&dir.join("kiwispray-proxy.conf"));
    let has = |l: &str| proxy.iter().any(|p| p == l);
    // Bound to one named interface; addresses come from the site's server.
    assert!(
        proxy.iter().any(|l| l.starts_with("interface=")),
        "{proxy:?}"
    );
    assert!(has("bind-interfaces"));
    let ranges: Vec<_> = proxy
        .iter()
        .filter(|l| l.starts_with("dhcp-range="))
        .collect();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(ranges[0].ends_with(",proxy"), "{ranges:?}");
    assert!(
        !has("dhcp-authoritative"),
        "a proxy must not be authoritative"
    );
    // Firmware clients get iPXE over TFTP, per architecture.
    assert!(has("enable-tftp"));
    for (csa, file) in [("x86PC", "undionly.kpxe"), ("x86-64_EFI", "snponly.efi")] {
        assert!(
            proxy.iter().any(|l| l.starts_with("pxe-service=tag:!ipxe,")
                && l.contains(&format!(",{csa},"))
                && l.ends_with(&format!(",{file}"))),
            "no pxe-service for {csa} -> {file}: {proxy:?}"
        );
    }
    // iPXE gets the bootstrap URL, the same as in the full-DHCP variant,
    // short enough for the 128-byte BOOTP file field (with its NUL).
    // The proxy also names the server as next server (the last field):
    // iPXE ignores a ProxyDHCP boot file without one.
    let url_of = |lines: &[String]| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("dhcp-boot=tag:ipxe,"))
            .expect("a dhcp-boot for iPXE")
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    let url = url_of(&proxy);
    assert_eq!(url, url_of(&active_lines(&dir.join("kiwispray.conf"))));
    assert!(
        url.starts_with("http://") && url.ends_with("/bootstrap.ipxe"),
        "{url}"
    );
    assert!(!url.contains('?'), "{url}");
    let longest = url.replace("192.168.100.1:5000", "255.255.255.255:65535");
    assert!(longest.len() < 128, "{longest} is {} bytes", longest.len());
    // The lines an operator adapts are marked, as in kiwispray.conf.
    let raw = fs::read_to_string(dir.join("kiwispray-proxy.conf")).unwrap();
    for key in ["interface=", "dhcp-range=", "dhcp-boot=tag:ipxe,"] {
        let at = raw.find(&format!("\n{key}")).unwrap();
        let before = &raw[..at];
        let comment_start = before.rfind("\n\n").unwrap_or(0);
        assert!(
            before[comment_start..].contains("EDIT"),
            "{key} has no EDIT marker"
        );
    }
}

#[test]
fn systemd_units_pass_verify_and_match_the_web_server_snippets() {
    let sd = repo().join("systemd");
    let socket = fs::read_to_string(sd.join("kiwispray-fcgi.socket")).unwrap();
    let service = fs::read_to_string(sd.join("kiwispray-fcgi.service")).unwrap();
    let socket_lines = active_lines(&sd.join("kiwispray-fcgi.socket"));
    let service_lines = active_lines(&sd.join("kiwispray-fcgi.service"));
    for l in [
        "ListenStream=/run/kiwispray/fcgi.sock",
        "SocketUser=kiwispray",
        "SocketGroup=kiwispray-web",
        "SocketMode=0660",
        "Accept=no",
    ] {
        assert!(socket_lines.iter().any(|s| s == l), "socket lacks {l}");
    }
    for l in [
        "ExecStart=/usr/bin/kiwispray-fcgi --root /srv/kiwispray --config /etc/kiwispray/kiwispray.json",
        "StandardInput=socket",
        "User=kiwispray",
        "ProtectSystem=strict",
        "ReadWritePaths=/srv/kiwispray",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "Restart=on-failure",
    ] {
        assert!(service_lines.iter().any(|s| s == l), "service lacks {l}");
    }
    // The web server snippets talk to the same socket.
    let nginx = fs::read_to_string(repo().join("nginx/kiwispray.conf")).unwrap();
    assert!(nginx.contains("unix:/run/kiwispray/fcgi.sock"));
    let lighttpd = fs::read_to_string(repo().join("lighttpd/kiwispray.conf")).unwrap();
    assert!(lighttpd.contains("var.kiwispray_socket = \"/run/kiwispray/fcgi.sock\""));
    // sysusers and tmpfiles agree with the units.
    let sysusers = active_lines(&sd.join("kiwispray.sysusers"));
    assert!(
        sysusers.iter().any(|l| l.starts_with("u kiwispray ")),
        "{sysusers:?}"
    );
    assert!(
        sysusers.iter().any(|l| l.starts_with("g kiwispray-web ")),
        "{sysusers:?}"
    );
    let tmpfiles = active_lines(&sd.join("kiwispray.tmpfiles"));
    assert!(
        tmpfiles.iter().any(|l| l.starts_with("d /srv/kiwispray ")),
        "{tmpfiles:?}"
    );

    // systemd-analyze verify, with ExecStart pointing at the built binary.
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        panic!(
            "systemd-analyze is missing: install the Debian package systemd (make deps-test does)"
        );
    };
    let dir = scratch("units");
    fs::write(dir.join("kiwispray-fcgi.socket"), &socket).unwrap();
    fs::write(
        dir.join("kiwispray-fcgi.service"),
        service.replace("/usr/bin/kiwispray-fcgi", FCGI),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join("kiwispray-fcgi.socket"))
        .arg(dir.join("kiwispray-fcgi.service"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("kiwispray") {
        // systemd-analyze itself cannot run here (no usable manager
        // environment): say so loudly; the checks above still hold.
        eprintln!(
            "\n!!! SKIPPED systemd-analyze verify: it cannot run in this environment:\n{stderr}\n"
        );
        return;
    }
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let complaints: Vec<_> = stderr.lines().filter(|l| l.contains("kiwispray")).collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );

    // And verify notices a broken unit, so the check above means something.
    fs::write(
        dir.join("kiwispray-fcgi.service"),
        service
            .replace("/usr/bin/kiwispray-fcgi", FCGI)
            .replace("ProtectSystem=strict", "ProtectSystm=strict"),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join("kiwispray-fcgi.service"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectSystm"),
        "verify did not report an unknown key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The handler on a listening socket handed over as systemd does: as fd 0
/// (`StandardInput=socket`, what kiwispray-fcgi.service uses) and as
/// `LISTEN_FDS` (systemd-socket-activate), each behind lighttpd's FastCGI
/// snippet.
#[test]
fn socket_activated_handler_serves_behind_lighttpd_fastcgi() {
    let dir = scratch("activation");
    let root = deployment_root(&dir);
    let sock = dir.join("fcgi.sock");

    // fd 0: a bound, listening Unix socket as standard input.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let handler = Command::new(FCGI)
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stderr(fs::File::create(dir.join("handler.err")).unwrap())
        .spawn()
        .unwrap();
    let _handler = Running {
        child: handler,
        term: false,
    };
    let port = free_port();
    let site = lighttpd_site("kiwispray.conf", &root, port, &sock, &dir);
    let _web = start_lighttpd(&dir, &site, port);
    let base = format!("http://127.0.0.1:{port}");
    let r = get(&format!("{base}/bootstrap?net0=52-54-00-cc-00-01"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(get(&format!("{base}/state?id=1")).body_text(), "new\n");
    drop(_handler);

    // LISTEN_FDS: systemd-socket-activate listens and execs the handler.
    let activate = need("systemd-socket-activate", "systemd");
    fs::remove_file(&sock).unwrap();
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&sock)
        .arg(FCGI)
        .arg("--root")
        .arg(&root)
        .stderr(fs::File::create(dir.join("activate.err")).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "systemd-socket-activate exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _activated = Running { child, term: false };
    let r = get(&format!("{base}/bootstrap?net0=52-54-00-cc-00-02"));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(get(&format!("{base}/state?id=2")).body_text(), "new\n");
    let err = fs::read_to_string(dir.join("activate.err")).unwrap();
    assert!(err.contains("kiwispray-fcgi: serving"), "{err}");
}

#[test]
fn cgi_mode_under_lighttpd_mod_cgi() {
    let dir = scratch("cgi");
    let root = deployment_root(&dir);
    let port = free_port();
    let site = lighttpd_site("kiwispray-cgi.conf", &root, port, Path::new(FCGI), &dir);
    assert!(site.contains("mod_cgi") && !site.contains("fastcgi.server"));
    let _web = start_lighttpd(&dir, &site, port);
    let base = format!("http://127.0.0.1:{port}");
    let r = get(&format!("{base}/bootstrap.ipxe"));
    assert_eq!(r.status, 200);
    assert!(r.body_text().starts_with("#!ipxe"));
    boot_lifecycle(port, &root);
    // Every request was its own process: no handler is left running and
    // none listens anywhere.
    let running: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with(FCGI) && c.contains(&*root.to_string_lossy()))
        .collect();
    assert!(
        running.is_empty(),
        "a CGI handler outlived its request: {running:?}"
    );
}

#[test]
fn stack_under_lighttpd_serve_sh() {
    let dir = scratch("stack");
    let root = dir.join("root");
    let run_dir = dir.join("run");
    let port = free_port();
    let log = dir.join("serve.log");
    let child = Command::new(repo().join("nginx/serve.sh"))
        .env("WEB", "lighttpd")
        .env("PORT", port.to_string())
        .env("ROOT", &root)
        .env("RUN_DIR", &run_dir)
        .env("BIN_DIR", Path::new(FCGI).parent().unwrap())
        .env_remove("DISCOVER")
        .env_remove("DHCP_IFACE")
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    let mut serve = Running { child, term: true };
    wait_for_port(port, &mut serve.child, &dir.join("serve.err"));
    let base = format!("http://127.0.0.1:{port}");

    // The static bootstrap script, from the root's templates.
    let r = get(&format!("{base}/bootstrap.ipxe"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        fs::read(root.join("templates/bootstrap.ipxe")).unwrap()
    );
    assert!(r
        .headers
        .to_ascii_lowercase()
        .contains("cache-control: no-store"));

    // An image file, whole and in ranges; its template and hidden files
    // stay private.
    let image = root.join("images/image1");
    fs::create_dir_all(&image).unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(image.join("image1.xz"), &data).unwrap();
    fs::write(image.join(".secret"), "x").unwrap();
    let r = get(&format!("{base}/images/image1/image1.xz"));
    assert_eq!(r.status, 200);
    assert!(r.body == data, "whole image differs");
    let r = curl(
        &["-r", "1000000-1000999"],
        &format!("{base}/images/image1/image1.xz"),
    );
    assert_eq!(r.status, 206, "{}", r.headers);
    assert_eq!(r.body, &data[1_000_000..1_001_000]);
    assert!(
        r.headers
            .contains("Content-Range: bytes 1000000-1000999/3000000"),
        "{}",
        r.headers
    );
    let r = curl(&["-r", "-100"], &format!("{base}/images/image1/image1.xz"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (206, &data[data.len() - 100..])
    );
    // A machine registers and boots through the whole stack.
    boot_lifecycle(port, &root);

    // With its own host.tmpl, image1 is rendered from there now; the
    // template, hidden files and directory listings are not served.
    fs::write(image.join("host.tmpl"), "#!ipxe\necho @state@\n").unwrap();
    for path in [
        "/images/image1/host.tmpl",
        "/images/image1/.secret",
        "/images/image1/",
    ] {
        assert_eq!(get(&format!("{base}{path}")).status, 404, "{path}");
    }
    let mut hosts = read_db(&root).as_array().unwrap().clone();
    hosts.push(serde_json::json!({"id": 3, "macs": "52:54:00:AA:BB:03", "state": "image1"}));
    fs::write(
        root.join("known_hosts.json"),
        serde_json::to_string(&hosts).unwrap(),
    )
    .unwrap();
    let r = get(&format!("{base}/bootstrap?net0=52-54-00-aa-bb-03"));
    assert_eq!(r.body_text(), "#!ipxe\necho image1\n");

    let access = fs::read_to_string(run_dir.join("access.log")).unwrap();
    assert!(access.contains("GET /bootstrap.ipxe"), "{access}");

    // SIGTERM stops the stack and removes the socket.
    let status = serve.stop().expect("serve.sh stops on SIGTERM");
    assert!(status.success(), "serve.sh exited with {status}");
    assert!(!run_dir.join("fcgi.sock").exists());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
}

/// Busybox as the scratch root's shell, with stand-ins for the account
/// tools the %pre fallback uses, so that the scriptlets really run.
fn minimal_system(root: &Path) {
    for d in ["bin", "etc", "usr/bin", "usr/sbin", "tmp", "var/tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(need("busybox", "busybox-static"), root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "grep", "cut", "cat", "echo", "sort", "tail", "wc", "expr", "printf", "test", "[",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let tools = [
        (
            "usr/bin/getent",
            "#!/bin/sh\ngrep -q \"^$2:\" \"/etc/$1\"\n",
        ),
        (
            "usr/sbin/groupadd",
            "#!/bin/sh\nfor a; do name=$a; done\n\
             n=$(cut -d: -f3 /etc/group | sort -n | tail -n 1)\n\
             echo \"$name:x:$((n + 100)):\" >> /etc/group\n",
        ),
        (
            "usr/sbin/useradd",
            "#!/bin/sh\nwhile [ $# -gt 1 ]; do case $1 in\n\
             -g) g=$2; shift 2;; -d) d=$2; shift 2;; -s) s=$2; shift 2;; -c) c=$2; shift 2;; *) shift;; esac; done\n\
             gid=$(grep \"^$g:\" /etc/group | cut -d: -f3)\n\
             echo \"$1:x:$gid:$gid:$c:$d:$s\" >> /etc/passwd\n",
        ),
    ];
    for (path, script) in tools {
        let p = root.join(path);
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn rpm_builds_lists_its_files_and_installs_into_a_scratch_root() {
    need("rpmbuild", "rpm");
    let rpm = need("rpm", "rpm");
    let out = run(Command::new("make").arg("rpm").current_dir(repo()));
    let built: Vec<PathBuf> = text(&out)
        .lines()
        .filter_map(|l| l.strip_prefix("built "))
        .map(PathBuf::from)
        .collect();
    let binary = |prefix: &str| {
        built
            .iter()
            .find(|p| {
                p.to_string_lossy().contains("/RPMS/")
                    && p.extension().is_some_and(|e| e == "rpm")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix(prefix))
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .unwrap_or_else(|| panic!("make rpm printed no binary RPM {prefix}*: {built:?}"))
            .clone()
    };
    let package = binary("kiwispray-");
    let firstboot = binary("kiwispray-firstboot-");
    assert!(
        package.starts_with(repo().join("target")),
        "{}",
        package.display()
    );
    assert!(built
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".src.rpm")));
    let query = |args: &[&str]| text(&run(Command::new(&rpm).args(args).arg(&package)));

    // The file list.
    let files: BTreeSet<String> = query(&["-qlp"]).lines().map(String::from).collect();
    for f in [
        "/usr/bin/kiwispray-fcgi",
        "/usr/bin/kiwispray-hosts",
        "/usr/lib/systemd/system/kiwispray-fcgi.socket",
        "/usr/lib/systemd/system/kiwispray-fcgi.service",
        "/usr/lib/sysusers.d/kiwispray.conf",
        "/usr/lib/tmpfiles.d/kiwispray.conf",
        "/usr/share/kiwispray/templates/bootstrap.ipxe",
        "/usr/share/kiwispray/templates/known_host.tmpl",
        "/usr/share/kiwispray/lighttpd/kiwispray-cgi.conf",
        "/etc/kiwispray/kiwispray.json",
        "/etc/kiwispray/dnsmasq/kiwispray.conf",
        "/etc/kiwispray/dnsmasq/kiwispray-proxy.conf",
        "/etc/kiwispray/dnsmasq/kiwispray-grub.conf",
        "/etc/nginx/conf.d/kiwispray.conf",
        "/etc/lighttpd/conf.d/kiwispray.conf",
        "/srv/kiwispray",
        "/srv/kiwispray/images",
        "/srv/kiwispray/templates/bootstrap.ipxe",
        "/srv/kiwispray/templates/bootstrap.grub",
        "/srv/kiwispray/boot/shimx64.efi",
        "/srv/kiwispray/boot/grubx64.efi",
        "/srv/kiwispray/boot/grub/grub.cfg",
        "/srv/kiwispray/known_hosts.json",
        "/srv/kiwispray/events.jsonl",
        "/srv/kiwispray/kiwispray.json",
    ] {
        assert!(files.contains(f), "{f} is not in the package:\n{files:#?}");
    }
    // Every template of the tree is shipped twice; the man pages and the
    // README where the tree has them.
    for t in fs::read_dir(repo().join("templates")).unwrap() {
        let name = t.unwrap().file_name().into_string().unwrap();
        assert!(
            files.contains(&format!("/usr/share/kiwispray/templates/{name}")),
            "{name}"
        );
        assert!(
            files.contains(&format!("/srv/kiwispray/templates/{name}")),
            "{name}"
        );
    }
    // (What the tree has: the source tarball the RPM was built from, as
    // HEAD may have moved on since.)
    let sources = package.parent().unwrap().join("../../SOURCES");
    let tarball = fs::read_dir(&sources)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.to_string_lossy().ends_with(".tar.gz") && !p.to_string_lossy().contains("-vendor")
        })
        .expect("the source tarball");
    let listing = text(&run(Command::new("tar").arg("-tzf").arg(&tarball)));
    let shipped: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once('/').map(|(_, rest)| rest))
        .filter(|f| {
            f == &"README.md" || (f.starts_with("man/") && (f.ends_with(".1") || f.ends_with(".8")))
        })
        .collect();
    for f in shipped {
        if let Some(page) = f.strip_prefix("man/") {
            let section = page.rsplit('.').next().unwrap();
            assert!(
                files
                    .iter()
                    .any(|p| p.starts_with(&format!("/usr/share/man/man{section}/{page}"))),
                "man page {page} is not packaged"
            );
        } else {
            assert!(
                files.contains("/usr/share/doc/kiwispray/README.md"),
                "README not packaged"
            );
        }
    }

    // Config files: every file in /etc and the deployment's database and
    // templates, all %config(noreplace).
    let configs: BTreeSet<String> = query(&["-qp", "--configfiles"])
        .lines()
        .map(String::from)
        .collect();
    let flags = query(&[
        "-qp",
        "--qf",
        "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]",
    ]);
    for line in flags.lines() {
        let mut parts = line.splitn(3, ' ');
        let (fl, perms, name) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let operator_owned = (name.starts_with("/etc/") && !perms.starts_with('d'))
            || name == "/srv/kiwispray/known_hosts.json"
            || name == "/srv/kiwispray/events.jsonl"
            || (name.starts_with("/srv/kiwispray/templates/") && !perms.starts_with('d'));
        if operator_owned {
            assert!(configs.contains(name), "{name} is not a config file");
            assert!(
                fl.contains('c') && fl.contains('n'),
                "{name} is not %config(noreplace): {fl}"
            );
        } else {
            assert!(!fl.contains('c'), "{name} should not be a config file");
        }
    }
    let owners = query(&[
        "-qp",
        "--qf",
        "[%{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms} %{FILENAMES}\n]",
    ]);
    assert!(
        owners.contains("kiwispray:kiwispray -rw-r----- /srv/kiwispray/known_hosts.json"),
        "{owners}"
    );
    assert!(
        owners.contains("kiwispray:kiwispray drwxr-xr-x /srv/kiwispray\n"),
        "{owners}"
    );

    // Scriptlets: the user from the sysusers lines, tmpfiles, the units.
    let scripts = query(&["-qp", "--scripts"]);
    for part in ["preinstall", "postinstall", "preuninstall", "postuninstall"] {
        assert!(
            scripts.contains(&format!("{part} scriptlet")),
            "no {part}:\n{scripts}"
        );
    }
    for line in active_lines(&repo().join("systemd/kiwispray.sysusers")) {
        assert!(
            scripts.contains(&line),
            "%pre lacks sysusers line {line:?}:\n{scripts}"
        );
    }
    for needle in [
        "systemd-tmpfiles --create",
        "kiwispray-fcgi.socket",
        "try-restart",
    ] {
        assert!(
            scripts.contains(needle),
            "scripts lack {needle}:\n{scripts}"
        );
    }

    // Install into a scratch root, with the scriptlets run by busybox.
    let root = scratch("rpm-root");
    minimal_system(&root);
    let install = |extra: &[&str]| {
        run(Command::new(&rpm)
            .arg("--root")
            .arg(&root)
            .args(extra)
            .args(["--nodeps"])
            .arg(&package))
    };
    install(&["-i"]);
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("kiwispray:"))
        .unwrap_or_else(|| panic!("%pre created no kiwispray user:\n{passwd}"));
    assert!(user.ends_with(":/srv/kiwispray:/sbin/nologin"), "{user}");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.contains("\nkiwispray-web:"), "{group}");
    let srv = root.join("srv/kiwispray");
    let db_meta = fs::metadata(srv.join("known_hosts.json")).unwrap();
    assert_eq!((db_meta.uid(), db_meta.mode() & 0o777), (uid, 0o640));
    assert_eq!(fs::metadata(&srv).unwrap().uid(), uid);

    // The installed binaries run from there.
    let bin = root.join("usr/bin");
    let help = text(&run(Command::new(bin.join("kiwispray-fcgi")).arg("--help")));
    assert!(help.contains("--root") && help.contains("CGI"), "{help}");
    let help = text(&run(Command::new(bin.join("kiwispray-hosts")).arg("--help")));
    assert!(help.contains("list"), "{help}");
    let list = text(&run(Command::new(bin.join("kiwispray-hosts"))
        .arg("--root")
        .arg(&srv)
        .arg("list")));
    assert!(list.starts_with("ID"), "{list}");
    // The installed handler answers a CGI request on the installed root,
    // with the installed settings (/srv/kiwispray/kiwispray.json links to
    // /etc/kiwispray/kiwispray.json; discover mode shows that it is read).
    let settings = root.join("etc/kiwispray/kiwispray.json");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&settings).unwrap()).unwrap();
    assert_eq!(json["discover"], false);
    fs::write(&settings, "{\"discover\": true}\n").unwrap();
    let out = run(Command::new(bin.join("kiwispray-fcgi"))
        .env_clear()
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", "GET")
        .env("SCRIPT_NAME", "/bootstrap")
        .env("QUERY_STRING", "net0=52-54-00-dd-00-01")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("KIWISPRAY_ROOT", &srv)
        .stdin(Stdio::null()));
    assert!(text(&out).starts_with("Status: 200"), "{}", text(&out));
    assert_eq!(host_field(&read_db(&srv), 1, "state"), "discover,new");
    let list = text(&run(Command::new(bin.join("kiwispray-hosts"))
        .arg("--root")
        .arg(&srv)
        .arg("list")));
    assert!(list.contains("discover,new"), "{list}");

    // Reinstalling (as an update does) keeps the operator's edits and hosts.
    let tmpl = srv.join("templates/new_host.tmpl");
    let mut edited = fs::read_to_string(&tmpl).unwrap();
    edited.push_str("# edited by the operator\n");
    fs::write(&tmpl, &edited).unwrap();
    install(&["-U", "--replacepkgs"]);
    assert_eq!(fs::read_to_string(&tmpl).unwrap(), edited);
    assert_eq!(
        fs::read_to_string(&settings).unwrap(),
        "{\"discover\": true}\n"
    );
    assert_eq!(host_field(&read_db(&srv), 1, "state"), "discover,new");
    assert_eq!(
        fs::read(root.join("usr/share/kiwispray/templates/new_host.tmpl")).unwrap(),
        fs::read(repo().join("templates/new_host.tmpl")).unwrap(),
        "the pristine copy stays pristine"
    );

    // Removing the package keeps the hosts (as .rpmsave) and edits.
    run(Command::new(&rpm)
        .arg("--root")
        .arg(&root)
        .args(["-e", "--nodeps", "kiwispray"]));
    assert!(!bin.join("kiwispray-fcgi").exists());
    let saved = srv.join("known_hosts.json.rpmsave");
    let kept = if saved.exists() {
        saved
    } else {
        srv.join("known_hosts.json")
    };
    let db: serde_json::Value = serde_json::from_str(&fs::read_to_string(&kept).unwrap()).unwrap();
    assert_eq!(host_field(&db, 1, "state"), "discover,new");

    check_firstboot_package(&rpm, &package, &firstboot);
}

/// The `kiwispray-firstboot` subpackage: noarch, the agent and its unit
/// with the unit's ExecStart pointing at the packaged script, the preset
/// that enables it, the KIWI snippet as docs, the systemd scriptlets; no
/// dependency on the server package; installed into a scratch root, its
/// files are the tree's.
fn check_firstboot_package(rpm: &Path, server: &Path, package: &Path) {
    let query = |args: &[&str], p: &Path| text(&run(Command::new(rpm).args(args).arg(p)));
    assert_eq!(
        query(&["-qp", "--qf", "%{NAME} %{ARCH}"], package),
        "kiwispray-firstboot noarch"
    );
    let files: BTreeSet<String> = query(&["-qlp"], package)
        .lines()
        .map(String::from)
        .collect();
    let script = "/usr/libexec/kiwispray-firstboot";
    let unit = "/usr/lib/systemd/system/kiwispray-firstboot.service";
    let docs = "/usr/share/doc/kiwispray-firstboot/kiwi";
    for f in [
        script,
        unit,
        "/usr/lib/systemd/system-preset/50-kiwispray-firstboot.preset",
        "/var/lib/kiwispray-firstboot",
        &format!("{docs}/README.md"),
        &format!("{docs}/config.xml.fragment"),
        &format!("{docs}/config.sh"),
    ] {
        assert!(
            files.contains(f),
            "{f} is not in kiwispray-firstboot:\n{files:#?}"
        );
    }
    assert!(
        files.iter().all(|f| !f.contains("/usr/com")),
        "state directory outside /var/lib: {files:#?}"
    );
    // The server package does not ship the agent, and the agent does not
    // need the server (it runs on the installed machines).
    let server_files = query(&["-qlp"], server);
    assert!(
        !server_files.contains("kiwispray-firstboot"),
        "{server_files}"
    );
    let requires = query(&["-qpR"], package);
    assert!(requires.contains("curl"), "{requires}");
    assert!(
        !requires.lines().any(|l| l.trim().starts_with("kiwispray")),
        "{requires}"
    );
    let scripts = query(&["-qp", "--scripts"], package);
    for part in ["postinstall", "preuninstall", "postuninstall"] {
        assert!(
            scripts.contains(&format!("{part} scriptlet")),
            "no {part}:\n{scripts}"
        );
    }
    for needle in [
        "preset kiwispray-firstboot.service",
        "disable kiwispray-firstboot.service",
    ] {
        assert!(
            scripts.contains(needle),
            "scripts lack {needle}:\n{scripts}"
        );
    }
    let docflags = query(&["-qp", "--docfiles"], package);
    assert!(
        docflags.contains(&format!("{docs}/README.md")),
        "{docflags}"
    );

    // Installed into a scratch root (scriptlets run by busybox; there is
    // no systemctl there, so they only skip).
    let root = scratch("rpm-firstboot-root");
    minimal_system(&root);
    run(Command::new(rpm)
        .arg("--root")
        .arg(&root)
        .args(["-i", "--nodeps"])
        .arg(package));
    let installed = |p: &str| root.join(p.trim_start_matches('/'));
    assert_eq!(
        fs::read(installed(script)).unwrap(),
        fs::read(repo().join("firstboot/kiwispray-firstboot")).unwrap()
    );
    assert_eq!(
        fs::metadata(installed(script)).unwrap().mode() & 0o777,
        0o755
    );
    let unit_text = fs::read_to_string(installed(unit)).unwrap();
    assert_eq!(
        unit_text,
        fs::read_to_string(repo().join("firstboot/kiwispray-firstboot.service")).unwrap()
    );
    assert!(
        unit_text.contains("\nConditionKernelCommandLine=razorurl\n"),
        "{unit_text}"
    );
    let exec = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no ExecStart in {unit_text}"));
    assert_eq!(exec.trim_start_matches(['-', '@', '+', '!']), script);
    let preset = fs::read_to_string(installed(
        "/usr/lib/systemd/system-preset/50-kiwispray-firstboot.preset",
    ))
    .unwrap();
    assert_eq!(preset.trim(), "enable kiwispray-firstboot.service");
    for f in ["README.md", "config.xml.fragment", "config.sh"] {
        assert_eq!(
            fs::read(installed(&format!("{docs}/{f}"))).unwrap(),
            fs::read(repo().join("firstboot/kiwi").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(installed("/var/lib/kiwispray-firstboot").is_dir());
}
