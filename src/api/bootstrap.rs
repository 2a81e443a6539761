//! `GET /bootstrap`: a booting machine reports its MACs, serial, UUID and
//! platform, and gets the iPXE script of its next boot: wait (`new`), boot
//! the local disk (`finished`), install an image, or, for a held host, an
//! explanation and a reboot.
//!
//! The read-only path comes first: a known machine that waits, is finished
//! or is held, and reports nothing new, is answered from the cached
//! snapshot without a lock or a write. Its "last seen" time is queued for
//! the writer at most once a minute and nobody waits for it. Everything else
//! (a registration, new MACs, an install boot) is decided again under the
//! store's lock by [`boot_change`], where the install-safety rules of
//! [`lifecycle::install_decision`] run before any new attempt starts.

use super::{
    in_flavour, ipxe_safe, list_paths, log, new_bootid, refusal, store_failure, Facts, Params,
    Request, Response, Service,
};
use crate::config::Config;
use crate::events::{rfc3339_secs, Event};
use crate::flavour::{self, Flavour};
use crate::hosts::{Host, Key, STATE_DISCOVER};
use crate::identity::Mac;
use crate::lifecycle::{self, Identity, InstallDecision, NextBoot, Report};
use crate::render::Template;
use crate::runtime::{self, human_duration, HostRuntime, Seen};
use crate::store::Txn;
use serde_json::Value;

/// Seconds within which a host's "last seen" time is not written again
/// (unless its platform changed).
pub const SEEN_RESOLUTION: u64 = 60;
/// Seconds a machine beyond `max_installs` waits before it asks again.
pub const DEFER_RETRY: u64 = 60;

/// What a writing `/bootstrap` did.
enum BootOutcome {
    Conflict(Vec<(Key, Vec<u64>)>),
    NoMac,
    Host {
        host: Host,
        rt: Box<HostRuntime>,
        registered: bool,
    },
    /// An install boot beyond `max_installs`: nothing started.
    Deferred {
        host: Host,
        installing: usize,
    },
}

impl Service {
    /// `/bootstrap` in the flavour the request names with `loader=`; its
    /// error statuses too are in that flavour.
    pub(super) fn bootstrap_any(
        &self,
        req: &Request,
        params: &Params,
    ) -> Result<Response, Response> {
        let loader = params.one("loader").map_err(|e| {
            // `loader` given twice: answered in the first one's language.
            let response = Response::error(400, e);
            match flavour::from_raw_query(&req.query) {
                Some(f) => in_flavour(f, response),
                None => response,
            }
        })?;
        let flavour = flavour::by_loader(loader).map_err(|e| Response::error(400, e))?;
        self.bootstrap(req, params, flavour)
            .map_err(|e| in_flavour(flavour, e))
    }

    fn bootstrap(
        &self,
        req: &Request,
        params: &Params,
        flavour: &dyn Flavour,
    ) -> Result<Response, Response> {
        let (report, facts) = parse_report(params)?;
        let snap = self.snapshot()?;
        let now = runtime::now();
        let seen = Seen {
            at: now,
            platform: facts.platform.clone(),
            remote: req.remote.clone(),
        };
        // The read-only path: a known machine that waits, is finished or is
        // held, and reports nothing new, is answered without any write.
        match lifecycle::identify(&snap, &report) {
            Identity::Conflict(matched) => {
                crate::metrics::count_boot("conflict");
                return Ok(self.conflict(req, &matched, flavour));
            }
            Identity::Known(id) => {
                // Its metadata is read only if the answer's template uses it.
                let host = snap.get_core(id).expect("indexed host exists");
                let rt = snap.runtime(id);
                if lifecycle::unrecorded_macs(&host, &report).is_empty() {
                    let read_only = match lifecycle::next_boot(&host.state) {
                        NextBoot::Wait | NextBoot::LocalDisk | NextBoot::Refuse(_) => true,
                        NextBoot::Install(_) => rt.hold.is_some(),
                    };
                    if read_only {
                        self.note_seen(id, rt, seen);
                        crate::metrics::count_boot(super::metrics::boot_outcome(&host, rt, false));
                        let full = || snap.get(id).expect("indexed host exists");
                        return Ok(self.boot_script_of(
                            req,
                            &host,
                            Some(&full),
                            rt,
                            &facts,
                            flavour,
                        ));
                    }
                }
            }
            Identity::Unknown if report.macs.is_empty() => return Err(Response::error(
                400,
                "no valid MAC address in the request (net0..net7, dhcp_mac); nothing registered",
            )),
            Identity::Unknown => {}
        }
        drop(snap);
        let bootid = new_bootid().map_err(|e| {
            log(&format!("cannot read the random source: {e}"));
            Response::error(500, format!("cannot create a bootid: {e}"))
        })?;
        let config = self.config.clone();
        let via = req.via.clone();
        let outcome = self
            .store
            .modify(move |txn| boot_change(txn, &config, report, bootid, seen, &via))
            .map_err(|e| store_failure(&e))?;
        Ok(match outcome {
            BootOutcome::Conflict(matched) => {
                crate::metrics::count_boot("conflict");
                self.conflict(req, &matched, flavour)
            }
            BootOutcome::NoMac => Response::error(400, "no valid MAC address in the request"),
            BootOutcome::Deferred { host, installing } => {
                crate::metrics::count_boot("deferred");
                self.deferred(req, &host, installing, flavour)
            }
            BootOutcome::Host {
                host,
                rt,
                registered,
            } => {
                if registered {
                    log(&format!(
                        "registered host {} (MACs {}, serial {:?}) from {} as {}",
                        host.id,
                        host.macs,
                        host.serial,
                        req.origin(),
                        host.state
                    ));
                }
                crate::metrics::count_boot(super::metrics::boot_outcome(&host, &rt, registered));
                self.boot_script(req, &host, &rt, &facts, flavour)
            }
        })
    }

