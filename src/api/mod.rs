//! The HTTP interface: one function from a request to a response for each
//! dynamic path, one file per path ([`bootstrap`], [`post_install`],
//! [`finish`], [`fail`], [`state`], [`update`], [`hosts`], [`metrics`] and
//! the read-only JSON API under `/api/v1/` in [`v1`]), plus the
//! [`overdue`] watch, a task of the service rather than a path. The FastCGI and
//! CGI adapters in [`crate::fcgi`] translate the web server's parameters
//! into a [`Request`] and the [`Response`] back; this module holds what the
//! paths share: parsing, the template context, the bootid check and the
//! error scripts.
//!
//! Bad requests get a 4xx status with a one-line reason and change nothing.
//! A machine that cannot be booted as asked (a conflict, an unsafe state, a
//! broken template, a hold) gets an iPXE script that explains why on its
//! console, waits and reboots, so that it neither boots something wrong nor
//! stalls.

mod bootstrap;
mod fail;
mod finish;
mod hosts;
mod metrics;
pub mod overdue;
mod post_install;
mod state;
mod update;
mod v1;

pub use hosts::{format_table, host_table};
pub use update::merge;

use crate::config::Config;
use crate::flavour::Flavour;
use crate::hosts::{Database, Host};
use crate::lifecycle;
use crate::render::{Template, Templates};
use crate::runtime::{HostRuntime, RuntimeTable};
use crate::store::{Snapshot, Store, StoreError};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// The longest query string accepted.
pub const MAX_QUERY: usize = 8 * 1024;
/// The most parameters accepted in a query or form.
pub const MAX_PARAMS: usize = 64;
/// The largest request body accepted (`POST /update`).
pub const MAX_BODY: usize = 64 * 1024;
/// Seconds an error script waits before it reboots the machine.
pub const ERROR_REBOOT_DELAY: u32 = 300;

/// A request, as the web server describes it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// The request path without the query, e.g. `/bootstrap`.
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
    pub content_type: String,
    /// The client's address: the machine's own, also behind a trusted edge
    /// server (see [`forwarded_machine`]).
    pub remote: String,
    /// The trusted edge server the request came through (its address, the
    /// web server's `REMOTE_ADDR`); empty for a direct request.
    pub via: String,
    /// The `X-Forwarded-For` and `X-Real-IP` headers as sent; believed only
    /// from a trusted edge.
    pub forwarded_for: String,
    pub real_ip: String,
    /// The `Host` header.
    pub host_header: String,
    /// The server address and port the request came in on.
    pub server_addr: String,
    pub server_port: String,
    /// The status of a refused request the web server hands to its error
    /// handler (`REDIRECT_STATUS`), if any.
    pub redirect_status: String,
}

impl Request {
    /// Where the request came from, for log lines: `10.0.1.5`, or
    /// `10.0.1.5 via edge 10.0.0.2`.
    pub fn origin(&self) -> String {
        if self.via.is_empty() {
            self.remote.clone()
        } else {
            format!("{} via edge {}", self.remote, self.via)
        }
    }
}

/// A response, written as a CGI response by the adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: body.into_bytes(),
        }
    }

    /// A 4xx or 5xx with a one-line reason.
    pub fn error(status: u16, reason: impl AsRef<str>) -> Response {
        let line: String = reason
            .as_ref()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Response::text(status, format!("kiwispray: {line}"))
    }

    /// The response in CGI form: `Status:` and header lines, a blank line,
    /// the body.
    pub fn to_cgi(&self) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(self.body.len() + 160);
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "Status: {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
        let _ = write!(
            out,
            "Content-Length: {}\r\nCache-Control: no-store\r\n\r\n",
            self.body.len()
        );
        out.extend_from_slice(&self.body);
        out
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Query or form parameters, decoded and checked. The decoded names and
/// values are kept in one string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    text: String,
    /// Per pair: where its name ends and its value starts, and where the
    /// value ends, in `text` (each pair starts where the previous ended).
    pairs: Vec<(usize, usize)>,
}

