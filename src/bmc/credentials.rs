//! BMC credentials: `bmc-credentials.json` in the deployment root (or the
//! path `bmc_credentials` in `kiwispray.json` names), never the host
//! database. A default entry and entries per BMC URL; each gives a user and
//! a password or a password file, and for Redfish a CA file or an explicit
//! `insecure`:
//!
//! ```json
//! {
//!   "default": {"user": "admin", "password_file": "/etc/kiwispray/bmc-password"},
//!   "bmcs": {
//!     "ipmi://10.0.7.21": {"user": "root", "password": "…", "cipher_suite": 3},
//!     "redfish://10.0.7.22": {"password": "…", "ca_file": "/etc/kiwispray/bmc-ca.pem"}
//!   }
//! }
//! ```
//!
//! A BMC's entry is matched by address, port and protocol (the Redfish
//! system path does not matter); the fields it leaves out come from the
//! default. The file, and every password file, must be readable by its
//! owner alone (mode 0600 or stricter): anything else is refused. A
//! password is a [`Secret`], whose `Debug` and `Display` print `<hidden>`
//! and which is never serialised, so it cannot reach output, `--json`,
//! events or error messages by accident.

use super::BmcUrl;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The credentials file's name in a deployment root.
pub const CREDENTIALS_FILE: &str = "bmc-credentials.json";

/// A password. Shows as `<hidden>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The password itself, for the driver that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Where a password comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Password {
    Given(Secret),
    /// A file holding it (first line); ipmitool reads it itself with `-f`.
    File(PathBuf),
}

/// What a driver logs in with.
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    pub user: String,
    pub password: Password,
    /// Redfish: the CA certificate(s) (PEM) the BMC's certificate must
    /// chain to; else the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Redfish: no certificate verification at all (explicit only).
    pub insecure: bool,
    /// IPMI: the RMCP+ cipher suite (`ipmitool -C`); else ipmitool picks.
    pub cipher_suite: Option<u8>,
}

