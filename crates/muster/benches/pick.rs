//! Pick cost of every load balancer, against the naive client muster
//! replaces, on one and two threads.
//!
//! `cargo bench -p muster --bench pick` (about two minutes). Groups:
//!
//! - `pick/<balancer>/<n>`: one pick (and drop of the [`Picked`]) with `n`
//!   eligible instances, including `baseline`: the Go client's shape, a
//!   `Mutex<HashMap<String, String>>` copied into a `Vec<String>` on every
//!   call, then chosen round-robin.
//! - `threads/<balancer>/<t>`: the same pick loop on `t` threads at once,
//!   100 instances, reported as wall time per pick over all threads (so
//!   perfect scaling halves the figure from 1 to 2 threads).
//!   `shared-counter-rr` is round-robin on a single shared atomic, to show
//!   what the per-thread cursors of [`RoundRobin`] buy. (`hash` here picks
//!   random keys, so it is not comparable with `pick/hash`.)
//! - `update/<balancer>`: rebuilding for a changed set of 1000 instances
//!   (off the hot path, for reference).
#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use muster::Instance;
use muster::balance::{
    AnyLoadBalancer, Balancer, BalancerKind, Choice, ConsistentHash, Filter, LoadBalancer, Picked,
    PowerOfTwo, Random, RoundRobin, SmoothWeighted,
};

const SIZES: [usize; 3] = [10, 100, 1000];

fn instances(n: usize) -> Vec<Arc<Instance>> {
    (0..n)
        .map(|i| {
            Arc::new(Instance::new(
                "user",
                format!("user-{i}"),
                format!("http://10.0.{}.{}:8080", i / 256, i % 256),
            ))
        })
        .collect()
}

/// Unrelated weights in 1..=10 000 (so the smooth weighted sequence is too
/// long to precompute for 100 and more instances).
fn uneven(n: usize) -> Vec<Arc<Instance>> {
    let mut rng = fastrand::Rng::with_seed(7);
    instances(n)
        .into_iter()
        .map(|i| Arc::new((*i).clone().with_weight(rng.u32(1..=10_000))))
        .collect()
}

fn load_balancer<B: Balancer>(set: &[Arc<Instance>]) -> LoadBalancer<B> {
    let lb = LoadBalancer::new();
    lb.update(set);
    assert_eq!(lb.len(), set.len());
    lb
}

/// The client being replaced: every call copies all addresses out of a
/// locked map, then takes the next one round-robin.
struct Baseline {
    endpoints: Mutex<HashMap<String, String>>,
    next: AtomicUsize,
}

impl Baseline {
    fn new(set: &[Arc<Instance>]) -> Self {
        Baseline {
            endpoints: Mutex::new(
                set.iter()
                    .map(|i| (i.key(muster::instance::DEFAULT_PREFIX), i.addr.clone()))
                    .collect(),
            ),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> Option<String> {
        let mut addrs: Vec<String> = self.endpoints.lock().unwrap().values().cloned().collect();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len();
        Some(addrs.swap_remove(i))
    }
}

/// Round-robin on one shared counter: the obvious design [`RoundRobin`]
/// avoids.
struct SharedCounterRr {
    len: usize,
    next: AtomicUsize,
}

impl Balancer for SharedCounterRr {
    fn build(instances: &[Arc<Instance>], _previous: Option<&Self>) -> Self {
        SharedCounterRr {
            len: instances.len(),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self, _key: Option<&[u8]>) -> Option<Choice> {
        (self.len > 0).then(|| Choice::new(self.next.fetch_add(1, Ordering::Relaxed) % self.len))
    }
}

fn keys() -> Vec<Vec<u8>> {
    (0..4096)
        .map(|k| format!("session-{k:08}").into_bytes())
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    let keys = keys();
    for n in SIZES {
        let set = instances(n);
        let rr = load_balancer::<RoundRobin>(&set);
        g.bench_function(BenchmarkId::new("round-robin", n), |b| {
            b.iter(|| black_box(rr.pick()))
        });
        let random = load_balancer::<Random>(&set);
        g.bench_function(BenchmarkId::new("random", n), |b| {
            b.iter(|| black_box(random.pick()))
        });
        let weighted = load_balancer::<SmoothWeighted>(&set);
        assert!(weighted.inspect(SmoothWeighted::is_lock_free));
        g.bench_function(BenchmarkId::new("weighted", n), |b| {
            b.iter(|| black_box(weighted.pick()))
        });
        let uneven_set = uneven(n);
        let weighted_uneven = load_balancer::<SmoothWeighted>(&uneven_set);
        let name = if weighted_uneven.inspect(SmoothWeighted::is_lock_free) {
            "weighted-uneven-table"
        } else {
            "weighted-uneven-locked"
        };
        g.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter(|| black_box(weighted_uneven.pick()))
        });
        let p2c = load_balancer::<PowerOfTwo>(&set);
        g.bench_function(BenchmarkId::new("p2c", n), |b| {
            b.iter(|| black_box(p2c.pick()))
        });
        let hash = load_balancer::<ConsistentHash>(&set);
        g.bench_function(BenchmarkId::new("hash", n), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & 4095;
                black_box(hash.pick_key(&keys[k]))
            })
        });
        if n == 100 {
            let any = AnyLoadBalancer::new(BalancerKind::RoundRobin, Filter::new());
            any.update(&set);
            g.bench_function(BenchmarkId::new("any-round-robin", n), |b| {
                b.iter(|| black_box(any.pick()))
            });
        }
        let baseline = Baseline::new(&set);
        g.bench_function(BenchmarkId::new("baseline", n), |b| {
            b.iter(|| black_box(baseline.pick()))
        });
    }
    g.finish();
}

