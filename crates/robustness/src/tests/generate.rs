//! Histories of a correct concurrent server, generated: random overlapping
//! intervals per client, a linearization point drawn inside each (after
//! the invocation, possibly after the give-up for lost answers), and every
//! answer computed by the model at its point. They must all check as
//! linearizable; with one read's value changed, none may.

use std::time::Instant;

use proptest::prelude::*;

use super::*;
use crate::check_history;
use crate::linearizability::{CheckOptions, Verdict};
use crate::model::State;
use crate::watch::{WatchRecord, WatchResponseRecord, patch_history, validate_against};

pub(crate) struct Shape {
    pub clients: u32,
    pub ops: usize,
    pub keys: usize,
    /// Out of 1000: answers lost (half of them took effect anyway).
    pub unknown_per_mille: u32,
}

fn request(
    rng: &mut fastrand::Rng,
    shape: &Shape,
    client: u32,
    seq: usize,
    leases: &[i64],
) -> Request {
    let key = |rng: &mut fastrand::Rng| format!("k{}", rng.usize(..shape.keys));
    let value = format!("c{client}-{seq}");
    let lease = |rng: &mut fastrand::Rng| {
        if leases.is_empty() {
            client as i64 * 1_000_000 + 1
        } else {
            leases[rng.usize(..leases.len())]
        }
    };
    match rng.u32(..100) {
        0..35 => Request::Get {
            key: key(rng),
            revision: 0,
            serializable: false,
        },
        35..40 => Request::Get {
            key: key(rng),
            revision: 0,
            serializable: true,
        },
        40..44 => Request::Get {
            key: key(rng),
            revision: rng.i64(1..(seq as i64 + 3)),
            serializable: false,
        },
        44..47 => Request::Range {
            prefix: "k".into(),
            revision: 0,
            serializable: false,
        },
        47..67 => Request::Put {
            key: key(rng),
            value,
            lease: 0,
        },
        67..72 => Request::Put {
            key: key(rng),
            value,
            lease: lease(rng),
        },
        72..80 => Request::Delete { key: key(rng) },
        80..92 => {
            let k = key(rng);
            Request::Txn {
                compares: vec![Compare {
                    key: k.clone(),
                    op: if rng.bool() {
                        CompareOp::Equal
                    } else {
                        CompareOp::Less
                    },
                    target: CompareTarget::Version(rng.i64(0..3)),
                }],
                success: vec![
                    TxnOp::Put {
                        key: k.clone(),
                        value,
                        lease: 0,
                    },
                    TxnOp::Get { key: key(rng) },
                ],
                failure: vec![TxnOp::Get { key: k }, TxnOp::Delete { key: key(rng) }],
            }
        }
        92..95 => Request::LeaseGrant {
            ttl: 600,
            id: client as i64 * 1_000_000 + seq as i64,
        },
        95..98 => Request::LeaseRevoke { id: lease(rng) },
        _ => Request::LeaseKeepAlive { id: lease(rng) },
    }
}

/// A valid history, and the state of the linearization it was made from.
pub(crate) fn generate(seed: u64, shape: &Shape) -> (History, State) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut clock = vec![0u64; shape.clients as usize];
    let mut granted: Vec<Vec<i64>> = vec![Vec::new(); shape.clients as usize];
    // (linearization point, operation, whether it takes effect)
    let mut planned: Vec<(u64, Operation, bool)> = Vec::with_capacity(shape.ops);
    for seq in 0..shape.ops {
        let c = rng.u32(..shape.clients);
        let ci = c as usize;
        let invoke = clock[ci] + rng.u64(0..50);
        let ret = invoke + rng.u64(1..200);
        clock[ci] = ret;
        let req = request(&mut rng, shape, c, seq, &granted[ci]);
        if let Request::LeaseGrant { id, .. } = req {
            granted[ci].push(id);
        }
        let unknown = rng.u32(..1000) < shape.unknown_per_mille;
        let applied = !unknown || rng.bool();
        // A lost answer may take effect well after the client gave up.
        let point = if unknown {
            rng.u64(invoke..ret + 500)
        } else {
            rng.u64(invoke..=ret)
        };
        let op = op(c, invoke, (!unknown).then_some(ret), req, Outcome::Unknown);
        planned.push((point, op, applied));
    }
    planned.sort_by_key(|(point, _, _)| *point);
    let mut state = State::new();
    let mut operations = Vec::with_capacity(planned.len());
    for (_, mut op, applied) in planned {
        if applied {
            let (next, outcome) = state.apply(&op.request);
            state = next;
            if op.return_time.is_some() {
                op.outcome = outcome;
            }
        }
        operations.push(op);
    }
    operations.sort_by_key(|op| (op.invoke, op.client));
    (History { operations }, state)
}