impl Params {
    /// Parses `a=1&b=2` (`application/x-www-form-urlencoded`). Rejects
    /// overlong input, too many parameters, bad percent escapes, invalid
    /// UTF-8 and control characters, naming the offending parameter.
    pub fn parse(raw: &[u8], what: &str) -> Result<Params, String> {
        if raw.len() > MAX_QUERY {
            return Err(format!(
                "{what} is {} bytes long; at most {MAX_QUERY} are accepted",
                raw.len()
            ));
        }
        let parts = raw.iter().filter(|b| **b == b'&').count() + 1;
        let mut params = Params {
            text: String::with_capacity(raw.len()),
            pairs: Vec::with_capacity(parts.min(MAX_PARAMS)),
        };
        let mut scratch = Vec::new();
        for part in raw.split(|b| *b == b'&') {
            if part.is_empty() {
                continue;
            }
            if params.pairs.len() == MAX_PARAMS {
                return Err(format!("{what} has more than {MAX_PARAMS} parameters"));
            }
            let (k, v) = match part.iter().position(|b| *b == b'=') {
                Some(i) => (&part[..i], &part[i + 1..]),
                None => (part, &b""[..]),
            };
            let start = params.text.len();
            decode(k, &mut params.text, &mut scratch)
                .map_err(|e| format!("bad parameter name in {what}: {e}"))?;
            let name_end = params.text.len();
            decode(v, &mut params.text, &mut scratch)
                .map_err(|e| format!("bad value for {:?}: {e}", &params.text[start..name_end]))?;
            params.pairs.push((name_end, params.text.len()));
        }
        Ok(params)
    }

    /// How many parameters there are.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The parameters in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut start = 0;
        self.pairs.iter().map(move |&(name_end, end)| {
            let pair = (&self.text[start..name_end], &self.text[name_end..end]);
            start = end;
            pair
        })
    }

    /// The value of a parameter that may be given once.
    pub fn one(&self, key: &str) -> Result<Option<&str>, String> {
        let mut found = None;
        for (k, v) in self.iter() {
            if k == key {
                if found.is_some() {
                    return Err(format!("parameter {key:?} is given more than once"));
                }
                found = Some(v);
            }
        }
        Ok(found)
    }

    pub fn required(&self, key: &str) -> Result<&str, String> {
        match self.one(key)? {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("missing parameter {key:?}")),
        }
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter(move |(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Appends the decoded `raw` to `out`; `scratch` holds bytes being decoded.
fn decode(raw: &[u8], out: &mut String, scratch: &mut Vec<u8>) -> Result<(), String> {
    // Most values (MACs, UUIDs, platform names) need no decoding: they are
    // checked and copied in one go.
    let plain = !raw.iter().any(|b| matches!(b, b'%' | b'+'));
    let s = if plain {
        std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?
    } else {
        scratch.clear();
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'+' => scratch.push(b' '),
                b'%' => {
                    let hex = raw
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or("bad percent-encoding")?;
                    scratch.push(hex);
                    i += 2;
                }
                b => scratch.push(b),
            }
            i += 1;
        }
        std::str::from_utf8(scratch).map_err(|_| "not valid UTF-8".to_string())?
    };
    let control = if s.is_ascii() {
        s.bytes().any(|b| b.is_ascii_control() && b != b'\t')
    } else {
        s.chars().any(|c| c.is_control() && c != '\t')
    };
    if control {
        return Err("contains control characters".into());
    }
    out.push_str(s);
    Ok(())
}

fn parse_id(params: &Params) -> Result<u64, String> {
    let raw = params.required("id")?;
    if raw.len() > 19 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "id {:?} is not a host id (a whole number)",
            shorten(raw)
        ));
    }
    raw.parse()
        .map_err(|_| format!("id {raw:?} is out of range"))
}

