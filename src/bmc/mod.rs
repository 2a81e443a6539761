//! Out-of-band power control through a machine's BMC: the URL that names a
//! BMC (`ipmi://ADDRESS[:PORT]`, `redfish://ADDRESS[:PORT][/redfish/v1/Systems/ID]`,
//! `redfish+http://…` for test rigs only), the small [`Bmc`] trait with one
//! driver per protocol ([`ipmi`]: `ipmitool -I lanplus`; [`redfish`]: HTTPS
//! with certificate verification), the credentials they log in with
//! ([`credentials`], never in the host database) and [`run_parallel`], which
//! drives many BMCs at once, at most `jobs` at a time, each within a
//! timeout.
//!
//! No message of this module carries a password: drivers build their
//! errors from what the BMC or the tool said, and [`scrub`] removes a
//! secret that a tool might echo.

pub mod credentials;
pub mod ipmi;
pub mod redfish;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// The protocol of a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// IPMI 2.0 over LAN (RMCP+), UDP port 623 unless given.
    Ipmi,
    /// Redfish over HTTPS, port 443 unless given.
    Redfish,
    /// Redfish over plain HTTP: only for test rigs.
    RedfishHttp,
}

/// A parsed BMC URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BmcUrl {
    pub protocol: Protocol,
    /// An IPv4 address, a DNS name, or an IPv6 address without brackets.
    pub host: String,
    pub port: Option<u16>,
    /// The Redfish system, `/redfish/v1/Systems/ID`; `None`: the only one.
    pub system: Option<String>,
}

impl BmcUrl {
    /// Parses `ipmi://ADDRESS[:PORT]` or
    /// `redfish[+http]://ADDRESS[:PORT][/redfish/v1/Systems/ID]`. User
    /// names and passwords in the URL are refused: they belong in the
    /// credentials file.
    pub fn parse(text: &str) -> Result<BmcUrl, String> {
        let t = text.trim();
        let shown = shorten(t);
        if t.is_empty() || t.len() > 512 || t.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "BMC URL {shown:?} is not valid (ipmi://ADDRESS[:PORT] or redfish://ADDRESS[:PORT][/redfish/v1/Systems/ID])"
            ));
        }
        let (scheme, rest) = t.split_once("://").ok_or_else(|| {
            format!("BMC URL {shown:?} has no scheme: write ipmi://ADDRESS or redfish://ADDRESS")
        })?;
        let protocol = match scheme.to_ascii_lowercase().as_str() {
            "ipmi" => Protocol::Ipmi,
            "redfish" | "redfish+https" => Protocol::Redfish,
            "redfish+http" => Protocol::RedfishHttp,
            other => {
                return Err(format!(
                    "BMC URL {shown:?}: unknown scheme {other:?} (ipmi, redfish or, for test rigs, redfish+http)"
                ))
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "BMC URL {:?}: no user or password in the URL; they go in bmc-credentials.json",
                format!("{scheme}://…")
            ));
        }
        if rest.contains('?') || rest.contains('#') {
            return Err(format!("BMC URL {shown:?}: no query or fragment allowed"));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| format!("BMC URL {shown:?}: the address or port is not valid"))?;
        let system = match (protocol, path.trim_end_matches('/')) {
            (_, "") => None,
            (Protocol::Ipmi, _) => {
                return Err(format!("BMC URL {shown:?}: an ipmi:// URL has no path"))
            }
            (_, p) => {
                let id = p.strip_prefix("/redfish/v1/Systems/").unwrap_or("");
                if id.is_empty()
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:%".contains(&b))
                {
                    return Err(format!(
                        "BMC URL {shown:?}: the path must be /redfish/v1/Systems/ID"
                    ));
                }
                Some(p.to_string())
            }
        };
        Ok(BmcUrl {
            protocol,
            host,
            port,
            system,
        })
    }

    /// The port the driver connects to.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(match self.protocol {
            Protocol::Ipmi => 623,
            Protocol::Redfish => 443,
            Protocol::RedfishHttp => 80,
        })
    }

    /// `host` as it goes in a URL or a tool's argument (IPv6 in brackets
    /// for URLs).
    pub fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// Whether two URLs name the same BMC (protocol family, address and
    /// port; the Redfish system path does not matter): how credentials are
    /// looked up.
    pub fn same_bmc(&self, other: &BmcUrl) -> bool {
        let family = |p: Protocol| match p {
            Protocol::Ipmi => 0,
            _ => 1,
        };
        family(self.protocol) == family(other.protocol)
            && self.host.eq_ignore_ascii_case(&other.host)
            && self.port_or_default() == other.port_or_default()
    }
}

