#![no_main]
//! Arbitrary bytes decoded as a saved machine state (vCPUs, interrupt
//! controllers, devices): refused with an error or decoded into a state
//! that encodes and decodes to itself; the virtio queues it carries can be
//! rebuilt without a panic.

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::queue::VirtQueue;
use vmm::MachineState;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = MachineState::from_bytes(data) else {
        return;
    };
    let bytes = state.to_bytes();
    let again = MachineState::from_bytes(&bytes).expect("a decoded state re-decodes");
    assert_eq!(again.to_bytes(), bytes);
    for dev in &state.virtio {
        let q = VirtQueue::restore(&dev.queue);
        let _ = q.save();
    }
});
