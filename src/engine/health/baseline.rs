//! Learned baselines: per target and metric, a robust streaming estimate of where a probe
//! value usually is and how much it wanders, and a verdict on each new value.
//!
//! The estimate is an EWMA of the mean and of the variance, with winsorized updates and a
//! floor under the spread. It was chosen over a median/MAD window because its state is three
//! numbers and two small counters per series instead of a window of samples: 5,000 series
//! persist in a few hundred KB of ConfigMap ([`encode`], [`decode`]).
//!
//! How one value is judged ([`Series::observe`]):
//! - The first `warmup` values are only learned ([`Verdict::Learning`]): cumulative mean and
//!   variance (Welford), winsorized from the 5th value on so a spike in the warmup does not
//!   blind the series for long.
//! - Then `deviations = (value - mean) / max(sd, floor)`; beyond `sensitivity` it is
//!   [`Verdict::Outside`], and the 3rd and later consecutive Outside rounds are
//!   [`Verdict::Anomalous`]. One value inside the band resets the run.
//! - The floor, `max(min_band / sensitivity, 1% of |mean|)`, makes the band at least
//!   `min_band` wide (and at least `sensitivity`% of the mean): a flat series does not alarm
//!   on noise of a size nobody cares about.
//! - Values inside the band move the mean and variance, clipped to mean ± 3 sd. Values
//!   outside are held back while the run is short (no learning at all, so the first rounds
//!   of a level shift are judged against an untouched baseline); a run that ends before
//!   turning Anomalous was a tail event, and its values are then credited to the variance as
//!   3 sd each — what winsorizing would have done — so heavy tails are not ignored either
//!   (ignoring them makes the spread too small: 4x the false anomalies on Student-t(3) noise).
//! - During an Anomalous run the mean follows the value, clipped to 3 sd widened 1.2x per
//!   round, and the variance is left alone: a permanent shift is absorbed without inflating
//!   the spread. Measured at the default settings (sensitivity 3, warmup 20), median round
//!   of the last anomaly: 11 for a 5 sd shift, 26 for 10 sd, 66 for 50 sd, 97 for 1000 sd
//!   (large shifts take about `ln(shift / sensitivity) / alpha` rounds plus ~10).
//! - `learn == false` (target failing, maintenance): judged, the run counted, nothing learned.
//!
//! Figures (`cargo bench --bench health_baseline`, defaults, 1,000,000 rounds of noise):
//! 0.01 false anomalies per 10,000 rounds on Gaussian noise, 0.3 on Student-t(3) (0.04 at
//! sensitivity 4); a 5 sd shift is Anomalous by its 3rd round in 92% of trials (a detector
//! that knew the true mean and sd: 93%), 10 sd in 100%. A shift barely past the band is
//! often learned before three rounds in a row fall outside it: at sensitivity 3, 79% of
//! 3 sd shifts never alarm, and 4% of 5 sd ones. About 22 ns per value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};

use crate::api::health_check::Baseline;

/// Consecutive Outside rounds that make a value Anomalous: one odd round is noise, three in
/// a row is a change.
pub const ANOMALOUS_AFTER: u32 = 3;
/// Most series [`decode`] returns: bounds memory whatever the ConfigMap holds.
pub const MAX_SERIES: usize = 10_000;
/// Longest text [`decode`] parses (a ConfigMap holds at most 1 MiB anyway).
pub const MAX_ENCODED: usize = 8 << 20;
/// Longest key [`decode`] keeps.
pub const MAX_KEY: usize = 512;

