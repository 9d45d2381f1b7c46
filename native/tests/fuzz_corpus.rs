//! The fuzz corpus (native/fuzz/corpus/TARGET/*, what `cargo fuzz` found worth keeping),
//! replayed through the same targets as ordinary tests: what once passed keeps passing.

use std::fs;
use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        run(&fs::read(&path).expect("corpus file"));
        inputs += 1;
    }
    assert!(inputs > 0, "{}: an empty corpus", dir.display());
}

#[test]
fn sqe_corpus() {
    replay("sqe", nvme_mdev_native::fuzzing::sqe);
}

#[test]
fn prp_corpus() {
    replay("prp", nvme_mdev_native::fuzzing::prp);
}

#[test]
fn sgl_corpus() {
    replay("sgl", nvme_mdev_native::fuzzing::sgl);
}

#[test]
fn plane_corpus() {
    replay("plane", nvme_mdev_native::fuzzing::plane);
}
