//! Image references (`reference::parse`): what a client names in a deploy or on the command
//! line, hostile to the service. Also the tag check on its own and `Digest`'s parser.
//!
//! Invariant: a registry reference prints (`Display`) as a string that parses back to it.
#![no_main]

use fnvm_rootfs_builder::digest::Digest;
use fnvm_rootfs_builder::reference::{self, ImageReference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = reference::is_valid_tag(s);
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(
            d.to_string().parse::<Digest>().expect("digest round trip"),
            d
        );
    }
    if let Ok(r) = reference::parse(s) {
        if let ImageReference::Registry(reg) = &r {
            let _ = reg.manifest_ref();
            let _ = reg.api_host();
            let printed = r.to_string();
            let back = reference::parse(&printed)
                .unwrap_or_else(|e| panic!("{printed:?} (from {s:?}) does not parse: {e}"));
            assert_eq!(back, r, "{printed:?} from {s:?}");
        }
    }
});
