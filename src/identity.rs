//! Machine identity: normalising the keys a booting machine reports (MAC
//! addresses, SMBIOS serial and UUID) and deciding which of them may identify
//! it. Pure functions only; the host database applies them.
//!
//! Firmware is sloppy: serials such as `To be filled by O.E.M.` and all-zero
//! UUIDs are shared by whole batches of machines, so they never identify a
//! machine. The lists of such placeholders come from [`Placeholders`], which
//! the configuration can extend.

use std::fmt;

/// A MAC address in the database's spelling: uppercase, colon-separated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac([u8; 6]);

impl Mac {
    /// The six bytes of the address.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Parses a MAC in any usual spelling: `52:54:00:ab:cd:ef`,
    /// `52-54-00-AB-CD-EF`, `5254.00ab.cdef` or `525400abcdef`.
    /// The all-zero, broadcast and multicast addresses are not machine
    /// identities and are rejected.
    pub fn parse(text: &str) -> Result<Mac, String> {
        let text = text.trim();
        let bad = || format!("invalid MAC address {:?}", shorten(text));
        let bytes = text.as_bytes();
        let separator = |i: usize| match bytes.len() {
            12 => false,
            14 => i % 5 == 4,
            17 => i % 3 == 2,
            _ => true,
        };
        let sep = match bytes.len() {
            12 => 0,
            14 => b'.',
            17 if matches!(bytes[2], b':' | b'-') => bytes[2],
            _ => return Err(bad()),
        };
        let mut mac = [0u8; 6];
        let mut digits = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if separator(i) {
                if b != sep {
                    return Err(bad());
                }
                continue;
            }
            let nibble = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return Err(bad()),
            };
            mac[digits / 2] = mac[digits / 2] << 4 | nibble;
            digits += 1;
        }
        if digits != 12 {
            return Err(bad());
        }
        if mac == [0; 6] || mac == [0xff; 6] {
            return Err(format!(
                "MAC address {} is not a machine's address",
                Mac(mac)
            ));
        }
        if mac[0] & 1 == 1 {
            return Err(format!("MAC address {} is a multicast address", Mac(mac)));
        }
        Ok(Mac(mac))
    }

    /// The `52-54-00-ab-cd-ef` spelling iPXE's `${mac:hexhyp}` produces.
    pub fn hexhyp(&self) -> String {
        let m = self.0;
        format!(
            "{:02x}-{:02x}-{:02x}-{:02x}-{:02x}-{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        Mac::parse(s)
    }
}

/// Parses the database's `macs` field: MACs separated by spaces (commas are
/// tolerated). Entries that do not parse are returned separately so that a
/// caller can report them instead of silently dropping them.
pub fn parse_mac_list(text: &str) -> (Vec<Mac>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',') {
        if word.is_empty() {
            continue;
        }
        match Mac::parse(word) {
            Ok(mac) => {
                if !good.contains(&mac) {
                    good.push(mac)
                }
            }
            Err(_) => bad.push(word.to_string()),
        }
    }
    (good, bad)
}

/// Formats MACs the way the database stores them.
pub fn format_mac_list(macs: &[Mac]) -> String {
    macs.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Serial numbers and UUIDs that firmware vendors ship unchanged on many
/// machines. Comparison ignores case and surrounding blanks.
#[derive(Debug, Clone)]
pub struct Placeholders {
    serials: Vec<String>,
    uuids: Vec<String>,
}

/// Serials seen on many machines at once.
pub const DEFAULT_PLACEHOLDER_SERIALS: &[&str] = &[
    "",
    "To be filled by O.E.M.",
    "To Be Filled By O.E.M.",
    "Default string",
    "System Serial Number",
    "Chassis Serial Number",
    "Base Board Serial Number",
    "0123456789",
    "123456789",
    "1234567890",
    "Not Specified",
    "Not Applicable",
    "None",
    "N/A",
    "NA",
    "Unknown",
    "Serial",
    "SerNum",
    "OEM",
    "Invalid",
];

/// UUIDs seen on many machines at once (besides all-zero and all-F, which
/// are always placeholders).
pub const DEFAULT_PLACEHOLDER_UUIDS: &[&str] = &[
    "03000200-0400-0500-0006-000700080009",
    "00020003-0004-0005-0006-000700080009",
    "01234567-8901-2345-6789-012345678901",
];

impl Default for Placeholders {
    fn default() -> Self {
        Placeholders::new(
            DEFAULT_PLACEHOLDER_SERIALS.iter().map(|s| s.to_string()),
            DEFAULT_PLACEHOLDER_UUIDS.iter().map(|s| s.to_string()),
        )
    }
}

impl Placeholders {
    pub fn new(
        serials: impl IntoIterator<Item = String>,
        uuids: impl IntoIterator<Item = String>,
    ) -> Self {
        Placeholders {
            serials: serials
                .into_iter()
                .map(|s| s.trim().to_lowercase())
                .collect(),
            uuids: uuids.into_iter().map(|s| s.trim().to_lowercase()).collect(),
        }
    }

    /// The serial as an identity key, or `None` if it cannot identify a
    /// machine (empty, a known placeholder, or one repeated character such
    /// as `00000000` or `XXXXXXXX`).
    pub fn serial_key(&self, serial: &str) -> Option<String> {
        let trimmed = serial.trim();
        if trimmed.is_empty() {
            return None;
        }
        let placeholder = if trimmed.is_ascii() {
            self.serials.iter().any(|p| p.eq_ignore_ascii_case(trimmed))
        } else {
            self.serials.contains(&trimmed.to_lowercase())
        };
        if placeholder {
            return None;
        }
        let mut chars = trimmed
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase);
        if let Some(first) = chars.next() {
            if chars.all(|c| c == first) {
                return None;
            }
        }
        Some(trimmed.to_string())
    }

    /// The UUID as an identity key (lowercase, hyphenated), or `None` if it
    /// is malformed or a placeholder.
    pub fn uuid_key(&self, uuid: &str) -> Option<String> {
        let canonical = canonical_uuid(uuid)?;
        let mut hex = canonical.bytes().filter(|b| *b != b'-');
        let first = hex.next()?;
        if matches!(first, b'0' | b'f') && hex.all(|b| b == first) {
            return None;
        }
        if self.uuids.contains(&canonical) {
            return None;
        }
        Some(canonical)
    }
}

