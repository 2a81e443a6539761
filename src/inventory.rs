//! Inventory import as pure values: a vendor's list of machines (CSV with a
//! header row, or a JSON array of objects) turned into rows, and rows into
//! a plan against the host database: which hosts to add, which to update,
//! which are unchanged, and which rows are refused and why. Reading the file
//! and committing the plan belong to `kiwispray-hosts import-inventory`.
//!
//! Columns (case does not matter): `mac` (one or more, separated by `;`,
//! `,` or spaces), `serial`, `uuid`, `hostname`, `state`, `bmc` and
//! `metadata.<path>` (a dotted path; a value that parses as JSON is taken as
//! JSON, so `12` is a number). An empty cell sets nothing. A row is matched
//! to an existing host by any of its MACs, its serial or its UUID
//! (placeholders never match); a row whose keys point at two hosts, or at a
//! host another row already took, is refused.

use crate::hosts::{keys_of, Database, Host, Key, HOSTNAME_NOT_SET, STATE_NEW};
use crate::identity::{canonical_uuid, Mac, Placeholders};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// One row of the inventory, as given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// The line of the file it starts on.
    pub line: usize,
    pub macs: Vec<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
    pub hostname: Option<String>,
    pub state: Option<String>,
    pub bmc: Option<String>,
    pub metadata: Vec<(Vec<String>, Value)>,
}

