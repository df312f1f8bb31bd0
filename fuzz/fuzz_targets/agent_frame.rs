//! Control-protocol frames as the guest agent reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    if let Ok(len) = berth_proto::decode_len([data[0], data[1], data[2], data[3]]) {
        let body = &data[4..data.len().min(4 + len)];
        let _ = berth_proto::decode_body::<berth_proto::Request>(body);
        let _ = berth_proto::decode_body::<berth_proto::Response>(body);
    }
});
