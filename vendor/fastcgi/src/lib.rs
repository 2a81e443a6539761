////////////////////////////////////////////////////////////////////////////////
//                                                                            //
//  Copyright (c) 2015 Mohd Tarmizi Mohd Affandi                              //
//                                                                            //
//  Permission is hereby granted, free of charge, to any person obtaining a   //
//  copy of this software and associated documentation files (the             //
//  "Software"), to deal in the Software without restriction, including       //
//  without limitation the rights to use, copy, modify, merge, publish,       //
//  distribute, sublicense, and/or sell copies of the Software, and to        //
//  permit persons to whom the Software is furnished to do so, subject to     //
//  the following conditions:                                                 //
//                                                                            //
//  The above copyright notice and this permission notice shall be included   //
//  in all copies or substantial portions of the Software.                    //
//                                                                            //
//  THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS   //
//  OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF                //
//  MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.    //
//  IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY      //
//  CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,      //
//  TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE         //
//  SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.                    //
//                                                                            //
////////////////////////////////////////////////////////////////////////////////

//! Pure Rust implementation of FastCGI 1.0.
//!
//! Example usage:
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() {
//!     fastcgi::run(|mut req| {
//!         write!(&mut req.stdout(), "Content-Type: text/plain\n\nHello, world!")
//!             .unwrap_or(());
//!     });
//! }
//! ```
//!
//! `run`, `run_raw` and `run_tcp` start one thread per connection without
//! limit. `run_raw_with` and `run_tcp_with` take a [`Limits`] value that
//! bounds the number of connection threads, answers excess connections with
//! a fixed overload response, applies socket timeouts and caps the size of
//! the request parameters.
//!
//! Malformed or truncated records from the peer never panic: they end the
//! affected connection only.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::net::TcpListener;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::unix::{accept_backoff, Socket, Transport};
#[cfg(unix)]
mod unix;

#[cfg(windows)]
use crate::windows::{accept_backoff, Socket, Transport};
#[cfg(windows)]
mod windows;

const HEADER_LEN: usize = 8;
const VERSION_1: u8 = 1;
/// Largest content length a single record can carry.
const MAX_CONTENT_LEN: usize = u16::MAX as usize;

const BEGIN_REQUEST: u8 = 1;
const ABORT_REQUEST: u8 = 2;
const END_REQUEST: u8 = 3;
const PARAMS: u8 = 4;
const STDIN: u8 = 5;
const STDOUT: u8 = 6;
const STDERR: u8 = 7;
const DATA: u8 = 8;
const GET_VALUES: u8 = 9;
const GET_VALUES_RESULT: u8 = 10;
const UNKNOWN_TYPE: u8 = 11;

/// Number of records gathered into one vectored write by the stream writers.
const RECORDS_PER_WRITE: usize = 16;
/// Largest number of buffers passed to one `write_vectored` call.
const MAX_WRITE_PARTS: usize = 3 * RECORDS_PER_WRITE;

/// Longest wait for a free slot of the connection first in line before
/// the waiting connections get the overload response. A request takes the
/// handler well under a millisecond, so this is only reached when it is
/// stuck or far behind.
const ADMIT_WAIT: Duration = Duration::from_secs(1);
/// Threads that answer connections refused for lack of a free slot.
const SHED_THREADS: usize = 2;
/// Refused connections waiting for a shedding thread; beyond that they are
/// closed at once.
const SHED_QUEUE: usize = 32;
/// Socket timeout while answering a refused connection.
const SHED_TIMEOUT: Duration = Duration::from_secs(1);
/// Total time a refused connection may take to send its BEGIN_REQUEST.
const SHED_DEADLINE: Duration = Duration::from_secs(2);
/// Records read from a refused connection before giving up on it.
const SHED_MAX_RECORDS: usize = 8;

const DEFAULT_MAX_CONNECTIONS: usize = 64;
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_PARAMS_BYTES: usize = 64 * 1024;
const DEFAULT_OVERLOAD_RESPONSE: &[u8] = b"Status: 503 Service Unavailable\r\n\
Retry-After: 5\r\n\
Content-Type: text/plain\r\n\
\r\n\
Service overloaded, retry later\n";

static PADDING: [u8; 8] = [0; 8];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Responder,
    Authorizer,
    Filter,
}

/// Resource limits for [`run_raw_with`] and [`run_tcp_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest number of connections served at the same time, each by a
    /// thread of its own while it lasts (idle keep-alive connections
    /// count); also the most connection threads ever started. Further
    /// connections wait for a free one; when none is freed for a second
    /// they are answered with `overload_response` and closed. Values below
    /// 1 are treated as 1. Also reported as `FCGI_MAX_CONNS` and
    /// `FCGI_MAX_REQS`.
    pub max_connections: usize,
    /// Raw CGI response (header lines, blank line, body) sent as the STDOUT
    /// stream of a request that is refused because all slots are busy.
    pub overload_response: Vec<u8>,
    /// Timeout for each socket read and write of a connection (SO_RCVTIMEO
    /// and SO_SNDTIMEO). An idle keep-alive connection is closed quietly
    /// when it expires. `None` or zero disables it.
    pub read_timeout: Option<Duration>,
    /// Largest accepted size in bytes of the encoded PARAMS stream of one
    /// request. A larger stream ends the connection with an error.
    pub max_params_bytes: usize,
}

impl Default for Limits {
    /// 64 connections, a plain-text 503 response, a 30 second timeout and
    /// 64 KiB of parameters.
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            overload_response: DEFAULT_OVERLOAD_RESPONSE.to_vec(),
            read_timeout: Some(DEFAULT_READ_TIMEOUT),
            max_params_bytes: DEFAULT_MAX_PARAMS_BYTES,
        }
    }
}

/// Effective configuration of an accept loop.
#[derive(Debug)]
struct Config {
    /// `None`: unbounded (the historical `run`, `run_raw`, `run_tcp`).
    max_connections: Option<usize>,
    overload_response: Vec<u8>,
    read_timeout: Option<Duration>,
    max_params_bytes: usize,
}

impl Config {
    fn unbounded() -> Self {
        Config {
            max_connections: None,
            overload_response: Vec::new(),
            read_timeout: None,
            max_params_bytes: DEFAULT_MAX_PARAMS_BYTES,
        }
    }

    fn bounded(limits: Limits) -> Self {
        Config {
            max_connections: Some(limits.max_connections.max(1)),
            overload_response: limits.overload_response,
            read_timeout: limits.read_timeout,
            max_params_bytes: limits.max_params_bytes,
        }
    }
}

/// How the accept loop reacts to an accept error.
pub(crate) struct Backoff {
    log: bool,
    pause: Option<Duration>,
}

impl Backoff {
    pub(crate) fn quiet(pause: Option<Duration>) -> Self {
        Backoff { log: false, pause }
    }

    pub(crate) fn logged(pause: Option<Duration>) -> Self {
        Backoff { log: true, pause }
    }
}

