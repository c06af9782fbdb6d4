//! Percentiles of a series of latencies, nearest-rank: each is one of
//! the samples, never an interpolation between two.
use serde::{Deserialize, Serialize};

/// min / p50 / p90 / p99 / max of a series, in its unit (milliseconds
/// throughout the benchmarks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// The fastest sample.
    pub min: f64,
    /// The median: half the samples are at or below it.
    pub p50: f64,
    /// 90% of the samples are at or below it.
    pub p90: f64,
    /// 99% of the samples are at or below it: the tail.
    pub p99: f64,
    /// The slowest sample.
    pub max: f64,
}

/// `samples`, sorted (NaN last, by [`f64::total_cmp`]).
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The nearest-rank percentile `p` (0 to 1) of `sorted`: the smallest
/// sample with at least `p` of them at or below it; `None` when empty.
pub fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Stats {
    /// The percentiles of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let sorted = sorted(samples);
        let rank = |p| nearest_rank(&sorted, p);
        Some(Stats {
            min: *sorted.first()?,
            p50: rank(0.5)?,
            p90: rank(0.9)?,
            p99: rank(0.99)?,
            max: *sorted.last()?,
        })
    }

    /// The five values in order, min first.
    pub fn values(&self) -> [f64; 5] {
        [self.min, self.p50, self.p90, self.p99, self.max]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_samples() {
        let s = Stats::of(&[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
        assert_eq!(
            s,
            Stats {
                min: 1.0,
                p50: 5.0,
                p90: 9.0,
                p99: 10.0,
                max: 10.0
            }
        );
    }

    #[test]
    fn the_rank_rounds_up_to_a_sample() {
        assert_eq!(Stats::of(&[2.0, 1.0]).unwrap().p50, 1.0);
        let five = Stats::of(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((five.p50, five.p90, five.p99), (3.0, 5.0, 5.0));
        let many: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let s = Stats::of(&many).unwrap();
        assert_eq!((s.p50, s.p90, s.p99), (100.0, 180.0, 198.0));
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let s = Stats::of(&[42.0]).unwrap();
        assert_eq!(s.values(), [42.0; 5]);
    }

    #[test]
    fn no_samples_no_stats() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn the_extremes_of_p() {
        let sorted = [1.0, 2.0, 3.0];
        assert_eq!(nearest_rank(&sorted, 0.0), Some(1.0));
        assert_eq!(nearest_rank(&sorted, 1.0), Some(3.0));
    }
}
