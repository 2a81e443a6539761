//! Property tests with random input from a fixed-seed generator: query and
//! form parsing, MAC/serial/UUID normalisation, template parsing and
//! rendering, shell quoting and database loading must never panic, and
//! what they accept must round-trip.
//!
//! `make test` runs a short pass. For a longer run set the number of
//! iterations and, to explore new input, the seed:
//!
//! ```sh
//! KIWISPRAY_FUZZ_ITERS=1000000 KIWISPRAY_FUZZ_SEED=$RANDOM \
//!     cargo test --release --test reliability_fuzz
//! ```
//!
//! A failure prints the seed and the input, so it can be repeated.

use kiwispray::api::{Params, MAX_PARAMS};
use kiwispray::hosts::Database;
use kiwispray::identity::{canonical_uuid, format_mac_list, parse_mac_list, Mac, Placeholders};
use kiwispray::render::{percent_encode, shell_quote, Template};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn iterations(default: u64) -> u64 {
    std::env::var("KIWISPRAY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("KIWISPRAY_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c0ff_ee15_bad5)
        | 1
}

/// xorshift64*: small, fast, repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// Bytes drawn mostly from `alphabet`, sometimes anything.
    fn bytes(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n)
            .map(|_| {
                if self.below(16) == 0 {
                    self.next() as u8
                } else {
                    *self.pick(alphabet)
                }
            })
            .collect()
    }
    fn text(&mut self, alphabet: &[u8], max: usize) -> String {
        String::from_utf8_lossy(&self.bytes(alphabet, max)).into_owned()
    }
}

#[test]
fn params_parse_never_panics_and_round_trips() {
    let mut rng = Rng(seed());
    let alphabet = b"ab=&%+0123456789fFzZ \t-_.~\x00\xff\xc3\xa9";
    for _ in 0..iterations(20_000) {
        let raw = rng.bytes(alphabet, 120);
        let Ok(p) = Params::parse(&raw, "query") else {
            continue;
        };
        assert!(p.len() <= MAX_PARAMS, "{raw:?}");
        for (k, v) in p.iter() {
            for s in [k, v] {
                assert!(
                    !s.chars().any(|c| c.is_control() && c != '\t'),
                    "control character accepted from {raw:?}"
                );
            }
        }
        // What was accepted, encoded again, parses to the same pairs.
        let again: Vec<String> = p
            .iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        let q = Params::parse(again.join("&").as_bytes(), "query").unwrap();
        let nonempty: Vec<_> = p
            .iter()
            .filter(|(k, v)| !(k.is_empty() && v.is_empty()))
            .collect();
        let q_nonempty: Vec<_> = q
            .iter()
            .filter(|(k, v)| !(k.is_empty() && v.is_empty()))
            .collect();
        assert_eq!(nonempty, q_nonempty, "{raw:?}");
    }
    // Too many parameters and too long input are refused, not truncated.
    let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("k{i}=v")).collect();
    assert!(Params::parse(many.join("&").as_bytes(), "query").is_err());
    assert!(Params::parse(&vec![b'a'; 64 * 1024], "query").is_err());
}

#[test]
fn mac_parsing_never_panics_and_round_trips() {
    let mut rng = Rng(seed() ^ 1);
    for _ in 0..iterations(20_000) {
        let raw = rng.text(b"0123456789abcdefABCDEF:-. gx", 20);
        if let Ok(mac) = Mac::parse(&raw) {
            assert_eq!(Mac::parse(&mac.to_string()), Ok(mac), "{raw:?}");
            assert_eq!(Mac::parse(&mac.hexhyp()), Ok(mac), "{raw:?}");
            let s = mac.to_string();
            assert!(s.len() == 17 && !s.bytes().any(|b| b.is_ascii_lowercase()));
        }
        let (good, _bad) = parse_mac_list(&raw);
        assert_eq!(parse_mac_list(&format_mac_list(&good)).0, good, "{raw:?}");
        // Every real MAC in any usual spelling parses to itself.
        let b: Vec<u8> = (0..6).map(|_| rng.next() as u8).collect();
        let b0 = b[0] & 0xfe | 0x02;
        let spellings = [
            format!(
                "{b0:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                b[1], b[2], b[3], b[4], b[5]
            ),
            format!(
                "{b0:02X}-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}",
                b[1], b[2], b[3], b[4], b[5]
            ),
            format!(
                "{b0:02x}{:02x}.{:02x}{:02x}.{:02x}{:02x}",
                b[1], b[2], b[3], b[4], b[5]
            ),
            format!(
                "{b0:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                b[1], b[2], b[3], b[4], b[5]
            ),
        ];
        let first = Mac::parse(&spellings[0]).expect("a unicast MAC parses");
        for s in &spellings[1..] {
            assert_eq!(Mac::parse(s), Ok(first), "{s}");
        }
    }
}