/// Changes the value of one answered, non-empty linearizable read to one
/// never written. `false` when the history has no such read.
fn corrupt(history: &mut History, pick: usize) -> bool {
    let reads: Vec<usize> = (0..history.operations.len())
        .filter(|&i| {
            let op = &history.operations[i];
            matches!(
                op.request,
                Request::Get {
                    serializable: false,
                    ..
                }
            ) && matches!(
                &op.outcome,
                Outcome::Response(Response {
                    body: ResponseBody::Get { kv: Some(_) },
                    ..
                })
            )
        })
        .collect();
    if reads.is_empty() {
        return false;
    }
    let i = reads[pick % reads.len()];
    if let Outcome::Response(Response {
        body: ResponseBody::Get { kv: Some(kv) },
        ..
    }) = &mut history.operations[i].outcome
    {
        kv.value = "never written".into();
    }
    true
}

#[test]
fn ten_thousand_operations_check_quickly() {
    let shape = Shape {
        clients: 8,
        ops: 10_000,
        keys: 10,
        unknown_per_mille: 10,
    };
    let (history, expected) = generate(42, &shape);
    let unknown = history
        .operations
        .iter()
        .filter(|op| !op.is_known())
        .count();
    let started = Instant::now();
    let verdict = check_history(&history, CheckOptions::default());
    let elapsed = started.elapsed();
    println!(
        "10k history ({unknown} unknown, final revision {}): checked in {elapsed:?}",
        expected.revision()
    );
    let Verdict::Linearizable { state, order } = verdict else {
        panic!(
            "a valid history was not found linearizable: {:?}",
            crate::report::Linearizable::from(&verdict)
        );
    };
    assert!(order.len() >= history.operations.len() - unknown);
    assert_eq!(state.revision(), expected.revision());

    // A watch on everything from revision 1 that saw exactly the writes is
    // valid against the server's own order...
    let responses = expected
        .changes()
        .into_iter()
        .map(|(rev, events)| WatchResponseRecord {
            header_revision: rev,
            events,
            compact_revision: 0,
            canceled: false,
            received: 0,
        })
        .collect();
    let watch = WatchRecord {
        key: "k".into(),
        prefix: true,
        start_revision: 1,
        responses,
    };
    assert_eq!(
        validate_against(&expected, std::slice::from_ref(&watch)),
        vec![]
    );
    // ...and the lost puts it saw, patched in, leave the history linearizable.
    let patched = patch_history(&history, std::slice::from_ref(&watch));
    let still_unknown = patched
        .operations
        .iter()
        .filter(|op| !op.is_known())
        .count();
    assert!(still_unknown < unknown, "some lost puts took effect");
    let started = Instant::now();
    assert!(check_history(&patched, CheckOptions::default()).is_linearizable());
    println!(
        "patched from the watch ({still_unknown} unknown left): checked in {:?}",
        started.elapsed()
    );

    // One read corrupted in a history of the same shape without lost
    // answers. (With them, proving that no linearization exists means
    // trying every placement of every lost write before the bad read: the
    // small proptest histories below do that; at 10k it takes minutes.)
    let (mut broken, _) = generate(
        43,
        &Shape {
            unknown_per_mille: 0,
            ..shape
        },
    );
    assert!(corrupt(&mut broken, 4321));
    let started = Instant::now();
    let verdict = check_history(&broken, CheckOptions::default());
    println!("10k history, one read corrupted: {:?}", started.elapsed());
    let Verdict::Violation(v) = verdict else {
        panic!(
            "a corrupted read was not caught: {:?}",
            crate::report::Linearizable::from(&verdict)
        );
    };
    let excerpt = crate::report::excerpt(&broken, &v);
    println!("excerpt: {} operations", excerpt.operations.len());
    assert!(excerpt.operations.iter().any(|o| o.index == v.stuck));
}

#[test]
fn generated_history_json_round_trip() {
    let (history, _) = generate(
        7,
        &Shape {
            clients: 3,
            ops: 200,
            keys: 4,
            unknown_per_mille: 50,
        },
    );
    assert_eq!(
        History::from_json(&history.to_json()).expect("parses"),
        history
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn valid_histories_are_linearizable(
        seed in any::<u64>(),
        clients in 1u32..6,
        ops in 1usize..300,
        keys in 1usize..5,
        unknown_per_mille in 0u32..100,
    ) {
        let (history, _) = generate(seed, &Shape { clients, ops, keys, unknown_per_mille });
        let verdict = check_history(&history, CheckOptions::default());
        prop_assert!(verdict.is_linearizable(), "{}", history.to_json());
    }

    #[test]
    fn a_corrupted_read_is_caught(
        seed in any::<u64>(),
        clients in 1u32..6,
        ops in 20usize..300,
        keys in 1usize..5,
        unknown_per_mille in 0u32..100,
        pick in any::<usize>(),
    ) {
        let (mut history, _) = generate(seed, &Shape { clients, ops, keys, unknown_per_mille });
        prop_assume!(corrupt(&mut history, pick));
        let verdict = check_history(&history, CheckOptions::default());
        prop_assert!(matches!(verdict, Verdict::Violation(_)), "{}", history.to_json());
    }
}