/// Writes one line to stderr. Never panics, even if stderr is broken.
fn log(msg: fmt::Arguments<'_>) {
    let line = format!("fastcgi: {msg}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Logs at most one line per second, counting the lines left out.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, msg: fmt::Arguments<'_>) {
        let now = Instant::now();
        if let Some(last) = self.last {
            if now.duration_since(last) < Duration::from_secs(1) {
                self.suppressed += 1;
                return;
            }
        }
        if self.suppressed > 0 {
            log(format_args!(
                "{msg} ({} similar messages suppressed)",
                self.suppressed
            ));
        } else {
            log(msg);
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[derive(Debug, Clone, Copy)]
enum ProtocolStatus {
    RequestComplete = 0,
    CantMpxConn = 1,
    #[allow(dead_code)]
    Overloaded = 2,
    UnknownRole = 3,
}

/// A record the application can receive.
#[derive(Debug)]
enum Record {
    BeginRequest {
        request_id: u16,
        role: Result<Role, u16>,
        keep_conn: bool,
    },
    AbortRequest {
        request_id: u16,
    },
    Params {
        request_id: u16,
        content: Vec<u8>,
    },
    Stdin {
        request_id: u16,
        content: Vec<u8>,
    },
    Data {
        request_id: u16,
        content: Vec<u8>,
    },
    GetValues(Vec<String>),
    UnknownType(u8),
}

/// Reads a name-value pair length at `*pos` (1 or 4 bytes).
fn read_len(buf: &[u8], pos: &mut usize) -> io::Result<usize> {
    let truncated = || invalid("truncated FastCGI name-value pair");
    let first = *buf.get(*pos).ok_or_else(truncated)?;
    if first & 0x80 == 0 {
        *pos += 1;
        Ok(usize::from(first))
    } else {
        let b = buf.get(*pos..*pos + 4).ok_or_else(truncated)?;
        *pos += 4;
        Ok(u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]) as usize)
    }
}

/// Takes `len` bytes at `*pos`, checking `len` against what is there.
fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> io::Result<&'a [u8]> {
    let end = pos
        .checked_add(len)
        .filter(|&end| end <= buf.len())
        .ok_or_else(|| invalid("FastCGI name-value pair length exceeds its stream"))?;
    let bytes = &buf[*pos..end];
    *pos = end;
    Ok(bytes)
}

fn read_pair(buf: &[u8], pos: &mut usize) -> io::Result<(String, String)> {
    let name_len = read_len(buf, pos)?;
    let value_len = read_len(buf, pos)?;
    let name = take(buf, pos, name_len)?;
    let value = take(buf, pos, value_len)?;
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// Decodes a complete name-value pair stream. Invalid UTF-8 is replaced
/// with U+FFFD; truncated pairs are an error.
fn read_pairs(buf: &[u8]) -> io::Result<Vec<(String, String)>> {
    let mut pos = 0;
    let mut pairs = Vec::new();
    while pos < buf.len() {
        pairs.push(read_pair(buf, &mut pos)?);
    }
    Ok(pairs)
}

fn write_len(out: &mut Vec<u8>, n: usize) -> io::Result<()> {
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0x7fff_ffff {
        out.extend_from_slice(&(n as u32 | 0x8000_0000).to_be_bytes());
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "FastCGI name-value pair too long",
        ));
    }
    Ok(())
}

fn write_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) -> io::Result<()> {
    for (name, value) in pairs {
        write_len(out, name.len())?;
        write_len(out, value.len())?;
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    Ok(())
}

/// Padding that brings a record to a multiple of 8 bytes.
fn padding_len(content_len: usize) -> usize {
    (8 - content_len % 8) % 8
}

/// Header of a record; `content_len` must not exceed `MAX_CONTENT_LEN`.
fn record_header(record_type: u8, request_id: u16, content_len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(content_len <= MAX_CONTENT_LEN);
    let id = request_id.to_be_bytes();
    let len = (content_len as u16).to_be_bytes();
    [
        VERSION_1,
        record_type,
        id[0],
        id[1],
        len[0],
        len[1],
        padding_len(content_len) as u8,
        0,
    ]
}

/// Appends one record; `content` must not exceed `MAX_CONTENT_LEN`.
fn encode_record(out: &mut Vec<u8>, record_type: u8, request_id: u16, content: &[u8]) {
    out.extend_from_slice(&record_header(record_type, request_id, content.len()));
    out.extend_from_slice(content);
    out.extend_from_slice(&PADDING[..padding_len(content.len())]);
}

/// Writes all of `parts` with as few (vectored) write calls as possible.
fn write_all_parts<W: Write>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let end = parts.len().min(first + MAX_WRITE_PARTS);
        let slices: Vec<IoSlice<'_>> = parts[first..end].iter().map(|p| IoSlice::new(p)).collect();
        let mut written = match w.write_vectored(&slices) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write FastCGI record",
                ))
            }
            Ok(n) => n,
            Err(ref e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while written > 0 && first < parts.len() {
            let len = parts[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                parts[first] = &parts[first][written..];
                written = 0;
            }
        }
    }
    Ok(())
}

/// Writes one record (header, content and padding) in a single write.
fn write_record<W: Write>(
    w: &mut W,
    record_type: u8,
    request_id: u16,
    content: &[u8],
) -> io::Result<()> {
    if content.len() > MAX_CONTENT_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "FastCGI record content too long",
        ));
    }
    let header = record_header(record_type, request_id, content.len());
    write_all_parts(
        w,
        &[&header, content, &PADDING[..padding_len(content.len())]],
    )
}

/// Writes `data` as a series of full-size stream records, without copying
/// it, several records per write call.
fn write_stream<W: Write>(
    w: &mut W,
    record_type: u8,
    request_id: u16,
    data: &[u8],
) -> io::Result<()> {
    for group in data.chunks(MAX_CONTENT_LEN * RECORDS_PER_WRITE) {
        let headers: Vec<[u8; HEADER_LEN]> = group
            .chunks(MAX_CONTENT_LEN)
            .map(|chunk| record_header(record_type, request_id, chunk.len()))
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(3 * headers.len());
        for (header, chunk) in headers.iter().zip(group.chunks(MAX_CONTENT_LEN)) {
            parts.push(header);
            parts.push(chunk);
            parts.push(&PADDING[..padding_len(chunk.len())]);
        }
        write_all_parts(w, &parts)?;
    }
    Ok(())
}

fn end_request_body(app_status: i32, protocol_status: ProtocolStatus) -> [u8; 8] {
    let s = app_status.to_be_bytes();
    [s[0], s[1], s[2], s[3], protocol_status as u8, 0, 0, 0]
}

fn send_end_request<W: Write>(
    w: &mut W,
    request_id: u16,
    protocol_status: ProtocolStatus,
) -> io::Result<()> {
    write_record(
        w,
        END_REQUEST,
        request_id,
        &end_request_body(0, protocol_status),
    )
}

fn send_unknown_type<W: Write>(w: &mut W, record_type: u8) -> io::Result<()> {
    write_record(w, UNKNOWN_TYPE, 0, &[record_type, 0, 0, 0, 0, 0, 0, 0])
}

/// Values for the variables of a GET_VALUES query; each known variable is
/// answered once, unknown ones are left out.
fn get_values(keys: Vec<String>, cfg: &Config) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = Vec::new();
    for key in keys {
        if values.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let value = match key.as_str() {
            "FCGI_MAX_CONNS" | "FCGI_MAX_REQS" => cfg
                .max_connections
                .map_or_else(|| "1".to_owned(), |n| n.to_string()),
            "FCGI_MPXS_CONNS" => "0".to_owned(),
            _ => continue,
        };
        values.push((key, value));
    }
    values
}

fn send_get_values_result<W: Write>(w: &mut W, keys: Vec<String>, cfg: &Config) -> io::Result<()> {
    let mut content = Vec::new();
    write_pairs(&mut content, &get_values(keys, cfg))?;
    write_record(w, GET_VALUES_RESULT, 0, &content)
}

/// Reads one record. `Ok(None)` means the peer closed the connection
/// cleanly at a record boundary.
fn read_record<R: Read>(r: &mut R) -> io::Result<Option<(u8, u16, Vec<u8>)>> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated FastCGI record header",
                ))
            }
            Ok(n) => filled += n,
            Err(ref e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if header[0] != VERSION_1 {
        return Err(invalid("unsupported FastCGI protocol version"));
    }
    let record_type = header[1];
    let request_id = u16::from_be_bytes([header[2], header[3]]);
    let content_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let padding_len = usize::from(header[6]);
    // At most 65535 + 255 bytes: the lengths are 16 and 8 bit fields.
    let mut body = vec![0u8; content_len + padding_len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, "truncated FastCGI record")
        } else {
            e
        }
    })?;
    body.truncate(content_len);
    Ok(Some((record_type, request_id, body)))
}

