#![no_main]
// Guest input, decoded as the data plane decodes it: see nvme_mdev_native::fuzzing::plane.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvme_mdev_native::fuzzing::plane(data));
