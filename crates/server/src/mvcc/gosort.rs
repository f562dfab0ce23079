//! Go's `sort.Sort` as of Go 1.19 (pattern-defeating quicksort), which
//! etcd 3.4 sorts range results with (Debian's etcd 3.4.23 is built with Go
//! 1.19; later Go releases changed the xorshift that breaks patterns, and
//! so the order of some ties).
//!
//! Go's sort is not stable: keys whose sort target compares equal (the
//! same version, revision or value) come out in whatever order the
//! algorithm leaves them, and clients see that order. A stable sort agrees
//! with it only up to 12 elements (where Go uses insertion sort), so this
//! is a step-by-step port: the same comparisons and swaps, in the same
//! order, give the same permutation of ties.
//!
//! Ported from Go's `src/sort/zsortinterface.go` (Go 1.19), which carries
//! this notice:
//!
//! > Copyright 2017 The Go Authors. All rights reserved. Use of this source
//! > code is governed by a BSD-style license: Redistribution and use in
//! > source and binary forms, with or without modification, are permitted
//! > provided that the following conditions are met: redistributions of
//! > source code must retain the above copyright notice, this list of
//! > conditions and the following disclaimer; redistributions in binary
//! > form must reproduce the above copyright notice, this list of
//! > conditions and the following disclaimer in the documentation and/or
//! > other materials provided with the distribution; neither the name of
//! > Google Inc. nor the names of its contributors may be used to endorse
//! > or promote products derived from this software without specific prior
//! > written permission. THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS
//! > AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES,
//! > INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
//! > MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED.
//! > IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE FOR ANY
//! > DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
//! > DAMAGES ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF
//! > ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

/// Sorts `v` as Go's `sort.Sort` does with `less` as `Less(i, j)`.
pub(crate) fn sort_by<T>(v: &mut [T], less: impl Fn(&T, &T) -> bool) {
    let n = v.len() as isize;
    if n <= 1 {
        return;
    }
    let mut s = Sorter { v, less };
    let limit = bits_len(n as u64) as isize;
    s.pdqsort(0, n, limit);
}

/// `bits.Len`: the number of bits needed to represent `x`.
fn bits_len(x: u64) -> u32 {
    u64::BITS - x.leading_zeros()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hint {
    Unknown,
    Increasing,
    Decreasing,
}

struct Sorter<'a, T, F> {
    v: &'a mut [T],
    less: F,
}