impl Record {
    /// Receives one record. `Ok(None)` means the peer closed the connection
    /// cleanly at a record boundary.
    fn receive<R: Read>(r: &mut R) -> io::Result<Option<Self>> {
        let (record_type, request_id, content) = match read_record(r)? {
            Some(record) => record,
            None => return Ok(None),
        };
        let rec = match record_type {
            BEGIN_REQUEST => {
                if content.len() < 8 {
                    return Err(invalid("short FastCGI BEGIN_REQUEST record"));
                }
                if request_id == 0 {
                    return Err(invalid("FastCGI BEGIN_REQUEST with request id 0"));
                }
                let role = match u16::from_be_bytes([content[0], content[1]]) {
                    1 => Ok(Role::Responder),
                    2 => Ok(Role::Authorizer),
                    3 => Ok(Role::Filter),
                    other => Err(other),
                };
                Record::BeginRequest {
                    request_id,
                    role,
                    keep_conn: content[2] & 1 == 1,
                }
            }
            ABORT_REQUEST => Record::AbortRequest { request_id },
            PARAMS => Record::Params {
                request_id,
                content,
            },
            STDIN => Record::Stdin {
                request_id,
                content,
            },
            DATA => Record::Data {
                request_id,
                content,
            },
            GET_VALUES => {
                let pairs = read_pairs(&content)?;
                Record::GetValues(pairs.into_iter().map(|(key, _)| key).collect())
            }
            END_REQUEST | STDOUT | STDERR | GET_VALUES_RESULT | UNKNOWN_TYPE => {
                return Err(invalid(
                    "received a FastCGI record type only an application may send",
                ))
            }
            other => Record::UnknownType(other),
        };
        Ok(Some(rec))
    }

    /// Receives one record; end of stream is an error.
    fn receive_required<R: Read>(r: &mut R) -> io::Result<Self> {
        Record::receive(r)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "FastCGI connection closed in the middle of a request",
            )
        })
    }
}

/// A connection shared by the requests it carries.
struct Conn {
    sock: Socket,
    /// False once a read failed: the record stream is out of step.
    readable: Cell<bool>,
    /// False once a write failed: a partial record may have been sent.
    writable: Cell<bool>,
}

impl Conn {
    fn new(sock: Socket) -> Self {
        Conn {
            sock,
            readable: Cell::new(true),
            writable: Cell::new(true),
        }
    }

    fn reusable(&self) -> bool {
        self.readable.get() && self.writable.get()
    }
}

pub struct Stdin<'a> {
    req: &'a mut Request,
}

impl Stdin<'_> {
    /// Begin reading the second stream of the request, for FastCGI Filter
    /// applications.
    ///
    /// May only be called after all contents of stdin has been read. Panics
    /// if stdin has not reached EOF yet.
    pub fn start_filter_data(&mut self) {
        if !self.req.filter_data {
            assert!(self.req.is_eof);
            self.req.is_eof = false;
            self.req.filter_data = true;
        }
    }

    /// Reads records until the next chunk of the current input stream.
    fn next_chunk(&mut self) -> io::Result<()> {
        let req = &mut *self.req;
        let mut sock = &req.conn.sock;
        loop {
            match (Record::receive_required(&mut sock)?, req.filter_data) {
                (Record::UnknownType(rec_type), _) => {
                    send_unknown_type(&mut sock, rec_type)?;
                }
                (Record::GetValues(keys), _) => {
                    send_get_values_result(&mut sock, keys, &req.cfg)?;
                }
                (Record::BeginRequest { request_id, .. }, _) => {
                    send_end_request(&mut sock, request_id, ProtocolStatus::CantMpxConn)?;
                }
                (Record::AbortRequest { request_id }, _) => {
                    if request_id != req.id {
                        continue;
                    }
                    req.aborted = true;
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "Request aborted",
                    ));
                }
                (
                    Record::Stdin {
                        request_id,
                        content,
                    },
                    false,
                )
                | (
                    Record::Data {
                        request_id,
                        content,
                    },
                    true,
                ) => {
                    if request_id != req.id {
                        continue;
                    }
                    if content.is_empty() {
                        req.is_eof = true;
                    }
                    req.buf = content;
                    req.pos = 0;
                    return Ok(());
                }
                _ => (),
            }
        }
    }
}

impl BufRead for Stdin<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.req.aborted {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "Request aborted",
            ));
        }
        if self.req.pos == self.req.buf.len() && !self.req.is_eof {
            if !self.req.conn.readable.get() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "FastCGI connection failed",
                ));
            }
            if let Err(e) = self.next_chunk() {
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    self.req.conn.readable.set(false);
                }
                return Err(e);
            }
        }
        Ok(&self.req.buf[self.req.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.req.pos = std::cmp::min(self.req.pos + amount, self.req.buf.len());
    }
}

impl Read for Stdin<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let mut chunk = self.fill_buf()?;
            chunk.read(buf)?
        };
        self.consume(n);
        Ok(n)
    }
}

macro_rules! writer {
    ($Writer:ident, $record_type:expr) => {
        pub struct $Writer<'a> {
            req: &'a mut Request,
        }

        impl Write for $Writer<'_> {
            /// Writes all of `buf` as records of up to 65535 bytes each,
            /// several records per system call.
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.req.aborted {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "Request aborted",
                    ));
                }
                if !self.req.conn.writable.get() {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "FastCGI connection failed",
                    ));
                }
                if buf.is_empty() {
                    return Ok(0);
                }
                match write_stream(&mut &self.req.conn.sock, $record_type, self.req.id, buf) {
                    Ok(()) => Ok(buf.len()),
                    Err(e) => {
                        self.req.conn.writable.set(false);
                        Err(e)
                    }
                }
            }

            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
    };
}

writer!(Stdout, STDOUT);

writer!(Stderr, STDERR);

/// Request objects are what a FastCGI application will primarily deal with
/// throughout its lifetime.
///
/// The Request API is designed to be an abstraction of the traditional CGI
/// process model. Note that this API is low level. Dealing with things like
/// GET/POST parameters or cookies is outside the scope of this library.
pub struct Request {
    conn: Rc<Conn>,
    cfg: Arc<Config>,
    id: u16,
    role: Role,
    params: HashMap<String, String>,
    aborted: bool,
    status: i32,
    buf: Vec<u8>,
    pos: usize,
    is_eof: bool,
    filter_data: bool,
}

pub type Params<'a> = Box<dyn Iterator<Item = (String, String)> + 'a>;

impl Request {
    /// Waits for the next BEGIN_REQUEST. `Ok(None)` means the connection
    /// ended normally: the peer closed it, or it stayed idle past the read
    /// timeout, between requests.
    fn begin(conn: &Conn, cfg: &Config) -> io::Result<Option<(u16, Role, bool)>> {
        let mut sock = &conn.sock;
        loop {
            let rec = match Record::receive(&mut sock) {
                Ok(Some(rec)) => rec,
                Ok(None) => return Ok(None),
                Err(ref e) if is_timeout(e) => return Ok(None),
                Err(e) => return Err(e),
            };
            match rec {
                Record::UnknownType(rec_type) => {
                    send_unknown_type(&mut sock, rec_type)?;
                }
                Record::GetValues(keys) => {
                    send_get_values_result(&mut sock, keys, cfg)?;
                }
                Record::BeginRequest {
                    request_id,
                    role: Ok(role),
                    keep_conn,
                } => {
                    return Ok(Some((request_id, role, keep_conn)));
                }
                Record::BeginRequest {
                    request_id,
                    role: Err(_),
                    ..
                } => {
                    send_end_request(&mut sock, request_id, ProtocolStatus::UnknownRole)?;
                }
                _ => (),
            }
        }
    }

