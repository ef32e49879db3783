#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nanobot_fuzzing::device_datagram(data));
