//! HealthCheck's engine: host checks over persistent SSH connections ([`host`], [`pool`]),
//! endpoint probes from this process ([`endpoint`]), and what the results mean over time:
//! thresholds and hysteresis ([`evaluate`]) and learned baselines ([`baseline`]). The
//! controller and `outrider check run` share it; nothing here imports `kube`.

pub mod baseline;
pub mod endpoint;
pub mod evaluate;
pub mod host;
pub mod pool;
pub mod round;

use std::time::Duration;

use baseline::Unit;

/// The unit of an endpoint probe's value, for its baseline.
pub fn endpoint_unit(kind: &str) -> Option<Unit> {
    match kind {
        "http" | "tcp" => Some(Unit::Millis),
        "tls" => Some(Unit::Days),
        _ => None,
    }
}

/// Longest message a probe reports (status clips to the schema's 1,024 bytes anyway).
pub const MAX_MESSAGE: usize = 512;

/// How one probe of one target went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Measured and within its limits.
    Pass,
    /// Measured and outside its limits (or the command failed).
    Fail,
    /// Could not be measured: unreachable host, missing tool or file, timeout.
    Unknown,
}

/// One probe's result: the outcome, what was measured and against what, and a sentence
/// a human can act on ("/ is 93% used (limit 85%)").
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub outcome: Outcome,
    /// The measured value in the probe's unit (percent, load per core, milliseconds, days).
    pub value: Option<f64>,
    /// The configured limit `value` is compared with.
    pub threshold: Option<f64>,
    /// Time the probe took.
    pub latency: Duration,
    pub message: String,
}

impl Observation {
    pub fn pass(message: impl Into<String>) -> Self {
        Self::new(Outcome::Pass, message)
    }

    pub fn fail(message: impl Into<String>) -> Self {
        Self::new(Outcome::Fail, message)
    }

    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(Outcome::Unknown, message)
    }

    fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            value: None,
            threshold: None,
            latency: Duration::ZERO,
            message: crate::text::clip(message.into(), MAX_MESSAGE),
        }
    }

    pub fn value(mut self, value: f64, threshold: Option<f64>) -> Self {
        self.value = value.is_finite().then_some(value);
        self.threshold = threshold.filter(|t| t.is_finite());
        self
    }

    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
}
