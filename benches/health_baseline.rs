//! Learned baseline benchmark (`cargo bench --bench health_baseline`): how often
//! `baseline::Series` raises false anomalies on stationary noise, how fast it flags a level
//! shift, how long a permanent shift keeps alarming, the cost of one `observe`, and the size
//! and speed of the persisted form. Deterministic (seeded), no cluster or network needed.
//!
//! Environment: `BENCH_ROUNDS` (1,000,000 rounds per stationary series), `BENCH_TRIALS`
//! (1,000 trials per shift).

use std::hint::black_box;
use std::time::Instant;

use outrider::engine::health::baseline::{
    self, Baselines, Series, Settings, Unit, Verdict, min_band_for,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Values learned before a shift starts.
const TRAIN: usize = 300;
/// Rounds after a shift within which it must be detected, and over which alarms are counted.
const HORIZON: usize = 2_000;
const MEAN: f64 = 100.0;
const SD: f64 = 10.0;

fn gauss(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Student-t with 3 degrees of freedom, Z / sqrt(chi2_3 / 3) (sd √3).
fn student_t3(rng: &mut StdRng) -> f64 {
    let z = gauss(rng);
    let chi2: f64 = (0..3).map(|_| gauss(rng).powi(2)).sum();
    z / (chi2 / 3.0).sqrt()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn settings(sensitivity: f64) -> Settings {
    Settings {
        sensitivity,
        warmup: 20,
        min_band: 0.0,
    }
}

fn trained(rng: &mut StdRng, s: &Settings) -> Series {
    let mut series = Series::default();
    for _ in 0..TRAIN {
        series.observe(MEAN + SD * gauss(rng), s, true);
    }
    series
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Shift {
    /// Rounds to the first Anomalous verdict of the detected trials.
    detect: Vec<usize>,
    within3: usize,
    missed: usize,
    /// Round of the last Anomalous verdict, per trial (0: never alarmed).
    last: Vec<usize>,
}

/// `trials` series trained on N(MEAN, SD), then shifted by `k` SD for HORIZON rounds.
fn shift(k: f64, sensitivity: f64, trials: usize, seed: u64) -> Shift {
    let s = settings(sensitivity);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Shift {
        detect: Vec::new(),
        within3: 0,
        missed: 0,
        last: Vec::new(),
    };
    for _ in 0..trials {
        let mut series = trained(&mut rng, &s);
        let (mut first, mut last) = (None, 0);
        for round in 1..=HORIZON {
            let v = MEAN + SD * (k + gauss(&mut rng));
            if series.observe(v, &s, true).is_anomalous() {
                first.get_or_insert(round);
                last = round;
            }
        }
        match first {
            Some(r) => {
                out.detect.push(r);
                if r <= 3 {
                    out.within3 += 1;
                }
            }
            None => out.missed += 1,
        }
        out.last.push(last);
    }
    out.detect.sort_unstable();
    out.last.sort_unstable();
    out
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 1_000_000);
    let trials = env_usize("BENCH_TRIALS", 1_000);
    let t0 = Instant::now();
    println!("# Learned baseline (EWMA, winsorized, variance floor)");
    println!();
    println!(
        "warmup 20 (alpha {}), min_band 0, noise N({MEAN}, {SD}) or {MEAN} + {SD}·t3",
        settings(3.0).alpha()
    );

    println!();
    println!("## False anomalies on stationary noise ({rounds} rounds each)");
    println!();
    println!("| noise | sensitivity | anomalies | per 10,000 rounds | outside rounds |");
    println!("|---|---|---|---|---|");
    for (name, seed) in [("Gaussian", 1u64), ("Student-t(3)", 2)] {
        for sensitivity in [3.0, 4.0] {
            let s = settings(sensitivity);
            let mut rng = StdRng::seed_from_u64(seed);
            let mut series = Series::default();
            let (mut anomalies, mut outside) = (0usize, 0usize);
            for _ in 0..rounds {
                let noise = if seed == 1 {
                    gauss(&mut rng)
                } else {
                    student_t3(&mut rng)
                };
                match series.observe(MEAN + SD * noise, &s, true) {
                    Verdict::Anomalous { .. } => anomalies += 1,
                    Verdict::Outside { .. } => outside += 1,
                    _ => {}
                }
            }
            println!(
                "| {name} | {sensitivity} | {anomalies} | {:.3} | {outside} |",
                anomalies as f64 * 10_000.0 / rounds as f64
            );
        }
    }

    println!();
    println!(
        "## Level shift detection ({trials} trials, Gaussian noise, {TRAIN} rounds learned first)"
    );
    println!();
    println!(
        "| shift | sensitivity | mean rounds to detect | within 3 rounds | not detected in {HORIZON} |"
    );
    println!("|---|---|---|---|---|");
    let mut absorbed = Vec::new();
    for sensitivity in [3.0, 4.0] {
        for (i, k) in [3.0, 5.0, 10.0].into_iter().enumerate() {
            let r = shift(k, sensitivity, trials, 100 + i as u64);
            let mean = r.detect.iter().sum::<usize>() as f64 / r.detect.len().max(1) as f64;
            println!(
                "| {k} sd | {sensitivity} | {mean:.2} | {:.1}% | {:.1}% |",
                100.0 * r.within3 as f64 / trials as f64,
                100.0 * r.missed as f64 / trials as f64,
            );
            if sensitivity == 3.0 && k >= 5.0 {
                absorbed.push((k, r.last));
            }
        }
    }
    for (i, k) in [50.0, 1000.0].into_iter().enumerate() {
        absorbed.push((k, shift(k, 3.0, trials, 200 + i as u64).last));
    }

    println!();
    println!(
        "## Permanent shift: round of the last anomaly in {HORIZON} (sensitivity 3, {trials} trials)"
    );
    println!();
    println!("| shift | median | p90 | p99 |");
    println!("|---|---|---|---|");
    for (k, last) in &absorbed {
        println!(
            "| {k} sd | {} | {} | {} |",
            percentile(last, 0.5),
            percentile(last, 0.9),
            percentile(last, 0.99)
        );
    }

    println!();
    println!("## Cost");
    println!();
    let s = settings(3.0);
    let mut rng = StdRng::seed_from_u64(3);
    let values: Vec<f64> = (0..1 << 16)
        .map(|_| MEAN + SD * student_t3(&mut rng))
        .collect();
    let mut series = trained(&mut rng, &s);
    let n = 20_000_000usize;
    let start = Instant::now();
    let mut anomalies = 0usize;
    for i in 0..n {
        let v = values[i & (values.len() - 1)];
        if black_box(&mut series)
            .observe(black_box(v), &s, true)
            .is_anomalous()
        {
            anomalies += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    black_box(anomalies);
    println!("observe(): {ns:.1} ns ({n} calls)");

    let series_count = 5_000;
    let s = Settings {
        min_band: min_band_for(Unit::Percent),
        ..settings(3.0)
    };
    let mut map = Baselines::new();
    for i in 0..series_count {
        let mut series = Series::default();
        for _ in 0..100 {
            series.observe(50.0 + 5.0 * gauss(&mut rng), &s, true);
        }
        map.insert(
            baseline::key(&format!("node-{i:04}.example.com"), "disk-root"),
            series,
        );
    }
    let start = Instant::now();
    let text = baseline::encode(&map);
    let encode_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let back = baseline::decode(&text);
    let decode_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(back.len(), map.len());
    let keys: usize = map.keys().map(|k| k.len() + 3).sum();
    println!(
        "{series_count} series (keys like node-0001.example.com/disk-root): {} KB encoded, {:.0} bytes a series beside its key; encode {encode_ms:.1} ms, decode {decode_ms:.1} ms",
        text.len() / 1024,
        (text.len() - keys) as f64 / series_count as f64,
    );
    println!();
    println!("(bench ran {:.1} s)", t0.elapsed().as_secs_f64());
}
