//! Deadlines from durations the user controls. `Instant + Duration` panics on overflow, and
//! the schema accepts `timeout: 9999999999999999h`: every deadline is computed here, with
//! the duration capped at [`FAR`] (ten years: "never", for anything Outrider waits on).

use std::time::Duration;

/// The longest wait any deadline stands for.
pub const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `start + d`, never panicking: `d` is capped at [`FAR`] and an overflow saturates at
/// `start + FAR`.
pub fn after_std(start: std::time::Instant, d: Duration) -> std::time::Instant {
    let d = d.min(FAR);
    start.checked_add(d).unwrap_or(start)
}

/// `start + d` on tokio's clock, never panicking (see [`after_std`]).
pub fn after(start: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    start.checked_add(d.min(FAR)).unwrap_or(start)
}

/// `tokio::time::Instant::now() + d`, never panicking (see [`after_std`]).
pub fn from_now(d: Duration) -> tokio::time::Instant {
    after(tokio::time::Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_give_a_far_deadline_instead_of_a_panic() {
        let start = std::time::Instant::now();
        assert_eq!(after_std(start, Duration::MAX), start + FAR);
        assert_eq!(
            after_std(start, Duration::from_secs(3)),
            start + Duration::from_secs(3)
        );
    }

    #[tokio::test]
    async fn tokio_deadlines_are_capped_too() {
        let d = from_now(Duration::MAX);
        assert!(d > tokio::time::Instant::now() + Duration::from_secs(3600));
    }
}
