//! Database loading on arbitrary bytes: a parse or a positioned error,
//! never a panic; what parses is written back, parses again to the same
//! hosts, and streams to the same bytes.
#![no_main]

use kiwispray::hosts::Database;
use kiwispray::identity::Placeholders;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn placeholders() -> Arc<Placeholders> {
    static P: OnceLock<Arc<Placeholders>> = OnceLock::new();
    P.get_or_init(|| Arc::new(Placeholders::default())).clone()
}

fuzz_target!(|data: &[u8]| {
    match Database::parse(data, placeholders()) {
        Ok(db) => {
            let text = db.to_json();
            let again = Database::parse(text.as_bytes(), placeholders())
                .unwrap_or_else(|e| panic!("written database does not parse: {e:?}\n{text}"));
            assert_eq!(again.len(), db.len());
            for h in db.hosts() {
                assert_eq!(again.get(h.id).as_ref(), Some(&h));
            }
            assert_eq!(again.to_json(), text, "writing is not stable");
            let mut streamed = Vec::new();
            db.write_json(&mut streamed).expect("writing to memory");
            assert_eq!(streamed, text.as_bytes());
        }
        Err(e) => {
            assert!(e.line >= 1, "{e:?}");
            assert!(!e.message.is_empty(), "{e:?}");
        }
    }
});
