//! Settings of a deployment: the root directory and the optional
//! `kiwispray.json` in it (or the file given with `--config`), shared by the
//! handler and the CLI.
//!
//! ```json
//! {
//!   "discover": false,
//!   "placeholder_serials": ["ACME-0000"],
//!   "placeholder_uuids": [],
//!   "server": "192.168.100.1:5000",
//!   "max_connections": 128,
//!   "max_install_boots": 3,
//!   "install_deadline_minutes": 60,
//!   "hold_overdue": false,
//!   "max_installs": 50,
//!   "trusted_proxies": ["10.20.0.2", "10.30.0.2"],
//!   "bmc_credentials": "/etc/kiwispray/bmc-credentials.json"
//! }
//! ```
//!
//! Placeholder lists extend the built-in ones. `server` is what
//! `kiwispray-hosts render` uses for `@SERVER_IP@:@SERVER_PORT@`.
//! `max_install_boots` and `install_deadline_minutes` drive the install
//! safety of [`crate::lifecycle::install_decision`]; an image may set its own
//! deadline in `images/<state>/image.json` (`{"install_deadline_minutes": 90}`).
//! `max_installs` caps how many hosts install at once (absent: no cap).
//! `trusted_proxies` lists the edge servers (nginx/kiwispray-edge.conf) whose
//! `X-Real-IP` / `X-Forwarded-For` name the machine behind them.
//! `bmc_credentials` is where the BMC credentials are (default
//! `<root>/bmc-credentials.json`; see [`crate::bmc::credentials`]).
//!
//! This is also the one place where a state name becomes a path
//! ([`Config::image_dir`] and the template lists built on it): every caller,
//! HTTP or CLI, gets the same refusal for an unsafe name.

use crate::identity::{Placeholders, DEFAULT_PLACEHOLDER_SERIALS, DEFAULT_PLACEHOLDER_UUIDS};
use crate::store::Store;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The name of the optional settings file in a deployment root.
pub const CONFIG_FILE: &str = "kiwispray.json";
/// The host database in a deployment root.
pub const DATABASE_FILE: &str = "known_hosts.json";
/// The event log in a deployment root.
pub const EVENTS_FILE: &str = "events.jsonl";
/// FastCGI connections served at once unless configured. Connections
/// beyond it wait for a free one (see nginx/kiwispray.conf); idle
/// keep-alive connections of a web server would hold slots too, so the
/// shipped configurations keep none.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    #[serde(default)]
    discover: bool,
    #[serde(default)]
    placeholder_serials: Vec<String>,
    #[serde(default)]
    placeholder_uuids: Vec<String>,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_install_boots: Option<u32>,
    #[serde(default)]
    install_deadline_minutes: Option<u64>,
    #[serde(default)]
    hold_overdue: bool,
    #[serde(default)]
    max_installs: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    database: Option<PathBuf>,
    #[serde(default)]
    event_log: Option<PathBuf>,
    #[serde(default)]
    bmc_credentials: Option<PathBuf>,
}

/// The resolved settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub database: PathBuf,
    pub events: PathBuf,
    pub discover: bool,
    pub placeholder_serials: Vec<String>,
    pub placeholder_uuids: Vec<String>,
    pub server: Option<String>,
    pub max_connections: usize,
    /// Install boots of one state element without a `/finish` after which
    /// a host is held (cause `loop`).
    pub max_install_boots: u32,
    /// Minutes after which an open install attempt is overdue.
    pub install_deadline_minutes: u64,
    /// Whether an overdue host's next boot holds it.
    pub hold_overdue: bool,
    /// How many hosts may install at once (`None`: no limit).
    pub max_installs: Option<usize>,
    /// Edge servers whose forwarding headers are believed (see
    /// [`crate::api::forwarded_machine`]); from anyone else they are ignored.
    pub trusted_proxies: Vec<IpAddr>,
    /// The BMC credentials file.
    pub bmc_credentials: PathBuf,
}

/// Install boots without a `/finish` before a host is held, unless set.
pub const DEFAULT_MAX_INSTALL_BOOTS: u32 = 3;
/// Minutes an install may take before it is overdue, unless set.
pub const DEFAULT_INSTALL_DEADLINE_MINUTES: u64 = 60;

