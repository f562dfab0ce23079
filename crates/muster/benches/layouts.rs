//! Reading registry entries in each layout: what discovery does for every
//! key it lists and every event it gets.
//!
//! `cargo bench -p muster --bench layouts` (under a minute). Groups, each
//! over 10,000 entries of one service:
//!
//! - `decode/muster`: muster's values with muster's layout (the native
//!   case);
//! - `decode/native-mixed`: 2,000 entries of each of the five layouts, each
//!   read with its own layout (what a caller that knows every source's
//!   layout pays);
//! - `decode/auto-mixed`: the same entries read with `auto`, which detects
//!   each one's layout from its value first. The target: within
//!   20% of `native-mixed`.
#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use muster::Instance;
use muster::layout::{LayoutKind, Source};

const N: usize = 10_000;
const WRITERS: [LayoutKind; 5] = [
    LayoutKind::Muster,
    LayoutKind::EtcdNaming,
    LayoutKind::Kratos,
    LayoutKind::GoZero,
    LayoutKind::GoMicro,
];

/// `n` entries (key, value, the layout that wrote it) of service `user`.
fn entries(n: usize, layouts: &[LayoutKind]) -> Vec<(Vec<u8>, Vec<u8>, LayoutKind)> {
    (0..n)
        .map(|i| {
            let kind = layouts[i % layouts.len()];
            let layout = kind.layout();
            let id = format!("{i:05}-{}", layout.new_id("user", "10.0.0.1:80").len());
            let instance = Instance::new(
                "user",
                id.clone(),
                format!("10.0.{}.{}:8080", i / 250, i % 250),
            )
            .with_version("1.4.2")
            .with_zone("eu-1")
            .with_metadata("git", "abc123");
            let value = layout.encode(&instance, None).expect("encodes");
            let key = Source::new(LayoutKind::Auto).key("user", &id).into_bytes();
            (key, value, kind)
        })
        .collect()
}

fn decode_all(
    entries: &[(Vec<u8>, Vec<u8>, LayoutKind)],
    source: impl Fn(LayoutKind) -> Source,
) -> usize {
    let sources: Vec<Source> = WRITERS.iter().map(|k| source(*k)).collect();
    let mut ok = 0;
    for (key, value, kind) in entries {
        let index = WRITERS.iter().position(|k| k == kind).unwrap_or(0);
        if let Some(Ok(i)) = sources[index].decode(key, value) {
            ok += black_box(i).addr.len().min(1);
        }
    }
    ok
}

fn decode(c: &mut Criterion) {
    let prefix = LayoutKind::Auto.default_prefix();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(N as u64));
    let native = entries(N, &[LayoutKind::Muster]);
    let mixed = entries(N, &WRITERS);
    assert_eq!(
        decode_all(&native, |_| Source::with_prefix(LayoutKind::Muster, prefix)),
        N
    );
    assert_eq!(decode_all(&mixed, |k| Source::with_prefix(k, prefix)), N);
    assert_eq!(
        decode_all(&mixed, |_| Source::with_prefix(LayoutKind::Auto, prefix)),
        N
    );
    group.bench_function("muster", |b| {
        b.iter(|| decode_all(&native, |_| Source::with_prefix(LayoutKind::Muster, prefix)))
    });
    group.bench_function("native-mixed", |b| {
        b.iter(|| decode_all(&mixed, |k| Source::with_prefix(k, prefix)))
    });
    group.bench_function("auto-mixed", |b| {
        b.iter(|| decode_all(&mixed, |_| Source::with_prefix(LayoutKind::Auto, prefix)))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
