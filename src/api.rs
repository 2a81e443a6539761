//! The HTTP interface: one function from a request to a response for each
//! dynamic path (`/bootstrap`, `/post-install`, `/finish`, `/state`,
//! `/update`, `/hosts`). The FastCGI and CGI adapters in [`crate::fcgi`]
//! translate the web server's parameters into a [`Request`] and the
//! [`Response`] back; everything in between is here.
//!
//! Bad requests get a 4xx status with a one-line reason and change nothing.
//! A machine that cannot be booted as asked (a conflict, an unsafe state, a
//! broken template) gets an iPXE script that explains why on its console,
//! waits and reboots, so that it neither boots something wrong nor stalls.

use crate::config::Config;
use crate::events::Event;
use crate::hosts::{Database, Host, STATE_DISCOVER};
use crate::identity::Mac;
use crate::lifecycle::{self, Identity, NextBoot, Report};
use crate::render::{Template, Templates};
use crate::store::{Store, StoreError};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// The client's address.
    pub remote: String,
    /// The `Host` header.
    pub host_header: String,
    /// The server address and port the request came in on.
    pub server_addr: String,
    pub server_port: String,
    /// The status of a refused request the web server hands to its error
    /// handler (`REDIRECT_STATUS`), if any.
    pub redirect_status: String,
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
        let mut out = Vec::with_capacity(self.body.len() + 160);
        out.extend_from_slice(
            format!("Status: {} {}\r\n", self.status, reason_phrase(self.status)).as_bytes(),
        );
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nCache-Control: no-store\r\n\r\n",
                self.body.len()
            )
            .as_bytes(),
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

