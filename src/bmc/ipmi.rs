//! The IPMI driver: IPMI 2.0 over LAN (RMCP+) through `ipmitool -I
//! lanplus`. The password never appears on ipmitool's command line, where
//! `ps` would show it: it is passed in the environment (`IPMI_PASSWORD`
//! with `-E`), or, when the credential names a password file, ipmitool
//! reads that file itself (`-f FILE`). Each call is killed at the driver's
//! timeout. `ipmitool` is found on `PATH`; `KIWISPRAY_IPMITOOL` names
//! another program (for tests).

use super::credentials::{Credential, Password};
use super::{scrub, Bmc, BmcUrl, Power};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Ipmi {
    host: String,
    port: u16,
    cred: Credential,
    timeout: Duration,
}

impl Ipmi {
    pub fn new(url: &BmcUrl, cred: &Credential, timeout: Duration) -> Ipmi {
        Ipmi {
            host: url.host.clone(),
            port: url.port_or_default(),
            cred: cred.clone(),
            timeout,
        }
    }

    /// The arguments of one ipmitool call (never the password).
    pub fn args(&self, command: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-I".into(),
            "lanplus".into(),
            "-H".into(),
            self.host.clone(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            self.cred.user.clone(),
        ];
        if let Some(c) = self.cred.cipher_suite {
            a.extend(["-C".into(), c.to_string()]);
        }
        // a short per-try timeout and one retry: the driver's own deadline
        // bounds the whole call
        a.extend(["-N".into(), "2".into(), "-R".into(), "2".into()]);
        match &self.cred.password {
            Password::File(p) => a.extend(["-f".into(), p.display().to_string()]),
            Password::Given(_) => a.push("-E".into()),
        }
        a.extend(command.iter().map(|s| s.to_string()));
        a
    }

    fn run(&self, command: &[&str]) -> Result<String, String> {
        let program = std::env::var_os("KIWISPRAY_IPMITOOL").unwrap_or_else(|| "ipmitool".into());
        let mut cmd = Command::new(&program);
        cmd.args(self.args(command))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("IPMI_PASSWORD");
        let secret = match &self.cred.password {
            Password::Given(s) => {
                cmd.env("IPMI_PASSWORD", s.expose());
                s.expose().to_string()
            }
            Password::File(_) => {
                // checks the file's mode; the text is only used to scrub output
                self.cred.secret()?.expose().to_string()
            }
        };
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "ipmitool is not installed (Debian/SUSE package ipmitool)".to_string()
            } else {
                format!("cannot run ipmitool: {e}")
            }
        })?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("cannot wait for ipmitool: {e}")),
            }
        };
        let Some(status) = status else {
            // the readers are left behind: a grandchild may still hold the
            // pipes, and nothing it says matters now
            return Err(format!(
                "no answer from the BMC within {} s (ipmitool {} killed)",
                self.timeout.as_secs(),
                command.join(" ")
            ));
        };
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if status.success() {
            return Ok(out);
        }
        let said = scrub(&format!("{err}\n{out}"), &secret);
        let hint = if said.contains("RMCP+ session") || said.contains("RAKP") {
            "no IPMI session: wrong user or password, or the BMC does not offer the cipher suite"
        } else if said.contains("Get Auth Capabilities") || said.contains("No response") {
            "the BMC does not answer"
        } else {
            "ipmitool failed"
        };
        Err(format!(
            "{hint} (ipmitool {}: {})",
            command.join(" "),
            if said.is_empty() {
                format!("exit status {}", status.code().unwrap_or(-1))
            } else {
                said
            }
        ))
    }
}

impl Bmc for Ipmi {
    fn power_status(&mut self) -> Result<Power, String> {
        let out = self.run(&["power", "status"])?;
        let l = out.to_ascii_lowercase();
        if l.contains("power is on") {
            Ok(Power::On)
        } else if l.contains("power is off") {
            Ok(Power::Off)
        } else {
            Err(format!(
                "unexpected answer to power status: {}",
                scrub(&out, "")
            ))
        }
    }

    fn set_power(&mut self, on: bool) -> Result<(), String> {
        self.run(&["power", if on { "on" } else { "off" }])
            .map(|_| ())
    }

    fn power_cycle(&mut self) -> Result<(), String> {
        self.run(&["power", "cycle"]).map(|_| ())
    }

    fn boot_pxe_once(&mut self, efi: bool) -> Result<(), String> {
        // without "persistent" the flag is valid for the next boot only
        if efi {
            self.run(&["chassis", "bootdev", "pxe", "options=efiboot"])
        } else {
            self.run(&["chassis", "bootdev", "pxe"])
        }
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bmc::credentials::Secret;

    #[test]
    fn the_password_is_never_an_argument() {
        let url = BmcUrl::parse("ipmi://10.0.0.5:6230").unwrap();
        let mut cred = Credential {
            user: "admin".into(),
            password: Password::Given(Secret::new("argv-never-99")),
            ca_file: None,
            insecure: false,
            cipher_suite: Some(3),
        };
        let a = Ipmi::new(&url, &cred, Duration::from_secs(5)).args(&["power", "status"]);
        assert!(!a.iter().any(|x| x.contains("argv-never-99")), "{a:?}");
        assert!(a.contains(&"-E".to_string()) && !a.contains(&"-P".to_string()));
        assert_eq!(&a[a.len() - 2..], ["power", "status"]);
        assert!(a.windows(2).any(|w| w == ["-C", "3"]));
        cred.password = Password::File("/etc/kiwispray/pw".into());
        let a = Ipmi::new(&url, &cred, Duration::from_secs(5)).args(&["power", "on"]);
        assert!(
            a.windows(2).any(|w| w == ["-f", "/etc/kiwispray/pw"]),
            "{a:?}"
        );
        assert!(!a.contains(&"-E".to_string()));
    }
}