/// A UUID in lowercase hyphenated form, accepting upper case, braces and a
/// missing-hyphen spelling. `None` when it is not 32 hex digits.
pub fn canonical_uuid(text: &str) -> Option<String> {
    let text = text.trim().trim_start_matches('{').trim_end_matches('}');
    let hyphens = text.contains('-');
    if hyphens {
        let mut groups = text.split('-').map(str::len);
        if !groups.by_ref().eq([8, 4, 4, 4, 12]) {
            return None;
        }
    }
    let mut out = String::with_capacity(36);
    let mut digits = 0;
    for b in text.bytes() {
        if b == b'-' {
            continue;
        }
        if !b.is_ascii_hexdigit() || digits == 32 {
            return None;
        }
        if matches!(digits, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(b.to_ascii_lowercase() as char);
        digits += 1;
    }
    (digits == 32).then_some(out)
}

fn shorten(text: &str) -> String {
    if text.chars().count() > 40 {
        let mut s: String = text.chars().take(40).collect();
        s.push('…');
        s
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_spellings_normalise() {
        for s in [
            "52:54:00:ab:cd:ef",
            "52-54-00-AB-CD-EF",
            "525400abcdef",
            "5254.00ab.cdef",
            " 52:54:00:AB:cd:EF ",
        ] {
            assert_eq!(
                Mac::parse(s).unwrap().to_string(),
                "52:54:00:AB:CD:EF",
                "{s}"
            );
        }
        assert_eq!(
            Mac::parse("52:54:00:ab:cd:ef").unwrap().hexhyp(),
            "52-54-00-ab-cd-ef"
        );
    }

    #[test]
    fn bad_macs_rejected() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:eg",
            "52:54-00:ab:cd:ef",
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "52:54:00:ab:cd:ef:01",
            "5254:00ab:cdef",
            "ü2:54:00:ab:cd:ef",
        ] {
            assert!(Mac::parse(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn mac_list_round_trip() {
        let (good, bad) =
            parse_mac_list("52:54:00:00:00:01  52-54-00-00-00-02,bogus 52:54:00:00:00:01");
        assert_eq!(
            format_mac_list(&good),
            "52:54:00:00:00:01 52:54:00:00:00:02"
        );
        assert_eq!(bad, vec!["bogus".to_string()]);
    }

    #[test]
    fn placeholder_serials_do_not_identify() {
        let p = Placeholders::default();
        for s in [
            "",
            "  ",
            "To be filled by O.E.M.",
            "default STRING",
            "0000000",
            "XXXXXX",
            "0123456789",
        ] {
            assert_eq!(p.serial_key(s), None, "{s:?}");
        }
        assert_eq!(p.serial_key("SN 1234#5").as_deref(), Some("SN 1234#5"));
        let custom = Placeholders::new(vec!["ACME-0".to_string()], vec![]);
        assert_eq!(custom.serial_key("acme-0"), None);
    }

    #[test]
    fn uuids_canonicalise_and_placeholders_drop() {
        let p = Placeholders::default();
        assert_eq!(
            p.uuid_key("{4C4C4544-0042-3510-8052-B4C04F384A32}")
                .as_deref(),
            Some("4c4c4544-0042-3510-8052-b4c04f384a32")
        );
        assert_eq!(
            p.uuid_key("4c4c454400423510 8052b4c04f384a32"),
            None,
            "blanks are not allowed"
        );
        assert_eq!(p.uuid_key("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(p.uuid_key("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"), None);
        assert_eq!(p.uuid_key("03000200-0400-0500-0006-000700080009"), None);
        assert_eq!(p.uuid_key("not-a-uuid"), None);
    }
}
