//! `kiwispray-hosts render`: what `/bootstrap` or `/post-install` would
//! serve a host right now, without changing anything. The template lookup
//! order and the template context follow the boot service's
//! ([`crate::api`]); a preview has no request, so `@SERVER_IP@` and
//! `@SERVER_PORT@` come from `--server`, the settings, or this machine's
//! first global address and port 5000.

use super::{hosts::resolve, out, Ctx, Error, Exit, RenderArgs, Result};
use crate::api::{ipxe_error, ipxe_safe};
use crate::hosts::{Host, STATE_DISCOVER};
use crate::lifecycle::{self, NextBoot};
use crate::render::Templates;
use serde_json::{Map, Value};
use std::path::PathBuf;
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

/// The template context, as [`crate::api`] builds it for a request with
/// no hardware facts.
pub fn context(host: &Host, ip: &str, port: &str) -> Value {
    let mut ctx = match host.to_value() {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    ctx.insert("state".into(), host.current_state().into());
    ctx.insert("chain".into(), host.state.clone().into());
    if host.bootid.is_none() {
        ctx.remove("bootid");
    }
    ctx.insert("HOST".into(), host.id.into());
    ctx.insert("SERVER_IP".into(), ip.into());
    ctx.insert("SERVER_PORT".into(), port.into());
    ctx.insert("BASE_URL".into(), format!("http://{ip}:{port}").into());
    let data = [
        format!("id={}", host.id),
        format!("hostname={}", host.hostname),
        format!("state={}", host.state),
        format!("macs={}", host.macs.replace(' ', ",")),
        format!("serial={:?}", host.serial),
        format!("uuid={}", host.uuid),
    ];
    let mut request = Map::new();
    request.insert("remote".into(), "".into());
    ctx.insert("request".into(), Value::Object(request));
    ctx.insert("HOST_DATA".into(), ipxe_safe(&data.join(" ")).into());
    Value::Object(ctx)
}

/// The templates `/bootstrap` tries for a host, in order; `Err` when the
/// host cannot be booted at all (the reason).
pub fn boot_candidates(ctx: &Ctx, host: &Host) -> std::result::Result<Vec<PathBuf>, String> {
    let tdir = ctx.config.templates_dir();
    Ok(match lifecycle::next_boot(&host.state) {
        NextBoot::Wait => vec![tdir.join("new.tmpl")],
        NextBoot::LocalDisk => vec![tdir.join("finished.tmpl")],
        NextBoot::Refuse(reason) => return Err(reason),
        NextBoot::Install(s) if s == STATE_DISCOVER && host.bootid.is_none() => {
            vec![tdir.join("new.tmpl")]
        }
        NextBoot::Install(s) => vec![
            ctx.config.images_dir().join(&s).join("host.tmpl"),
            tdir.join(format!("{s}.tmpl")),
            tdir.join("known_host.tmpl"),
        ],
    })
}

/// The templates `/post-install` tries for a host, in order.
pub fn post_install_candidates(ctx: &Ctx, host: &Host) -> Vec<PathBuf> {
    vec![
        ctx.config
            .images_dir()
            .join(host.current_state())
            .join("post_install.tmpl"),
        ctx.config.templates_dir().join("post_install.tmpl"),
    ]
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders the first existing template; `Ok(None)` if none exists.
fn render_first(
    candidates: &[PathBuf],
    ctx: &Value,
) -> std::result::Result<Option<String>, String> {
    let templates = Templates::default();
    for path in candidates {
        let t = match templates.load(path) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => return Err(e.to_string()),
        };
        return t
            .render(ctx)
            .map(Some)
            .map_err(|e| format!("template {}: {e}", path.display()));
    }
    Ok(None)
}

/// The body as the handler sends it: `Response::text` ends it with a
/// newline.
fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

fn body(r: crate::api::Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

pub fn render(ctx: &Ctx, a: &RenderArgs) -> Result<Exit> {
    let (ip, port) = server(ctx, a.server.as_deref())?;
    let db = ctx.store().snapshot()?;
    let id = resolve(&db, &a.host)?;
    let host = db.get(id).expect("resolved");
    let values = context(host, &ip, &port);
    if a.post_install {
        let candidates = post_install_candidates(ctx, host);
        let text = match render_first(&candidates, &values) {
            Ok(Some(text)) => with_newline(text),
            Ok(None) => {
                return Err(Error::not_found(format!(
                    "no post-install template ({})",
                    list_paths(&candidates)
                )))
            }
            Err(msg) => return Err(Error::usage(format!("host {id}: {msg}"))),
        };
        if !lifecycle::installing(host) {
            eprintln!(
                "kiwispray-hosts: note: host {id} is not being installed (state {:?}, no active bootid); \
                 /post-install would refuse it now (409); this is what it gets once it is",
                host.state
            );
        }
        out(&text)?;
        return Ok(Exit::Ok);
    }
    let text = match boot_candidates(ctx, host) {
        Err(reason) => {
            eprintln!("kiwispray-hosts: note: host {id} cannot be booted: {reason}");
            body(ipxe_error(&[format!("host {id}: {reason}")]))
        }
        Ok(candidates) => match render_first(&candidates, &values) {
            Ok(Some(text)) => with_newline(text),
            Ok(None) => {
                let msg = format!(
                    "host {id}: no template for state {:?} (looked for {})",
                    host.current_state(),
                    list_paths(&candidates)
                );
                eprintln!("kiwispray-hosts: note: {msg}");
                body(ipxe_error(&[msg]))
            }
            Err(msg) => {
                eprintln!("kiwispray-hosts: note: host {id}: {msg}");
                body(ipxe_error(&[format!("host {id}: {msg}")]))
            }
        },
    };
    out(&text)?;
    Ok(Exit::Ok)
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