#[test]
fn serial_and_uuid_normalisation_never_panics() {
    let mut rng = Rng(seed() ^ 2);
    let placeholders = Placeholders::default();
    for _ in 0..iterations(20_000) {
        let raw = rng.text(b"0123456789abcdefABCDEF-{} Oo.\t", 40);
        if let Some(u) = canonical_uuid(&raw) {
            assert_eq!(u.len(), 36, "{raw:?}");
            assert!(!u.bytes().any(|b| b.is_ascii_uppercase()));
            assert_eq!(canonical_uuid(&u).as_deref(), Some(u.as_str()), "{raw:?}");
            if let Some(k) = placeholders.uuid_key(&raw) {
                assert_eq!(k, u);
            }
        }
        if let Some(k) = placeholders.serial_key(&raw) {
            assert_eq!(k, k.trim(), "{raw:?}");
            assert!(!k.is_empty());
        }
    }
    for junk in [
        "To be filled by O.E.M.",
        "Default string",
        "0123456789",
        "",
        "   ",
    ] {
        assert_eq!(placeholders.serial_key(junk), None, "{junk:?}");
    }
    for junk in [
        "00000000-0000-0000-0000-000000000000",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
    ] {
        assert_eq!(placeholders.uuid_key(junk), None, "{junk:?}");
    }
}

#[test]
fn templates_parse_and_render_never_panic() {
    let mut rng = Rng(seed() ^ 3);
    let ctx = json!({
        "id": 7, "hostname": "h'o\"st", "state": "image1",
        "metadata": { "a": { "b": "c{d}" }, "n": null, "list": [1, 2], "q": "x'y" },
    });
    for _ in 0..iterations(5_000) {
        let tails = [
            "",
            "@id@",
            "@metadata.a.b|shell@",
            "@hostname|url@",
            "@metadata|json@",
        ];
        let text = rng.text(b"@|.abnmqhostd{}\\$ \n'\"", 60) + *rng.pick(&tails);
        let Ok(t) = Template::parse(Path::new("fuzz.tmpl"), &text) else {
            continue;
        };
        let out = t.render(&ctx).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        if !text.contains('@') {
            assert_eq!(out, text, "text without placeholders is not kept as it is");
        }
    }
    // Values are inserted verbatim (never HTML-escaped).
    let t = Template::parse(Path::new("t"), "@metadata.a.b@ @hostname@").unwrap();
    assert_eq!(t.render(&ctx).unwrap(), "c{d} h'o\"st");
}

/// Found by the loop above: a text run ending in two backslashes came out
/// as `{ v.0 | raw }`, because only one trailing backslash was moved out
/// of tinytemplate's way (render.rs).
#[test]
fn regression_text_ending_in_two_backslashes_is_kept() {
    for text in ["a\\\\", "a\\\\@id@", "\\\\\\"] {
        let t = Template::parse(Path::new("t"), text).unwrap();
        let want = text.replace("@id@", "7");
        assert_eq!(t.render(&json!({ "id": 7 })).unwrap(), want, "{text:?}");
    }
}

/// `@x|shell@` yields one shell word equal to the value, for any value.
#[test]
fn shell_quote_is_one_word_for_any_value() {
    let mut rng = Rng(seed() ^ 4);
    let mut script = String::from("set -e\n");
    let mut values = Vec::new();
    for _ in 0..iterations(300).min(2_000) {
        let v = rng
            .text(b"a '\"$`\\;&|(){}*?~#!\n\t<>", 30)
            .replace('\0', "");
        script.push_str(&format!("v={}\nprintf '%s\\0' \"$v\"\n", shell_quote(&v)));
        values.push(v);
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = out
        .stdout
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(&got[..values.len()], &values[..]);
}

fn sample_db_text(rng: &mut Rng) -> String {
    let hosts: Vec<Value> = (1..=rng.below(6) as u64 + 1)
        .map(|id| {
            json!({
                "id": id,
                "macs": format!("52:54:00:00:00:{id:02X}"),
                "serial": format!("S{id}"),
                "uuid": "",
                "hostname": "not-set",
                "state": *rng.pick(&["new", "finished", "image1", "discover,new"]),
                "metadata": { "k": id, "nested": { "x": "y" } },
                "bootid": null,
                "rack": "R1"
            })
        })
        .collect();
    serde_json::to_string_pretty(&hosts).unwrap()
}

/// Mutated and truncated databases: parse or report a position, never
/// panic; what parses is written back and parses to the same hosts.
#[test]
fn database_loading_never_panics_and_round_trips() {
    let mut rng = Rng(seed() ^ 5);
    let placeholders = Arc::new(Placeholders::default());
    for _ in 0..iterations(5_000) {
        let mut bytes = sample_db_text(&mut rng).into_bytes();
        match rng.below(4) {
            0 => bytes.truncate(rng.below(bytes.len() + 1)),
            1 => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(bytes.len());
                    bytes[i] = *rng.pick(b"{}[]\",:0 \x00\xffnull");
                }
            }
            2 => {
                let i = rng.below(bytes.len());
                let extra = rng.bytes(b"{}[]\",:01 idmacs", 12);
                bytes.splice(i..i, extra);
            }
            _ => {}
        }
        match Database::parse(&bytes, placeholders.clone()) {
            Ok(db) => {
                let text = db.to_json();
                let again = Database::parse(text.as_bytes(), placeholders.clone())
                    .unwrap_or_else(|e| panic!("written database does not parse: {e:?}\n{text}"));
                assert_eq!(again.len(), db.len());
                for h in db.hosts() {
                    assert_eq!(again.get(h.id), Some(h));
                }
                let mut streamed = Vec::new();
                db.write_json(&mut streamed).unwrap();
                assert_eq!(streamed, text.as_bytes());
            }
            Err(e) => {
                assert!(e.line >= 1, "{e:?}");
                assert!(!e.message.is_empty());
            }
        }
    }
}