    /// Queues the "last seen" time of a host answered without a write, at
    /// most once per [`SEEN_RESOLUTION`] (or when its platform changed),
    /// without waiting for it.
    fn note_seen(&self, id: u64, rt: &HostRuntime, seen: Seen) {
        let fresh = rt.seen.as_ref().is_some_and(|s| {
            seen.at.saturating_sub(s.at) < SEEN_RESOLUTION && s.platform == seen.platform
        });
        if fresh {
            return;
        }
        {
            let mut queued = super::lock(&self.seen_queued);
            match queued.get(&id) {
                Some(at) if seen.at.saturating_sub(*at) < SEEN_RESOLUTION => return,
                _ => {
                    queued.insert(id, seen.at);
                }
            }
        }
        self.store.modify_later(move |txn| {
            if txn.db.contains(id) {
                txn.update_runtime(id, |rt| rt.seen = Some(seen));
            }
        });
    }

    /// The answer to an install boot beyond `max_installs`: says so on the
    /// console and asks again in a minute (`templates/deferred.<ext>`).
    fn deferred(
        &self,
        req: &Request,
        host: &Host,
        installing: usize,
        flavour: &dyn Flavour,
    ) -> Response {
        let max = self.config.max_installs.unwrap_or(installing);
        let context = |t: &Template| {
            let mut ctx = self.context(
                req,
                host,
                &HostRuntime::default(),
                None,
                Some(flavour),
                Some(t),
            );
            if let Value::Object(m) = &mut ctx {
                m.insert("installing".into(), installing.into());
                m.insert("max_installs".into(), max.into());
                m.insert("retry_seconds".into(), DEFER_RETRY.into());
            }
            ctx
        };
        let path = self
            .config
            .templates_dir()
            .join(format!("deferred.{}", flavour.extension()));
        match self.render_first(&[path], context) {
            Ok(Some(text)) => Response::text(200, text),
            Ok(None) | Err(_) => Response::text(
                200,
                flavour.retry_later(
                    &[format!(
                        "KIWIspray: {installing} of at most {max} machines are installing; host {} waits its turn.",
                        host.id
                    )],
                    DEFER_RETRY,
                ),
            ),
        }
    }

    fn conflict(
        &self,
        req: &Request,
        matched: &[(Key, Vec<u64>)],
        flavour: &dyn Flavour,
    ) -> Response {
        let lines = lifecycle::describe_conflict(matched);
        log(&format!(
            "conflict: machine at {} matches several hosts: {}; nothing changed",
            req.origin(),
            lines.join("; ")
        ));
        let mut msg =
            vec!["this machine matches more than one host; nothing was changed:".to_string()];
        msg.extend(lines);
        msg.push("fix the hosts with kiwispray-hosts (show, set, remove)".into());
        refusal(flavour, &msg)
    }

    /// The script for a host's next boot, by its state and hold, in the
    /// language of the loader that asked.
    pub(super) fn boot_script(
        &self,
        req: &Request,
        host: &Host,
        rt: &HostRuntime,
        facts: &Facts,
        flavour: &dyn Flavour,
    ) -> Response {
        self.boot_script_of(req, host, None, rt, facts, flavour)
    }