/// The `id` and `bootid` of `/post-install`, `/finish` and `/update`; the
/// bootid may be empty here, which `check_installing` reports.
fn id_and_bootid(params: &Params) -> Result<(u64, String), Response> {
    let id = parse_id(params).map_err(|e| Response::error(400, e))?;
    let bootid = params.one("bootid").map_err(|e| Response::error(400, e))?;
    Ok((id, bootid.unwrap_or("").to_string()))
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Hardware facts reported by `bootstrap.ipxe`, shown to the operator.
#[derive(Debug, Clone, Default)]
struct Facts {
    platform: String,
    buildarch: String,
    manufacturer: String,
    product: String,
    dhcp_mac: String,
}

/// The boot service of one deployment root.
pub struct Service {
    pub config: Config,
    pub store: Store,
    templates: Templates,
    /// When each host's "last seen" time was last queued by this process.
    seen_queued: Mutex<HashMap<u64, u64>>,
    /// The shared file of the counters `/metrics` reports.
    metrics_file: PathBuf,
}

impl Service {
    pub fn new(config: Config) -> Service {
        let store = config.store();
        // An earlier version's bootids move to the runtime log once.
        match store.migrate() {
            Ok(0) => {}
            Ok(n) => log(&format!(
                "moved the bootids of {n} hosts to the runtime log"
            )),
            Err(e) => log(&format!("cannot move earlier bootids: {e}")),
        }
        Service {
            metrics_file: crate::metrics::file_for(store.path()),
            store,
            config,
            templates: Templates::default(),
            seen_queued: Mutex::new(HashMap::new()),
        }
    }

    /// Answers one request and counts it (path, status, latency) for
    /// `/metrics`. Never panics on bad input; a panic from a bug is caught
    /// by the adapter and answered with a 500.
    pub fn handle(&self, req: &Request) -> Response {
        let started = std::time::Instant::now();
        let forwarded = self.through_edge(req);
        let req = forwarded.as_ref().unwrap_or(req);
        let response = self.route(req);
        crate::metrics::count_request(
            metrics::path_label(&req.path),
            response.status,
            started.elapsed().as_secs_f64(),
        );
        crate::metrics::flush_if_due(&self.metrics_file);
        response
    }

    /// A request from a trusted edge server, with the machine behind it as
    /// `remote` and the edge as `via`; `None` when the request is to be
    /// taken as it is (a direct request, or one from an edge that named no
    /// machine).
    fn through_edge(&self, req: &Request) -> Option<Request> {
        if self.config.trusted_proxies.is_empty() {
            return None;
        }
        let machine = forwarded_machine(
            &req.remote,
            &req.real_ip,
            &req.forwarded_for,
            &self.config.trusted_proxies,
        )?;
        let mut r = req.clone();
        r.via = std::mem::replace(&mut r.remote, machine);
        Some(r)
    }

    /// The shared file of the counters that `/metrics` reports.
    pub fn metrics_file(&self) -> PathBuf {
        self.metrics_file.clone()
    }

    fn route(&self, req: &Request) -> Response {
        let name = req.path.rsplit('/').next().unwrap_or("");
        let method = req.method.as_str();
        if name == "kiwispray-error" {
            return web_server_error(req);
        }
        if let Some(i) = req.path.find("/api/") {
            return self.api(req, &req.path[i..]);
        }
        let allowed = match name {
            "update" => method == "POST",
            // These change state, so only GET; HEAD must have no effects.
            "bootstrap" | "post-install" | "finish" | "fail" => method == "GET",
            "state" | "hosts" | "metrics" => method == "GET" || method == "HEAD",
            _ => return Response::error(404, format!("no such path {:?}", shorten(&req.path))),
        };
        if !allowed {
            return Response::error(405, format!("{method} is not allowed on /{name}"));
        }
        let params = match Params::parse(req.query.as_bytes(), "query string") {
            Ok(p) => p,
            Err(e) => {
                let status = if req.query.len() > MAX_QUERY {
                    414
                } else {
                    400
                };
                let response = Response::error(status, e);
                // A query that does not parse still says which loader runs
                // the answer.
                return match crate::flavour::from_raw_query(&req.query) {
                    Some(f) if name == "bootstrap" => in_flavour(f, response),
                    _ => response,
                };
            }
        };
        let result = match name {
            "bootstrap" => self.bootstrap_any(req, &params),
            "post-install" => self.post_install(req, &params),
            "finish" => self.finish(req, &params),
            "fail" => self.fail(req, &params),
            "state" => self.state(&params),
            "update" => self.update(req, &params),
            "metrics" => self.metrics(),
            _ => self.hosts(),
        };
        result.unwrap_or_else(|e| e)
    }

    /// The cached hosts and facts, or a 500 that says why not.
    fn snapshot(&self) -> Result<Arc<Snapshot>, Response> {
        self.store.snapshot().map_err(|e| store_failure(&e))
    }

    /// Renders the first template of `candidates` that exists, with the
    /// values `context` gives for it.
    fn render_first(
        &self,
        candidates: &[PathBuf],
        context: impl FnOnce(&Template) -> Value,
    ) -> Result<Option<String>, String> {
        for path in candidates {
            let template: Arc<Template> = match self.templates.load(path) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => return Err(e.to_string()),
            };
            return template
                .render(&context(&template))
                .map(Some)
                .map_err(|e| format!("template {}: {e}", path.display()));
        }
        Ok(None)
    }

    /// The values templates can use; with `needs`, only those that
    /// template names (a finished host's script uses two of them, and
    /// working out the rest cost more than the rest of its answer).
    fn context(
        &self,
        req: &Request,
        host: &Host,
        rt: &HostRuntime,
        facts: Option<&Facts>,
        flavour: Option<&dyn Flavour>,
        needs: Option<&Template>,
    ) -> Value {
        let wants = |name: &str| needs.is_none_or(|t| t.uses(name));
        let mut ctx = Map::new();
        let own_fields = needs.is_some_and(own_fields_only);
        if own_fields {
            for (k, v) in [
                ("hostname", &host.hostname),
                ("macs", &host.macs),
                ("serial", &host.serial),
                ("uuid", &host.uuid),
            ] {
                if wants(k) {
                    ctx.insert(k.into(), v.clone().into());
                }
            }
            ctx.insert("id".into(), host.id.into());
        } else if let Value::Object(m) = host.to_value() {
            ctx = m;
        }
        ctx.insert("state".into(), host.current_state().into());
        ctx.insert("chain".into(), host.state.clone().into());
        if let Some(b) = &rt.bootid {
            ctx.insert("bootid".into(), b.clone().into());
        }
        ctx.insert("HOST".into(), host.id.into());
        if let Some(f) = flavour {
            ctx.insert("LOADER".into(), f.name().into());
        }
        if wants("SERVER_IP") || wants("SERVER_PORT") || wants("BASE_URL") {
            let (ip, port) = server_address(req);
            ctx.insert("BASE_URL".into(), format!("http://{ip}:{port}").into());
            ctx.insert("SERVER_IP".into(), ip.into());
            ctx.insert("SERVER_PORT".into(), port.into());
        }
        if !wants("HOST_DATA") && !wants("request") {
            return Value::Object(ctx);
        }
        let mut data = vec![
            format!("id={}", host.id),
            format!("hostname={}", host.hostname),
            format!("state={}", host.state),
            format!("macs={}", host.macs.replace(' ', ",")),
            format!("serial={:?}", host.serial),
            format!("uuid={}", host.uuid),
        ];
        if let Some(f) = facts {
            let mut request = Map::new();
            for (k, v) in [
                ("platform", &f.platform),
                ("buildarch", &f.buildarch),
                ("manufacturer", &f.manufacturer),
                ("product", &f.product),
                ("dhcp_mac", &f.dhcp_mac),
            ] {
                if !v.is_empty() {
                    request.insert(k.into(), v.clone().into());
                    data.push(format!("{k}={v:?}"));
                }
            }
            request.insert("remote".into(), req.remote.clone().into());
            if !req.via.is_empty() {
                request.insert("via".into(), req.via.clone().into());
            }
            ctx.insert("request".into(), Value::Object(request));
        }
        ctx.insert("HOST_DATA".into(), ipxe_safe(&data.join(" ")).into());
        Value::Object(ctx)
    }
}