/// Query or form parameters, decoded and checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub Vec<(String, String)>);

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
        let mut pairs = Vec::new();
        for part in raw.split(|b| *b == b'&') {
            if part.is_empty() {
                continue;
            }
            if pairs.len() == MAX_PARAMS {
                return Err(format!("{what} has more than {MAX_PARAMS} parameters"));
            }
            let (k, v) = match part.iter().position(|b| *b == b'=') {
                Some(i) => (&part[..i], &part[i + 1..]),
                None => (part, &b""[..]),
            };
            let key = decode(k).map_err(|e| format!("bad parameter name in {what}: {e}"))?;
            let value = decode(v).map_err(|e| format!("bad value for {key:?}: {e}"))?;
            pairs.push((key, value));
        }
        Ok(Params(pairs))
    }

    /// The value of a parameter that may be given once.
    pub fn one(&self, key: &str) -> Result<Option<&str>, String> {
        let mut found = None;
        for (k, v) in &self.0 {
            if k == key {
                if found.is_some() {
                    return Err(format!("parameter {key:?} is given more than once"));
                }
                found = Some(v.as_str());
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
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn decode(raw: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("bad percent-encoding")?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    let s = String::from_utf8(out).map_err(|_| "not valid UTF-8".to_string())?;
    if s.chars().any(|c| c.is_control() && c != '\t') {
        return Err("contains control characters".into());
    }
    Ok(s)
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
}

/// What a writing `/bootstrap` did.
enum BootOutcome {
    Conflict(Vec<(crate::hosts::Key, Vec<u64>)>),
    NoMac,
    Host { host: Host, registered: bool },
}

impl Service {
    pub fn new(config: Config) -> Service {
        Service {
            store: config.store(),
            config,
            templates: Templates::default(),
        }
    }

    /// Answers one request. Never panics on bad input; a panic from a bug
    /// is caught by the adapter and answered with a 500.
    pub fn handle(&self, req: &Request) -> Response {
        let name = req.path.rsplit('/').next().unwrap_or("");
        let method = req.method.as_str();
        if name == "kiwispray-error" {
            return web_server_error(req);
        }
        let allowed = match name {
            "update" => method == "POST",
            // These change state, so only GET; HEAD must have no effects.
            "bootstrap" | "post-install" | "finish" => method == "GET",
            "state" | "hosts" => method == "GET" || method == "HEAD",
            _ => return Response::error(404, format!("no such path {:?}", shorten(&req.path))),
        };
        if !allowed {
            return Response::error(405, format!("{method} is not allowed on /{name}"));
        }
        let params = match Params::parse(req.query.as_bytes(), "query string") {
            Ok(p) => p,
            Err(e) if req.query.len() > MAX_QUERY => return Response::error(414, e),
            Err(e) => return Response::error(400, e),
        };
        let result = match name {
            "bootstrap" => self.bootstrap(req, &params),
            "post-install" => self.post_install(req, &params),
            "finish" => self.finish(req, &params),
            "state" => self.state(&params),
            "update" => self.update(req, &params),
            _ => self.hosts(),
        };
        result.unwrap_or_else(|e| e)
    }

    fn snapshot(&self) -> Result<Arc<Database>, Response> {
        self.store.snapshot().map_err(|e| store_failure(&e))
    }

    fn bootstrap(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let mut report = Report::default();
        let mut keys: Vec<String> = (0..8).map(|i| format!("net{i}")).collect();
        keys.push("dhcp_mac".into());
        // A NIC with an unusable address (all zeros on some unconfigured
        // ports) must not keep the machine from booting by its other NICs;
        // it only matters when no MAC at all is usable.
        let mut unusable = Vec::new();
        for key in &keys {
            let value = params.one(key).map_err(|e| Response::error(400, e))?;
            match value.map(str::trim) {
                None | Some("") => {}
                Some(v) => match Mac::parse(v) {
                    Ok(m) if !report.macs.contains(&m) => report.macs.push(m),
                    Ok(_) => {}
                    Err(e) => unusable.push(format!("{key}: {e}")),
                },
            }
        }
        if report.macs.is_empty() && !unusable.is_empty() {
            return Err(Response::error(
                400,
                format!(
                    "no valid MAC address; nothing registered ({})",
                    unusable.join("; ")
                ),
            ));
        }
        let text = |k: &str| -> Result<String, Response> {
            let v = params.one(k).map_err(|e| Response::error(400, e))?;
            let v = v.unwrap_or("");
            if v.chars().count() > 256 {
                return Err(Response::error(
                    400,
                    format!("{k} is longer than 256 characters"),
                ));
            }
            Ok(v.to_string())
        };
        report.serial = text("serial")?;
        report.uuid = text("uuid")?;
        let facts = Facts {
            platform: text("platform")?,
            buildarch: text("buildarch")?,
            manufacturer: text("manufacturer")?,
            product: text("product")?,
            dhcp_mac: text("dhcp_mac")?,
        };
        let db = self.snapshot()?;
        // The read-only path: a known machine that waits or is finished
        // and reports nothing new is answered without any write.
        match lifecycle::identify(&db, &report) {
            Identity::Conflict(matched) => return Ok(self.conflict(req, &matched)),
            Identity::Known(id) => {
                let host = db.get(id).expect("indexed host exists");
                if lifecycle::unrecorded_macs(&host, &report).is_empty() {
                    match lifecycle::next_boot(&host.state) {
                        NextBoot::Wait | NextBoot::LocalDisk | NextBoot::Refuse(_) => {
                            return Ok(self.boot_script(req, &host, &facts));
                        }
                        NextBoot::Install(_) => {}
                    }
                }
            }
            Identity::Unknown if report.macs.is_empty() => return Err(Response::error(
                400,
                "no valid MAC address in the request (net0..net7, dhcp_mac); nothing registered",
            )),
            Identity::Unknown => {}
        }
        let bootid = new_bootid().map_err(|e| {
            log(&format!("cannot read the random source: {e}"));
            Response::error(500, format!("cannot create a bootid: {e}"))
        })?;
        let discover = self.config.discover;
        let remote = req.remote.clone();
        let outcome = self
            .store
            .modify(move |txn| boot_change(txn, report, discover, bootid, &remote))
            .map_err(|e| store_failure(&e))?;
        Ok(match outcome {
            BootOutcome::Conflict(matched) => self.conflict(req, &matched),
            BootOutcome::NoMac => Response::error(400, "no valid MAC address in the request"),
            BootOutcome::Host { host, registered } => {
                if registered {
                    log(&format!(
                        "registered host {} (MACs {}, serial {:?}) from {} as {}",
                        host.id, host.macs, host.serial, req.remote, host.state
                    ));
                }
                self.boot_script(req, &host, &facts)
            }
        })
    }

    fn conflict(&self, req: &Request, matched: &[(crate::hosts::Key, Vec<u64>)]) -> Response {
        let lines = lifecycle::describe_conflict(matched);
        log(&format!(
            "conflict: machine at {} matches several hosts: {}; nothing changed",
            req.remote,
            lines.join("; ")
        ));
        let mut msg =
            vec!["this machine matches more than one host; nothing was changed:".to_string()];
        msg.extend(lines);
        msg.push("fix the hosts with kiwispray-hosts (show, set, remove)".into());
        ipxe_error(&msg)
    }

    /// The script for a host's next boot, by its state.
    fn boot_script(&self, req: &Request, host: &Host, facts: &Facts) -> Response {
        let tdir = self.config.templates_dir();
        let state = host.current_state();
        let candidates = match lifecycle::next_boot(&host.state) {
            NextBoot::Wait => vec![tdir.join("new.tmpl")],
            NextBoot::LocalDisk => vec![tdir.join("finished.tmpl")],
            NextBoot::Refuse(reason) => {
                log(&format!("host {}: {reason}", host.id));
                return ipxe_error(&[format!("host {}: {reason}", host.id)]);
            }
            NextBoot::Install(s) if s == STATE_DISCOVER && host.bootid.is_none() => {
                vec![tdir.join("new.tmpl")]
            }
            NextBoot::Install(s) => vec![
                self.config.images_dir().join(&s).join("host.tmpl"),
                tdir.join(format!("{s}.tmpl")),
                tdir.join("known_host.tmpl"),
            ],
        };
        let ctx = self.context(req, host, Some(facts));
        match self.render_first(&candidates, &ctx) {
            Ok(Some(text)) => Response::text(200, text),
            Ok(None) => {
                let msg = format!(
                    "host {}: no template for state {state:?} (looked for {})",
                    host.id,
                    list_paths(&candidates)
                );
                log(&msg);
                ipxe_error(&[msg])
            }
            Err(msg) => {
                log(&format!("host {}: {msg}", host.id));
                ipxe_error(&[format!("host {}: {msg}", host.id)])
            }
        }
    }

    /// Renders the first template of `candidates` that exists.
    fn render_first(&self, candidates: &[PathBuf], ctx: &Value) -> Result<Option<String>, String> {
        for path in candidates {
            let template: Arc<Template> = match self.templates.load(path) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => return Err(e.to_string()),
            };
            return template
                .render(ctx)
                .map(Some)
                .map_err(|e| format!("template {}: {e}", path.display()));
        }
        Ok(None)
    }

    /// The values templates can use.
    fn context(&self, req: &Request, host: &Host, facts: Option<&Facts>) -> Value {
        let (ip, port) = server_address(req);
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
        ctx.insert("SERVER_IP".into(), ip.clone().into());
        ctx.insert("SERVER_PORT".into(), port.clone().into());
        ctx.insert("BASE_URL".into(), format!("http://{ip}:{port}").into());
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
            ctx.insert("request".into(), Value::Object(request));
        }
        ctx.insert("HOST_DATA".into(), ipxe_safe(&data.join(" ")).into());
        Value::Object(ctx)
    }

    /// The host that `id` and `bootid` name, if it is being installed.
    fn installing_host(db: &Database, params: &Params) -> Result<Host, Response> {
        let (id, bootid) = id_and_bootid(params)?;
        check_installing(db, id, &bootid)
    }

    fn post_install(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let db = self.snapshot()?;
        let host = Self::installing_host(&db, params)?;
        self.post_install_script(req, &host).inspect_err(|r| {
            if r.status == 500 {
                log(&format!(
                    "host {}: {}",
                    host.id,
                    String::from_utf8_lossy(&r.body).trim_end()
                ));
            }
        })
    }

    /// The post-install script of a host, by its current state.
    fn post_install_script(&self, req: &Request, host: &Host) -> Result<Response, Response> {
        let candidates = vec![
            self.config
                .images_dir()
                .join(host.current_state())
                .join("post_install.tmpl"),
            self.config.templates_dir().join("post_install.tmpl"),
        ];
        let ctx = self.context(req, host, None);
        match self.render_first(&candidates, &ctx) {
            Ok(Some(text)) => Ok(Response::text(200, text)),
            Ok(None) => Err(Response::error(
                404,
                format!("no post-install template ({})", list_paths(&candidates)),
            )),
            Err(msg) => Err(Response::error(500, msg)),
        }
    }

    /// What `/bootstrap` would serve `host` now, had it come in on
    /// `server_ip:server_port`, without changing anything (the bootid it
    /// shows is the current one, not a fresh one).
    pub fn preview_boot(&self, host: &Host, server_ip: &str, server_port: &str) -> Response {
        let req = preview_request(server_ip, server_port);
        self.boot_script(&req, host, &Facts::default())
    }

    /// What `/post-install` serves `host` while it is being installed.
    pub fn preview_post_install(
        &self,
        host: &Host,
        server_ip: &str,
        server_port: &str,
    ) -> Result<Response, Response> {
        let req = preview_request(server_ip, server_port);
        self.post_install_script(&req, host)
    }

    fn finish(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let (id, bootid) = id_and_bootid(params)?;
        // Check on the cached copy first, so that bad requests never queue
        // behind writers; the check is repeated under the lock.
        check_installing(&*self.snapshot()?, id, &bootid)?;
        let remote = req.remote.clone();
        let result = self
            .store
            .modify(move |txn| -> Result<(String, String), Response> {
                check_installing(&txn.db, id, &bootid)?;
                let (from, to) = txn
                    .db
                    .update(id, |h| {
                        let from = h.state.clone();
                        h.state = lifecycle::advance(&h.state);
                        h.bootid = None;
                        (from, h.state.clone())
                    })
                    .expect("checked");
                txn.record(Event::now(id, &from, &to, "finish", &remote));
                Ok((from, to))
            })
            .map_err(|e| store_failure(&e))?;
        let (from, to) = result?;
        log(&format!(
            "host {id}: finished {from:?}, now {to:?} (from {})",
            req.remote
        ));
        Ok(Response::text(200, to))
    }

    fn state(&self, params: &Params) -> Result<Response, Response> {
        let id = parse_id(params).map_err(|e| Response::error(400, e))?;
        let db = self.snapshot()?;
        let host = db
            .get(id)
            .ok_or_else(|| Response::error(404, format!("no host with id {id}")))?;
        Ok(Response::text(200, host.state.clone()))
    }

    fn update(&self, req: &Request, params: &Params) -> Result<Response, Response> {
        let media = req.content_type.split(';').next().unwrap_or("").trim();
        if !media.is_empty() && !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(Response::error(
                415,
                format!("expected a form (application/x-www-form-urlencoded), got {media:?}"),
            ));
        }
        if req.body.len() > MAX_BODY {
            return Err(Response::error(
                413,
                format!("body larger than {MAX_BODY} bytes"),
            ));
        }
        let form = Params::parse(&req.body, "form").map_err(|e| Response::error(400, e))?;
        let mut macs = Vec::new();
        let mut metadata = Map::new();
        for (k, v) in &form.0 {
            match k.as_str() {
                "mac" => {
                    let m = Mac::parse(v).map_err(|e| Response::error(400, format!("mac: {e}")))?;
                    if !macs.contains(&m) {
                        macs.push(m);
                    }
                }
                "metadata" => match serde_json::from_str::<Value>(v) {
                    Ok(Value::Object(m)) => merge(&mut metadata, m),
                    Ok(_) => return Err(Response::error(400, "metadata must be a JSON object")),
                    Err(e) => {
                        return Err(Response::error(
                            400,
                            format!("metadata is not valid JSON: {e}"),
                        ))
                    }
                },
                other => {
                    return Err(Response::error(
                        400,
                        format!(
                            "unknown form field {:?} (expected mac, metadata)",
                            shorten(other)
                        ),
                    ))
                }
            }
        }
        let (id, bootid) = id_and_bootid(params)?;
        let check = move |db: &Database, macs: &[Mac]| -> Result<(), Response> {
            let host = check_installing(db, id, &bootid)?;
            if host.current_state() != STATE_DISCOVER {
                return Err(Response::error(
                    409,
                    format!(
                        "host {id} is in state {:?}; /update is accepted only in state discover",
                        host.state
                    ),
                ));
            }
            for m in macs {
                if let Some(other) = db
                    .lookup(&crate::hosts::Key::Mac(*m))
                    .iter()
                    .find(|o| **o != id)
                {
                    return Err(Response::error(
                        409,
                        format!("MAC {m} belongs to host {other}"),
                    ));
                }
            }
            Ok(())
        };
        // Checked on the cached copy first, so that bad requests never
        // queue behind writers; the check is repeated under the lock.
        check(&*self.snapshot()?, &macs)?;
        let remote = req.remote.clone();
        let result = self
            .store
            .modify(move |txn| -> Result<String, Response> {
                check(&txn.db, &macs)?;
                let state = txn
                    .db
                    .update(id, |h| {
                        let mut list = h.mac_list();
                        for m in macs {
                            if !list.contains(&m) {
                                list.push(m);
                            }
                        }
                        h.macs = crate::identity::format_mac_list(&list);
                        merge(&mut h.metadata, metadata);
                        h.state.clone()
                    })
                    .expect("checked");
                txn.record(Event::now(id, &state, &state, "update", &remote));
                Ok(state)
            })
            .map_err(|e| store_failure(&e))?;
        result?;
        Ok(Response::text(200, "updated"))
    }

    fn hosts(&self) -> Result<Response, Response> {
        let db = self.snapshot()?;
        Ok(Response::text(200, host_table(&db)))
    }
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

/// The `/hosts` table: id, hostname, state, serial.
pub fn host_table(db: &Database) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "HOSTNAME".to_string(),
        "STATE".to_string(),
        "SERIAL".to_string(),
    ]];
    for h in db.hosts() {
        rows.push([
            h.id.to_string(),
            h.hostname.clone(),
            h.state.clone(),
            h.serial.clone(),
        ]);
    }
    format_table(&rows)
}

