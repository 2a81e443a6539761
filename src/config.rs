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
//!   "max_connections": 128
//! }
//! ```
//!
//! Placeholder lists extend the built-in ones. `server` is what
//! `kiwispray-hosts render` uses for `@SERVER_IP@:@SERVER_PORT@`.

use crate::identity::{Placeholders, DEFAULT_PLACEHOLDER_SERIALS, DEFAULT_PLACEHOLDER_UUIDS};
use crate::store::Store;
use serde::Deserialize;
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
    database: Option<PathBuf>,
    #[serde(default)]
    event_log: Option<PathBuf>,
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
}

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
            discover: settings.discover,
            placeholder_serials: settings.placeholder_serials,
            placeholder_uuids: settings.placeholder_uuids,
            server: settings.server,
            max_connections: settings
                .max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .clamp(1, 4096),
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
}