/// The values [`Service::context`] gives besides the host's fields.
const SERVICE_NAMES: [&str; 10] = [
    "state",
    "chain",
    "bootid",
    "HOST",
    "LOADER",
    "SERVER_IP",
    "SERVER_PORT",
    "BASE_URL",
    "HOST_DATA",
    "request",
];

/// Whether a template uses only the service's values and the host's own
/// fields (no metadata, no other tools' fields).
fn own_fields_only(t: &Template) -> bool {
    t.names().all(|n| {
        SERVICE_NAMES.contains(&n) || matches!(n, "id" | "hostname" | "macs" | "serial" | "uuid")
    })
}

/// The web server's own refusal (lighttpd's `server.error-handler`) as one
/// line of plain text with the web server's status.
fn web_server_error(req: &Request) -> Response {
    match req.redirect_status.parse::<u16>() {
        Ok(status @ 400..=599) => {
            let reason = match reason_phrase(status) {
                "" => "request refused".to_string(),
                r => r.to_lowercase(),
            };
            Response::error(
                status,
                format!("{reason} ({} {})", req.method, shorten(&req.path)),
            )
        }
        _ => Response::error(404, "no such path \"/kiwispray-error\""),
    }
}

/// A request as a machine reaching `server_ip:server_port` would send it.
fn preview_request(server_ip: &str, server_port: &str) -> Request {
    Request {
        method: "GET".into(),
        host_header: format!("{server_ip}:{server_port}"),
        server_addr: server_ip.trim_matches(|c| c == '[' || c == ']').into(),
        server_port: server_port.into(),
        ..Request::default()
    }
}

