//! The PRP and SGL walkers, and the media-error table, against what the Python
//! reference (nvme/prp.py, nvme/sgl.py, nvme/media_errors.py) says for the same command
//! and guest memory, or the same errno: tests/walker_vectors.txt, made by
//! tools/walker_vectors.py (the format is described there). Every segment, status and
//! flag must match, case by case.

use nvme_mdev_native::fuzzing::memory_over;
use nvme_mdev_native::media_errors::{classify, HostFailure, StoreSize};
use nvme_mdev_native::memory::NoFallback;
use nvme_mdev_native::prp::{prp_segments, CmdResult, Segment};
use nvme_mdev_native::sgl::sgl_segments;

const BASE: u64 = 0x10_0000;
const SIZE: usize = 512 * 4096;

fn hex(field: &str) -> u64 {
    u64::from_str_radix(field, 16).unwrap_or_else(|e| panic!("{field}: {e}"))
}

fn bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| hex(&text[i..i + 2]) as u8)
        .collect()
}

/// The reference's answer in this file's notation.
fn render(result: &CmdResult<()>, segments: &[Segment]) -> String {
    match result {
        Err(e) => format!("err {:x}", e.status),
        Ok(()) => {
            let mut out = String::from("ok");
            for s in segments {
                if s.bucket {
                    out += &format!(" b+{:x}", s.len);
                } else {
                    out += &format!(" {:x}+{:x}", s.addr, s.len);
                }
            }
            out
        }
    }
}

fn render_failure(f: HostFailure) -> String {
    let flags = [f.dnr, f.media, f.gone, f.read_only].map(|x| u8::from(x).to_string());
    format!("fail {:x} {}", f.status, flags.join(" "))
}

/// A media-error case: the failure the table gives, in this file's notation.
fn media_case(f: &[&str]) -> String {
    let probe = hex(f[6]) as i32;
    let size = hex(f[5]);
    let failure = classify(
        hex(f[1]) as i32,
        f[2] == "1",
        f[3] == "1",
        f[4] == "1",
        || {
            if probe != 0 {
                StoreSize::Failed(probe)
            } else {
                StoreSize::Bytes(size)
            }
        },
    );
    render_failure(failure)
}

#[test]
fn the_walkers_answer_as_the_reference_does() {
    let text = include_str!("walker_vectors.txt");
    let mut cases = 0;
    for (number, line) in text.lines().enumerate() {
        let parts: Vec<&str> = line.split(" ; ").collect();
        assert_eq!(parts.len(), 3, "line {}: {line}", number + 1);
        let mut ram = vec![0u8; SIZE];
        for write in parts[1].split_whitespace() {
            let (offset, data) = write.split_once(':').expect("offset:bytes");
            let offset = hex(offset) as usize;
            let data = bytes(data);
            ram[offset..offset + data.len()].copy_from_slice(&data);
        }
        let memory = memory_over(BASE, &mut ram);
        let f: Vec<&str> = parts[0].split_whitespace().collect();
        if f[0] == "M" {
            assert_eq!(
                media_case(&f),
                parts[2],
                "line {}: {}",
                number + 1,
                parts[0]
            );
            cases += 1;
            continue;
        }
        let mut segments = Vec::new();
        let result = match f[0] {
            "P" => prp_segments(
                &memory,
                &NoFallback,
                hex(f[1]),
                hex(f[2]),
                hex(f[3]),
                &mut segments,
            ),
            "S" => sgl_segments(
                &memory,
                &NoFallback,
                hex(f[1]),
                hex(f[2]) as u32,
                hex(f[3]) as u8,
                hex(f[4]),
                f[5] == "1",
                f[6] == "1",
                &mut segments,
            ),
            kind => panic!("line {}: case kind {kind}", number + 1),
        };
        assert_eq!(
            render(&result, &segments),
            parts[2],
            "line {}: {}",
            number + 1,
            parts[0]
        );
        cases += 1;
    }
    assert!(cases >= 100, "only {cases} cases");
}
