//! `kiwispray-hosts add`: registers a machine before its first boot. Its
//! MACs, serial and UUID are checked, and refused if another host has one
//! of them; the new host gets an id no host or runtime record has.

use super::hosts::{check_hostname, check_keys_free, check_states, parse_object, short, CAUSE};
use super::{json_text, out, AddArgs, Ctx, Error, Exit, Result};
use crate::events::Event;
use crate::hosts::{Host, HOSTNAME_NOT_SET, STATE_NEW};
use crate::identity::{canonical_uuid, Mac};
use serde_json::Map;

pub fn add(ctx: &Ctx, a: &AddArgs) -> Result<Exit> {
    let mut macs: Vec<Mac> = Vec::new();
    for m in &a.macs {
        let mac = Mac::parse(m).map_err(|e| Error::usage(format!("--mac: {e}")))?;
        if !macs.contains(&mac) {
            macs.push(mac);
        }
    }
    let serial = a.serial.clone().unwrap_or_default();
    if serial.chars().any(char::is_control) || serial.chars().count() > 256 {
        return Err(Error::usage(
            "--serial must be at most 256 characters without control characters",
        ));
    }
    let uuid = match a.uuid.as_deref() {
        None => String::new(),
        Some(u) => canonical_uuid(u).ok_or_else(|| {
            Error::usage(format!(
                "--uuid {:?} is not a UUID (32 hex digits)",
                short(u)
            ))
        })?,
    };
    let hostname = a
        .hostname
        .clone()
        .unwrap_or_else(|| HOSTNAME_NOT_SET.to_string());
    check_hostname(&hostname)?;
    let state = match &a.state {
        Some(s) => check_states(&ctx.config.images_dir(), &ctx.config.templates_dir(), s)?,
        None => STATE_NEW.to_string(),
    };
    let bmc = match &a.bmc {
        Some(b) => Some(
            crate::bmc::BmcUrl::parse(b)
                .map_err(Error::usage)?
                .to_string(),
        ),
        None => None,
    };
    let metadata = match &a.meta {
        Some(m) => parse_object("--meta", m)?,
        None => Map::new(),
    };
    let store = ctx.store();
    let probe = Host::new(0, &macs, &serial, &uuid, &state);
    let db = store.snapshot()?;
    let keys = crate::hosts::keys_of(&probe, db.placeholders());
    if keys.is_empty() {
        return Err(Error::usage(
            "give at least one --mac, or a serial or UUID that identifies the machine \
             (placeholder serials such as \"Default string\" do not)",
        ));
    }
    if !serial.is_empty() && db.placeholders().serial_key(&serial).is_none() {
        eprintln!("kiwispray-hosts: note: serial {serial:?} is a placeholder shared by many machines; it does not identify this one");
    }
    check_keys_free(&db, &keys, None)?;
    let host = store.modify(move |txn| -> Result<Host> {
        let keys = crate::hosts::keys_of(&probe, txn.db.placeholders());
        check_keys_free(&txn.db, &keys, None)?;
        let id = txn.next_id();
        let mut host = Host::new(id, &macs, &serial, &uuid, &state);
        host.hostname = hostname;
        host.metadata = metadata;
        host.bmc = bmc;
        txn.db.insert(host.clone()).map_err(Error::io)?;
        txn.record(Event::now(id, "", &host.state, CAUSE, ""));
        Ok(host)
    })??;
    if a.json {
        out(&json_text(&host.to_value()))?;
    } else {
        out(&format!(
            "added host {} ({}), state {}\n",
            host.id, host.macs, host.state
        ))?;
    }
    Ok(Exit::Ok)
}