    /// [`Self::boot_script`] of a host that may have been read without its
    /// metadata ([`crate::hosts::Database::get_core`]): `full` reads it
    /// whole when the template uses more than the host's own fields.
    fn boot_script_of(
        &self,
        req: &Request,
        host: &Host,
        full: Option<&dyn Fn() -> Host>,
        rt: &HostRuntime,
        facts: &Facts,
        flavour: &dyn Flavour,
    ) -> Response {
        let tdir = self.config.templates_dir();
        let ext = flavour.extension();
        let state = host.current_state();
        let mut held = false;
        let refuse = |lines: &[String]| refusal(flavour, lines);
        let candidates = match lifecycle::next_boot(&host.state) {
            NextBoot::Wait => vec![tdir.join(format!("new.{ext}"))],
            NextBoot::LocalDisk => vec![tdir.join(format!("finished.{ext}"))],
            NextBoot::Refuse(reason) => {
                log(&format!("host {}: {reason}", host.id));
                return refuse(&[format!("host {}: {reason}", host.id)]);
            }
            NextBoot::Install(_) if rt.hold.is_some() => {
                held = true;
                vec![tdir.join(format!("held.{ext}"))]
            }
            NextBoot::Install(s) if s == STATE_DISCOVER && rt.bootid.is_none() => {
                vec![tdir.join(format!("new.{ext}"))]
            }
            NextBoot::Install(s) => match self.config.install_templates(&s, ext) {
                Ok(c) => c,
                Err(e) => {
                    log(&format!("host {}: {e}", host.id));
                    return refuse(&[format!("host {}: {e}", host.id)]);
                }
            },
        };
        let context = |t: &Template| {
            let whole;
            let host = match full {
                Some(read) if !super::own_fields_only(t) => {
                    whole = read();
                    &whole
                }
                _ => host,
            };
            let mut ctx = self.context(req, host, rt, Some(facts), Some(flavour), Some(t));
            if held {
                hold_context(&mut ctx, host, rt);
            }
            ctx
        };
        match self.render_first(&candidates, context) {
            Ok(Some(text)) => Response::text(200, text),
            Ok(None) if rt.hold.is_some() => held_fallback(host, rt, flavour),
            Ok(None) => {
                let msg = format!(
                    "host {}: no template for state {state:?} (looked for {})",
                    host.id,
                    list_paths(&candidates)
                );
                log(&msg);
                refuse(&[msg])
            }
            Err(msg) => {
                log(&format!("host {}: {msg}", host.id));
                refuse(&[format!("host {}: {msg}", host.id)])
            }
        }
    }
}

