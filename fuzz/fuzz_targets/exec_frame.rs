//! Exec-session frames: the host's `berth shell` parses what the guest
//! sends, the agent parses what the host sends. Decoding must refuse, never
//! panic; whatever decodes must encode back to the same bytes.
#![no_main]

use berth_proto::ExecFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 5 {
        let header = [rest[0], rest[1], rest[2], rest[3], rest[4]];
        let Ok((kind, len)) = ExecFrame::decode_header(header) else {
            return;
        };
        let body = &rest[5..];
        if body.len() < len {
            return;
        }
        if let Ok(frame) = ExecFrame::decode_payload(kind, body[..len].to_vec()) {
            assert_eq!(frame.encode().unwrap(), rest[..5 + len]);
        }
        rest = &body[len..];
    }
});
