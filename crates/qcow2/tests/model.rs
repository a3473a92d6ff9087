//! Property test: random operation sequences against an in-memory model,
//! with the built-in consistency check after every step.

mod common;

use common::{pattern, CrashBackend};
use proptest::prelude::*;
use qcow2::{CreateOptions, Qcow2};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Snapshot { vm_len: usize },
    Apply(usize),
    Delete(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..SIZE, 1usize..150_000, any::<u64>()).prop_map(|(off, len, seed)| Op::Write {
            off,
            len: len.min((SIZE - off) as usize),
            seed
        }),
        2 => (0usize..200_000).prop_map(|vm_len| Op::Snapshot { vm_len }),
        1 => any::<usize>().prop_map(Op::Apply),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_model(cb in prop::sample::select(vec![9u32, 12, 16]),
                                     ops in prop::collection::vec(op(), 1..24)) {
        let be = CrashBackend::new(Vec::new(), None);
        let mut img = Qcow2::create_with(Box::new(be.clone()), SIZE,
            CreateOptions { cluster_bits: cb, ..Default::default() }, None).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut snaps: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut counter = 0;
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    // Mix in zero runs so the zero-skipping paths are exercised.
                    let mut d = pattern(len, seed);
                    if seed % 3 == 0 { d[..len / 2].fill(0); }
                    img.write_at(&d, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&d);
                }
                Op::Snapshot { vm_len } => {
                    counter += 1;
                    let name = format!("snap{counter}");
                    let vm = pattern(vm_len, counter);
                    img.write_vmstate(0, &vm).unwrap();
                    img.create_snapshot(&name, 0, vm.len() as u64).unwrap();
                    snaps.push((name, model.clone(), vm));
                }
                Op::Apply(i) if !snaps.is_empty() => {
                    let (name, m, _) = &snaps[i % snaps.len()];
                    img.apply_snapshot(name).unwrap();
                    model = m.clone();
                }
                Op::Delete(i) if !snaps.is_empty() => {
                    let (name, _, _) = snaps.remove(i % snaps.len());
                    img.delete_snapshot(&name).unwrap();
                }
                Op::Reopen => {
                    img.flush().unwrap();
                    drop(img);
                    img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
                }
                _ => {}
            }
            let rep = img.check().unwrap();
            prop_assert!(rep.is_clean(), "{:?}", rep);
        }
        prop_assert!(read_all(&mut img) == model);
        prop_assert_eq!(img.snapshots().len(), snaps.len());
        for (name, m, vm) in &snaps {
            let mut b = vec![0u8; SIZE as usize];
            img.read_snapshot_at(name, &mut b, 0).unwrap();
            prop_assert!(b == *m, "snapshot {} content", name);
            let mut v = vec![0u8; vm.len()];
            img.read_vmstate(name, 0, &mut v).unwrap();
            prop_assert!(v == *vm, "snapshot {} vmstate", name);
        }
    }
}
