//! Batch and budget arithmetic. Batch sizes round a percentage UP with a minimum of one host
//! (like Ansible's `serial`: `25%` of 3 hosts must still make progress); the failure budget
//! rounds DOWN (like Kubernetes' `maxUnavailable`: `10%` of 5 hosts tolerates no failure).

use std::ops::Range;

use super::Amount;

/// Hosts per batch for `total` targets: never 0 unless there are no targets, never more
/// than `total`.
pub fn batch_size(amount: Amount, total: usize) -> usize {
    if total == 0 {
        return 0;
    }
    let size = match amount {
        Amount::Count(n) => n as usize,
        Amount::Percent(p) => (total * p as usize).div_ceil(100),
    };
    size.clamp(1, total)
}

/// Failed hosts a run tolerates: a count as given, a percentage rounded down.
pub fn max_unavailable(amount: Amount, total: usize) -> usize {
    match amount {
        Amount::Count(n) => n as usize,
        Amount::Percent(p) => total * p.min(100) as usize / 100,
    }
}

/// Contiguous host-index ranges of `size` (the last one may be shorter); batch 0 is the canary.
pub fn batches(total: usize, size: usize) -> Vec<Range<usize>> {
    if total == 0 {
        return Vec::new();
    }
    let size = size.max(1);
    (0..total)
        .step_by(size)
        .map(|start| start..(start + size).min(total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_counts_are_capped_by_the_fleet_and_at_least_one() {
        assert_eq!(batch_size(Amount::Count(5), 20), 5);
        assert_eq!(batch_size(Amount::Count(50), 20), 20);
        assert_eq!(batch_size(Amount::Count(0), 20), 1);
        assert_eq!(batch_size(Amount::Count(5), 0), 0);
    }

    #[test]
    fn batch_size_percent_rounds_up_with_a_minimum_of_one() {
        assert_eq!(batch_size(Amount::Percent(25), 40), 10);
        assert_eq!(batch_size(Amount::Percent(25), 10), 3); // 2.5 -> 3
        assert_eq!(batch_size(Amount::Percent(1), 10), 1); // 0.1 -> 1
        assert_eq!(batch_size(Amount::Percent(100), 7), 7);
        assert_eq!(batch_size(Amount::Percent(150), 7), 7);
        assert_eq!(batch_size(Amount::Percent(25), 0), 0);
    }

    #[test]
    fn max_unavailable_percent_rounds_down() {
        assert_eq!(max_unavailable(Amount::Count(1), 20), 1);
        assert_eq!(max_unavailable(Amount::Count(0), 20), 0);
        assert_eq!(max_unavailable(Amount::Percent(10), 40), 4);
        assert_eq!(max_unavailable(Amount::Percent(10), 15), 1); // 1.5 -> 1
        assert_eq!(max_unavailable(Amount::Percent(10), 5), 0); // 0.5 -> 0
        assert_eq!(max_unavailable(Amount::Percent(100), 5), 5);
        assert_eq!(max_unavailable(Amount::Percent(50), 0), 0);
    }

    #[test]
    fn batches_are_contiguous_and_cover_every_host_once() {
        assert_eq!(batches(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(batches(3, 3), vec![0..3]);
        assert_eq!(batches(0, 3), Vec::<Range<usize>>::new());
        assert_eq!(batches(2, 0), vec![0..1, 1..2]);
    }
}
