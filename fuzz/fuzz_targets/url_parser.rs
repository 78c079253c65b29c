//! Fuzz target for step 2 of the request flow: everything that reads the request line before any I/O
//! (the URL grammar, the query parser, the signature check, the `?source=` rules). None may panic, and
//! a parsed request's canonical key must parse back to the same request (equivalent URLs share one
//! cache entry, docs/urls.md).
#![no_main]

use image_server::request::{query_values, ImageRequest, Rules};
use image_server::signature;
use image_server::source::guard::{self, AddressPolicy, AllowedHosts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let rules = Rules::default();
    if let Ok(req) = ImageRequest::parse(path, &rules) {
        let key = req.cache_key(req.format);
        let again = ImageRequest::parse(&format!("/{key}"), &rules)
            .unwrap_or_else(|e| panic!("canonical key {key} does not parse: {e:?}"));
        assert_eq!(again, req, "canonical key {key} changes the request");
    }
    let _ = signature::verify("fuzzing-key-0123456789", path, query);
    let hosts = AllowedHosts::new(&["example.com".to_owned(), "203.0.113.7".to_owned()]);
    for source in query_values(query, "source") {
        if let Ok(checked) = guard::check(&source, &hosts, &AddressPolicy::public_only()) {
            // Whatever passed names an allowed host over http(s), without credentials.
            let url = checked.url();
            assert!(matches!(url.scheme(), "http" | "https"), "{url}");
            assert!(
                url.username().is_empty() && url.password().is_none(),
                "{url}"
            );
        }
    }
});