/// A value given as text: JSON if it parses as JSON, else a string.
fn cell_value(text: &str) -> Value {
    serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn split_macs(text: &str) -> Vec<String> {
    text.split([';', ',', ' ', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn metadata_path(key: &str) -> Option<Vec<String>> {
    let path = key.strip_prefix("metadata.")?;
    let parts: Vec<String> = path.split('.').map(str::to_string).collect();
    (!parts.iter().any(String::is_empty)).then_some(parts)
}

const COLUMNS: &str = "mac, serial, uuid, hostname, state, bmc, metadata.<path>";

/// Sets one column of a row. `Err` for an unknown column.
fn set_column(row: &mut Row, column: &str, text: &str) -> Result<(), String> {
    let text = text.trim();
    let key = column.trim().to_ascii_lowercase();
    if text.is_empty() {
        return match key.as_str() {
            "mac" | "macs" | "serial" | "uuid" | "hostname" | "state" | "bmc" => Ok(()),
            k if metadata_path(k).is_some() => Ok(()),
            _ => Err(format!("unknown column {column:?} (expected {COLUMNS})")),
        };
    }
    match key.as_str() {
        "mac" | "macs" => row.macs.extend(split_macs(text)),
        "serial" => row.serial = Some(text.to_string()),
        "uuid" => row.uuid = Some(text.to_string()),
        "hostname" => row.hostname = Some(text.to_string()),
        "state" => row.state = Some(text.to_string()),
        "bmc" => row.bmc = Some(text.to_string()),
        k => match metadata_path(column.trim()) {
            Some(path) => row.metadata.push((path, cell_value(text))),
            None => {
                let _ = k;
                return Err(format!("unknown column {column:?} (expected {COLUMNS})"));
            }
        },
    }
    Ok(())
}

/// Parses a CSV inventory with a header row (a UTF-8 BOM and CRLF line
/// ends are fine).
pub fn parse_csv(text: &str) -> Result<Vec<Row>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("line 1: {e}"))?
        .iter()
        .map(str::to_string)
        .collect();
    if headers.iter().all(String::is_empty) {
        return Err("line 1: no header row".into());
    }
    let mut seen = Vec::new();
    for h in &headers {
        set_column(&mut Row::default(), h, "x").map_err(|e| format!("line 1: {e}"))?;
        let k = h.to_ascii_lowercase();
        if seen.contains(&k) && k != "mac" {
            return Err(format!("line 1: column {h:?} is given twice"));
        }
        seen.push(k);
    }
    let mut rows = Vec::new();
    // The crate's own line count lags behind; count the newlines before
    // each record instead, from where the last count ended (records come
    // in file order).
    let counted = std::cell::Cell::new((0usize, 1usize));
    let line_at = |byte: u64| {
        let b = text.as_bytes();
        let mut end = (byte as usize).min(b.len());
        // The position may point at the previous line's terminator.
        while end < b.len() && matches!(b[end], b'\r' | b'\n') {
            end += 1;
        }
        let (mut from, mut line) = counted.get();
        if end < from {
            (from, line) = (0, 1);
        }
        line += b[from..end].iter().filter(|c| **c == b'\n').count();
        counted.set((end, line));
        line
    };
    for record in reader.records() {
        let record = record.map_err(|e| match e.position() {
            Some(p) => format!("line {}: {e}", line_at(p.byte())),
            None => e.to_string(),
        })?;
        let line = record.position().map_or(0, |p| line_at(p.byte()));
        if record.iter().all(str::is_empty) {
            continue;
        }
        let mut row = Row {
            line,
            ..Row::default()
        };
        for (h, v) in headers.iter().zip(record.iter()) {
            set_column(&mut row, h, v).map_err(|e| format!("line {line}: {e}"))?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Parses a JSON inventory: an array of objects with the CSV's columns as
/// keys (`mac` may be an array, `metadata` an object).
pub fn parse_json(text: &str) -> Result<Vec<Row>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("line {}, column {}: {e}", e.line(), e.column()))?;
    let Value::Array(items) = value else {
        return Err("expected a JSON array of objects".into());
    };
    // Line numbers: where each top-level object starts.
    let starts = object_lines(text);
    let mut rows = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let line = starts.get(i).copied().unwrap_or(0);
        let Value::Object(obj) = item else {
            return Err(format!("line {line}: entry {} is not an object", i + 1));
        };
        let mut row = Row {
            line,
            ..Row::default()
        };
        for (k, v) in obj {
            let at = |e: String| format!("line {line}: {e}");
            match (k.to_ascii_lowercase().as_str(), v) {
                ("mac" | "macs", Value::Array(a)) => {
                    for m in a {
                        match m {
                            Value::String(s) => row.macs.extend(split_macs(&s)),
                            other => return Err(at(format!("mac {other} is not a string"))),
                        }
                    }
                }
                ("metadata", Value::Object(m)) => {
                    for (mk, mv) in m {
                        row.metadata.push((vec![mk], mv));
                    }
                }
                (_, Value::Null) => {}
                (key, Value::String(s)) => set_column(&mut row, key, &s).map_err(at)?,
                (key, other) if metadata_path(key).is_some() => {
                    row.metadata
                        .push((metadata_path(key).expect("checked"), other));
                }
                (key, other) => {
                    return Err(at(format!("{key:?} must be a string, not {other}")));
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The line on which each element of a top-level JSON array starts.
fn object_lines(text: &str) -> Vec<usize> {
    let (mut depth, mut line, mut in_str, mut esc) = (0usize, 1usize, false, false);
    let mut out = Vec::new();
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => {
                if depth == 1 {
                    out.push(line);
                }
                depth += 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    out
}

/// What the import does with one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Add(Host),
    /// The host as it is and as it will be.
    Update(Box<Host>, Box<Host>),
    Unchanged(u64),
    Refused(String),
}

/// The plan for a whole file, row by row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub rows: Vec<(usize, Action)>,
}

impl Plan {
    pub fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.rows.iter().filter(|(_, a)| f(a)).count()
    }

    pub fn refused(&self) -> Vec<(usize, &str)> {
        self.rows
            .iter()
            .filter_map(|(line, a)| match a {
                Action::Refused(why) => Some((*line, why.as_str())),
                _ => None,
            })
            .collect()
    }
}

/// Checks the values a row sets; the caller's checks for states and
/// hostnames (which need the deployment root) run through `check`.
pub struct Checks<'a> {
    pub state: &'a dyn Fn(&str) -> Result<String, String>,
    pub hostname: &'a dyn Fn(&str) -> Result<(), String>,
    pub bmc: &'a dyn Fn(&str) -> Result<(), String>,
}

/// Plans the import of `rows` into `db`. New hosts get ids from `next_id`
/// on. Pure: nothing is changed.
pub fn plan(db: &Database, rows: &[Row], mut next_id: u64, checks: &Checks) -> Plan {
    let placeholders = db.placeholders();
    let mut taken: HashMap<Key, usize> = HashMap::new();
    let mut hosts_taken: HashMap<u64, usize> = HashMap::new();
    let mut out = Plan::default();
    for row in rows {
        let action = plan_row(
            db,
            placeholders,
            row,
            &mut taken,
            &mut hosts_taken,
            &mut next_id,
            checks,
        )
        .unwrap_or_else(Action::Refused);
        out.rows.push((row.line, action));
    }
    out
}

fn plan_row(
    db: &Database,
    placeholders: &Placeholders,
    row: &Row,
    taken: &mut HashMap<Key, usize>,
    hosts_taken: &mut HashMap<u64, usize>,
    next_id: &mut u64,
    checks: &Checks,
) -> Result<Action, String> {
    let mut macs = Vec::new();
    for m in &row.macs {
        let mac = Mac::parse(m).map_err(|e| format!("mac {m:?}: {e}"))?;
        if !macs.contains(&mac) {
            macs.push(mac);
        }
    }
    let uuid = match &row.uuid {
        None => None,
        Some(u) => Some(canonical_uuid(u).ok_or_else(|| format!("uuid {u:?} is not a UUID"))?),
    };
    if let Some(s) = &row.serial {
        if s.chars().any(char::is_control) || s.chars().count() > 256 {
            return Err("serial must be at most 256 characters without control characters".into());
        }
    }
    let state = match &row.state {
        Some(s) => Some((checks.state)(s)?),
        None => None,
    };
    if let Some(h) = &row.hostname {
        (checks.hostname)(h)?;
    }
    if let Some(b) = &row.bmc {
        (checks.bmc)(b)?;
    }
    let probe = Host::new(
        0,
        &macs,
        row.serial.as_deref().unwrap_or(""),
        uuid.as_deref().unwrap_or(""),
        STATE_NEW,
    );
    let keys = keys_of(&probe, placeholders);
    if keys.is_empty() {
        return Err(
            "no MAC, and no serial or UUID that identifies a machine (placeholders do not)".into(),
        );
    }
    for k in &keys {
        if let Some(other) = taken.get(k) {
            return Err(format!("{k} is also on line {other}: one machine per row"));
        }
    }
    let mut matched: Vec<u64> = Vec::new();
    for k in &keys {
        for id in db.lookup(k) {
            if !matched.contains(id) {
                matched.push(*id);
            }
        }
    }
    let action = match matched.as_slice() {
        [] => {
            let id = *next_id;
            *next_id += 1;
            let mut host = probe.clone();
            host.id = id;
            host.hostname = row
                .hostname
                .clone()
                .unwrap_or_else(|| HOSTNAME_NOT_SET.to_string());
            if let Some(s) = &state {
                host.state = s.clone();
            }
            if let Some(b) = &row.bmc {
                host.bmc = Some(b.clone());
            }
            apply_metadata(&mut host.metadata, &row.metadata)?;
            Action::Add(host)
        }
        [id] => {
            if let Some(other) = hosts_taken.get(id) {
                return Err(format!(
                    "host {id} is also on line {other}: one row per machine"
                ));
            }
            hosts_taken.insert(*id, row.line);
            let before = db.get(*id).expect("indexed host exists");
            let mut after = before.clone();
            let mut list = after.mac_list();
            for m in &macs {
                if !list.contains(m) {
                    list.push(*m);
                }
            }
            after.macs = crate::identity::format_mac_list(&list);
            if let Some(s) = &row.serial {
                after.serial = s.clone();
            }
            if let Some(u) = &uuid {
                after.uuid = u.clone();
            }
            if let Some(h) = &row.hostname {
                after.hostname = h.clone();
            }
            if let Some(s) = &state {
                after.state = s.clone();
            }
            if let Some(b) = &row.bmc {
                after.bmc = Some(b.clone());
            }
            apply_metadata(&mut after.metadata, &row.metadata)?;
            // The row's keys may not belong to any other host.
            for k in keys_of(&after, placeholders) {
                if let Some(o) = db.lookup(&k).iter().find(|o| **o != *id) {
                    return Err(format!("{k} belongs to host {o}, not host {id}"));
                }
            }
            if after == before {
                Action::Unchanged(*id)
            } else {
                Action::Update(Box::new(before), Box::new(after))
            }
        }
        many => {
            let list: Vec<String> = many.iter().map(|i| format!("host {i}")).collect();
            return Err(format!(
                "its keys belong to different hosts ({}); fix them first",
                list.join(" and ")
            ));
        }
    };
    for k in keys {
        taken.insert(k, row.line);
    }
    Ok(action)
}

/// Sets each path; an object given for a path that holds an object is
/// merged into it.
fn apply_metadata(
    into: &mut Map<String, Value>,
    sets: &[(Vec<String>, Value)],
) -> Result<(), String> {
    for (path, value) in sets {
        let mut value = value.clone();
        if let Value::Object(new) = &mut value {
            let mut cur = Some(&*into);
            for p in path {
                cur = cur.and_then(|m| m.get(p)).and_then(Value::as_object);
            }
            if let Some(old) = cur {
                let mut merged = old.clone();
                crate::api::merge(&mut merged, std::mem::take(new));
                *new = merged;
            }
        }
        crate::hosts::set_path(into, path, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn checks() -> Checks<'static> {
        Checks {
            state: &|s| {
                if s == "ghost" {
                    Err(format!("state {s:?} has no image"))
                } else {
                    Ok(s.to_string())
                }
            },
            hostname: &|h| {
                if h.is_ascii() {
                    Ok(())
                } else {
                    Err(format!("hostname {h:?} is not valid"))
                }
            },
            bmc: &|_| Ok(()),
        }
    }

    #[test]
    fn csv_with_bom_crlf_and_metadata_columns() {
        let text = "\u{feff}MAC,serial,Hostname,metadata.rack,metadata.net.vlan\r\n\
                    52:54:00:00:00:01;52-54-00-00-00-02,SN1,web1,R7,12\r\n\r\n\
                    ,SN2,web2,,\r\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].macs.len(), 2);
        assert_eq!(
            rows[0].metadata[1],
            (vec!["net".into(), "vlan".into()], serde_json::json!(12))
        );
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].serial.as_deref(), Some("SN2"));
        assert!(parse_csv("mac,colour\n1,2\n")
            .unwrap_err()
            .contains("unknown column \"colour\""));
        assert!(parse_csv("mac,serial\n1\n")
            .unwrap_err()
            .starts_with("line 2:"));
    }

    #[test]
    fn plans_add_update_unchanged_and_refusals() {
        let db = Database::parse(
            br#"[{"id": 1, "macs": "52:54:00:00:00:01", "serial": "SN1", "state": "new", "hostname": "a"},
                 {"id": 2, "macs": "52:54:00:00:00:09", "serial": "SN9", "state": "new"}]"#,
            Arc::new(Placeholders::default()),
        )
        .unwrap();
        let rows = parse_json(
            r#"[
  {"mac": "52:54:00:00:00:01", "hostname": "a"},
  {"serial": "SN1"},
  {"mac": ["52:54:00:00:00:05"], "hostname": "new1", "metadata": {"rack": "R1"}},
  {"mac": "zz"},
  {"mac": "52:54:00:00:00:09", "serial": "SN1"},
  {"serial": "To be filled by O.E.M."},
  {"mac": "52:54:00:00:00:06", "state": "ghost"},
  {"mac": "52:54:00:00:00:07", "hostname": "wéb"},
  {"mac": "52:54:00:00:00:05"},
  {"serial": "SN9", "hostname": "b"}
]"#,
        )
        .unwrap();
        let p = plan(&db, &rows, 3, &checks());
        let actions: Vec<String> = p
            .rows
            .iter()
            .map(|(l, a)| match a {
                Action::Add(h) => format!("{l} add {}", h.id),
                Action::Update(_, h) => format!("{l} update {}", h.id),
                Action::Unchanged(id) => format!("{l} unchanged {id}"),
                Action::Refused(why) => format!("{l} refused {why}"),
            })
            .collect();
        assert_eq!(actions[0], "2 unchanged 1");
        assert!(
            actions[1].starts_with("3 refused host 1 is also on line 2"),
            "{}",
            actions[1]
        );
        assert_eq!(actions[2], "4 add 3");
        assert!(
            actions[3].starts_with("5 refused mac \"zz\""),
            "{}",
            actions[3]
        );
        assert!(
            actions[4].contains("different hosts (host 2 and host 1)"),
            "{}",
            actions[4]
        );
        assert!(actions[5].contains("no MAC"), "{}", actions[5]);
        assert!(actions[6].contains("state \"ghost\""), "{}", actions[6]);
        assert!(actions[7].contains("hostname"), "{}", actions[7]);
        assert!(actions[8].contains("also on line 4"), "{}", actions[8]);
        assert_eq!(actions[9], "11 update 2");
        assert_eq!(p.refused().len(), 7);
    }
}