impl Config {
    /// Reads `config` if given, else `<root>/kiwispray.json` if it exists.
    pub fn load(root: &Path, config: Option<&Path>) -> Result<Config, String> {
        let default_path = root.join(CONFIG_FILE);
        let path = match config {
            Some(p) => Some(p.to_path_buf()),
            None if default_path.exists() => Some(default_path),
            None => None,
        };
        let settings = match &path {
            Some(p) => {
                let text = std::fs::read(p)
                    .map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                serde_json::from_slice::<FileSettings>(&text)
                    .map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => FileSettings::default(),
        };
        let in_root = |p: Option<PathBuf>, name: &str| match p {
            Some(p) if p.is_absolute() => p,
            Some(p) => root.join(p),
            None => root.join(name),
        };
        Ok(Config {
            root: root.to_path_buf(),
            database: in_root(settings.database, DATABASE_FILE),
            events: in_root(settings.event_log, EVENTS_FILE),
            bmc_credentials: in_root(
                settings.bmc_credentials,
                crate::bmc::credentials::CREDENTIALS_FILE,
            ),
            discover: settings.discover,
            placeholder_serials: settings.placeholder_serials,
            placeholder_uuids: settings.placeholder_uuids,
            server: settings.server,
            max_connections: settings
                .max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .clamp(1, 4096),
            max_install_boots: match settings.max_install_boots {
                Some(0) => {
                    return Err(format!(
                        "config {}: max_install_boots must be at least 1",
                        path.as_deref().unwrap_or(Path::new(CONFIG_FILE)).display()
                    ))
                }
                Some(n) => n,
                None => DEFAULT_MAX_INSTALL_BOOTS,
            },
            install_deadline_minutes: match settings.install_deadline_minutes {
                Some(0) => {
                    return Err(format!(
                        "config {}: install_deadline_minutes must be at least 1",
                        path.as_deref().unwrap_or(Path::new(CONFIG_FILE)).display()
                    ))
                }
                Some(n) => n,
                None => DEFAULT_INSTALL_DEADLINE_MINUTES,
            },
            hold_overdue: settings.hold_overdue,
            max_installs: match settings.max_installs {
                Some(0) => {
                    return Err(format!(
                        "config {}: max_installs must be at least 1 (leave it out for no limit)",
                        path.as_deref().unwrap_or(Path::new(CONFIG_FILE)).display()
                    ))
                }
                m => m,
            },
            trusted_proxies: settings
                .trusted_proxies
                .iter()
                .map(|a| {
                    crate::api::parse_address(a).ok_or_else(|| {
                        format!(
                            "config {}: trusted_proxies: {a:?} is not an IP address",
                            path.as_deref().unwrap_or(Path::new(CONFIG_FILE)).display()
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// The placeholder lists: built-in plus configured.
    pub fn placeholders(&self) -> Placeholders {
        Placeholders::new(
            DEFAULT_PLACEHOLDER_SERIALS
                .iter()
                .map(|s| s.to_string())
                .chain(self.placeholder_serials.iter().cloned()),
            DEFAULT_PLACEHOLDER_UUIDS
                .iter()
                .map(|s| s.to_string())
                .chain(self.placeholder_uuids.iter().cloned()),
        )
    }

    /// The host database of this deployment.
    pub fn store(&self) -> Store {
        Store::new(
            self.database.clone(),
            self.events.clone(),
            self.placeholders(),
        )
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The directory of an image state, `images/<state>`. The one place a
    /// state becomes a path: a name that is not one safe path component
    /// (`../../etc`, `a/b`, `/abs`) is refused.
    pub fn image_dir(&self, state: &str) -> Result<PathBuf, String> {
        crate::lifecycle::check_state_name(state)?;
        Ok(self.images_dir().join(state))
    }

    /// The templates that can give the boot script of an image state, in
    /// the order they are tried, for the flavour whose templates end in
    /// `.<ext>` (see [`crate::flavour`]).
    pub fn install_templates(&self, state: &str, ext: &str) -> Result<Vec<PathBuf>, String> {
        let dir = self.image_dir(state)?;
        let tdir = self.templates_dir();
        Ok(vec![
            dir.join(format!("host.{ext}")),
            tdir.join(format!("{state}.{ext}")),
            tdir.join(format!("known_host.{ext}")),
        ])
    }

    /// The templates that can give the post-install script of a state, in
    /// the order they are tried.
    pub fn post_install_templates(&self, state: &str) -> Result<Vec<PathBuf>, String> {
        Ok(vec![
            self.image_dir(state)?.join("post_install.tmpl"),
            self.templates_dir().join("post_install.tmpl"),
        ])
    }

    /// The install deadline of an image state in minutes: its own from
    /// `images/<state>/image.json` (`install_deadline_minutes`), else the
    /// deployment's.
    pub fn deadline_minutes(&self, state: &str) -> Result<u64, String> {
        let dir = self.image_dir(state)?;
        Ok(crate::images::ImageInfo::read(&dir)
            .and_then(|i| i.install_deadline_minutes)
            .filter(|m| *m > 0)
            .unwrap_or(self.install_deadline_minutes))
    }
}
