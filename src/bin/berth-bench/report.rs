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
    /// The item of BENCHMARKS.md it answers (1 to 10).
    pub item: u8,
    pub metric: String,
    pub berth: String,
    /// The comparison: the engine's own, docker-compose, a `docker run` loop.
    pub other: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
    /// The same figure from the run under load (`--load`): value, comparison,
    /// ratio and verdict in one cell.
    pub loaded: Option<String>,
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
            loaded: None,
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

/// Puts the rows of the run under load beside their quiet twins (same item
/// and figure, in order); a row only the loaded run produced is added with
/// an empty quiet side.
pub fn merge_loaded(quiet: &mut Vec<Row>, loaded: Vec<Row>) {
    let mut taken = vec![false; quiet.len()];
    let mut extras = Vec::new();
    for row in loaded {
        let cell = loaded_cell(&row);
        let twin = quiet
            .iter()
            .enumerate()
            .position(|(i, q)| !taken[i] && q.item == row.item && q.metric == row.metric);
        match twin {
            Some(i) => {
                taken[i] = true;
                quiet[i].loaded = Some(cell);
            }
            None => {
                let mut extra = Row::new(row.item, row.metric.clone());
                extra.loaded = Some(cell);
                if row.verdict == Verdict::Fail || row.verdict == Verdict::Error {
                    extra.verdict = row.verdict;
                }
                extras.push(extra);
            }
        }
    }
    quiet.extend(extras);
}

fn loaded_cell(row: &Row) -> String {
    let mut parts = vec![row.berth.clone()];
    if !row.other.is_empty() {
        parts.push(format!("vs {}", row.other));
    }
    if !row.ratio.is_empty() {
        parts.push(format!("ratio {}", row.ratio));
    }
    if !row.target.is_empty() {
        parts.push(format!("{} {}", row.target, row.verdict.label()));
    }
    parts.retain(|p| !p.is_empty());
    parts.join("; ")
}

/// The table, in Markdown; with a column for the run under load when there
/// was one.
pub fn table(rows: &[Row]) -> String {
    let load = rows.iter().any(|r| r.loaded.is_some());
    let mut out = String::from("| # | figure | berth | comparison | ratio | target | result |");
    out += if load {
        " under load (`--load`) |\n|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|---|---|\n"
    };
    for r in rows {
        let _ = write!(
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
        if load {
            let _ = write!(out, " {} |", r.loaded.as_deref().unwrap_or(""));
        }
        out.push('\n');
    }
    out
}

/// The markers between which the bench writes its results into a file
/// (BENCHMARKS.md); everything outside them is left as it is.
pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

/// `document` with the text between the bench's markers replaced by
/// `generated`.
pub fn replace_between_markers(document: &str, generated: &str) -> Result<String, String> {
    replace_between(document, BEGIN, END, generated)
}

/// `document` with the text between `begin` and `end`, each on a line of
/// its own (a marker quoted in prose does not count), replaced by
/// `generated`; fails when they are missing or out of order.
pub fn replace_between(
    document: &str,
    begin: &str,
    end: &str,
    generated: &str,
) -> Result<String, String> {
    let line = |marker: &str| {
        document.match_indices(marker).map(|(i, _)| i).find(|&i| {
            (i == 0 || document[..i].ends_with('\n'))
                && document[i + marker.len()..].starts_with('\n')
        })
    };
    let (Some(from), Some(to)) = (line(begin), line(end)) else {
        return Err(format!("the markers {begin} and {end} are missing"));
    };
    if to < from {
        return Err(format!("{end} comes before {begin}"));
    }
    Ok(format!(
        "{}{begin}\n{}\n{}",
        &document[..from],
        generated.trim_end(),
        &document[to..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = dist(&v).expect("values");
        assert_eq!((d.n, d.p50, d.p99, d.max), (100, 50.0, 99.0, 100.0));
        let d = dist(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((d.p50, d.p99), (2.0, 3.0));
        assert!(dist(&[]).is_none());
    }

    #[test]
    fn the_generated_part_replaces_only_what_is_between_the_markers() {
        let doc = format!("intro\n{BEGIN}\nold table\n{END}\nprose\n");
        let new = replace_between_markers(&doc, "new table\n").expect("markers");
        assert_eq!(new, format!("intro\n{BEGIN}\nnew table\n{END}\nprose\n"));
        assert!(replace_between_markers("no markers", "x").is_err());
        assert!(replace_between_markers(&format!("{END}\n{BEGIN}\n"), "x").is_err());
        // A marker quoted in prose (the flags table) is not a marker.
        let doc = format!("see `{BEGIN}` and `{END}`\n{BEGIN}\nold\n{END}\nprose\n");
        let new = replace_between_markers(&doc, "new\n").expect("markers");
        assert_eq!(
            new,
            format!("see `{BEGIN}` and `{END}`\n{BEGIN}\nnew\n{END}\nprose\n")
        );
    }

    #[test]
    fn loaded_rows_go_beside_their_twins() {
        let mut quiet = vec![
            Row::new(1, "a").berth("1 ms").target("≤ 2 ms", true),
            Row::new(1, "b").berth("2 ms"),
        ];
        let loaded = vec![
            Row::new(1, "b").berth("4 ms"),
            Row::new(1, "a").berth("3 ms").target("≤ 5 ms", true),
            Row::new(2, "c").berth("x"),
            Row::new(2, "d").berth("y"),
        ];
        merge_loaded(&mut quiet, loaded);
        assert_eq!(quiet[0].loaded.as_deref(), Some("3 ms; ≤ 5 ms pass"));
        assert_eq!(quiet[1].loaded.as_deref(), Some("4 ms"));
        assert_eq!(quiet[2].metric, "c");
        assert_eq!(quiet[3].loaded.as_deref(), Some("y"));
        assert!(table(&quiet).contains("under load"));
    }
}