impl fmt::Display for BmcUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.protocol {
            Protocol::Ipmi => "ipmi",
            Protocol::Redfish => "redfish",
            Protocol::RedfishHttp => "redfish+http",
        };
        write!(f, "{scheme}://{}", self.host_for_url())?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(s) = &self.system {
            f.write_str(s)?;
        }
        Ok(())
    }
}

fn split_host_port(a: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        (h.to_string(), port)
    } else {
        let (h, p) = match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        };
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !h.starts_with('-');
        if !ok {
            return None;
        }
        (h.to_string(), p)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return None,
        },
    };
    Some((host, port))
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

/// A machine's power as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    On,
    Off,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::On => "on",
            Power::Off => "off",
        }
    }
}

/// What an operator asks of a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    On,
    Off,
    /// Off and on again; on if it is off.
    Cycle,
    Status,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "on" => Some(Action::On),
            "off" => Some(Action::Off),
            "cycle" => Some(Action::Cycle),
            "status" => Some(Action::Status),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::On => "on",
            Action::Off => "off",
            Action::Cycle => "cycle",
            Action::Status => "status",
        }
    }
}

/// One BMC, behind one protocol. Every call either succeeds or returns
/// one line that says what went wrong, without a secret in it.
pub trait Bmc: Send {
    /// The machine's power.
    fn power_status(&mut self) -> Result<Power, String>;
    /// Switches the machine on or off (hard, not graceful).
    fn set_power(&mut self, on: bool) -> Result<(), String>;
    /// Resets a machine that is on (power cycle or hard reset).
    fn power_cycle(&mut self) -> Result<(), String>;
    /// Asks for one network (PXE) boot at the next start; `efi` where the
    /// machine boots with UEFI.
    fn boot_pxe_once(&mut self, efi: bool) -> Result<(), String>;
}

/// Runs an action; its result as the table shows it (`on`, `off`,
/// `cycled`, `was off, powered on`).
pub fn perform(bmc: &mut dyn Bmc, action: Action) -> Result<String, String> {
    match action {
        Action::Status => bmc.power_status().map(|p| p.as_str().to_string()),
        Action::On => bmc.set_power(true).map(|_| "powered on".to_string()),
        Action::Off => bmc.set_power(false).map(|_| "powered off".to_string()),
        Action::Cycle => cycle_or_on(bmc),
    }
}

/// Power-cycles a machine that is on, and switches on one that is off.
pub fn cycle_or_on(bmc: &mut dyn Bmc) -> Result<String, String> {
    match bmc.power_status()? {
        Power::Off => bmc
            .set_power(true)
            .map(|_| "was off, powered on".to_string()),
        Power::On => bmc.power_cycle().map(|_| "power-cycled".to_string()),
    }
}

/// A driver for `url`, logging in with `cred`; each request gives up after
/// `timeout`.
pub fn driver(
    url: &BmcUrl,
    cred: &credentials::Credential,
    timeout: Duration,
) -> Result<Box<dyn Bmc>, String> {
    Ok(match url.protocol {
        Protocol::Ipmi => Box::new(ipmi::Ipmi::new(url, cred, timeout)),
        Protocol::Redfish | Protocol::RedfishHttp => {
            Box::new(redfish::Redfish::new(url, cred, timeout)?)
        }
    })
}

