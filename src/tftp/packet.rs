//! TFTP packets as pure values: parsing of what clients send (RRQ, WRQ,
//! ACK, ERROR and the rest, with RFC 2347 options), the negotiation of the
//! options this server knows (RFC 2348 `blksize`, RFC 2349 `tsize` and
//! `timeout`), and the encoding of what the server sends (DATA, OACK,
//! ERROR). No I/O here; every input, however malformed, gives an `Err`
//! with a reason, never a panic.

/// Opcodes (RFC 1350, RFC 2347).
pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

/// Error codes (RFC 1350, RFC 2347).
pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;
pub const ERR_OPTIONS: u16 = 8;

/// The longest file name accepted in a request.
pub const MAX_FILENAME: usize = 512;
/// The block size without options (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// The block sizes RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;
/// The most options accepted in one request.
const MAX_OPTIONS: usize = 16;

/// A read (or write) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    /// The transfer mode, lowercased (`octet`, `netascii`, `mail`).
    pub mode: String,
    /// The options in the order sent, names lowercased.
    pub options: Vec<(String, String)>,
}

/// A packet as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Read(Request),
    Write(Request),
    Data { block: u16, len: usize },
    Ack(u16),
    Error { code: u16, message: String },
    Oack,
}

/// Parses one packet. The reason in an `Err` is one line meant for an
/// ERROR packet and the log.
pub fn parse(buf: &[u8]) -> Result<Packet, String> {
    if buf.len() < 2 {
        return Err("packet shorter than an opcode".into());
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    let rest = &buf[2..];
    match op {
        RRQ | WRQ => {
            let req = parse_request(rest)?;
            Ok(if op == RRQ {
                Packet::Read(req)
            } else {
                Packet::Write(req)
            })
        }
        DATA => {
            if rest.len() < 2 {
                return Err("DATA packet without a block number".into());
            }
            Ok(Packet::Data {
                block: u16::from_be_bytes([rest[0], rest[1]]),
                len: rest.len() - 2,
            })
        }
        ACK => {
            if rest.len() < 2 {
                return Err("ACK packet without a block number".into());
            }
            Ok(Packet::Ack(u16::from_be_bytes([rest[0], rest[1]])))
        }
        ERROR => {
            if rest.len() < 2 {
                return Err("ERROR packet without an error code".into());
            }
            let msg = &rest[2..];
            let msg = msg.split(|b| *b == 0).next().unwrap_or_default();
            Ok(Packet::Error {
                code: u16::from_be_bytes([rest[0], rest[1]]),
                message: printable(&String::from_utf8_lossy(msg), 200),
            })
        }
        OACK => Ok(Packet::Oack),
        other => Err(format!("unknown opcode {other}")),
    }
}

/// `filename NUL mode NUL (option NUL value NUL)*`.
fn parse_request(body: &[u8]) -> Result<Request, String> {
    if body.last() != Some(&0) {
        return Err("request does not end with a NUL byte".into());
    }
    let fields: Vec<&[u8]> = body[..body.len() - 1].split(|b| *b == 0).collect();
    if fields.len() < 2 {
        return Err("request without a mode".into());
    }
    let name = fields[0];
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.len() > MAX_FILENAME {
        return Err(format!(
            "file name is {} bytes long; at most {MAX_FILENAME} are accepted",
            name.len()
        ));
    }
    let filename = std::str::from_utf8(name)
        .map_err(|_| "file name is not UTF-8".to_string())?
        .to_string();
    if filename.chars().any(char::is_control) {
        return Err("file name contains control characters".into());
    }
    let mode = ascii_lower(fields[1], "mode")?;
    if !matches!(mode.as_str(), "octet" | "netascii" | "mail") {
        return Err(format!("unknown transfer mode {mode:?}"));
    }
    let opts = &fields[2..];
    if opts.len() % 2 != 0 {
        return Err("option without a value".into());
    }
    if opts.len() / 2 > MAX_OPTIONS {
        return Err(format!("more than {MAX_OPTIONS} options"));
    }
    let mut options: Vec<(String, String)> = Vec::new();
    for pair in opts.chunks(2) {
        let name = ascii_lower(pair[0], "option name")?;
        let value = ascii_lower(pair[1], "option value")?;
        if name.is_empty() {
            return Err("empty option name".into());
        }
        if options.iter().any(|(n, _)| *n == name) {
            return Err(format!("option {name:?} given twice"));
        }
        options.push((name, value));
    }
    Ok(Request {
        filename,
        mode,
        options,
    })
}

/// A request field that must be printable ASCII, lowercased.
fn ascii_lower(field: &[u8], what: &str) -> Result<String, String> {
    if field.len() > 64 || !field.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{what} is not short printable ASCII"));
    }
    Ok(String::from_utf8_lossy(field).to_ascii_lowercase())
}