/// The host `id` if it is being installed with this bootid.
fn check_installing(
    db: &Database,
    table: &RuntimeTable,
    id: u64,
    bootid: &str,
) -> Result<(Host, HostRuntime), Response> {
    let host = db
        .get(id)
        .ok_or_else(|| Response::error(404, format!("no host with id {id}")))?;
    if bootid.is_empty() {
        return Err(Response::error(400, "missing parameter \"bootid\""));
    }
    let rt = table.get(id);
    if !lifecycle::installing(&host, rt) {
        return Err(Response::error(
            409,
            format!(
                "host {id} is not being installed (state {:?}, no active bootid)",
                host.state
            ),
        ));
    }
    if !lifecycle::bootid_matches(rt.bootid.as_deref().unwrap_or(""), bootid) {
        return Err(Response::error(403, format!("wrong bootid for host {id}")));
    }
    Ok((host, rt.clone()))
}

/// 128 random bits from the OS as 32 lowercase hex digits.
pub fn new_bootid() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The address and port the machine used to reach this server: from the
/// `Host` header when it is a valid host, else the server's own address.
pub fn server_address(req: &Request) -> (String, String) {
    let fallback_port = if req.server_port.is_empty() {
        "80".to_string()
    } else {
        req.server_port.clone()
    };
    let host = req.host_header.trim();
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if plausible {
        if let Ok(u) = url::Url::parse(&format!("http://{host}/")) {
            if let Some(h) = u.host() {
                let ip = match h {
                    url::Host::Ipv6(a) => format!("[{a}]"),
                    other => other.to_string(),
                };
                let port = u.port().map_or(fallback_port, |p| p.to_string());
                return (ip, port);
            }
        }
    }
    let addr = req.server_addr.trim();
    let ip = if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]")
    } else if addr.is_empty() {
        "127.0.0.1".to_string()
    } else {
        addr.to_string()
    };
    (ip, fallback_port)
}

/// An IP address as a web server or proxy writes it: `10.0.1.5`, `::1`,
/// `[fe80::1]`, with or without a port (`10.0.1.5:4711`, `[::1]:80`); an
/// IPv4-mapped IPv6 address becomes the IPv4 address.
pub fn parse_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            s.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })?;
    Some(ip.to_canonical())
}