/// Aligns columns with two spaces between them.
pub fn format_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The host `id` if it is being installed with this bootid.
fn check_installing(db: &Database, id: u64, bootid: &str) -> Result<Host, Response> {
    let host = db
        .get(id)
        .ok_or_else(|| Response::error(404, format!("no host with id {id}")))?;
    if bootid.is_empty() {
        return Err(Response::error(400, "missing parameter \"bootid\""));
    }
    if !lifecycle::installing(&host) {
        return Err(Response::error(
            409,
            format!(
                "host {id} is not being installed (state {:?}, no active bootid)",
                host.state
            ),
        ));
    }
    if !lifecycle::bootid_matches(host.bootid.as_deref().unwrap_or(""), bootid) {
        return Err(Response::error(403, format!("wrong bootid for host {id}")));
    }
    Ok(host)
}

/// The change a `/bootstrap` makes, decided again under the lock.
fn boot_change(
    txn: &mut crate::store::Txn,
    report: Report,
    discover: bool,
    bootid: String,
    remote: &str,
) -> BootOutcome {
    match lifecycle::identify(&txn.db, &report) {
        Identity::Conflict(m) => BootOutcome::Conflict(m),
        Identity::Unknown if report.macs.is_empty() => BootOutcome::NoMac,
        Identity::Unknown => {
            let id = txn.db.next_id();
            let state = lifecycle::initial_state(discover);
            let uuid = crate::identity::canonical_uuid(&report.uuid).unwrap_or(report.uuid);
            let host = Host::new(id, &report.macs, &report.serial, &uuid, &state);
            txn.db.insert(host.clone()).expect("fresh id");
            txn.record(Event::now(id, "", &state, "register", remote));
            BootOutcome::Host {
                host,
                registered: true,
            }
        }
        Identity::Known(id) => {
            let mut host = txn.db.get(id).expect("identified host exists");
            let added = lifecycle::unrecorded_macs(&host, &report);
            if !added.is_empty() {
                host = txn
                    .db
                    .update(id, |h| {
                        let mut macs = h.mac_list();
                        macs.extend(added);
                        h.macs = crate::identity::format_mac_list(&macs);
                        h.clone()
                    })
                    .expect("identified host exists");
            }
            let started = matches!(lifecycle::next_boot(&host.state), NextBoot::Install(_));
            if started {
                // The frequent write during mass installs: a bootid-only
                // change is appended to the store's journal, not a rewrite
                // of the whole file.
                txn.db.set_bootid(id, Some(bootid.clone()));
                host.bootid = Some(bootid);
                txn.record(Event::now(
                    id,
                    &host.state,
                    &host.state,
                    "install-boot",
                    remote,
                ));
            }
            BootOutcome::Host {
                host,
                registered: false,
            }
        }
    }
}

/// Deep-merges `from` into `into`: objects merge, other values replace.
pub fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
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

/// Text that iPXE's `echo` prints as it is: no setting expansion, no
/// `&&`/`||` that would chain a command, no control characters.
pub fn ipxe_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect::<String>()
        .replace("${", "$ {")
        .replace("&&", "& &")
        .replace("||", "| |")
}

/// An iPXE script that explains why this machine is not booted, waits and
/// reboots.
pub fn ipxe_error(lines: &[String]) -> Response {
    let mut s = String::from("#!ipxe\necho\necho KIWIspray cannot boot this machine as asked:\n");
    for l in lines {
        s.push_str(&format!("echo   {}\n", ipxe_safe(l)));
    }
    s.push_str(&format!(
        "echo Rebooting in {ERROR_REBOOT_DELAY} seconds.\nsleep {ERROR_REBOOT_DELAY}\nreboot\n"
    ));
    Response::text(200, s)
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