/// What the server agreed to for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    /// Seconds between retransmissions, when the client asked.
    pub timeout: Option<u8>,
    /// Whether the client asked for the size.
    pub tsize: bool,
    /// The options to acknowledge in an OACK (empty: no OACK, plain RFC 1350).
    pub acknowledged: Vec<&'static str>,
}

/// Negotiates the known options of a read request; unknown options are
/// ignored (RFC 2347). A value outside what the RFCs allow is an `Err`
/// (answered with ERROR 8). The block size is capped by `max_blksize`.
pub fn negotiate(req: &Request, max_blksize: u16) -> Result<Negotiated, String> {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        timeout: None,
        tsize: false,
        acknowledged: Vec::new(),
    };
    for (name, value) in &req.options {
        match name.as_str() {
            "blksize" => {
                let v: u32 = number(value, name)?;
                if v < u32::from(MIN_BLKSIZE) || v > u32::from(MAX_BLKSIZE) {
                    return Err(format!(
                        "blksize {v} is outside {MIN_BLKSIZE}..{MAX_BLKSIZE}"
                    ));
                }
                n.blksize = (v as u16).min(max_blksize.max(MIN_BLKSIZE));
                n.acknowledged.push("blksize");
            }
            "timeout" => {
                let v: u32 = number(value, name)?;
                if !(1..=255).contains(&v) {
                    return Err(format!("timeout {v} is outside 1..255 seconds"));
                }
                n.timeout = Some(v as u8);
                n.acknowledged.push("timeout");
            }
            "tsize" => {
                let v: u64 = number(value, name)?;
                if v != 0 {
                    return Err("tsize in a read request must be 0".into());
                }
                n.tsize = true;
                n.acknowledged.push("tsize");
            }
            _ => {}
        }
    }
    Ok(n)
}

fn number<T: std::str::FromStr>(value: &str, name: &str) -> Result<T, String> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{name} {value:?} is not a number"));
    }
    value
        .parse()
        .map_err(|_| format!("{name} {value:?} is out of range"))
}