/// The machine behind an edge server: when `remote` (the peer the web
/// server saw) is one of `trusted`, the last hop of `X-Forwarded-For` that
/// is not itself a trusted proxy, else `X-Real-IP`. `None` when `remote` is
/// not trusted (the headers of anyone else are ignored: a machine could
/// send anything), or the trusted edge named no valid address. A hop that
/// is not an address ends the walk: what lies before it cannot be trusted.
pub fn forwarded_machine(
    remote: &str,
    real_ip: &str,
    forwarded_for: &str,
    trusted: &[IpAddr],
) -> Option<String> {
    let peer = parse_address(remote)?;
    if !trusted.contains(&peer) {
        return None;
    }
    let from_xff = forwarded_for
        .rsplit(',')
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .map(parse_address)
        .take_while(Option::is_some)
        .flatten()
        .find(|ip| !trusted.contains(ip));
    from_xff
        .or_else(|| parse_address(real_ip).filter(|ip| !trusted.contains(ip)))
        .map(|ip| ip.to_string())
}

/// Text that iPXE's `echo` prints as it is (see [`crate::flavour::ipxe::echo_safe`]).
pub fn ipxe_safe(s: &str) -> String {
    crate::flavour::ipxe::echo_safe(s)
}

/// A script in `flavour` that explains why this machine is not booted,
/// waits and reboots.
pub fn refusal(flavour: &dyn Flavour, lines: &[String]) -> Response {
    Response::text(200, flavour.refusal(lines, ERROR_REBOOT_DELAY))
}

/// An iPXE script that explains why this machine is not booted, waits and
/// reboots.
pub fn ipxe_error(lines: &[String]) -> Response {
    refusal(&crate::flavour::ipxe::Ipxe, lines)
}

/// An error status answered to a loader of `flavour`: the same status, with
/// the body that loader can take (harmless script for GRUB).
pub fn in_flavour(flavour: &dyn Flavour, response: Response) -> Response {
    if response.status < 400 {
        return response;
    }
    let text = String::from_utf8_lossy(&response.body);
    let reason = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("kiwispray: ")
        .to_string();
    Response {
        body: flavour.error_body(&reason).into_bytes(),
        ..response
    }
}