/// Clip of a value's distance from the mean, in effective sd, when it is learned: 3 keeps
/// the learned sd of Gaussian noise within 3% of the truth, while a spike moves it at most
/// as much as a 3 sd value does.
const WINSOR: f64 = 3.0;
/// Relative floor of the effective sd, as a fraction of |mean|.
const REL_FLOOR: f64 = 0.01;
/// Absolute floor of the effective sd, so deviations stay finite when `min_band` is 0.
const MIN_SD: f64 = 1e-9;
/// Values beyond ±1e12 are not measurements of any probe here (1e12 ms is 31 years): they
/// are ignored like NaN, which also keeps squares far from overflow.
const MAX_ABS: f64 = 1e12;
/// Warmup values from this count on are winsorized (fewer give no usable sd).
const WARMUP_WINSOR_FROM: u32 = 5;
/// Widening per round of the clip during an Anomalous run.
const WIDEN: f64 = 1.2;
/// Outside values of a run that may be credited (runs that reach Anomalous are not).
const MAX_CREDIT: u8 = (ANOMALOUS_AFTER - 1) as u8;
/// Bounds of the EWMA weight; see [`Settings::alpha`].
const ALPHA_MIN: f64 = 0.01;
const ALPHA_MAX: f64 = 0.05;

/// What a metric is measured in; picks the smallest change worth an anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Disk or memory used, 0-100.
    Percent,
    /// One-minute load average divided by the number of cores.
    LoadPerCore,
    /// Latency in milliseconds.
    Millis,
    /// Days of certificate validity left.
    Days,
    /// A count of things, such as processes.
    Count,
    /// A command's exit code.
    Exit,
}

/// The smallest absolute distance from the baseline that may ever count as anomalous for a
/// unit: 2 percentage points, 0.1 load per core, 5 ms, half a day, a change of 2 in a
/// count, any change of an exit code.
pub fn min_band_for(unit: Unit) -> f64 {
    match unit {
        Unit::Percent => 2.0,
        Unit::LoadPerCore => 0.1,
        Unit::Millis => 5.0,
        Unit::Days => 0.5,
        Unit::Count => 1.5,
        Unit::Exit => 0.5,
    }
}

/// How a series is judged: from the HealthCheck's `baseline` and the metric's unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Effective standard deviations from the mean beyond which a value is Outside (> 0;
    /// anything else means 3).
    pub sensitivity: f64,
    /// Values learned before any is judged (at least 1).
    pub warmup: u32,
    /// Smallest absolute distance from the mean that may count as Outside, in the metric's
    /// unit (see [`min_band_for`]).
    pub min_band: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sensitivity: 3.0,
            warmup: 20,
            min_band: 0.0,
        }
    }
}

impl Settings {
    /// Settings of one metric of a HealthCheck.
    pub fn new(baseline: &Baseline, unit: Unit) -> Self {
        Self {
            sensitivity: baseline.sensitivity,
            warmup: baseline.warmup,
            min_band: min_band_for(unit),
        }
    }

    /// Weight of a new value once warm: `2 / (warmup + 1)`, the EWMA whose memory (its
    /// centre of mass) is the warmup the user thought enough to learn the series, bounded to
    /// [0.01, 0.05]. Not above 0.05 (a memory of ~40 values), because a faster EWMA makes
    /// the spread estimate itself noisy; measured at 0.1 against 0.05, per 1,000,000 rounds
    /// of Student-t(3) noise: 81 false anomalies against 30, and 6.3% of 5 sd shifts never
    /// flagged against 2.9%. A longer warmup buys more of the same (warmup 100, alpha 0.02:
    /// 15 and 0.3%) at the price of alarming ~2.5x longer on a permanent shift. Not below
    /// 0.01, so a permanent shift is absorbed within a few hundred rounds at most.
    pub fn alpha(&self) -> f64 {
        (2.0 / (f64::from(self.warmup()) + 1.0)).clamp(ALPHA_MIN, ALPHA_MAX)
    }

    fn sensitivity(&self) -> f64 {
        if self.sensitivity.is_finite() && self.sensitivity > 0.0 {
            self.sensitivity.min(100.0)
        } else {
            3.0
        }
    }

    fn warmup(&self) -> u32 {
        self.warmup.max(1)
    }

    fn min_band(&self) -> f64 {
        if self.min_band.is_finite() && self.min_band > 0.0 {
            self.min_band.min(MAX_ABS)
        } else {
            0.0
        }
    }
}