    fn new(conn: Rc<Conn>, cfg: Arc<Config>, id: u16, role: Role) -> io::Result<Self> {
        let mut buf: Vec<u8> = Vec::new();
        let mut params = HashMap::new();
        let mut aborted = false;
        {
            let mut sock = &conn.sock;
            loop {
                match Record::receive_required(&mut sock)? {
                    Record::UnknownType(rec_type) => {
                        send_unknown_type(&mut sock, rec_type)?;
                    }
                    Record::GetValues(keys) => {
                        send_get_values_result(&mut sock, keys, &cfg)?;
                    }
                    Record::BeginRequest { request_id, .. } => {
                        send_end_request(&mut sock, request_id, ProtocolStatus::CantMpxConn)?;
                    }
                    Record::AbortRequest { request_id } => {
                        if id != request_id {
                            continue;
                        }
                        aborted = true;
                        break;
                    }
                    Record::Params {
                        request_id,
                        content,
                    } => {
                        if id != request_id {
                            continue;
                        }
                        if content.is_empty() {
                            params.extend(read_pairs(&buf)?);
                            break;
                        }
                        if content.len() > cfg.max_params_bytes.saturating_sub(buf.len()) {
                            return Err(invalid("FastCGI parameters exceed the size limit"));
                        }
                        buf.extend_from_slice(&content);
                    }
                    _ => (),
                }
            }
        }
        Ok(Request {
            conn,
            cfg,
            id,
            role,
            params,
            aborted,
            status: 0,
            buf: Vec::new(),
            pos: 0,
            is_eof: false,
            filter_data: false,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Retrieves the value of the given parameter name.
    pub fn param(&self, key: &str) -> Option<String> {
        self.params.get(key).cloned()
    }

    /// Retrieves the value of the given parameter name without copying it.
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// Iterates over the FastCGI parameters.
    pub fn params(&self) -> Params<'_> {
        Box::new(self.params.iter().map(|(k, v)| (k.clone(), v.clone())))
    }

    /// Standard input stream of the request.
    pub fn stdin(&mut self) -> Stdin<'_> {
        Stdin { req: self }
    }

    /// Standard output stream of the request.
    ///
    /// Each `write` call sends its whole buffer at once, as records of up to
    /// 65535 bytes; there is no need to wrap it in a `BufWriter` when the
    /// response is written with a single `write_all`.
    pub fn stdout(&mut self) -> Stdout<'_> {
        Stdout { req: self }
    }

    /// Standard error stream of the request.
    pub fn stderr(&mut self) -> Stderr<'_> {
        Stderr { req: self }
    }

    /// Checks if the client has closed the connection prematurely.
    ///
    /// The reliability of this method depends on whether the web server
    /// notifies such event (by sending the `FCGI_REQUEST_ABORTED` record) to
    /// the FastCGI application. This value is updated synchronously; the
    /// update may only be triggered by reading from stdin.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Reports the specified exit code to the web server.
    ///
    /// This will consume the Request object. If you finish processing the
    /// Request object without calling `exit`, it is assumed that the exit code
    /// is 0.
    pub fn exit(mut self, code: i32) {
        self.status = code;
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.conn.writable.get() {
            return;
        }
        // End of stdout, end of stderr and END_REQUEST in one write.
        let mut out = Vec::with_capacity(4 * HEADER_LEN);
        encode_record(&mut out, STDOUT, self.id, &[]);
        encode_record(&mut out, STDERR, self.id, &[]);
        encode_record(
            &mut out,
            END_REQUEST,
            self.id,
            &end_request_body(self.status, ProtocolStatus::RequestComplete),
        );
        if (&self.conn.sock).write_all(&out).is_err() {
            self.conn.writable.set(false);
        }
    }
}

/// Serves the requests of one connection until it ends. `Ok(())` means it
/// ended normally (peer closed it between requests, idle timeout, no
/// keep-alive); an error is worth one log line.
fn serve_connection<F>(sock: Socket, handler: &F, cfg: &Arc<Config>) -> io::Result<()>
where
    F: Fn(Request),
{
    if cfg.read_timeout.is_some() {
        sock.set_timeouts(cfg.read_timeout)?;
    }
    let conn = Rc::new(Conn::new(sock));
    loop {
        let (request_id, role, keep_conn) = match Request::begin(&conn, cfg)? {
            Some(begin) => begin,
            None => return Ok(()),
        };
        let req = Request::new(conn.clone(), cfg.clone(), request_id, role)?;
        handler(req);
        if !keep_conn || !conn.reusable() {
            return Ok(());
        }
    }
}

/// A reader that fails once a deadline has passed. Each read blocks at most
/// for the socket timeout, so the total time is bounded.
struct DeadlineReader<'a> {
    sock: &'a Socket,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "deadline for BEGIN_REQUEST passed",
            ));
        }
        let mut sock = self.sock;
        sock.read(buf)
    }
}

/// Answers a connection that got no slot: reads its BEGIN_REQUEST, replies
/// with the overload response and closes it.
fn shed_connection(sock: Socket, cfg: &Config) -> io::Result<()> {
    sock.set_timeouts(Some(SHED_TIMEOUT))?;
    let mut reader = DeadlineReader {
        sock: &sock,
        deadline: Instant::now() + SHED_DEADLINE,
    };
    let mut w = &sock;
    for _ in 0..SHED_MAX_RECORDS {
        let rec = match Record::receive(&mut reader)? {
            Some(rec) => rec,
            None => return Ok(()),
        };
        match rec {
            Record::BeginRequest { request_id, .. } => {
                let mut out = Vec::with_capacity(cfg.overload_response.len() + 64);
                for chunk in cfg.overload_response.chunks(MAX_CONTENT_LEN) {
                    encode_record(&mut out, STDOUT, request_id, chunk);
                }
                encode_record(&mut out, STDOUT, request_id, &[]);
                encode_record(
                    &mut out,
                    END_REQUEST,
                    request_id,
                    &end_request_body(0, ProtocolStatus::RequestComplete),
                );
                return w.write_all(&out);
            }
            Record::GetValues(keys) => send_get_values_result(&mut w, keys, cfg)?,
            Record::UnknownType(rec_type) => send_unknown_type(&mut w, rec_type)?,
            _ => (),
        }
    }
    Err(invalid("no FastCGI BEGIN_REQUEST on refused connection"))
}

