//! The Redfish driver: HTTPS with HTTP basic authentication, through the
//! `ureq` client on rustls. Certificates are verified: against the
//! credential's `ca_file` if it names one, else against the system's trust
//! store (`/etc/ssl/certs/ca-certificates.crt` or
//! `/etc/ssl/ca-bundle.pem`), else Mozilla's roots; only an explicit
//! `"insecure": true` turns verification off. No proxy is used: a BMC is
//! on the management network.
//!
//! Power is the system's `Actions/#ComputerSystem.Reset` (`On`,
//! `ForceOff`, `ForceRestart`), the one-time network boot a `PATCH` of
//! `Boot` with `BootSourceOverrideEnabled: Once` and
//! `BootSourceOverrideTarget: Pxe`. Without a system path in the BMC URL
//! the only member of `/redfish/v1/Systems` is used.

use super::credentials::{Credential, Secret};
use super::{scrub, BmcUrl, Power, Protocol};
use serde_json::Value;
use std::time::Duration;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

pub struct Redfish {
    agent: ureq::Agent,
    base: String,
    system: Option<String>,
    user: String,
    secret: Secret,
}

const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

fn read_pem(path: &std::path::Path) -> Result<Vec<Certificate<'static>>, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&text)
        .filter_map(|i| match i {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

impl Redfish {
    pub fn new(url: &BmcUrl, cred: &Credential, timeout: Duration) -> Result<Redfish, String> {
        let https = url.protocol == Protocol::Redfish;
        let roots = match (&cred.ca_file, cred.insecure) {
            (Some(f), _) => RootCerts::new_with_certs(&read_pem(f)?),
            (None, _) => match SYSTEM_BUNDLES
                .iter()
                .map(std::path::Path::new)
                .find(|p| p.is_file())
            {
                Some(p) => RootCerts::new_with_certs(&read_pem(p)?),
                None => RootCerts::WebPki,
            },
        };
        let tls = TlsConfig::builder()
            .root_certs(roots)
            .disable_verification(cred.insecure)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .user_agent("kiwispray")
            .build()
            .into();
        let port = url.port.map_or(String::new(), |p| format!(":{p}"));
        Ok(Redfish {
            agent,
            base: format!(
                "{}://{}{port}",
                if https { "https" } else { "http" },
                url.host_for_url()
            ),
            system: url.system.clone(),
            user: cred.user.clone(),
            secret: cred.secret()?,
        })
    }

    fn auth(&self) -> String {
        format!(
            "Basic {}",
            base64(format!("{}:{}", self.user, self.secret.expose()).as_bytes())
        )
    }

    fn explain(&self, e: ureq::Error) -> String {
        let text = scrub(&e.to_string(), self.secret.expose());
        let l = text.to_ascii_lowercase();
        if l.contains("certificate")
            || l.contains("unknownissuer")
            || l.contains("tls")
            || l.contains("rustls")
        {
            format!(
                "TLS: the BMC's certificate is not trusted ({text}); name its CA with \"ca_file\" in bmc-credentials.json, or, knowingly, \"insecure\": true"
            )
        } else {
            format!("cannot reach the BMC at {}: {text}", self.base)
        }
    }

    /// One request; the JSON answer (or null for an empty one).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth();
        let res = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &auth)
                .header("Accept", "application/json")
                .call(),
            (m, b) => {
                let data = b.map(|v| v.to_string()).unwrap_or_else(|| "{}".into());
                let req = if m == "PATCH" {
                    self.agent.patch(&url)
                } else {
                    self.agent.post(&url)
                };
                req.header("Authorization", &auth)
                    .header("Accept", "application/json")
                    .header("Content-Type", "application/json")
                    .send(data.as_bytes())
            }
        };
        let mut res = res.map_err(|e| self.explain(e))?;
        let status = res.status().as_u16();
        let text = res
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_string()
            .unwrap_or_default();
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        match status {
            200..=299 => Ok(json),
            401 => Err(format!(
                "the BMC refused the login (HTTP 401): wrong user or password for {} (bmc-credentials.json)",
                self.base
            )),
            403 => Err(format!(
                "the BMC refused {method} {path} (HTTP 403): the user may lack the privilege"
            )),
            s => Err(format!(
                "{method} {path}: HTTP {s}{}",
                redfish_message(&json)
                    .map(|m| format!(": {}", scrub(&m, self.secret.expose())))
                    .unwrap_or_default()
            )),
        }
    }

    fn system(&mut self) -> Result<String, String> {
        if let Some(s) = &self.system {
            return Ok(s.clone());
        }
        let v = self.call("GET", "/redfish/v1/Systems", None)?;
        let members: Vec<String> = v["Members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["@odata.id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match members.as_slice() {
            [one] => {
                self.system = Some(one.clone());
                Ok(one.clone())
            }
            [] => Err("the BMC lists no system under /redfish/v1/Systems".into()),
            many => Err(format!(
                "the BMC has {} systems ({}); name one in the BMC URL: redfish://ADDRESS/redfish/v1/Systems/ID",
                many.len(),
                many.join(", ")
            )),
        }
    }

    fn reset(&mut self, kind: &str) -> Result<(), String> {
        let sys = self.system()?;
        let v = self.call("GET", &sys, None)?;
        let target = v["Actions"]["#ComputerSystem.Reset"]["target"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{sys}/Actions/ComputerSystem.Reset"));
        self.call(
            "POST",
            &target,
            Some(&serde_json::json!({ "ResetType": kind })),
        )
        .map(|_| ())
    }
}

/// The message of a Redfish error body (`error.message` and the first
/// extended info).
fn redfish_message(v: &Value) -> Option<String> {
    let e = &v["error"];
    let ext = e["@Message.ExtendedInfo"][0]["Message"].as_str();
    match (e["message"].as_str(), ext) {
        (Some(m), Some(x)) if m != x => Some(format!("{m} ({x})")),
        (Some(m), _) => Some(m.to_string()),
        (None, Some(x)) => Some(x.to_string()),
        _ => None,
    }
}

impl super::Bmc for Redfish {
    fn power_status(&mut self) -> Result<Power, String> {
        let sys = self.system()?;
        let v = self.call("GET", &sys, None)?;
        match v["PowerState"].as_str() {
            Some("On") | Some("PoweringOff") | Some("Paused") => Ok(Power::On),
            Some("Off") | Some("PoweringOn") => Ok(Power::Off),
            other => Err(format!(
                "{sys} reports no PowerState we know ({})",
                other.unwrap_or("none")
            )),
        }
    }

    fn set_power(&mut self, on: bool) -> Result<(), String> {
        self.reset(if on { "On" } else { "ForceOff" })
    }

    fn power_cycle(&mut self) -> Result<(), String> {
        self.reset("ForceRestart")
    }

    fn boot_pxe_once(&mut self, _efi: bool) -> Result<(), String> {
        let sys = self.system()?;
        self.call(
            "PATCH",
            &sys,
            Some(&serde_json::json!({"Boot": {
                "BootSourceOverrideEnabled": "Once",
                "BootSourceOverrideTarget": "Pxe",
            }})),
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_basic_auth() {
        assert_eq!(base64(b"admin:password"), "YWRtaW46cGFzc3dvcmQ=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn redfish_error_messages() {
        let v = serde_json::json!({"error": {"message": "A general error", "@Message.ExtendedInfo": [{"Message": "The value X is not allowed"}]}});
        assert_eq!(
            redfish_message(&v).unwrap(),
            "A general error (The value X is not allowed)"
        );
        assert_eq!(redfish_message(&Value::Null), None);
    }
}