/// The judgement of one value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Still in warmup: nothing is judged.
    Learning,
    /// Within the band (or not a usable value).
    Normal,
    /// Beyond the band, for fewer than [`ANOMALOUS_AFTER`] rounds in a row so far;
    /// `deviations` is signed (positive above the mean), in effective sd.
    Outside { deviations: f64 },
    /// Beyond the band for [`ANOMALOUS_AFTER`] or more rounds in a row; `baseline` is the
    /// learned mean the value was compared with.
    Anomalous { deviations: f64, baseline: f64 },
}

impl Verdict {
    /// True for [`Verdict::Anomalous`], the only verdict that changes a target's state.
    pub fn is_anomalous(&self) -> bool {
        matches!(self, Self::Anomalous { .. })
    }
}

/// The learned state of one target and metric. Short field names keep thousands of series
/// small in a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Values learned (saturating).
    #[serde(rename = "n", default)]
    learned: u32,
    /// Mean: cumulative in warmup, EWMA after.
    #[serde(rename = "m", default)]
    mean: f64,
    /// Variance, same.
    #[serde(rename = "v", default)]
    variance: f64,
    /// Consecutive Outside rounds.
    #[serde(rename = "o", default, skip_serializing_if = "is_zero")]
    outside: u32,
    /// Outside values of the current run not learned yet (credited if the run ends short).
    #[serde(rename = "p", default, skip_serializing_if = "is_zero_u8")]
    pending: u8,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

fn is_zero_u8(x: &u8) -> bool {
    *x == 0
}

impl Series {
    /// Judges `value` against the baseline, then learns it when `learn` (false while the
    /// target is failing or in maintenance, so a broken state is never learned as normal).
    /// NaN, infinities and values beyond ±1e12 are ignored: Learning or Normal, nothing
    /// changes.
    pub fn observe(&mut self, value: f64, settings: &Settings, learn: bool) -> Verdict {
        if !self.is_sane() {
            *self = Self::default();
        }
        let warm = self.learned >= settings.warmup();
        if !value.is_finite() || value.abs() > MAX_ABS {
            return if warm {
                Verdict::Normal
            } else {
                Verdict::Learning
            };
        }
        if !warm {
            if learn {
                self.learn_warmup(value, settings);
            }
            return Verdict::Learning;
        }

        let alpha = settings.alpha();
        let sd = self.spread(settings);
        let d = value - self.mean;
        let deviations = d / sd;
        if deviations.abs() <= settings.sensitivity() {
            if learn {
                for _ in 0..self.pending.min(MAX_CREDIT) {
                    self.credit(WINSOR * sd, alpha);
                }
                self.update(d, WINSOR * sd, alpha, true);
            }
            self.outside = 0;
            self.pending = 0;
            return Verdict::Normal;
        }

        self.outside = self.outside.saturating_add(1);
        if self.outside < ANOMALOUS_AFTER {
            if learn {
                self.pending = self.pending.saturating_add(1).min(MAX_CREDIT);
            }
            return Verdict::Outside { deviations };
        }
        self.pending = 0;
        let baseline = self.mean;
        if learn {
            let rounds = (self.outside - ANOMALOUS_AFTER).min(64);
            let widen = WIDEN.powi(i32::try_from(rounds).unwrap_or(64));
            self.update(d, WINSOR * sd * widen, alpha, false);
        }
        Verdict::Anomalous {
            deviations,
            baseline,
        }
    }

    /// The learned mean (0 before any value).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The learned standard deviation, without the floor of [`Series::band`].
    pub fn deviation(&self) -> f64 {
        self.variance.max(0.0).sqrt()
    }

    /// Half-width of the band around the mean within which a value is Normal, floor
    /// included: for messages ("93 is outside 50 ± 6").
    pub fn band(&self, settings: &Settings) -> f64 {
        settings.sensitivity() * self.spread(settings)
    }

    /// Values learned so far (saturating).
    pub fn learned(&self) -> u32 {
        self.learned
    }

