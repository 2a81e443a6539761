//! `kiwispray-hosts set HOST`: changes a host's state chain, hostname or
//! metadata. A new state ends an install in progress (its bootid is used
//! up) and starts the loop count anew; a hold stays until `release`.
use super::hosts::{
    check_hostname, check_states, parse_meta_set, parse_object, resolve, set_path, split_key,
    unset_path, CAUSE,
};
use super::{json_text, out, Ctx, Error, Exit, Result, SetArgs};
use crate::events::Event;
use crate::hosts::Host;
use crate::runtime;
use serde_json::{Map, Value};

/// The edits of one `set`, validated.
struct Edit {
    state: Option<String>,
    hostname: Option<String>,
    merge: Option<Map<String, Value>>,
    sets: Vec<(Vec<String>, Value)>,
    unsets: Vec<Vec<String>>,
}

impl Edit {
    fn apply(&self, h: &mut Host) -> std::result::Result<(), String> {
        if let Some(s) = &self.state {
            if *s != h.state {
                h.state = s.clone();
            }
        }
        if let Some(n) = &self.hostname {
            h.hostname = n.clone();
        }
        if let Some(m) = &self.merge {
            crate::api::merge(&mut h.metadata, m.clone());
        }
        for (path, v) in &self.sets {
            set_path(&mut h.metadata, path, v.clone())?;
        }
        for path in &self.unsets {
            if !unset_path(&mut h.metadata, path) {
                eprintln!(
                    "kiwispray-hosts: note: metadata {} was not set",
                    path.join(".")
                );
            }
        }
        Ok(())
    }
}

pub fn set(ctx: &Ctx, a: &SetArgs) -> Result<Exit> {
    let state = match &a.state {
        Some(s) => Some(check_states(
            &ctx.config.images_dir(),
            &ctx.config.templates_dir(),
            s,
        )?),
        None => None,
    };
    if let Some(h) = &a.hostname {
        check_hostname(h)?;
    }
    let merge = match &a.meta {
        Some(m) => Some(parse_object("--meta", m)?),
        None => None,
    };
    let sets = a
        .meta_set
        .iter()
        .map(|s| parse_meta_set(s))
        .collect::<Result<Vec<_>>>()?;
    let unsets = a
        .meta_unset
        .iter()
        .map(|k| split_key(k))
        .collect::<Result<Vec<_>>>()?;
    if state.is_none()
        && a.hostname.is_none()
        && merge.is_none()
        && sets.is_empty()
        && unsets.is_empty()
    {
        return Err(Error::usage(
            "nothing to change: give --state, --hostname, --meta, --meta-set or --meta-unset",
        ));
    }
    let edit = Edit {
        state,
        hostname: a.hostname.clone(),
        merge,
        sets,
        unsets,
    };
    let store = ctx.store();
    let db = store.snapshot()?;
    let id = resolve(&db, &a.host)?;
    // Try the edit on the current copy first, so that errors are reported
    // without taking the lock.
    let mut trial = db.get(id).expect("resolved");
    edit.apply(&mut trial).map_err(Error::usage)?;
    let host = store.modify(move |txn| -> Result<Host> {
        let before = txn
            .db
            .get(id)
            .ok_or_else(|| Error::not_found(format!("host {id} was removed meanwhile")))?;
        let mut failed = None;
        txn.db.update(id, |h| {
            if let Err(e) = edit.apply(h) {
                failed = Some(e);
                *h = before.clone();
            }
        });
        if let Some(e) = failed {
            return Err(Error::usage(e));
        }
        let after = txn.db.get(id).expect("exists");
        if after.state != before.state {
            // A new intent: the installer of the old state may no longer
            // report, and the loop count starts anew. A hold stays.
            let now = runtime::now();
            txn.update_runtime(id, |rt| {
                rt.abandon_open(now, Some("state changed by an operator".into()));
                rt.reset_count();
            });
        }
        if after != before {
            txn.record(Event::now(id, &before.state, &after.state, CAUSE, ""));
        }
        if after.state != before.state && txn.runtime(id).hold.is_some() {
            eprintln!(
                "kiwispray-hosts: note: host {id} is held; it installs nothing until: kiwispray-hosts release {id}"
            );
        }
        Ok(after)
    })??;
    if a.json {
        out(&json_text(&host.to_value()))?;
    } else {
        out(&format!(
            "host {}: hostname {}, state {}\n",
            host.id, host.hostname, host.state
        ))?;
    }
    Ok(Exit::Ok)
}
