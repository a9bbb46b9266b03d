//! The report every `hearth-perf` scenario writes: `{"scenario", "machine", "metrics"}` as JSON
//! (with `--json FILE`) and as a table on stdout. Metrics are summarized by percentiles of their
//! samples (nearest rank: every figure is a sample that was measured).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// Errors from writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The JSON file could not be written.
    #[error("cannot write the report to {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The report could not be encoded.
    #[error("cannot encode the report as JSON")]
    Encode(#[source] serde_json::Error),
}

/// One metric's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// `ms`, `MiB`, ...
    pub unit: String,
    /// Number of samples.
    pub n: usize,
}

impl Metric {
    /// Summarizes `samples` (in `unit`); `None` when there are none (or only NaNs).
    pub fn from_samples(samples: &[f64], unit: &str) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| !s.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        Some(Self {
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            min: sorted[0],
            max: sorted[n - 1],
            mean: sorted.iter().sum::<f64>() / n as f64,
            unit: unit.to_owned(),
            n,
        })
    }
}

/// The nearest-rank percentile `p` (0..=100) of sorted, non-empty `sorted`: the smallest sample
/// with at least `p` percent of the samples at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A scenario's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub machine: Machine,
    /// Scenario parameters (runs, memory, ...), for reading the figures later.
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
    pub metrics: BTreeMap<String, Metric>,
}

impl Report {
    /// An empty report for `scenario` on `machine`.
    pub fn new(scenario: &str, machine: Machine) -> Self {
        Self {
            scenario: scenario.to_owned(),
            machine,
            parameters: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    /// Records a parameter.
    pub fn parameter(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.parameters.insert(name.to_owned(), value.into());
    }

    /// Adds a metric from its samples (nothing when there are none).
    pub fn add(&mut self, name: &str, samples: &[f64], unit: &str) {
        if let Some(metric) = Metric::from_samples(samples, unit) {
            self.metrics.insert(name.to_owned(), metric);
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> Result<String, ReportError> {
        serde_json::to_string_pretty(self).map_err(ReportError::Encode)
    }

    /// Writes the JSON report to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let mut json = self.to_json()?;
        json.push('\n');
        std::fs::write(path, json).map_err(|source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A readable table of the metrics.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "scenario {} on {} ({} cores, {} MiB), kernel {}, kvm: {}{}\n",
            self.scenario,
            m.cpu_model,
            m.cores,
            m.memory_mib,
            m.kernel,
            m.kvm,
            if m.in_testhost {
                " (inside the test host)"
            } else {
                ""
            }
        );
        let width = self
            .metrics
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "{:<width$} {:>10} {:>10} {:>10} {:>10} {:>10}  {:<5} {:>4}",
            "metric", "p50", "p90", "p99", "min", "max", "unit", "n"
        );
        for (name, v) in &self.metrics {
            let _ = writeln!(
                out,
                "{name:<width$} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}  {:<5} {:>4}",
                v.p50, v.p90, v.p99, v.min, v.max, v.unit, v.n
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 90.0), 90.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 90.0), 4.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn metrics_sort_their_samples() {
        let m = Metric::from_samples(&[30.0, 10.0, 20.0, f64::NAN], "ms").expect("metric");
        assert_eq!(
            (m.p50, m.p90, m.p99, m.min, m.max, m.mean, m.n),
            (20.0, 30.0, 30.0, 10.0, 30.0, 20.0, 3)
        );
        assert_eq!(m.unit, "ms");
        assert!(Metric::from_samples(&[], "ms").is_none());
    }

    #[test]
    fn the_report_has_the_documented_shape() {
        let mut report = Report::new("boot", Machine::fake_for_tests());
        report.add("start_to_init", &[1.0, 2.0, 3.0], "ms");
        report.add("empty", &[], "ms");
        report.parameter("runs", 3);
        let json: serde_json::Value =
            serde_json::from_str(&report.to_json().expect("json")).expect("parse");
        assert_eq!(json["scenario"], "boot");
        assert_eq!(json["metrics"]["start_to_init"]["p50"], 2.0);
        assert_eq!(json["metrics"]["start_to_init"]["unit"], "ms");
        assert_eq!(json["metrics"]["start_to_init"]["n"], 3);
        assert!(json["metrics"].get("empty").is_none());
        assert!(json["machine"]["cpu_model"].is_string());
        assert!(json["machine"]["in_testhost"].is_boolean());
        let table = report.table();
        assert!(
            table.contains("start_to_init") && table.contains("p99"),
            "{table}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        report.write_json(&path).expect("write");
        let back: Report =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse back");
        assert_eq!(back, report);
    }
}