/// Runs `per_thread` picks on each of `threads` threads at once; returns
/// the wall time divided by `threads` (time per pick of the whole process
/// times `per_thread`).
fn run_threads<T>(threads: usize, per_thread: u64, pick: &(impl Fn() -> T + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..per_thread {
                    black_box(pick());
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Leaving the scope joins the threads.
        start
    })
    .elapsed()
        / threads as u32
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    let set = instances(100);
    let rr = load_balancer::<RoundRobin>(&set);
    let shared = load_balancer::<SharedCounterRr>(&set);
    let random = load_balancer::<Random>(&set);
    let weighted = load_balancer::<SmoothWeighted>(&set);
    let p2c = load_balancer::<PowerOfTwo>(&set);
    let hash = load_balancer::<ConsistentHash>(&set);
    let keys = keys();
    let baseline = Baseline::new(&set);
    type PickFn<'a> = Box<dyn Fn() -> Option<Picked> + Sync + 'a>;
    let cases: Vec<(&str, PickFn)> = vec![
        ("round-robin", Box::new(|| rr.pick())),
        ("shared-counter-rr", Box::new(|| shared.pick())),
        ("random", Box::new(|| random.pick())),
        ("weighted", Box::new(|| weighted.pick())),
        ("p2c", Box::new(|| p2c.pick())),
        (
            "hash",
            Box::new(|| hash.pick_key(&keys[fastrand::usize(..keys.len())])),
        ),
    ];
    for (name, f) in &cases {
        for t in [1, 2] {
            g.bench_function(BenchmarkId::new(*name, t), |b| {
                b.iter_custom(|iters| run_threads(t, iters, f))
            });
        }
    }
    for t in [1, 2] {
        g.bench_function(BenchmarkId::new("baseline", t), |b| {
            b.iter_custom(|iters| run_threads(t, iters, &|| baseline.pick()))
        });
    }
    g.finish();
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    let a = instances(1000);
    // The same set with one instance replaced, so every update rebuilds.
    let mut b_set = a.clone();
    b_set[500] = Arc::new(Instance::new("user", "user-new", "http://10.9.9.9:8080"));
    fn bench<B: Balancer>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        sets: [&[Arc<Instance>]; 2],
    ) {
        let lb = LoadBalancer::<B>::new();
        let mut flip = 0;
        g.bench_function(BenchmarkId::new(name, 1000), |b| {
            b.iter(|| {
                flip ^= 1;
                lb.update(sets[flip]);
            })
        });
    }
    let sets = [&a[..], &b_set[..]];
    bench::<RoundRobin>(&mut g, "round-robin", sets);
    bench::<SmoothWeighted>(&mut g, "weighted", sets);
    bench::<PowerOfTwo>(&mut g, "p2c", sets);
    bench::<ConsistentHash>(&mut g, "hash", sets);
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = pick, threads, update
}
criterion_main!(benches);