impl Credential {
    /// The password, read from its file if need be.
    pub fn secret(&self) -> Result<Secret, String> {
        match &self.password {
            Password::Given(s) => Ok(s.clone()),
            Password::File(p) => {
                check_private(p)?;
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read password file {}: {e}", p.display()))?;
                let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
                if line.is_empty() {
                    return Err(format!("password file {} is empty", p.display()));
                }
                Ok(Secret::new(line))
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    user: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    insecure: Option<bool>,
    cipher_suite: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    #[serde(default)]
    default: Option<Entry>,
    #[serde(default)]
    bmcs: BTreeMap<String, Entry>,
}

/// The credentials of a deployment.
#[derive(Debug)]
pub struct Credentials {
    path: PathBuf,
    default: Option<Entry>,
    bmcs: Vec<(BmcUrl, Entry)>,
}

/// Refuses a file that anyone but its owner may read or write.
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable or writable by others (mode {mode:04o}); it holds BMC passwords: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

impl Credentials {
    /// Reads the credentials file; a missing file is an error that says
    /// how to write one.
    pub fn load(path: &Path) -> Result<Credentials, String> {
        if !path.exists() {
            return Err(format!(
                "no BMC credentials: write {} (mode 0600) with a \"default\" entry or one per BMC (see the README, \"Out-of-band power\")",
                path.display()
            ));
        }
        check_private(path)?;
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // serde_json's messages quote the offending token for some errors;
        // give only the position, so that no password reaches the message.
        let form: FileForm = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{} is not valid: {} at line {} column {} (expected {{\"default\": {{…}}, \"bmcs\": {{\"URL\": {{…}}}}}} with user, password or password_file, ca_file, insecure, cipher_suite)",
                path.display(),
                match e.classify() {
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "bad JSON",
                    _ => "unexpected field or value",
                },
                e.line(),
                e.column()
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |mut e: Entry| {
            for p in [&mut e.password_file, &mut e.ca_file].into_iter().flatten() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            e
        };
        let mut bmcs = Vec::new();
        for (k, v) in form.bmcs {
            let url = BmcUrl::parse(&k).map_err(|e| format!("{}: {e}", path.display()))?;
            if v.password.is_some() && v.password_file.is_some() {
                return Err(format!(
                    "{}: entry {k:?} gives both password and password_file",
                    path.display()
                ));
            }
            bmcs.push((url, fix(v)));
        }
        let default = form.default.map(fix);
        if let Some(d) = &default {
            if d.password.is_some() && d.password_file.is_some() {
                return Err(format!(
                    "{}: the default entry gives both password and password_file",
                    path.display()
                ));
            }
        }
        Ok(Credentials {
            path: path.to_path_buf(),
            default,
            bmcs,
        })
    }

    /// The credential for one BMC: its own entry over the default.
    pub fn for_bmc(&self, url: &BmcUrl) -> Result<Credential, String> {
        let own = self
            .bmcs
            .iter()
            .find(|(u, _)| u.same_bmc(url))
            .map(|(_, e)| e.clone());
        if own.is_none() && self.default.is_none() {
            return Err(format!(
                "no credentials for {url} in {} (and no default entry)",
                self.path.display()
            ));
        }
        let own = own.unwrap_or_default();
        let def = self.default.clone().unwrap_or_default();
        let user = own
            .user
            .or(def.user)
            .ok_or_else(|| format!("no user for {url} in {}", self.path.display()))?;
        let password = if let Some(p) = own.password {
            Password::Given(Secret::new(p))
        } else if let Some(f) = own.password_file {
            Password::File(f)
        } else if let Some(p) = def.password {
            Password::Given(Secret::new(p))
        } else if let Some(f) = def.password_file {
            Password::File(f)
        } else {
            return Err(format!(
                "no password or password_file for {url} in {}",
                self.path.display()
            ));
        };
        Ok(Credential {
            user,
            password,
            ca_file: own.ca_file.or(def.ca_file),
            insecure: own.insecure.or(def.insecure).unwrap_or(false),
            cipher_suite: own.cipher_suite.or(def.cipher_suite),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ks-cred-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn credentials_file_readable_by_others_is_refused() {
        let d = dir("mode");
        let p = d.join(CREDENTIALS_FILE);
        let text = r#"{"default": {"user": "admin", "password": "pw-mode-test-1"}}"#;
        for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
            write(&p, text, mode);
            let e = Credentials::load(&p).unwrap_err();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
            assert!(!e.contains("pw-mode-test-1"), "{e}");
        }
        for mode in [0o600, 0o400] {
            write(&p, text, mode);
            assert!(Credentials::load(&p).is_ok(), "{mode:o}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn password_file_readable_by_others_is_refused() {
        let d = dir("pwfile");
        let p = d.join(CREDENTIALS_FILE);
        write(
            &p,
            r#"{"default": {"user": "admin", "password_file": "pw"}}"#,
            0o600,
        );
        write(&d.join("pw"), "from-a-file-77\n", 0o644);
        let c = Credentials::load(&p).unwrap();
        let cred = c
            .for_bmc(&BmcUrl::parse("ipmi://10.0.0.1").unwrap())
            .unwrap();
        assert_eq!(cred.password, Password::File(d.join("pw")));
        let e = cred.secret().unwrap_err();
        assert!(
            e.contains("chmod 600") && !e.contains("from-a-file-77"),
            "{e}"
        );
        std::fs::set_permissions(d.join("pw"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cred.secret().unwrap().expose(), "from-a-file-77");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn per_bmc_entries_override_the_default() {
        let d = dir("merge");
        let p = d.join(CREDENTIALS_FILE);
        write(
            &p,
            r#"{"default": {"user": "admin", "password": "dflt-pw", "ca_file": "/etc/ca.pem"},
                "bmcs": {"redfish://10.0.0.2": {"password": "own-pw", "insecure": true},
                         "ipmi://10.0.0.3:6230": {"user": "root", "cipher_suite": 3}}}"#,
            0o600,
        );
        let c = Credentials::load(&p).unwrap();
        let a = c
            .for_bmc(&BmcUrl::parse("redfish://10.0.0.2/redfish/v1/Systems/x").unwrap())
            .unwrap();
        assert_eq!(a.user, "admin");
        assert_eq!(a.secret().unwrap().expose(), "own-pw");
        assert!(a.insecure);
        assert_eq!(a.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        let b = c
            .for_bmc(&BmcUrl::parse("ipmi://10.0.0.3:6230").unwrap())
            .unwrap();
        assert_eq!((b.user.as_str(), b.cipher_suite), ("root", Some(3)));
        assert_eq!(b.secret().unwrap().expose(), "dflt-pw");
        let other = c
            .for_bmc(&BmcUrl::parse("ipmi://10.0.0.3").unwrap())
            .unwrap();
        assert_eq!(other.user, "admin");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let d = dir("secret");
        let p = d.join(CREDENTIALS_FILE);
        let cred = Credential {
            user: "u".into(),
            password: Password::Given(Secret::new("never-shown-42")),
            ca_file: None,
            insecure: false,
            cipher_suite: None,
        };
        let dbg = format!("{cred:?} {}", Secret::new("never-shown-42"));
        assert!(!dbg.contains("never-shown-42"), "{dbg}");
        // a broken file: the error gives the position, not the text
        write(
            &p,
            r#"{"default": {"user": "a", "password": never-shown-42}}"#,
            0o600,
        );
        let e = Credentials::load(&p).unwrap_err();
        assert!(!e.contains("never-shown-42"), "{e}");
        write(
            &p,
            r#"{"default": {"user": "a", "pasword": "never-shown-42"}}"#,
            0o600,
        );
        let e = Credentials::load(&p).unwrap_err();
        assert!(!e.contains("never-shown-42"), "{e}");
        write(
            &p,
            r#"{"default": {"user": "a", "password": ["never-shown-42"]}}"#,
            0o600,
        );
        let e = Credentials::load(&p).unwrap_err();
        assert!(!e.contains("never-shown-42"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_entries_say_what_is_missing() {
        let d = dir("missing");
        let p = d.join(CREDENTIALS_FILE);
        assert!(Credentials::load(&p)
            .unwrap_err()
            .contains("no BMC credentials"));
        write(&p, r#"{"bmcs": {"ipmi://10.0.0.9": {"user": "x"}}}"#, 0o600);
        let c = Credentials::load(&p).unwrap();
        assert!(c
            .for_bmc(&BmcUrl::parse("ipmi://10.0.0.8").unwrap())
            .unwrap_err()
            .contains("no credentials for ipmi://10.0.0.8"));
        assert!(c
            .for_bmc(&BmcUrl::parse("ipmi://10.0.0.9").unwrap())
            .unwrap_err()
            .contains("no password"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
