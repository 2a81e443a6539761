//! MAC, serial and UUID normalisation on arbitrary strings: never a panic;
//! accepted MACs round-trip through their database and iPXE spellings, MAC
//! lists through `format_mac_list`, and canonical UUIDs are fixed points.
#![no_main]

use kiwispray::identity::{canonical_uuid, format_mac_list, parse_mac_list, Mac, Placeholders};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn placeholders() -> &'static Placeholders {
    static P: OnceLock<Placeholders> = OnceLock::new();
    P.get_or_init(Placeholders::default)
}

fuzz_target!(|text: &str| {
    if let Ok(mac) = Mac::parse(text) {
        let s = mac.to_string();
        assert_eq!(s.len(), 17);
        assert!(!s.bytes().any(|b| b.is_ascii_lowercase()));
        assert_eq!(Mac::parse(&s), Ok(mac));
        assert_eq!(s.parse::<Mac>(), Ok(mac));
        assert_eq!(Mac::parse(&mac.hexhyp()), Ok(mac));
    }

    let (good, bad) = parse_mac_list(text);
    for (i, m) in good.iter().enumerate() {
        assert!(!good[..i].contains(m), "duplicate MAC kept: {m}");
    }
    for word in &bad {
        assert!(Mac::parse(word).is_err());
    }
    let (again, again_bad) = parse_mac_list(&format_mac_list(&good));
    assert_eq!(again, good);
    assert!(again_bad.is_empty());

    let p = placeholders();
    if let Some(k) = p.serial_key(text) {
        assert!(!k.is_empty());
        assert_eq!(k, k.trim());
        assert_eq!(p.serial_key(&k).as_deref(), Some(k.as_str()));
    }
    if let Some(u) = canonical_uuid(text) {
        assert_eq!(u.len(), 36);
        assert!(!u.bytes().any(|b| b.is_ascii_uppercase()));
        assert_eq!(canonical_uuid(&u).as_deref(), Some(u.as_str()));
        if let Some(k) = p.uuid_key(text) {
            assert_eq!(k, u);
        }
    } else {
        assert_eq!(p.uuid_key(text), None);
    }
});
