//! Figures and the table: percentiles, formatting, and one row per figure
//! with its target and verdict.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A figure without a target.
    Info,
    /// The benchmark could not produce the figure.
    Error,
}

impl Verdict {
    pub fn check(pass: bool) -> Verdict {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::Info => "",
            Verdict::Error => "**ERROR**",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    /// The item of the issue it answers (1 to 6).
    pub item: u8,
    pub metric: String,
    pub berth: String,
    /// The comparison: the engine's own, docker-compose, a `docker run` loop.
    pub other: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    pub fn new(item: u8, metric: impl Into<String>) -> Row {
        Row {
            item,
            metric: metric.into(),
            berth: String::new(),
            other: String::new(),
            ratio: String::new(),
            target: String::new(),
            verdict: Verdict::Info,
        }
    }

    pub fn berth(mut self, value: impl Into<String>) -> Row {
        self.berth = value.into();
        self
    }

    pub fn other(mut self, value: impl Into<String>) -> Row {
        self.other = value.into();
        self
    }

    pub fn ratio(mut self, value: impl Into<String>) -> Row {
        self.ratio = value.into();
        self
    }

    pub fn target(mut self, target: impl Into<String>, pass: bool) -> Row {
        self.target = target.into();
        self.verdict = Verdict::check(pass);
        self
    }

    pub fn error(item: u8, what: &str, error: &anyhow::Error) -> Row {
        let mut text = format!("{error:#}").replace('\n', " ");
        if text.chars().count() > 300 {
            text = text.chars().take(300).collect::<String>() + " …";
        }
        let mut row = Row::new(item, what).berth(text);
        row.verdict = Verdict::Error;
        row
    }
}

/// The p50 and p99 of a sample (nearest rank: with 20 values, p99 is the
/// largest).
#[derive(Debug, Clone, Copy)]
pub struct Dist {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn dist(values: &[f64]) -> Option<Dist> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Dist {
        n: v.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        max: v[v.len() - 1],
    })
}

/// Milliseconds, to a tenth (a hundredth below 1 ms).
pub fn ms(value: f64) -> String {
    if value.abs() < 1.0 {
        format!("{value:.2} ms")
    } else {
        format!("{value:.1} ms")
    }
}

pub fn secs(value: f64) -> String {
    format!("{value:.2} s")
}

pub fn p50_p99(d: &Dist) -> String {
    format!("{} / {}", ms(d.p50), ms(d.p99))
}

pub fn mb(kb: u64) -> String {
    format!("{:.2} MB", kb as f64 / 1024.0)
}

/// The table, in Markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | figure | berth | comparison | ratio | target | result |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.item,
            r.metric,
            r.berth,
            r.other,
            r.ratio,
            r.target,
            r.verdict.label()
        );
    }
    out
}