/// Starts the shedding threads; returns the queue feeding them. Before a
/// queued connection is refused, a shedding thread offers it to the pool
/// again, so a slot freed in the meantime serves it.
fn start_shedders<F>(pool: &Arc<Pool<F>>) -> Option<SyncSender<Socket>>
where
    F: Fn(Request) + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::sync_channel::<Socket>(SHED_QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let mut started = 0;
    for _ in 0..SHED_THREADS {
        let rx = rx.clone();
        let pool = pool.clone();
        let spawned = thread::Builder::new()
            .name("fastcgi-shed".to_owned())
            .spawn(move || loop {
                let next = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match next {
                    Ok(sock) => {
                        if let Err(sock) = pool.dispatch(sock) {
                            // Failures are not logged: under overload they
                            // would flood the log.
                            drop(shed_connection(sock, &pool.cfg));
                        }
                    }
                    Err(_) => return,
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => log(format_args!("cannot start overload thread: {e}")),
        }
    }
    if started > 0 {
        Some(tx)
    } else {
        None
    }
}

/// The connection slots of an accept loop: how many are in use, and a
/// signal for a thread waiting for one to be freed.
#[derive(Default)]
struct Slots {
    used: AtomicUsize,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Slots {
    /// Waits until a slot may have been freed, or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // A slot freed between the caller's check and this wait is seen at
        // most `timeout` later, so short timeouts keep that cheap.
        drop(self.freed.wait_timeout(guard, timeout));
    }
}

/// One busy connection slot; released on drop, also when the connection
/// thread unwinds.
struct Slot(Arc<Slots>);

impl Slot {
    fn acquire(slots: &Arc<Slots>, max: usize) -> Option<Slot> {
        slots
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                if n < max {
                    Some(n + 1)
                } else {
                    None
                }
            })
            .ok()
            .map(|_| Slot(slots.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// A connection handed to a connection thread, with the slot it holds.
type Job = (Socket, Slot);

/// The connection threads of a bounded accept loop. They are started on
/// demand, one per slot in use, up to `max` in all, and then kept: a thread
/// takes the next connection when it is done with one, so the process
/// never has more than `max` connection threads, however fast connections
/// come and go. (A thread per connection freed its slot just before the
/// thread ended, so for a moment there could be more threads than slots.)
struct Pool<F> {
    handler: Arc<F>,
    cfg: Arc<Config>,
    max: usize,
    /// Slots in use: connections queued for a thread or being served.
    active: Arc<Slots>,
    /// Connection threads started (never more than `max`).
    workers: AtomicUsize,
    jobs: SyncSender<Job>,
    queue: Mutex<mpsc::Receiver<Job>>,
    spawn_log: Mutex<RateLimitedLog>,
}

impl<F> Pool<F>
where
    F: Fn(Request) + Send + Sync + 'static,
{
    fn new(handler: Arc<F>, cfg: Arc<Config>, max: usize) -> Arc<Self> {
        // A job holds a slot, so there are never more than `max` queued.
        let (jobs, queue) = mpsc::sync_channel(max);
        Arc::new(Pool {
            handler,
            cfg,
            max,
            active: Arc::new(Slots::default()),
            workers: AtomicUsize::new(0),
            jobs,
            queue: Mutex::new(queue),
            spawn_log: Mutex::new(RateLimitedLog::default()),
        })
    }

    /// Hands `sock` to a connection thread if a slot is free; gives it
    /// back otherwise.
    fn dispatch(self: &Arc<Self>, sock: Socket) -> Result<(), Socket> {
        let slot = match Slot::acquire(&self.active, self.max) {
            Some(slot) => slot,
            None => return Err(sock),
        };
        // Every slot in use needs a thread: queued jobs never wait for a
        // thread that is busy with another connection.
        if !self.ensure_workers(self.active.used.load(Ordering::Acquire).min(self.max)) {
            // No thread at all: close it (without draining) and free the slot.
            drop((sock, slot));
            thread::sleep(Duration::from_millis(50));
            return Ok(());
        }
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            self.jobs.try_send((sock, slot))
        {
            drop(job);
        }
        Ok(())
    }

    /// Hands `sock` to a connection thread as soon as a slot is free,
    /// waiting at most `wait`; gives it back if none was.
    fn wait_for_slot(self: &Arc<Self>, mut sock: Socket, wait: Duration) -> Result<(), Socket> {
        let deadline = Instant::now() + wait;
        loop {
            sock = match self.dispatch(sock) {
                Ok(()) => return Ok(()),
                Err(sock) => sock,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(sock);
            }
            self.active
                .wait((deadline - now).min(Duration::from_millis(5)));
        }
    }

    /// Starts threads until there are at least `wanted`. False if there is
    /// none and none can be started.
    fn ensure_workers(self: &Arc<Self>, wanted: usize) -> bool {
        loop {
            let have = self.workers.load(Ordering::Acquire);
            if have >= wanted {
                return true;
            }
            if self
                .workers
                .compare_exchange(have, have + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let pool = self.clone();
            let spawned = thread::Builder::new()
                .name("fastcgi-conn".to_owned())
                .spawn(move || pool.work());
            if let Err(e) = spawned {
                self.workers.fetch_sub(1, Ordering::AcqRel);
                if let Ok(mut l) = self.spawn_log.lock() {
                    l.log(format_args!("cannot start connection thread: {e}"));
                }
                return have > 0;
            }
        }
    }

    /// A connection thread: serves one connection after the other.
    fn work(&self) {
        loop {
            let job = match self.queue.lock() {
                Ok(queue) => queue.recv(),
                Err(poisoned) => poisoned.into_inner().recv(),
            };
            let Ok((mut sock, slot)) = job else { return };
            sock.set_drain(true);
            // A panicking handler ends its connection, not the thread, so
            // that the thread count stays equal to the slots it serves.
            let served = panic::catch_unwind(AssertUnwindSafe(|| {
                serve_connection(sock, &*self.handler, &self.cfg)
            }));
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log(format_args!("connection closed: {e}")),
                Err(_) => log(format_args!("connection closed: the handler panicked")),
            }
            // The socket is closed (and drained) before the slot is freed.
            drop(slot);
        }
    }
}

fn web_server_addrs() -> Option<HashSet<String>> {
    match std::env::var("FCGI_WEB_SERVER_ADDRS") {
        Ok(value) => Some(
            value
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            log(format_args!(
                "FCGI_WEB_SERVER_ADDRS is not valid Unicode; refusing all connections"
            ));
            Some(HashSet::new())
        }
    }
}

fn run_transport<F>(handler: F, transport: &mut Transport, cfg: Config)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    let addrs = web_server_addrs();
    let cfg = Arc::new(cfg);
    let max = cfg.max_connections;
    // Unbounded (the historical entry points): a thread per connection.
    let unbounded = Arc::new(handler);
    let pool = max.map(|max| Pool::new(unbounded.clone(), cfg.clone(), max));
    let shed_queue = pool.as_ref().and_then(start_shedders);
    let mut accept_log = RateLimitedLog::default();
    let mut spawn_log = RateLimitedLog::default();
    let mut overload_log = RateLimitedLog::default();
    let mut shedding = false;
    loop {
        let mut sock = match transport.accept() {
            Ok(sock) => sock,
            Err(e) => {
                let backoff = accept_backoff(&e);
                if backoff.log {
                    accept_log.log(format_args!("accept failed: {e}"));
                }
                if let Some(pause) = backoff.pause {
                    thread::sleep(pause);
                }
                continue;
            }
        };
        // Until a thread owns it, the socket is closed without draining so
        // that the accept loop never waits on a peer.
        sock.set_drain(false);
        if let Some(ref addrs) = addrs {
            let allowed = match sock.peer() {
                Ok(addr) => addrs.contains(&addr),
                Err(_) => false,
            };
            if !allowed {
                continue;
            }
        }
        if let Some(ref pool) = pool {
            let sock = match pool.dispatch(sock) {
                Ok(()) => {
                    shedding = false;
                    continue;
                }
                Err(sock) => sock,
            };
            // All slots are busy. The connection waits for one, and further
            // connections wait in the listen backlog, first come first
            // served, as long as slots are freed now and then: the
            // connection at the head waits at most ADMIT_WAIT. Beyond that
            // the handler is stuck or overrun: the waiting connections are
            // answered with the overload response, as fast as they come,
            // until a slot is free again.
            let sock = if shedding {
                Err(sock)
            } else {
                pool.wait_for_slot(sock, ADMIT_WAIT)
            };
            if let Err(mut sock) = sock {
                shedding = true;
                overload_log.log(format_args!(
                    "all {} connections busy, answering with the overload response",
                    pool.max
                ));
                if let Some(ref queue) = shed_queue {
                    // Every refused connection gets the overload response:
                    // when the shedding threads are behind, the accept loop
                    // waits for them and further connections wait in the
                    // listen backlog, instead of being closed unanswered
                    // (which a web server reports as 502).
                    sock.set_drain(true);
                    if let Err(mpsc::SendError(mut sock)) = queue.send(sock) {
                        sock.set_drain(false);
                    }
                }
            }
            continue;
        }
        let handler = unbounded.clone();
        let thread_cfg = cfg.clone();
        let spawned = thread::Builder::new()
            .name("fastcgi-conn".to_owned())
            .spawn(move || {
                let mut sock = sock;
                sock.set_drain(true);
                if let Err(e) = serve_connection(sock, &*handler, &thread_cfg) {
                    log(format_args!("connection closed: {e}"));
                }
            });
        if let Err(e) = spawned {
            spawn_log.log(format_args!("cannot start connection thread: {e}"));
            thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(unix)]
/// Runs as a FastCGI process with the given handler.
///
/// Available under Unix only. If you are using Windows, use `run_tcp` instead.
pub fn run<F>(handler: F)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    run_transport(handler, &mut Transport::new(), Config::unbounded())
}

#[cfg(unix)]
/// Accepts requests from a user-supplied raw file descriptor. IPv4, IPv6, and
/// Unix domain sockets are supported.
///
/// Available under Unix only.
pub fn run_raw<F>(handler: F, raw_fd: std::os::unix::io::RawFd)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    run_transport(
        handler,
        &mut Transport::from_raw_fd(raw_fd),
        Config::unbounded(),
    )
}

#[cfg(unix)]
/// Like `run_raw`, with bounded resources.
///
/// At most `limits.max_connections` connections are served at once, by as
/// many threads at most, started on demand and then kept. When all of them
/// are busy, the next connection waits for a free one, and further
/// connections wait in the listen backlog, first come first served. Only
/// when the connection first in line has waited a second do the waiting
/// connections get no thread: a small fixed set of threads reads each one's
/// BEGIN_REQUEST (giving up after about two seconds), answers with
/// `limits.overload_response` as the STDOUT stream of that request, ends
/// the request and closes the connection, until a slot is free again. The
/// accept loop itself never reads from or writes to a peer.
///
/// Available under Unix only.
///
/// ```no_run
/// use std::io::Write;
///
/// let limits = fastcgi::Limits {
///     max_connections: 16,
///     ..fastcgi::Limits::default()
/// };
/// fastcgi::run_raw_with(
///     |mut req| {
///         let body = b"Content-Type: text/plain\r\n\r\nHello, world!";
///         req.stdout().write_all(body).unwrap_or(());
///     },
///     0,
///     limits,
/// );
/// ```
pub fn run_raw_with<F>(handler: F, raw_fd: std::os::unix::io::RawFd, limits: Limits)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    run_transport(
        handler,
        &mut Transport::from_raw_fd(raw_fd),
        Config::bounded(limits),
    )
}

#[cfg(unix)]
/// Accepts requests from a user-supplied TCP listener.
pub fn run_tcp<F>(handler: F, listener: &TcpListener)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    use std::os::unix::io::AsRawFd;
    run_transport(
        handler,
        &mut Transport::from_raw_fd(listener.as_raw_fd()),
        Config::unbounded(),
    )
}

#[cfg(unix)]
/// Accepts requests from a user-supplied TCP listener, with bounded
/// resources as described for `run_raw_with`.
pub fn run_tcp_with<F>(handler: F, listener: &TcpListener, limits: Limits)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    use std::os::unix::io::AsRawFd;
    run_transport(
        handler,
        &mut Transport::from_raw_fd(listener.as_raw_fd()),
        Config::bounded(limits),
    )
}

