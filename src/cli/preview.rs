//! `kiwispray-hosts render`: what `/bootstrap` or `/post-install` would
//! serve a host right now, without changing anything. The boot service
//! ([`crate::api::Service`]) renders it; a preview has no request, so `@SERVER_IP@` and
//! `@SERVER_PORT@` come from `--server`, the settings, or this machine's
//! first global address and port 5000. `--loader grub` renders what a GRUB
//! machine gets.

use super::{hosts::select, out, Ctx, Error, Exit, RenderArgs, Result};
use crate::api::{Response, Service};
use crate::lifecycle;
use std::process::{Command, Stdio};

/// The port of the boot service when nothing else says.
pub const DEFAULT_PORT: &str = "5000";

/// Splits `HOST:PORT` (`[v6]:PORT`, or a host alone) into the two values
/// templates get; an IPv6 address keeps its brackets.
pub fn parse_server(text: &str) -> Result<(String, String)> {
    let t = text.trim();
    let bad = || {
        Error::usage(format!(
            "server {t:?} is not HOST:PORT (e.g. 192.168.100.1:5000 or [fe80::1]:5000)"
        ))
    };
    if t.is_empty() || t.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad());
    }
    let u = url::Url::parse(&format!("http://{t}/")).map_err(|_| bad())?;
    let host = match u.host().ok_or_else(bad)? {
        url::Host::Ipv6(a) => format!("[{a}]"),
        other => other.to_string(),
    };
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err(bad());
    }
    let port = u.port().map(|p| p.to_string()).unwrap_or_else(|| {
        if t.ends_with(":80") {
            "80".to_string()
        } else {
            DEFAULT_PORT.to_string()
        }
    });
    Ok((host, port))
}

/// This machine's first global IPv4 address, as `ip` reports it.
fn primary_address() -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut w = l.split_whitespace();
        w.find(|x| *x == "inet")?;
        Some(w.next()?.split('/').next()?.to_string())
    })
}

/// Where the rendered scripts point machines to.
pub fn server(ctx: &Ctx, given: Option<&str>) -> Result<(String, String)> {
    if let Some(s) = given {
        return parse_server(s);
    }
    if let Some(s) = &ctx.config.server {
        return parse_server(s)
            .map_err(|e| Error::usage(format!("\"server\" in the settings: {e}")));
    }
    Ok((
        primary_address().unwrap_or_else(|| "127.0.0.1".to_string()),
        DEFAULT_PORT.to_string(),
    ))
}

pub fn render(ctx: &Ctx, a: &RenderArgs) -> Result<Exit> {
    let (ip, port) = server(ctx, a.server.as_deref())?;
    let flavour = crate::flavour::by_loader(Some(&a.loader)).map_err(Error::usage)?;
    let service = Service::new(ctx.config.clone());
    let snap = service.store.snapshot()?;
    let ids = select(&snap, &a.targets)?;
    let many = ids.len() > 1;
    let mut text = String::new();
    for id in ids {
        let host = snap.get(id).expect("selected");
        let rt = snap.runtime(id);
        let response = if a.post_install {
            let response = match service.preview_post_install(&host, rt, &ip, &port) {
                Ok(r) => r,
                Err(r) if r.status == 404 => return Err(Error::not_found(body(&r))),
                Err(r) => return Err(Error::usage(format!("host {id}: {}", body(&r)))),
            };
            if !lifecycle::installing(&host, rt) {
                eprintln!(
                    "kiwispray-hosts: note: host {id} is not being installed (state {:?}, no active bootid); \
                     /post-install would refuse it now (409); this is what it gets once it is",
                    host.state
                );
            }
            response
        } else {
            service.preview_boot(&host, rt, &ip, &port, flavour)
        };
        if many {
            text.push_str(&format!("==> host {id} ({}) <==\n", host.hostname));
        }
        text.push_str(&String::from_utf8_lossy(&response.body));
    }
    out(&text)?;
    Ok(Exit::Ok)
}

/// An error response's one-line reason.
fn body(r: &Response) -> String {
    let text = String::from_utf8_lossy(&r.body);
    text.trim_end()
        .trim_start_matches("kiwispray: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_spellings() {
        assert_eq!(
            parse_server("10.0.0.1:8080").unwrap(),
            ("10.0.0.1".into(), "8080".into())
        );
        assert_eq!(
            parse_server("[fe80::1]:5000").unwrap(),
            ("[fe80::1]".into(), "5000".into())
        );
        assert_eq!(
            parse_server("pxe.example").unwrap(),
            ("pxe.example".into(), "5000".into())
        );
        assert_eq!(parse_server("pxe:80").unwrap(), ("pxe".into(), "80".into()));
        for bad in ["", "a b:1", "h:99999", "h/x", "${x}:1"] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }
}