/// Removes every occurrence of `secret` from `text` (a tool may echo what
/// it was given), and makes it one line.
pub fn scrub(text: &str, secret: &str) -> String {
    let mut t = text.to_string();
    if secret.len() >= 2 {
        t = t.replace(secret, "<hidden>");
    }
    let one: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = one.join("; ");
    if line.chars().count() > 300 {
        format!("{}…", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

/// Runs `task` on every item, at most `jobs` at once; a task that has not
/// finished `timeout` after it started is reported as timed out (its
/// thread is left to end by itself; drivers end their own requests at the
/// same deadline). The results come back in the order of `items`.
pub fn run_parallel<T, R, F>(
    items: Vec<T>,
    jobs: usize,
    timeout: Duration,
    task: F,
) -> Vec<Result<R, String>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Result<R, String> + Send + Sync + 'static,
{
    let n = items.len();
    let jobs = jobs.clamp(1, 256).min(n.max(1));
    let task = Arc::new(task);
    let queue: Arc<Mutex<Vec<Option<T>>>> =
        Arc::new(Mutex::new(items.into_iter().map(Some).collect()));
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<(usize, Result<R, String>)>();
    let mut workers = Vec::new();
    for _ in 0..jobs {
        let (task, queue, next, tx) = (task.clone(), queue.clone(), next.clone(), tx.clone());
        workers.push(std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= n {
                return;
            }
            let item = queue.lock().expect("queue lock")[i]
                .take()
                .expect("each item is taken once");
            // The task runs in a thread of its own so that a hung one
            // costs its slot only until the timeout.
            let (one_tx, one_rx) = mpsc::channel();
            let t = task.clone();
            std::thread::spawn(move || {
                let _ = one_tx.send(t(item));
            });
            let r = match one_rx.recv_timeout(timeout) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    Err(format!("timed out after {} s", timeout.as_secs()))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    Err("the driver stopped unexpectedly".to_string())
                }
            };
            if tx.send((i, r)).is_err() {
                return;
            }
        }));
    }
    drop(tx);
    let mut out: Vec<Option<Result<R, String>>> = (0..n).map(|_| None).collect();
    for (i, r) in rx {
        out[i] = Some(r);
    }
    for w in workers {
        let _ = w.join();
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not run".to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn parses_bmc_urls() {
        let u = BmcUrl::parse("ipmi://10.0.0.5").unwrap();
        assert_eq!(
            (u.protocol, u.host.as_str(), u.port),
            (Protocol::Ipmi, "10.0.0.5", None)
        );
        assert_eq!(u.port_or_default(), 623);
        let u = BmcUrl::parse("redfish://bmc-r7-01.example.com:8443/redfish/v1/Systems/1").unwrap();
        assert_eq!(u.port, Some(8443));
        assert_eq!(u.system.as_deref(), Some("/redfish/v1/Systems/1"));
        assert_eq!(
            u.to_string(),
            "redfish://bmc-r7-01.example.com:8443/redfish/v1/Systems/1"
        );
        let u = BmcUrl::parse("redfish://[fd00::5]:443").unwrap();
        assert_eq!(
            (u.host.as_str(), u.host_for_url().as_str()),
            ("fd00::5", "[fd00::5]")
        );
        assert_eq!(
            BmcUrl::parse("redfish+http://127.0.0.1:8000")
                .unwrap()
                .protocol,
            Protocol::RedfishHttp
        );
        for bad in [
            "",
            "10.0.0.5",
            "http://10.0.0.5",
            "ipmi://",
            "ipmi://10.0.0.5:0",
            "ipmi://10.0.0.5:99999",
            "ipmi://10.0.0.5/x",
            "redfish://10.0.0.5/redfish/v1/Managers/1",
            "redfish://10.0.0.5/redfish/v1/Systems/",
            "redfish://10.0.0.5/redfish/v1/Systems/a b",
            "redfish://a$(x)",
            "redfish://[zz::1]",
            "redfish://10.0.0.5/?x=1",
        ] {
            assert!(BmcUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_password_in_a_bmc_url_is_refused_without_echoing_it() {
        let e = BmcUrl::parse("redfish://root:hunter2secret@10.0.0.5").unwrap_err();
        assert!(!e.contains("hunter2secret"), "{e}");
        assert!(e.contains("bmc-credentials.json"), "{e}");
    }

    #[test]
    fn same_bmc_ignores_the_system_path_and_default_ports() {
        let a = BmcUrl::parse("redfish://10.0.0.5/redfish/v1/Systems/1").unwrap();
        let b = BmcUrl::parse("redfish://10.0.0.5:443").unwrap();
        let c = BmcUrl::parse("ipmi://10.0.0.5").unwrap();
        assert!(a.same_bmc(&b));
        assert!(!a.same_bmc(&c));
    }

    #[test]
    fn scrub_hides_the_secret_and_joins_lines() {
        assert_eq!(
            scrub("error: bad password s3cr3t\n\n  again s3cr3t ", "s3cr3t"),
            "error: bad password <hidden>; again <hidden>"
        );
    }

    #[test]
    fn run_parallel_keeps_order_caps_jobs_and_times_out() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let start = Instant::now();
        let r = run_parallel(
            (0..12u64).collect(),
            3,
            Duration::from_millis(1500),
            move |i| {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(if i == 5 { 5000 } else { 50 }));
                l.fetch_sub(1, Ordering::SeqCst);
                if i == 7 {
                    Err("seven".to_string())
                } else {
                    Ok(i * 10)
                }
            },
        );
        assert_eq!(r.len(), 12);
        assert_eq!(r[0], Ok(0));
        assert_eq!(r[11], Ok(110));
        assert_eq!(r[7], Err("seven".to_string()));
        assert!(
            r[5].as_ref().unwrap_err().contains("timed out"),
            "{:?}",
            r[5]
        );
        assert!(peak.load(Ordering::SeqCst) <= 3 + 1);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }
}