/// A DATA packet: the header followed by `data`.
pub fn data(block: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An OACK packet acknowledging what `n` accepted, with the file's size
/// for `tsize`.
pub fn oack(n: &Negotiated, size: u64) -> Vec<u8> {
    let mut out = OACK.to_be_bytes().to_vec();
    for name in &n.acknowledged {
        let value = match *name {
            "blksize" => n.blksize.to_string(),
            "timeout" => n.timeout.unwrap_or(1).to_string(),
            _ => size.to_string(),
        };
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// An ERROR packet; the message is made printable and cut to 200 bytes.
pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut out = ERROR.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(printable(message, 200).as_bytes());
    out.push(0);
    out
}

/// `s` without control characters, at most `max` bytes (cut at a
/// character boundary).
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut b = RRQ.to_be_bytes().to_vec();
        for p in parts {
            b.extend_from_slice(p.as_bytes());
            b.push(0);
        }
        b
    }

    #[test]
    fn read_request_with_options() {
        let p = parse(&rrq(&[
            "grub/grub.cfg",
            "OCTET",
            "BlkSize",
            "1468",
            "tsize",
            "0",
        ]))
        .unwrap();
        let Packet::Read(r) = p else {
            panic!("not a read request: {p:?}")
        };
        assert_eq!(r.filename, "grub/grub.cfg");
        assert_eq!(r.mode, "octet");
        assert_eq!(
            r.options,
            vec![
                ("blksize".to_string(), "1468".to_string()),
                ("tsize".to_string(), "0".to_string())
            ]
        );
        let n = negotiate(&r, 1468).unwrap();
        assert_eq!(n.blksize, 1468);
        assert!(n.tsize);
        assert_eq!(
            oack(&n, 4711),
            b"\x00\x06blksize\x001468\x00tsize\x004711\x00".to_vec()
        );
    }

    #[test]
    fn write_request_is_recognised() {
        let p = parse(&[&WRQ.to_be_bytes()[..], b"x\0octet\0"].concat()).unwrap();
        assert!(matches!(p, Packet::Write(_)));
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "shorter"),
            (vec![0], "shorter"),
            (vec![0, 9], "unknown opcode"),
            (b"\x00\x01file\x00octet".to_vec(), "NUL"),
            (b"\x00\x01file\x00".to_vec(), "without a mode"),
            (b"\x00\x01\x00octet\x00".to_vec(), "empty file name"),
            (b"\x00\x01f\x00binary\x00".to_vec(), "unknown transfer mode"),
            (
                b"\x00\x01f\x00octet\x00blksize\x00".to_vec(),
                "without a value",
            ),
            (b"\x00\x01f\xff\x00octet\x00".to_vec(), "UTF-8"),
            (b"\x00\x01f\x01\x00octet\x00".to_vec(), "control"),
            (
                b"\x00\x01f\x00octet\x00tsize\x000\x00TSIZE\x000\x00".to_vec(),
                "twice",
            ),
            (b"\x00\x04\x00".to_vec(), "ACK packet"),
            (b"\x00\x05\x00".to_vec(), "ERROR packet"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err();
            assert!(e.contains(want), "{bytes:?}: {e:?} lacks {want:?}");
        }
        let long = "a".repeat(MAX_FILENAME + 1);
        assert!(parse(&rrq(&[&long, "octet"]))
            .unwrap_err()
            .contains("at most 512"));
        assert!(parse(&rrq(&[&"a".repeat(MAX_FILENAME), "octet"])).is_ok());
    }

    #[test]
    fn option_values_are_checked_and_capped() {
        let req = |opts: &[(&str, &str)]| Request {
            filename: "f".into(),
            mode: "octet".into(),
            options: opts
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        assert_eq!(
            negotiate(&req(&[("blksize", "65464")]), 1468)
                .unwrap()
                .blksize,
            1468
        );
        assert_eq!(
            negotiate(&req(&[("blksize", "1024")]), 1468)
                .unwrap()
                .blksize,
            1024
        );
        assert_eq!(
            negotiate(&req(&[("blksize", "8")]), 1468).unwrap().blksize,
            8
        );
        for bad in ["7", "65465", "", "12a", "99999999999999999999999"] {
            assert!(negotiate(&req(&[("blksize", bad)]), 1468).is_err(), "{bad}");
        }
        assert!(negotiate(&req(&[("timeout", "0")]), 1468).is_err());
        assert!(negotiate(&req(&[("timeout", "256")]), 1468).is_err());
        assert_eq!(
            negotiate(&req(&[("timeout", "3")]), 1468).unwrap().timeout,
            Some(3)
        );
        assert!(negotiate(&req(&[("tsize", "5")]), 1468).is_err());
        let n = negotiate(&req(&[("windowsize", "8"), ("multicast", "")]), 1468).unwrap();
        assert!(n.acknowledged.is_empty(), "unknown options are ignored");
        assert_eq!(n.blksize, 512);
    }

    #[test]
    fn encodings() {
        assert_eq!(data(1, b"ab"), b"\x00\x03\x00\x01ab".to_vec());
        assert_eq!(data(0xffff, b""), b"\x00\x03\xff\xff".to_vec());
        assert_eq!(
            error(2, "read-only\nserver"),
            b"\x00\x05\x00\x02read-onlyserver\x00".to_vec()
        );
        assert_eq!(error(0, &"é".repeat(150)).len(), 4 + 200 + 1);
        assert_eq!(parse(b"\x00\x04\x12\x34").unwrap(), Packet::Ack(0x1234));
        assert_eq!(
            parse(b"\x00\x05\x00\x08no\x00").unwrap(),
            Packet::Error {
                code: 8,
                message: "no".into()
            }
        );
    }

    #[test]
    fn no_input_panics() {
        // Every prefix and every single-byte change of a valid request.
        let base = rrq(&[
            "a/b", "octet", "blksize", "1468", "tsize", "0", "timeout", "1",
        ]);
        for i in 0..=base.len() {
            let _ = parse(&base[..i]);
            for b in [0u8, 1, 0x7f, 0xff, b'/'] {
                let mut m = base.clone();
                if i < m.len() {
                    m[i] = b;
                    if let Ok(Packet::Read(r)) = parse(&m) {
                        let _ = negotiate(&r, 1468);
                    }
                }
            }
        }
    }
}