    /// True once the warmup is over and values are judged.
    pub fn is_warm(&self, settings: &Settings) -> bool {
        self.learned >= settings.warmup()
    }

    /// The effective sd: the learned one, floored by the minimum band and 1% of |mean|.
    fn spread(&self, settings: &Settings) -> f64 {
        let floor = (settings.min_band() / settings.sensitivity()).max(REL_FLOOR * self.mean.abs());
        self.deviation().max(floor).max(MIN_SD)
    }

    /// Welford's cumulative mean and variance (population), winsorized once there is an sd.
    fn learn_warmup(&mut self, value: f64, settings: &Settings) {
        let x = if self.learned >= WARMUP_WINSOR_FROM {
            let limit = WINSOR * self.spread(settings);
            value.max(self.mean - limit).min(self.mean + limit)
        } else {
            value
        };
        let n = f64::from(self.learned) + 1.0;
        let d = x - self.mean;
        let mean = self.mean + d / n;
        let variance = (self.variance + (d * (x - mean) - self.variance) / n).max(0.0);
        self.commit(mean, variance);
    }

    /// One EWMA step with `d` (distance from the mean) clipped to ±`limit`.
    fn update(&mut self, d: f64, limit: f64, alpha: f64, variance: bool) {
        let c = d.max(-limit).min(limit);
        let mean = self.mean + alpha * c;
        let variance = if variance {
            (1.0 - alpha) * (self.variance + alpha * c * c)
        } else {
            self.variance
        };
        self.commit(mean, variance);
    }

    /// The variance step of a value `distance` from the mean, the mean left alone.
    fn credit(&mut self, distance: f64, alpha: f64) {
        let variance = (1.0 - alpha) * (self.variance + alpha * distance * distance);
        if variance.is_finite() {
            self.variance = variance;
        }
    }

    fn commit(&mut self, mean: f64, variance: f64) {
        if mean.is_finite() && mean.abs() <= MAX_ABS && variance.is_finite() && variance >= 0.0 {
            self.mean = mean;
            self.variance = variance;
            self.learned = self.learned.saturating_add(1);
        }
    }

    /// A state `observe` can work with (decoded text may hold anything).
    fn is_sane(&self) -> bool {
        self.mean.is_finite()
            && self.mean.abs() <= MAX_ABS
            && self.variance.is_finite()
            && (0.0..=MAX_ABS * MAX_ABS).contains(&self.variance)
            && self.pending <= MAX_CREDIT
    }

    /// The same state with mean and variance at 6 significant digits, for [`encode`].
    fn rounded(&self) -> Self {
        Self {
            mean: round6(self.mean),
            variance: round6(self.variance),
            ..self.clone()
        }
    }
}

/// All series of one HealthCheck, by [`key`].
pub type Baselines = BTreeMap<String, Series>;

/// The key of one target's metric: `target/metric` (host or endpoint name, check name).
pub fn key(target: &str, metric: &str) -> String {
    format!("{target}/{metric}")
}

/// Compact JSON of `baselines` (~60 bytes and the key per series), mean and variance at 6
/// significant digits: what is persisted between controller restarts.
pub fn encode(baselines: &Baselines) -> String {
    struct Rounded<'a>(&'a Baselines);
    impl Serialize for Rounded<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v.rounded())))
        }
    }
    serde_json::to_string(&Rounded(baselines)).unwrap_or_else(|_| "{}".to_owned())
}

/// Series back from [`encode`]'s text. Never fails: text that is not a JSON object gives no
/// series, entries that are not a sane series are dropped one by one (the rest are kept),
/// and at most [`MAX_SERIES`] are returned — a bad ConfigMap must not stop probing.
pub fn decode(text: &str) -> Baselines {
    if text.len() > MAX_ENCODED {
        return Baselines::new();
    }
    let Ok(raw) = serde_json::from_str::<BTreeMap<String, serde_json::Value>>(text) else {
        return Baselines::new();
    };
    raw.into_iter()
        .filter(|(k, _)| !k.is_empty() && k.len() <= MAX_KEY)
        .filter_map(|(k, v)| {
            let series = serde_json::from_value::<Series>(v).ok()?;
            series.is_sane().then_some((k, series))
        })
        .take(MAX_SERIES)
        .collect()
}

