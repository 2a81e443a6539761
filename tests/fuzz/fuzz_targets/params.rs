//! Query and form parsing (`Params::parse`) on arbitrary bytes: never a
//! panic; whatever is accepted is bounded, free of control characters (tab
//! aside) and, encoded again, parses to the same pairs.
#![no_main]

use kiwispray::api::{Params, MAX_PARAMS, MAX_QUERY};
use kiwispray::render::percent_encode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Params::parse(data, "query") else {
        return;
    };
    assert!(p.len() <= MAX_PARAMS);
    for (k, v) in p.iter() {
        for s in [k, v] {
            // A `String` is valid UTF-8 by construction; check the bytes
            // anyway, in case the parser ever builds one unchecked.
            assert!(std::str::from_utf8(s.as_bytes()).is_ok());
            assert!(
                !s.chars().any(|c| c.is_control() && c != '\t'),
                "control character accepted: {s:?}"
            );
        }
    }
    let again: Vec<String> =
        p.iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
    let again = again.join("&");
    // Encoding may lengthen a query (a raw byte becomes %XX); one that
    // then exceeds the limit is refused for its length, as it should be.
    if again.len() > MAX_QUERY {
        return;
    }
    let q = Params::parse(again.as_bytes(), "query")
        .unwrap_or_else(|e| panic!("re-encoded parameters do not parse: {e}"));
    let nonempty = |p: &Params| -> Vec<(String, String)> {
        p.iter()
            .filter(|(k, v)| !(k.is_empty() && v.is_empty()))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(nonempty(&p), nonempty(&q));
});