#[cfg(windows)]
/// Accepts requests from a user-supplied TCP listener.
pub fn run_tcp<F>(handler: F, listener: &TcpListener)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    run_transport(
        handler,
        &mut Transport::from_tcp(listener),
        Config::unbounded(),
    )
}

#[cfg(windows)]
/// Accepts requests from a user-supplied TCP listener, with bounded
/// resources as described for `run_raw_with`.
pub fn run_tcp_with<F>(handler: F, listener: &TcpListener, limits: Limits)
where
    F: Fn(Request) + Send + Sync + 'static,
{
    run_transport(
        handler,
        &mut Transport::from_tcp(listener),
        Config::bounded(limits),
    )
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpStream};
    use std::os::unix::io::{AsRawFd, IntoRawFd};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);

    fn rec(record_type: u8, id: u16, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, record_type, id, content);
        out
    }

    fn begin(id: u16, role: u16, keep_conn: bool) -> Vec<u8> {
        let r = role.to_be_bytes();
        rec(
            BEGIN_REQUEST,
            id,
            &[r[0], r[1], keep_conn as u8, 0, 0, 0, 0, 0],
        )
    }

    fn pairs(items: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in items {
            write_len(&mut out, name.len()).unwrap();
            write_len(&mut out, value.len()).unwrap();
            out.extend_from_slice(name);
            out.extend_from_slice(value);
        }
        out
    }

    /// A complete responder request: BEGIN, PARAMS, end of PARAMS, end of STDIN.
    fn request(id: u16, keep_conn: bool, params: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = begin(id, 1, keep_conn);
        let encoded = pairs(params);
        for chunk in encoded.chunks(MAX_CONTENT_LEN) {
            out.extend(rec(PARAMS, id, chunk));
        }
        out.extend(rec(PARAMS, id, &[]));
        out.extend(rec(STDIN, id, &[]));
        out
    }

    fn test_config(max_params_bytes: usize) -> Arc<Config> {
        Arc::new(Config {
            max_connections: Some(4),
            overload_response: Vec::new(),
            read_timeout: Some(WAIT),
            max_params_bytes,
        })
    }

    /// Serves one end of a socket pair on a thread; returns the other end.
    fn spawn_conn<F>(cfg: Arc<Config>, handler: F) -> (UnixStream, JoinHandle<io::Result<()>>)
    where
        F: Fn(Request) + Send + 'static,
    {
        let (client, server) = UnixStream::pair().unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let sock = Socket::from_raw_fd(server.into_raw_fd());
        let conn = thread::spawn(move || serve_connection(sock, &handler, &cfg));
        (client, conn)
    }

    /// Reads records until END_REQUEST (included) or end of stream.
    fn read_response<R: Read>(r: &mut R) -> Vec<(u8, u16, Vec<u8>)> {
        let mut records = Vec::new();
        while let Some(record) = read_record(r).unwrap() {
            let end = record.0 == END_REQUEST;
            records.push(record);
            if end {
                break;
            }
        }
        records
    }

    fn stream_of(records: &[(u8, u16, Vec<u8>)], record_type: u8) -> Vec<u8> {
        records
            .iter()
            .filter(|r| r.0 == record_type)
            .flat_map(|r| r.2.iter().copied())
            .collect()
    }

    fn no_handler_calls() -> (Arc<AtomicUsize>, impl Fn(Request) + Send + 'static) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        (calls, move |_req: Request| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn malformed_records_close_the_connection_without_panic() {
        let mut bad_version = begin(1, 1, false);
        bad_version[0] = 2;
        let mut truncated_params = begin(1, 1, false);
        truncated_params.extend(rec(PARAMS, 1, &[3, 3, b'a']));
        truncated_params.extend(rec(PARAMS, 1, &[]));
        let mut huge_param_len = begin(1, 1, false);
        huge_param_len.extend(rec(PARAMS, 1, &[0xff, 0xff, 0xff, 0xff, 0x81, 0, 0, 0]));
        huge_param_len.extend(rec(PARAMS, 1, &[]));
        let mut eof_in_request = begin(1, 1, false);
        eof_in_request.extend(rec(PARAMS, 1, &pairs(&[(b"A", b"B")])));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short BEGIN_REQUEST", rec(BEGIN_REQUEST, 1, &[0, 1])),
            ("empty BEGIN_REQUEST", rec(BEGIN_REQUEST, 1, &[])),
            ("BEGIN_REQUEST with id 0", begin(0, 1, false)),
            ("END_REQUEST from peer", rec(END_REQUEST, 1, &[0; 8])),
            ("STDOUT from peer", rec(STDOUT, 1, b"x")),
            ("STDERR from peer", rec(STDERR, 1, b"x")),
            (
                "GET_VALUES_RESULT from peer",
                rec(GET_VALUES_RESULT, 0, &[]),
            ),
            ("UNKNOWN_TYPE from peer", rec(UNKNOWN_TYPE, 0, &[0; 8])),
            ("bad version byte", bad_version),
            ("truncated header", vec![1, 1, 0]),
            ("truncated content", begin(1, 1, false)[..12].to_vec()),
            ("truncated padding", rec(STDIN, 1, b"abc")[..12].to_vec()),
            (
                "truncated GET_VALUES pair",
                rec(GET_VALUES, 0, &[5, 0, b'a']),
            ),
            (
                "huge GET_VALUES length",
                rec(GET_VALUES, 0, &[0xff, 0xff, 0xff, 0xff, 0]),
            ),
            ("truncated PARAMS pair", truncated_params),
            ("huge PARAMS length", huge_param_len),
            ("EOF inside a request", eof_in_request),
        ];
        for (name, bytes) in cases {
            let (calls, handler) = no_handler_calls();
            let (mut client, conn) = spawn_conn(test_config(1024), handler);
            client.write_all(&bytes).unwrap();
            client.shutdown(Shutdown::Write).ok();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            let result = conn.join().unwrap_or_else(|_| panic!("{name}: panicked"));
            assert!(result.is_err(), "{name}: expected an error, got {result:?}");
            assert_eq!(calls.load(Ordering::SeqCst), 0, "{name}: handler called");
            assert!(rest.is_empty(), "{name}: unexpected output {rest:?}");
        }
    }

    #[test]
    fn keep_alive_connection_closed_by_peer_ends_quietly() {
        let handler = |mut req: Request| {
            let n = req.param_str("N").unwrap_or("?").to_owned();
            req.stdout().write_all(n.as_bytes()).unwrap();
        };
        let (mut client, conn) = spawn_conn(test_config(1024), handler);
        for (i, id) in [(1, 1u16), (2, 2), (3, 1)] {
            let n = format!("{i}");
            client
                .write_all(&request(id, true, &[(b"N", n.as_bytes())]))
                .unwrap();
            let records = read_response(&mut client);
            assert_eq!(stream_of(&records, STDOUT), n.as_bytes());
            let end = records.last().unwrap();
            assert_eq!((end.0, end.1), (END_REQUEST, id));
            assert_eq!(end.2, end_request_body(0, ProtocolStatus::RequestComplete));
        }
        drop(client);
        let result = conn.join().expect("connection thread panicked");
        assert!(result.is_ok(), "{result:?}");

        // Also when the peer closes before its first request.
        let (calls, handler) = no_handler_calls();
        let (client, conn) = spawn_conn(test_config(1024), handler);
        drop(client);
        assert!(conn.join().expect("connection thread panicked").is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn idle_keep_alive_connection_times_out_quietly() {
        let cfg = Arc::new(Config {
            read_timeout: Some(Duration::from_millis(100)),
            ..Config::bounded(Limits::default())
        });
        let (mut client, conn) = spawn_conn(cfg, |_req: Request| {});
        client.write_all(&request(1, true, &[])).unwrap();
        read_response(&mut client);
        let result = conn.join().expect("connection thread panicked");
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn invalid_utf8_params_do_not_drop_later_params() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let handler = move |req: Request| {
            let mut params: Vec<(String, String)> = req.params().collect();
            params.sort();
            let later = req.param_str("LATER").map(str::to_owned);
            tx.lock().unwrap().send((params, later)).unwrap();
        };
        let (mut client, conn) = spawn_conn(test_config(1024), handler);
        client
            .write_all(&request(
                1,
                false,
                &[
                    (b"FIRST", b"1"),
                    (b"BAD_VALUE", b"a\xffb"),
                    (b"BAD\xc3NAME", b"x"),
                    (b"LATER", b"still here"),
                ],
            ))
            .unwrap();
        read_response(&mut client);
        let (params, later) = rx.recv_timeout(WAIT).unwrap();
        assert_eq!(later.as_deref(), Some("still here"));
        let mut expected: Vec<(String, String)> = vec![
            ("BAD\u{fffd}NAME".into(), "x".into()),
            ("BAD_VALUE".into(), "a\u{fffd}b".into()),
            ("FIRST".into(), "1".into()),
            ("LATER".into(), "still here".into()),
        ];
        expected.sort();
        assert_eq!(params, expected);
        drop(client);
        assert!(conn.join().expect("connection thread panicked").is_ok());
    }

    #[test]
    fn oversized_params_are_rejected() {
        let big = vec![b'v'; 2000];
        let mut split = begin(1, 1, false);
        let encoded = pairs(&[(b"A", &big[..600]), (b"B", &big[..600])]);
        for chunk in encoded.chunks(300) {
            split.extend(rec(PARAMS, 1, chunk));
        }
        split.extend(rec(PARAMS, 1, &[]));
        split.extend(rec(STDIN, 1, &[]));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("one large record", request(1, false, &[(b"BIG", &big)])),
            ("many small records", split),
        ];
        for (name, bytes) in cases {
            let (calls, handler) = no_handler_calls();
            let (mut client, conn) = spawn_conn(test_config(1024), handler);
            client.write_all(&bytes).unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            let err = conn
                .join()
                .unwrap_or_else(|_| panic!("{name}: panicked"))
                .expect_err(name);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{name}");
            assert_eq!(calls.load(Ordering::SeqCst), 0, "{name}");
            assert!(rest.is_empty(), "{name}");
        }

        // Just below the limit is accepted.
        let (calls, handler) = no_handler_calls();
        let (mut client, conn) = spawn_conn(test_config(1024), handler);
        client
            .write_all(&request(1, false, &[(b"OK", &big[..1000])]))
            .unwrap();
        let records = read_response(&mut client);
        assert_eq!(records.last().unwrap().0, END_REQUEST);
        drop(client);
        assert!(conn.join().unwrap().is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn large_stdout_write_uses_full_records() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = body.clone();
        let handler = move |mut req: Request| {
            req.stdout().write_all(&body).unwrap();
            req.exit(3);
        };
        let (mut client, conn) = spawn_conn(test_config(1024), handler);
        client.write_all(&request(9, false, &[])).unwrap();
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).unwrap();
        assert!(conn.join().unwrap().is_ok());

        // Every record is padded to a multiple of 8 bytes.
        let mut pos = 0;
        while pos < raw.len() {
            let len = usize::from(u16::from_be_bytes([raw[pos + 4], raw[pos + 5]]));
            let total = HEADER_LEN + len + usize::from(raw[pos + 6]);
            assert_eq!(total % 8, 0);
            pos += total;
        }
        assert_eq!(pos, raw.len());

        let records = read_response(&mut &raw[..]);
        let lengths: Vec<(u8, usize)> = records.iter().map(|r| (r.0, r.2.len())).collect();
        assert_eq!(
            lengths,
            vec![
                (STDOUT, 65535),
                (STDOUT, 65535),
                (STDOUT, 65535),
                (STDOUT, 200_000 - 3 * 65535),
                (STDOUT, 0),
                (STDERR, 0),
                (END_REQUEST, 8),
            ]
        );
        assert!(records.iter().all(|r| r.1 == 9));
        assert_eq!(stream_of(&records, STDOUT), expected);
        assert_eq!(
            records[6].2,
            end_request_body(3, ProtocolStatus::RequestComplete)
        );
    }

    #[test]
    fn management_records_and_unknown_roles() {
        let (calls, handler) = no_handler_calls();
        let (mut client, conn) = spawn_conn(test_config(1024), handler);
        let query = pairs(&[
            (b"FCGI_MAX_CONNS", b""),
            (b"FCGI_MAX_REQS", b""),
            (b"FCGI_MPXS_CONNS", b""),
            (b"FCGI_MAX_CONNS", b""),
            (b"SOMETHING_ELSE", b""),
        ]);
        client.write_all(&rec(GET_VALUES, 0, &query)).unwrap();
        let (t, id, content) = read_record(&mut client).unwrap().unwrap();
        assert_eq!((t, id), (GET_VALUES_RESULT, 0));
        let values = read_pairs(&content).unwrap();
        let expected: Vec<(String, String)> = vec![
            ("FCGI_MAX_CONNS".into(), "4".into()),
            ("FCGI_MAX_REQS".into(), "4".into()),
            ("FCGI_MPXS_CONNS".into(), "0".into()),
        ];
        assert_eq!(values, expected);

        // Unknown record types are answered with UNKNOWN_TYPE.
        client.write_all(&rec(200, 0, b"?")).unwrap();
        let (t, _, content) = read_record(&mut client).unwrap().unwrap();
        assert_eq!((t, content[0]), (UNKNOWN_TYPE, 200));

        // An unknown role is refused, and the connection stays usable.
        client.write_all(&begin(5, 99, true)).unwrap();
        let (t, id, content) = read_record(&mut client).unwrap().unwrap();
        assert_eq!((t, id), (END_REQUEST, 5));
        assert_eq!(content, end_request_body(0, ProtocolStatus::UnknownRole));

        // Records with padding from the peer are read correctly.
        let mut padded = begin(6, 1, false);
        let params = pairs(&[(b"K", b"V")]);
        padded.extend_from_slice(&[VERSION_1, PARAMS, 0, 6, 0, params.len() as u8, 5, 0]);
        padded.extend_from_slice(&params);
        padded.extend_from_slice(&[0xAA; 5]);
        padded.extend(rec(PARAMS, 6, &[]));
        padded.extend(rec(STDIN, 6, &[]));
        client.write_all(&padded).unwrap();
        let records = read_response(&mut client);
        assert_eq!(records.last().unwrap().0, END_REQUEST);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(client);
        assert!(conn.join().unwrap().is_ok());

        // The unbounded entry points report the historical values.
        let unbounded = Config::unbounded();
        let keys = vec!["FCGI_MAX_CONNS".to_owned(), "FCGI_MPXS_CONNS".to_owned()];
        assert_eq!(
            get_values(keys, &unbounded),
            vec![
                ("FCGI_MAX_CONNS".to_owned(), "1".to_owned()),
                ("FCGI_MPXS_CONNS".to_owned(), "0".to_owned()),
            ]
        );
    }

    #[test]
    fn name_value_lengths_round_trip() {
        let long_name = vec![b'n'; 200];
        let long_value = vec![b'v'; 70_000];
        let encoded = pairs(&[(&long_name, b"short"), (b"k", &long_value)]);
        let decoded = read_pairs(&encoded).unwrap();
        assert_eq!(decoded[0].0.len(), 200);
        assert_eq!(decoded[1].1.len(), 70_000);
        assert_eq!(&encoded[..4], &[0x80, 0, 0, 200]);
    }

    #[test]
    fn slot_is_released_when_connection_thread_panics() {
        let counter = Arc::new(Slots::default());
        let slot = Slot::acquire(&counter, 1).unwrap();
        assert!(Slot::acquire(&counter, 1).is_none());
        let result = thread::spawn(move || {
            let _slot = slot;
            panic!("handler failure (expected by this test)");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(counter.used.load(Ordering::SeqCst), 0);
        assert!(Slot::acquire(&counter, 1).is_some());
    }

    #[test]
    fn accept_errors_back_off_instead_of_panicking() {
        let emfile = accept_backoff(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(emfile.log);
        assert!(emfile.pause.unwrap() >= Duration::from_millis(50));
        let aborted = accept_backoff(&io::Error::from_raw_os_error(libc::ECONNABORTED));
        assert!(aborted.log);
        assert!(aborted.pause.is_none());
        let eintr = accept_backoff(&io::Error::from_raw_os_error(libc::EINTR));
        assert!(!eintr.log);
        assert!(eintr.pause.is_none());
    }

    #[test]
    fn refused_connection_that_sends_nothing_is_dropped() {
        let (client, server) = UnixStream::pair().unwrap();
        let sock = Socket::from_raw_fd(server.into_raw_fd());
        let cfg = Config::bounded(Limits::default());
        let start = Instant::now();
        let err = shed_connection(sock, &cfg).expect_err("silent peer");
        assert!(is_timeout(&err), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(client);
    }

    #[test]
    fn connection_threads_never_exceed_the_slots() {
        // Many short connections, one after the other and at once: each
        // is served, and there are never more threads than slots, however
        // fast connections end and new ones come.
        let cfg = Arc::new(Config::bounded(Limits {
            max_connections: 3,
            read_timeout: Some(WAIT),
            ..Limits::default()
        }));
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let pool = Pool::new(
            Arc::new(move |mut req: Request| {
                counter.fetch_add(1, Ordering::SeqCst);
                req.stdout().write_all(b"Status: 200 OK\r\n\r\nok").unwrap();
            }),
            cfg,
            3,
        );
        for _ in 0..200 {
            let (mut client, server) = UnixStream::pair().unwrap();
            client.set_read_timeout(Some(WAIT)).unwrap();
            client.write_all(&request(1, false, &[])).unwrap();
            let mut sock = Socket::from_raw_fd(server.into_raw_fd());
            loop {
                sock = match pool.dispatch(sock) {
                    Ok(()) => break,
                    Err(sock) => sock,
                };
                pool.active.wait(Duration::from_millis(5));
            }
            assert!(pool.workers.load(Ordering::SeqCst) <= 3);
            let records = read_response(&mut client);
            assert_eq!(stream_of(&records, STDOUT), b"Status: 200 OK\r\n\r\nok");
        }
        assert_eq!(served.load(Ordering::SeqCst), 200);
        assert_eq!(pool.workers.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_connection_waits_for_a_slot_freed_soon() {
        // One slot, held by a handler for 300 ms: the next connection is
        // served after it, not refused.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            read_timeout: Some(WAIT),
            ..Limits::default()
        };
        thread::spawn(move || {
            let fd = listener.as_raw_fd();
            run_raw_with(
                |mut req| {
                    thread::sleep(Duration::from_millis(300));
                    req.stdout().write_all(b"Status: 200 OK\r\n\r\nok").unwrap();
                },
                fd,
                limits,
            );
            drop(listener);
        });
        let conns: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.write_all(&request(1, false, &[])).unwrap();
                s
            })
            .collect();
        for mut s in conns {
            let records = read_response(&mut s);
            assert_eq!(stream_of(&records, STDOUT), b"Status: 200 OK\r\n\r\nok");
            // Closed once answered, as a web server does.
        }
    }

    #[test]
    fn overload_answers_with_the_overload_response() {
        const OVERLOAD: &[u8] = b"Status: 503 Service Unavailable\r\n\
Retry-After: 5\r\nContent-Type: text/plain\r\n\r\ntest: overloaded, retry later\n";
        const OK: &[u8] = b"Status: 200 OK\r\n\r\nok";
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let handler_gate = gate.clone();
        let limits = Limits {
            max_connections: 2,
            overload_response: OVERLOAD.to_vec(),
            read_timeout: Some(WAIT),
            max_params_bytes: 4096,
        };
        thread::spawn(move || {
            let fd = listener.as_raw_fd();
            run_raw_with(
                move |mut req| {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    let (open, cv) = &*handler_gate;
                    let mut open = open.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                    drop(open);
                    req.stdout().write_all(OK).unwrap();
                },
                fd,
                limits,
            );
            drop(listener);
        });

        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        };
        // Occupy both slots with handlers that block.
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut s = connect();
            s.write_all(&request(1, false, &[])).unwrap();
            entered_rx.recv_timeout(WAIT).unwrap();
            busy.push(s);
        }

        // One more connection gets the overload response.
        let mut extra = connect();
        extra.write_all(&request(7, true, &[(b"X", b"y")])).unwrap();
        let records = read_response(&mut extra);
        assert_eq!(stream_of(&records, STDOUT), OVERLOAD);
        assert!(records.iter().all(|r| r.1 == 7));
        assert!(records.iter().any(|r| r.0 == STDOUT && r.2.is_empty()));
        let end = records.last().unwrap();
        assert_eq!(end.0, END_REQUEST);
        assert_eq!(end.2, end_request_body(0, ProtocolStatus::RequestComplete));
        assert!(read_record(&mut extra).unwrap().is_none(), "not closed");
        drop(extra);

        // Release the blocked handlers; they answer normally.
        {
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
        for mut s in busy {
            let records = read_response(&mut s);
            assert_eq!(stream_of(&records, STDOUT), OK);
        }

        // Once those connections are closed, their slots serve new requests.
        let deadline = Instant::now() + WAIT;
        loop {
            let mut s = connect();
            s.write_all(&request(1, false, &[])).unwrap();
            if stream_of(&read_response(&mut s), STDOUT) == OK {
                break;
            }
            assert!(Instant::now() < deadline, "slots were not released");
            thread::sleep(Duration::from_millis(50));
        }
    }
}