impl<T, F: Fn(&T, &T) -> bool> Sorter<'_, T, F> {
    // Go's ints are signed; indices stay as isize so the arithmetic reads
    // as Go's.
    fn less(&self, i: isize, j: isize) -> bool {
        (self.less)(&self.v[i as usize], &self.v[j as usize])
    }

    fn swap(&mut self, i: isize, j: isize) {
        self.v.swap(i as usize, j as usize);
    }

    fn insertion_sort(&mut self, a: isize, b: isize) {
        for i in a + 1..b {
            let mut j = i;
            while j > a && self.less(j, j - 1) {
                self.swap(j, j - 1);
                j -= 1;
            }
        }
    }

    fn sift_down(&mut self, lo: isize, hi: isize, first: isize) {
        let mut root = lo;
        loop {
            let mut child = 2 * root + 1;
            if child >= hi {
                return;
            }
            if child + 1 < hi && self.less(first + child, first + child + 1) {
                child += 1;
            }
            if !self.less(first + root, first + child) {
                return;
            }
            self.swap(first + root, first + child);
            root = child;
        }
    }

    fn heap_sort(&mut self, a: isize, b: isize) {
        let first = a;
        let lo = 0;
        let hi = b - a;
        let mut i = (hi - 1) / 2;
        while i >= 0 {
            self.sift_down(i, hi, first);
            i -= 1;
        }
        let mut i = hi - 1;
        while i >= 0 {
            self.swap(first, first + i);
            self.sift_down(lo, i, first);
            i -= 1;
        }
    }

    fn pdqsort(&mut self, mut a: isize, mut b: isize, mut limit: isize) {
        const MAX_INSERTION: isize = 12;
        let mut was_balanced = true;
        let mut was_partitioned = true;
        loop {
            let length = b - a;
            if length <= MAX_INSERTION {
                self.insertion_sort(a, b);
                return;
            }
            if limit == 0 {
                self.heap_sort(a, b);
                return;
            }
            if !was_balanced {
                self.break_patterns(a, b);
                limit -= 1;
            }
            let (mut pivot, mut hint) = self.choose_pivot(a, b);
            if hint == Hint::Decreasing {
                self.reverse_range(a, b);
                pivot = (b - 1) - (pivot - a);
                hint = Hint::Increasing;
            }
            if was_balanced
                && was_partitioned
                && hint == Hint::Increasing
                && self.partial_insertion_sort(a, b)
            {
                return;
            }
            if a > 0 && !self.less(a - 1, pivot) {
                a = self.partition_equal(a, b, pivot);
                continue;
            }
            let (mid, already_partitioned) = self.partition(a, b, pivot);
            was_partitioned = already_partitioned;
            let (left_len, right_len) = (mid - a, b - mid);
            let balance_threshold = length / 8;
            if left_len < right_len {
                was_balanced = left_len >= balance_threshold;
                self.pdqsort(a, mid, limit);
                a = mid + 1;
            } else {
                was_balanced = right_len >= balance_threshold;
                self.pdqsort(mid + 1, b, limit);
                b = mid;
            }
        }
    }

    fn partition(&mut self, a: isize, b: isize, pivot: isize) -> (isize, bool) {
        self.swap(a, pivot);
        let (mut i, mut j) = (a + 1, b - 1);
        while i <= j && self.less(i, a) {
            i += 1;
        }
        while i <= j && !self.less(j, a) {
            j -= 1;
        }
        if i > j {
            self.swap(j, a);
            return (j, true);
        }
        self.swap(i, j);
        i += 1;
        j -= 1;
        loop {
            while i <= j && self.less(i, a) {
                i += 1;
            }
            while i <= j && !self.less(j, a) {
                j -= 1;
            }
            if i > j {
                break;
            }
            self.swap(i, j);
            i += 1;
            j -= 1;
        }
        self.swap(j, a);
        (j, false)
    }

    fn partition_equal(&mut self, a: isize, b: isize, pivot: isize) -> isize {
        self.swap(a, pivot);
        let (mut i, mut j) = (a + 1, b - 1);
        loop {
            while i <= j && !self.less(a, i) {
                i += 1;
            }
            while i <= j && self.less(a, j) {
                j -= 1;
            }
            if i > j {
                break;
            }
            self.swap(i, j);
            i += 1;
            j -= 1;
        }
        i
    }

    fn partial_insertion_sort(&mut self, a: isize, b: isize) -> bool {
        const MAX_STEPS: usize = 5;
        const SHORTEST_SHIFTING: isize = 50;
        let mut i = a + 1;
        for _ in 0..MAX_STEPS {
            while i < b && !self.less(i, i - 1) {
                i += 1;
            }
            if i == b {
                return true;
            }
            if b - a < SHORTEST_SHIFTING {
                return false;
            }
            self.swap(i, i - 1);
            // Shift the smaller one to the left (Go's bound is 1, not a+1).
            if i - a >= 2 {
                let mut j = i - 1;
                while j >= 1 {
                    if !self.less(j, j - 1) {
                        break;
                    }
                    self.swap(j, j - 1);
                    j -= 1;
                }
            }
            // Shift the greater one to the right.
            if b - i >= 2 {
                let mut j = i + 1;
                while j < b {
                    if !self.less(j, j - 1) {
                        break;
                    }
                    self.swap(j, j - 1);
                    j += 1;
                }
            }
        }
        false
    }

    fn break_patterns(&mut self, a: isize, b: isize) {
        let length = b - a;
        if length >= 8 {
            let mut random = length as u64;
            let modulus = 1u64 << bits_len(length as u64);
            let mut idx = a + (length / 4) * 2 - 1;
            while idx <= a + (length / 4) * 2 + 1 {
                // Go 1.19's xorshift.Next (later Go: 13, 7, 17).
                random ^= random << 13;
                random ^= random >> 17;
                random ^= random << 5;
                let mut other = (random & (modulus - 1)) as isize;
                if other >= length {
                    other -= length;
                }
                self.swap(idx, a + other);
                idx += 1;
            }
        }
    }

    fn choose_pivot(&mut self, a: isize, b: isize) -> (isize, Hint) {
        const SHORTEST_NINTHER: isize = 50;
        const MAX_SWAPS: usize = 4 * 3;
        let l = b - a;
        let mut swaps = 0;
        let mut i = a + l / 4;
        let mut j = a + l / 4 * 2;
        let mut k = a + l / 4 * 3;
        if l >= 8 {
            if l >= SHORTEST_NINTHER {
                i = self.median(i - 1, i, i + 1, &mut swaps);
                j = self.median(j - 1, j, j + 1, &mut swaps);
                k = self.median(k - 1, k, k + 1, &mut swaps);
            }
            j = self.median(i, j, k, &mut swaps);
        }
        match swaps {
            0 => (j, Hint::Increasing),
            MAX_SWAPS => (j, Hint::Decreasing),
            _ => (j, Hint::Unknown),
        }
    }

    fn order2(&self, a: isize, b: isize, swaps: &mut usize) -> (isize, isize) {
        if self.less(b, a) {
            *swaps += 1;
            (b, a)
        } else {
            (a, b)
        }
    }

    fn median(&self, a: isize, b: isize, c: isize, swaps: &mut usize) -> isize {
        let (a, b) = self.order2(a, b, swaps);
        let (b, c) = self.order2(b, c, swaps);
        let _ = c;
        let (_, b) = self.order2(a, b, swaps);
        b
    }

    fn reverse_range(&mut self, a: isize, b: isize) {
        let (mut i, mut j) = (a, b - 1);
        while i < j {
            self.swap(i, j);
            i += 1;
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for the tests.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn sorts_like_a_sort() {
        let mut seed = 7;
        for n in [0usize, 1, 2, 5, 12, 13, 40, 49, 50, 51, 200, 1000] {
            for buckets in [1u64, 2, 3, 10, 1_000_000] {
                let mut v: Vec<(u64, usize)> =
                    (0..n).map(|i| (lcg(&mut seed) % buckets, i)).collect();
                sort_by(&mut v, |a, b| a.0 < b.0);
                assert!(v.windows(2).all(|w| w[0].0 <= w[1].0), "n={n}");
                let mut idx: Vec<usize> = v.iter().map(|x| x.1).collect();
                idx.sort_unstable();
                assert_eq!(idx, (0..n).collect::<Vec<_>>(), "a permutation");
                // Descending, sorted and reversed inputs.
                sort_by(&mut v, |a, b| b.0 < a.0);
                assert!(v.windows(2).all(|w| w[0].0 >= w[1].0));
                sort_by(&mut v, |a, b| a.0 < b.0);
                assert!(v.windows(2).all(|w| w[0].0 <= w[1].0));
            }
        }
    }

    #[test]
    fn small_inputs_are_stable_and_ties_beyond_twelve_are_not() {
        let mut v: Vec<(u8, usize)> = (0..12).map(|i| ((i % 2) as u8, i)).collect();
        sort_by(&mut v, |a, b| a.0 < b.0);
        let order: Vec<usize> = v.iter().map(|x| x.1).collect();
        assert_eq!(order, [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]);
        // What etcd 3.4 (Go 1.19) answers for 40 keys with values i % 3,
        // 14 of them (every third) then rewritten to a larger value, sorted
        // by that version ascending: Go's permutation, not key order.
        let mut v: Vec<(u8, usize)> = (0..40).map(|i| (u8::from(i % 3 == 0), i)).collect();
        sort_by(&mut v, |a, b| a.0 < b.0);
        let order: Vec<usize> = v.iter().map(|x| x.1).collect();
        assert_eq!(
            order,
            [
                20, 34, 2, 38, 4, 5, 37, 7, 8, 35, 10, 11, 19, 13, 14, 32, 16, 31, 29, 1, 17, 28,
                22, 23, 26, 25, 33, 15, 21, 6, 30, 24, 27, 0, 36, 9, 12, 18, 3, 39
            ]
        );
    }
}
