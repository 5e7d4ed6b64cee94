//! Item 8: what berth costs to build. A release build of the `berth` binary
//! from scratch (an empty target directory of the bench's own, the crates
//! already downloaded), timed around `cargo build`, and the size of the
//! binary it makes. Only when asked (`--only build`): it takes minutes and
//! loads every core.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::Row;
use crate::sys;
use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let target = ctx.dir.join("build-target");
    let _ = fs::remove_dir_all(&target);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--offline",
            "--bin",
            "berth",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" {
            command.env_remove(key.as_ref());
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let began = Instant::now();
    let result = sys::run(&mut command, Duration::from_secs(3600));
    let took = began.elapsed().as_secs_f64();
    let binary = target.join("release").join("berth");
    let size = fs::metadata(&binary).map(|m| m.len());
    let _ = fs::remove_dir_all(&target);
    result.context("the release build failed")?;
    let Ok(size) = size else {
        bail!("the release build left no {}", binary.display());
    };
    let crates = Command::new("cargo")
        .args([
            "tree",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .ok()
        .map(|o| {
            let mut lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim_end_matches(" (*)").to_owned())
                .collect();
            lines.sort();
            lines.dedup();
            lines.len()
        });
    Ok(vec![
        Row::new(
            8,
            format!("release build of `berth` from scratch ({cores} cores, crates downloaded)"),
        )
        .berth(format!("{:.0} s ({:.1} min)", took, took / 60.0)),
        Row::new(8, "release binary size (stripped, LTO, opt-level z)").berth(format!(
            "{:.2} MB ({size} bytes)",
            size as f64 / 1024.0 / 1024.0
        )),
        Row::new(
            8,
            "crates in the build (normal and build dependencies, berth included)",
        )
        .berth(crates.map_or_else(|| "unknown".to_owned(), |c| c.to_string())),
    ])
}