/// `x` at 6 significant digits (the decimal text is exact, so the JSON is short).
fn round6(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{x:.5e}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gauss(rng: &mut StdRng) -> f64 {
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Student-t with 3 degrees of freedom (sd √3).
    fn student_t3(rng: &mut StdRng) -> f64 {
        let z = gauss(rng);
        let chi2: f64 = (0..3).map(|_| gauss(rng).powi(2)).sum();
        z / (chi2 / 3.0).sqrt()
    }

    fn settings(min_band: f64) -> Settings {
        Settings {
            sensitivity: 3.0,
            warmup: 20,
            min_band,
        }
    }

    /// A series that has learned `rounds` values of mean + sd·N(0,1).
    fn trained(rng: &mut StdRng, mean: f64, sd: f64, rounds: usize, s: &Settings) -> Series {
        let mut series = Series::default();
        for _ in 0..rounds {
            series.observe(mean + sd * gauss(rng), s, true);
        }
        series
    }

    fn count_anomalies(rounds: usize, s: &Settings, mut noise: impl FnMut() -> f64) -> usize {
        let mut series = Series::default();
        (0..rounds)
            .filter(|_| {
                series
                    .observe(100.0 + 10.0 * noise(), s, true)
                    .is_anomalous()
            })
            .count()
    }

    #[test]
    fn warmup_values_are_learning_then_judged() {
        let s = settings(0.0);
        let mut series = Series::default();
        for i in 0..20 {
            assert_eq!(
                series.observe(10.0 + f64::from(i % 3), &s, true),
                Verdict::Learning
            );
        }
        assert!(series.is_warm(&s));
        assert_eq!(series.observe(11.0, &s, true), Verdict::Normal);
        assert!((series.mean() - 11.0).abs() < 0.1, "{}", series.mean());
    }

    #[test]
    fn flat_series_with_jitter_never_alarms() {
        let mut rng = StdRng::seed_from_u64(1);
        let s = Settings {
            min_band: min_band_for(Unit::Percent),
            ..settings(0.0)
        };
        let mut series = Series::default();
        for _ in 0..100_000 {
            let v = 50.0 + 0.1 * (rng.random::<f64>() - 0.5);
            let verdict = series.observe(v, &s, true);
            assert!(
                matches!(verdict, Verdict::Normal | Verdict::Learning),
                "{verdict:?}"
            );
        }
        assert!((series.band(&s) - 2.0).abs() < 1e-9, "{}", series.band(&s));
    }

    #[test]
    fn gaussian_noise_gives_at_most_one_anomaly_per_10k_rounds() {
        let mut rng = StdRng::seed_from_u64(2);
        let n = count_anomalies(200_000, &settings(0.0), || gauss(&mut rng));
        assert!(n <= 20, "{n} anomalies in 200,000 rounds");
    }

    #[test]
    fn student_t3_noise_gives_at_most_one_anomaly_per_10k_rounds() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = count_anomalies(200_000, &settings(0.0), || student_t3(&mut rng));
        assert!(n <= 20, "{n} anomalies in 200,000 rounds");
    }

    #[test]
    fn heavy_tails_do_not_inflate_the_spread() {
        let mut rng = StdRng::seed_from_u64(4);
        let s = settings(0.0);
        let mut series = Series::default();
        let mut sum = 0.0;
        for i in 0..100_000 {
            series.observe(student_t3(&mut rng), &s, true);
            if i >= 1_000 {
                sum += series.deviation();
            }
        }
        // The t3 sd is √3 ≈ 1.73, carried by rare huge values; its bulk is narrower.
        let sd = sum / 99_000.0;
        assert!((1.0..1.8).contains(&sd), "mean learned sd {sd}");
    }

    #[test]
    fn five_sd_shift_is_anomalous_on_the_third_round() {
        let mut rng = StdRng::seed_from_u64(5);
        let s = settings(0.0);
        let mut series = trained(&mut rng, 100.0, 10.0, 500, &s);
        let shifted = series.mean() + 5.0 * series.deviation();
        assert!(
            matches!(series.observe(shifted, &s, true), Verdict::Outside { deviations } if deviations > 4.9)
        );
        assert!(matches!(
            series.observe(shifted, &s, true),
            Verdict::Outside { .. }
        ));
        let baseline = series.mean();
        assert_eq!(
            series.observe(shifted, &s, true),
            Verdict::Anomalous {
                deviations: (shifted - baseline) / series.deviation(),
                baseline
            }
        );
    }

    #[test]
    fn five_sd_shift_in_noise_is_anomalous_within_three_rounds() {
        // A detector knowing the true mean and sd: P(3 values of 5+N(0,1) all > 3) = 93%.
        let mut rng = StdRng::seed_from_u64(6);
        let s = settings(0.0);
        let trials = 1_000;
        let detected = (0..trials)
            .filter(|_| {
                let mut series = trained(&mut rng, 100.0, 10.0, 300, &s);
                (0..3).any(|_| {
                    series
                        .observe(150.0 + 10.0 * gauss(&mut rng), &s, true)
                        .is_anomalous()
                })
            })
            .count();
        assert!(
            detected >= 900,
            "{detected} of {trials} detected within 3 rounds"
        );
    }

    #[test]
    fn one_value_inside_resets_the_run() {
        let mut rng = StdRng::seed_from_u64(7);
        let s = settings(0.0);
        let mut series = trained(&mut rng, 100.0, 10.0, 300, &s);
        for _ in 0..10 {
            // Each short run is credited to the variance, so "far" is measured anew.
            let far = series.mean() + 6.0 * series.deviation();
            assert!(matches!(
                series.observe(far, &s, true),
                Verdict::Outside { .. }
            ));
            assert!(matches!(
                series.observe(far, &s, true),
                Verdict::Outside { .. }
            ));
            assert_eq!(series.observe(series.mean(), &s, true), Verdict::Normal);
        }
    }

    #[test]
    fn isolated_spike_barely_moves_the_baseline() {
        let mut rng = StdRng::seed_from_u64(8);
        let s = settings(0.0);
        let mut series = trained(&mut rng, 100.0, 10.0, 300, &s);
        let (mean, sd) = (series.mean(), series.deviation());
        assert!(matches!(
            series.observe(1e9, &s, true),
            Verdict::Outside { .. }
        ));
        assert_eq!(series.observe(mean, &s, true), Verdict::Normal);
        assert!((series.mean() - mean).abs() < 0.01 * sd);
        // Credited as one 3 sd value: the variance grows by at most 9·alpha of itself.
        assert!(
            series.deviation() < 1.25 * sd,
            "{} vs {sd}",
            series.deviation()
        );
    }

    #[test]
    fn permanent_shift_is_absorbed() {
        let s = settings(0.0);
        // Rounds of the last anomaly after a permanent shift of `k` sd, median of 101 trials.
        let absorbed = |k: f64, seed: u64| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut last: Vec<usize> = (0..101)
                .map(|_| {
                    let mut series = trained(&mut rng, 100.0, 10.0, 300, &s);
                    (1..=2_000)
                        .filter(|_| {
                            let v = 100.0 + 10.0 * (k + gauss(&mut rng));
                            series.observe(v, &s, true).is_anomalous()
                        })
                        .last()
                        .unwrap_or(0)
                })
                .collect();
            last.sort_unstable();
            last[50]
        };
        let five = absorbed(5.0, 9);
        let fifty = absorbed(50.0, 10);
        // Measured 11 and 66 in the bench (see the module doc).
        assert!(
            (5..=20).contains(&five),
            "5 sd shift absorbed after {five} rounds"
        );
        assert!(
            (40..=100).contains(&fifty),
            "50 sd shift absorbed after {fifty} rounds"
        );
    }

    #[test]
    fn nothing_is_learned_when_learn_is_false() {
        let mut rng = StdRng::seed_from_u64(11);
        let s = settings(0.0);
        let mut series = trained(&mut rng, 100.0, 10.0, 300, &s);
        let before = series.clone();
        for _ in 0..100 {
            series.observe(100.0 + 10.0 * gauss(&mut rng), &s, false);
        }
        series.outside = before.outside;
        assert_eq!(series, before);
        // The run still counts: failing values far away turn Anomalous on the 3rd round.
        assert!(matches!(
            series.observe(1_000.0, &s, false),
            Verdict::Outside { .. }
        ));
        assert!(matches!(
            series.observe(1_000.0, &s, false),
            Verdict::Outside { .. }
        ));
        assert!(series.observe(1_000.0, &s, false).is_anomalous());
        assert_eq!(
            (series.mean(), series.learned()),
            (before.mean(), before.learned())
        );
        // Nor during warmup.
        let mut fresh = Series::default();
        assert_eq!(fresh.observe(5.0, &s, false), Verdict::Learning);
        assert_eq!(fresh, Series::default());
    }

    #[test]
    fn non_finite_and_huge_values_do_not_poison_the_state() {
        let s = settings(min_band_for(Unit::Millis));
        let bad = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e308,
            -1e308,
            f64::MAX,
        ];
        // From the very first value on.
        let mut series = Series::default();
        for v in bad {
            assert_eq!(series.observe(v, &s, true), Verdict::Learning);
        }
        assert_eq!(series, Series::default());

        let mut rng = StdRng::seed_from_u64(12);
        let mut series = Series::default();
        for i in 0..2_000 {
            let v = if i % 7 == 0 {
                bad[i % bad.len()]
            } else {
                100.0 + 10.0 * gauss(&mut rng)
            };
            let verdict = series.observe(v, &s, true);
            if !v.is_finite() || v.abs() > 1e12 {
                assert!(matches!(verdict, Verdict::Learning | Verdict::Normal));
            }
        }
        assert!((series.mean() - 100.0).abs() < 5.0, "{}", series.mean());
        assert!(
            (5.0..15.0).contains(&series.deviation()),
            "{}",
            series.deviation()
        );
        // Large but finite values are judged and winsorized.
        let (mean, sd) = (series.mean(), series.deviation());
        for v in [1e11, -1e11, 1e11] {
            assert!(!matches!(series.observe(v, &s, true), Verdict::Normal));
        }
        assert!(series.mean().is_finite() && series.deviation().is_finite());
        assert!((series.mean() - mean).abs() < 5.0 * sd);
    }

    #[test]
    fn insane_state_starts_over() {
        let s = settings(0.0);
        let mut series = Series {
            learned: 100,
            mean: f64::NAN,
            variance: -1.0,
            outside: 2,
            pending: 200,
        };
        assert_eq!(series.observe(5.0, &s, true), Verdict::Learning);
        assert_eq!((series.learned(), series.mean()), (1, 5.0));
    }

    #[test]
    fn bad_settings_fall_back() {
        let s = Settings {
            sensitivity: f64::NAN,
            warmup: 0,
            min_band: -3.0,
        };
        assert_eq!((s.sensitivity(), s.warmup(), s.min_band()), (3.0, 1, 0.0));
        let mut series = Series::default();
        assert_eq!(series.observe(1.0, &s, true), Verdict::Learning);
        assert_eq!(series.observe(1.0, &s, true), Verdict::Normal);
        assert!(matches!(
            series.observe(2.0, &s, true),
            Verdict::Outside { .. }
        ));
    }

    #[test]
    fn settings_come_from_the_spec_and_unit() {
        let b = Baseline {
            enabled: true,
            sensitivity: 4.0,
            warmup: 100,
        };
        let s = Settings::new(&b, Unit::Millis);
        assert_eq!((s.sensitivity, s.warmup, s.min_band), (4.0, 100, 5.0));
        assert!((s.alpha() - 2.0 / 101.0).abs() < 1e-12);
        assert_eq!(settings(0.0).alpha(), 0.05);
        assert_eq!(
            Settings {
                warmup: 100_000,
                ..s
            }
            .alpha(),
            0.01
        );
        for unit in [
            Unit::Percent,
            Unit::LoadPerCore,
            Unit::Millis,
            Unit::Days,
            Unit::Count,
            Unit::Exit,
        ] {
            assert!(min_band_for(unit) > 0.0);
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut rng = StdRng::seed_from_u64(13);
        let s = settings(0.0);
        let mut baselines = Baselines::new();
        for i in 0..50 {
            let series = trained(&mut rng, f64::from(i) * 7.3, 1.0 + f64::from(i), 40, &s);
            baselines.insert(
                key(&format!("node-{i:03}.example.com"), "disk-root"),
                series,
            );
        }
        let mut odd = Series::default();
        odd.observe(1.0, &s, true);
        odd.outside = 2;
        odd.pending = 1;
        baselines.insert(key("a", "b"), odd.clone());

        let text = encode(&baselines);
        let back = decode(&text);
        assert_eq!(back.len(), baselines.len());
        for (k, series) in &baselines {
            let b = &back[k];
            assert_eq!(
                (b.learned, b.outside, b.pending),
                (series.learned, series.outside, series.pending)
            );
            assert!((b.mean - series.mean).abs() <= 1e-5 * series.mean.abs());
            assert!((b.variance - series.variance).abs() <= 1e-5 * series.variance);
        }
        assert_eq!(encode(&back), text, "rounding is stable");
        assert!(
            text.contains(r#""a/b":{"n":1,"m":1.0,"v":0.0,"o":2,"p":1}"#),
            "{text}"
        );
        // Compact: the key plus ~50 bytes a series.
        let keys: usize = baselines.keys().map(|k| k.len() + 3).sum();
        assert!(
            text.len() - keys < 55 * baselines.len(),
            "{} bytes",
            text.len()
        );
        assert_eq!(decode(&encode(&Baselines::new())), Baselines::new());
    }

    #[test]
    fn decode_of_garbage_gives_what_it_can() {
        for text in [
            "",
            "garbage",
            "[1,2,3]",
            "null",
            "{",
            "{\"a\":",
            "\u{0}\u{1}",
            "{\"a\":5}",
        ] {
            assert!(decode(text).is_empty(), "{text:?}");
        }
        let deep = "[".repeat(10_000);
        assert!(decode(&deep).is_empty());
        // Bad entries are dropped one by one; missing counters default.
        let text = r#"{"good":{"n":30,"m":1.5,"v":0.25},"nan":{"n":1,"m":null,"v":0},
            "neg":{"n":1,"m":1,"v":-1},"huge":{"n":1,"m":1e300,"v":0},"str":{"m":"x"},
            "pend":{"n":1,"m":1,"v":0,"p":9},"":{"n":1,"m":1,"v":1}}"#;
        let back = decode(text);
        assert_eq!(back.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(back["good"].mean(), 1.5);
        assert_eq!(back["good"].deviation(), 0.5);
        // Capped.
        let many: Baselines = (0..MAX_SERIES + 5)
            .map(|i| (format!("k{i:06}"), Series::default()))
            .collect();
        assert_eq!(decode(&encode(&many)).len(), MAX_SERIES);
    }

    #[test]
    fn round6_keeps_six_significant_digits() {
        assert_eq!(round6(50.123456789), 50.1235);
        assert_eq!(round6(-0.000123456789), -0.000123457);
        assert_eq!(round6(1234567890.0), 1234570000.0);
        assert_eq!(round6(0.0), 0.0);
        assert!(round6(f64::NAN).is_nan());
    }
}