fn store_failure(e: &StoreError) -> Response {
    log(&e.to_string());
    Response::error(500, e.to_string())
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One line on stderr, which the service manager or web server keeps.
pub fn log(msg: &str) {
    eprintln!("kiwispray: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_decode_and_reject() {
        let p = Params::parse(b"a=1&serial=SN%201234%235&x=a+b&&flag", "q").unwrap();
        assert_eq!(p.one("serial").unwrap(), Some("SN 1234#5"));
        assert_eq!(p.one("x").unwrap(), Some("a b"));
        assert_eq!(p.one("flag").unwrap(), Some(""));
        assert!(Params::parse(b"a=%ff", "q").unwrap_err().contains("UTF-8"));
        assert!(Params::parse(b"a=%00", "q")
            .unwrap_err()
            .contains("control"));
        assert!(Params::parse(b"a=%4", "q").unwrap_err().contains("percent"));
        assert!(Params::parse(&vec![b'a'; MAX_QUERY + 1], "q").is_err());
        let many: Vec<u8> = (0..=MAX_PARAMS)
            .map(|i| format!("k{i}=1&"))
            .collect::<String>()
            .into_bytes();
        assert!(Params::parse(&many, "q").unwrap_err().contains("more than"));
        let dup = Params::parse(b"id=1&id=2", "q").unwrap();
        assert!(dup.one("id").is_err());
        assert_eq!(dup.all("id").collect::<Vec<_>>(), vec!["1", "2"]);
    }

    #[test]
    fn server_address_from_host_header() {
        let mut r = Request {
            server_addr: "10.1.1.1".into(),
            server_port: "5000".into(),
            ..Request::default()
        };
        r.host_header = "192.168.100.1:8080".into();
        assert_eq!(server_address(&r), ("192.168.100.1".into(), "8080".into()));
        r.host_header = "[fe80::1]:5000".into();
        assert_eq!(server_address(&r), ("[fe80::1]".into(), "5000".into()));
        r.host_header = "pxe.example".into();
        assert_eq!(server_address(&r), ("pxe.example".into(), "5000".into()));
        r.host_header = "evil\"; reboot #".into();
        assert_eq!(server_address(&r), ("10.1.1.1".into(), "5000".into()));
        r.host_header = String::new();
        r.server_addr = "::1".into();
        assert_eq!(server_address(&r), ("[::1]".into(), "5000".into()));
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn addresses_with_ports_brackets_and_mapped_v4() {
        assert_eq!(
            parse_address(" 10.0.1.5 "),
            Some("10.0.1.5".parse().unwrap())
        );
        assert_eq!(
            parse_address("10.0.1.5:4711"),
            Some("10.0.1.5".parse().unwrap())
        );
        assert_eq!(
            parse_address("[fe80::1]:80"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(parse_address("[fe80::1]"), Some("fe80::1".parse().unwrap()));
        assert_eq!(
            parse_address("::ffff:10.0.0.2"),
            Some("10.0.0.2".parse().unwrap())
        );
        for bad in [
            "",
            "unknown",
            "10.0.1",
            "10.0.1.5; reboot",
            "[10.0.1.5]x",
            "::1::2",
        ] {
            assert_eq!(parse_address(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn forwarded_headers_are_believed_from_trusted_edges_only() {
        let edges = ips(&["10.0.0.2", "10.0.0.3"]);
        // an edge: X-Real-IP alone, or its X-Forwarded-For
        assert_eq!(
            forwarded_machine("10.0.0.2", "10.20.0.100", "", &edges),
            Some("10.20.0.100".into())
        );
        assert_eq!(
            forwarded_machine("::ffff:10.0.0.3", "", "10.30.0.7", &edges),
            Some("10.30.0.7".into())
        );
        // the last untrusted hop wins over what the machine forged in front
        // of it, and over X-Real-IP
        assert_eq!(
            forwarded_machine("10.0.0.2", "10.20.0.9", "6.6.6.6, 10.20.0.100", &edges),
            Some("10.20.0.100".into())
        );
        // two trusted edges in a row are skipped
        assert_eq!(
            forwarded_machine("10.0.0.2", "", "10.20.0.100, 10.0.0.3", &edges),
            Some("10.20.0.100".into())
        );
        // a garbage hop ends the walk; X-Real-IP is the fallback
        assert_eq!(
            forwarded_machine("10.0.0.2", "10.20.0.100", "10.20.0.1, junk", &edges),
            Some("10.20.0.100".into())
        );
        assert_eq!(forwarded_machine("10.0.0.2", "junk", "junk", &edges), None);
        assert_eq!(forwarded_machine("10.0.0.2", "", "", &edges), None);
        assert_eq!(
            forwarded_machine("10.0.0.2", "10.0.0.3", "10.0.0.3", &edges),
            None
        );
        // anyone else: the headers are ignored, forged or not
        assert_eq!(
            forwarded_machine("10.20.0.100", "1.2.3.4", "1.2.3.4", &edges),
            None
        );
        assert_eq!(forwarded_machine("", "1.2.3.4", "1.2.3.4", &edges), None);
        assert_eq!(forwarded_machine("10.0.0.2", "1.2.3.4", "", &[]), None);
    }

    #[test]
    fn deep_merge() {
        let mut a = serde_json::json!({"x": {"y": 1, "z": 2}, "k": "v"});
        let b = serde_json::json!({"x": {"y": 3}, "n": [1]});
        merge(a.as_object_mut().unwrap(), b.as_object().unwrap().clone());
        assert_eq!(
            a,
            serde_json::json!({"x": {"y": 3, "z": 2}, "k": "v", "n": [1]})
        );
    }

    #[test]
    fn bootids_are_fresh_hex() {
        let a = new_bootid().unwrap();
        let b = new_bootid().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn error_scripts_neutralise_ipxe_expansion() {
        let r = ipxe_error(&["serial ${evil}\nreboot || shell && x".into()]);
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.starts_with("#!ipxe\n"));
        assert!(
            body.contains("echo   serial $ {evil}?reboot | | shell & & x\n"),
            "{body}"
        );
    }
}
