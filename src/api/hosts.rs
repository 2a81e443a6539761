//! `GET /hosts`: the host table (id, hostname, state, serial) as plain
//! text, for the operator; the web server configs allow it from the local
//! machine only. Changes nothing.

use super::{Response, Service};
use crate::hosts::Database;

impl Service {
    pub(super) fn hosts(&self) -> Result<Response, Response> {
        let snap = self.snapshot()?;
        Ok(Response::text(200, host_table(&snap)))
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