/// The report and hardware facts of a `/bootstrap` query.
fn parse_report(params: &Params) -> Result<(Report, Facts), Response> {
    /// The fields of a report; the first nine carry MACs.
    const FIELDS: [&str; 15] = [
        "net0",
        "net1",
        "net2",
        "net3",
        "net4",
        "net5",
        "net6",
        "net7",
        "dhcp_mac",
        "serial",
        "uuid",
        "platform",
        "buildarch",
        "manufacturer",
        "product",
    ];
    // One pass over the parameters.
    let mut values: [Option<&str>; FIELDS.len()] = [None; FIELDS.len()];
    for (k, v) in params.iter() {
        if let Some(i) = FIELDS.iter().position(|f| *f == k) {
            if values[i].replace(v).is_some() {
                return Err(Response::error(
                    400,
                    format!("parameter {k:?} is given more than once"),
                ));
            }
        }
    }
    let mut report = Report::default();
    // A NIC with an unusable address (all zeros on some unconfigured
    // ports) must not keep the machine from booting by its other NICs; it
    // only matters when no MAC at all is usable.
    let mut unusable = Vec::new();
    for (key, value) in FIELDS.iter().zip(values).take(9) {
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
        let i = FIELDS.iter().position(|f| *f == k).expect("a report field");
        let v = values[i].unwrap_or("");
        if v.len() > 256 && v.chars().count() > 256 {
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
    Ok((report, facts))
}

/// The values `held.tmpl` uses besides the host's own.
fn hold_context(ctx: &mut Value, host: &Host, rt: &HostRuntime) {
    let Some(hold) = &rt.hold else { return };
    if let Value::Object(m) = ctx {
        let now = runtime::now();
        m.insert("hold_cause".into(), hold.cause.as_str().into());
        m.insert("hold_since".into(), rfc3339_secs(hold.since).into());
        m.insert(
            "hold_for".into(),
            human_duration(now.saturating_sub(hold.since)).into(),
        );
        m.insert("hold_reason".into(), ipxe_safe(&hold.reason).into());
        m.insert(
            "release_command".into(),
            format!("kiwispray-hosts release {}", host.id).into(),
        );
    }
}

/// The hold explained without `held.<ext>` (a deployment root from before
/// it existed).
fn held_fallback(host: &Host, rt: &HostRuntime, flavour: &dyn Flavour) -> Response {
    let Some(hold) = &rt.hold else {
        return refusal(flavour, &[format!("host {} is held", host.id)]);
    };
    refusal(
        flavour,
        &[
            format!(
                "host {} is held ({}) since {}: {}",
                host.id,
                hold.cause.as_str(),
                rfc3339_secs(hold.since),
                hold.reason
            ),
            format!(
                "it installs nothing until: kiwispray-hosts release {}",
                host.id
            ),
        ],
    )
}

/// The change a `/bootstrap` makes, decided again under the lock.
fn boot_change(
    txn: &mut Txn,
    config: &Config,
    report: Report,
    bootid: String,
    seen: Seen,
    via: &str,
) -> BootOutcome {
    let remote = seen.remote.clone();
    let now = seen.at;
    match lifecycle::identify(&txn.db, &report) {
        Identity::Conflict(m) => BootOutcome::Conflict(m),
        Identity::Unknown if report.macs.is_empty() => BootOutcome::NoMac,
        Identity::Unknown => {
            let id = txn.next_id();
            let state = lifecycle::initial_state(config.discover);
            let uuid = crate::identity::canonical_uuid(&report.uuid).unwrap_or(report.uuid);
            let host = Host::new(id, &report.macs, &report.serial, &uuid, &state);
            txn.db.insert(host.clone()).expect("fresh id");
            txn.record(Event::now(id, "", &state, "register", &remote).via(via));
            let rt = txn.update_runtime(id, |rt| {
                rt.seen = Some(seen);
                rt.clone()
            });
            BootOutcome::Host {
                host,
                rt: Box::new(rt),
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
            let state = match lifecycle::next_boot(&host.state) {
                NextBoot::Install(s) if txn.runtime(id).hold.is_none() => Some(s),
                _ => None,
            };
            let Some(state) = state else {
                let rt = txn.update_runtime(id, |rt| {
                    rt.seen = Some(seen);
                    rt.clone()
                });
                return BootOutcome::Host {
                    host,
                    rt: Box::new(rt),
                    registered: false,
                };
            };
            let mut decision = lifecycle::install_decision(
                txn.runtime(id),
                &state,
                now,
                config.max_install_boots,
                config.hold_overdue,
            );
            if decision == InstallDecision::Start {
                let installing = txn.runtime_table().installing();
                if let Some(d) =
                    lifecycle::capacity_decision(txn.runtime(id), installing, config.max_installs)
                {
                    decision = d;
                }
            }
            let rt = match decision {
                InstallDecision::Defer(installing) => {
                    txn.update_runtime(id, |rt| rt.seen = Some(seen));
                    return BootOutcome::Deferred { host, installing };
                }
                InstallDecision::Start => {
                    let digest = config
                        .image_dir(&state)
                        .ok()
                        .and_then(|d| crate::images::image_digest(&d));
                    let deadline = config
                        .deadline_minutes(&state)
                        .unwrap_or(config.install_deadline_minutes);
                    let (rt, abandoned) = txn.update_runtime(id, |rt| {
                        let abandoned = rt.open_attempt().map(|a| a.n);
                        rt.start_attempt(now, &state, digest, deadline, bootid);
                        rt.seen = Some(seen);
                        (rt.clone(), abandoned)
                    });
                    let a = rt.attempts.last().expect("just started");
                    let mut detail = format!(
                        "attempt {} of {}, deadline {} min",
                        a.n, a.state, a.deadline_minutes
                    );
                    if let Some(d) = &a.digest {
                        detail.push_str(&format!(", image {d}"));
                    }
                    if let Some(n) = abandoned {
                        detail.push_str(&format!("; attempt {n} ended without /finish"));
                    }
                    txn.record(
                        Event::now(id, &host.state, &host.state, "install-boot", &remote)
                            .via(via)
                            .with_detail(detail),
                    );
                    rt
                }
                InstallDecision::Hold(cause, reason) => {
                    log(&format!(
                        "host {id}: held ({}): {reason}; no install starts until `kiwispray-hosts release {id}`",
                        cause.as_str()
                    ));
                    let rt = txn.update_runtime(id, |rt| {
                        rt.hold(now, cause, reason.clone());
                        rt.seen = Some(seen);
                        rt.clone()
                    });
                    txn.record(
                        Event::now(id, &host.state, &host.state, "hold", &remote)
                            .via(via)
                            .with_detail(format!("{}: {reason}", cause.as_str())),
                    );
                    rt
                }
            };
            BootOutcome::Host {
                host,
                rt: Box::new(rt),
                registered: false,
            }
        }
    }
}
