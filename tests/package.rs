//! The Debian package that `cargo deb` makes from `[package.metadata.deb]`
//! in Cargo.toml: its name, control fields, conffiles, maintainer scripts
//! and files, and that the config it installs uses production paths.
//!
//! Speed: a release build (LTO, one codegen unit) takes minutes, so the test
//! packages the binary cargo already built for the tests instead. It is
//! copied to `<tmp>/release/berth`, where `cargo deb --no-build` looks with
//! `CARGO_TARGET_DIR=<tmp>`; `--strip --fast` keep the packing to seconds.
//! Everything but the optimisation level of the binary is what a real
//! `cargo deb` produces.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e})"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(program: &str, args: &[&str]) -> String {
    String::from_utf8(run(program, args).stdout).expect("UTF-8 output")
}

fn dpkg_arch() -> String {
    stdout("dpkg", &["--print-architecture"]).trim().to_owned()
}

/// The package built from this tree, and the temp dir that holds it.
struct Package {
    deb: PathBuf,
    dir: TempDir,
}

impl Package {
    fn build() -> Package {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let available = Command::new(&cargo)
            .args(["deb", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            available,
            "cargo-deb is missing: run scripts/setup.sh --tests, or `cargo install cargo-deb --locked`"
        );
        let dir = tempfile::tempdir().expect("temp dir for the package");
        let release = dir.path().join("release");
        fs::create_dir(&release).unwrap();
        fs::copy(env!("CARGO_BIN_EXE_berth"), release.join("berth")).expect("copy berth");
        let out = Command::new(&cargo)
            .args(["deb", "--no-build", "--strip", "--fast"])
            .env("CARGO_TARGET_DIR", dir.path())
            .current_dir(MANIFEST_DIR)
            .output()
            .expect("run cargo deb");
        assert!(
            out.status.success(),
            "cargo deb failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = format!("berth_{VERSION}_{}.deb", dpkg_arch());
        let deb = dir.path().join("debian").join(&name);
        let made: Vec<_> = fs::read_dir(dir.path().join("debian"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name())
                    .collect()
            })
            .unwrap_or_default();
        assert!(deb.is_file(), "no {name}; cargo deb made {made:?}");
        Package { deb, dir }
    }

    fn deb(&self) -> &str {
        self.deb.to_str().unwrap()
    }

    fn field(&self, name: &str) -> String {
        stdout("dpkg-deb", &["-f", self.deb(), name])
            .trim()
            .to_owned()
    }

    /// `dpkg-deb -c`: (mode, owner, path without the leading `.`), symlinks
    /// and directories included.
    fn contents(&self) -> Vec<(String, String, String)> {
        stdout("dpkg-deb", &["-c", self.deb()])
            .lines()
            .map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                assert!(cols.len() >= 6, "unexpected dpkg-deb -c line: {line}");
                let path = cols[5].trim_start_matches('.').to_owned();
                (cols[0].to_owned(), cols[1].to_owned(), path)
            })
            .collect()
    }

    /// The files of the package unpacked into a temp root.
    fn unpack(&self) -> PathBuf {
        let root = self.dir.path().join("root");
        run("dpkg-deb", &["-x", self.deb(), root.to_str().unwrap()]);
        root
    }

    /// The control area (control, conffiles, maintainer scripts) unpacked.
    fn control_dir(&self) -> PathBuf {
        let control = self.dir.path().join("control");
        run("dpkg-deb", &["-e", self.deb(), control.to_str().unwrap()]);
        control
    }
}

fn example_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(Path::new(MANIFEST_DIR).join("config/deployments.d"))
        .expect("config/deployments.d")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no example deployments in config/deployments.d"
    );
    names
}

#[test]
fn the_deb_has_the_files_fields_and_conffiles_an_operator_expects() {
    let package = Package::build();

    // Control fields.
    assert_eq!(package.field("Package"), "berth");
    assert_eq!(package.field("Version"), VERSION);
    assert_eq!(package.field("Architecture"), dpkg_arch());
    assert_eq!(package.field("Section"), "admin");
    let depends = package.field("Depends");
    assert!(
        depends
            .split(',')
            .any(|d| d.trim() == "docker.io | docker-ce"),
        "Depends: {depends}"
    );
    assert!(!package.field("Maintainer").is_empty());
    let description = package.field("Description");
    let synopsis = description.lines().next().unwrap_or_default();
    assert!(
        !synopsis.is_empty() && synopsis.len() < 80,
        "the synopsis must be one line under 80 characters: {synopsis:?}"
    );
    assert!(
        description.lines().count() > 2,
        "no extended description for operators: {description}"
    );

    // Files, modes and owners.
    let contents = package.contents();
    let entry = |path: &str| {
        contents
            .iter()
            .find(|(_, _, p)| p == path)
            .unwrap_or_else(|| panic!("{path} is not in the package: {contents:#?}"))
    };
    let (mode, owner, _) = entry("/usr/bin/berth");
    assert_eq!((mode.as_str(), owner.as_str()), ("-rwxr-xr-x", "0/0"));
    let mut expected_files = vec![
        "/usr/bin/berth".to_owned(),
        "/lib/systemd/system/berth.service".to_owned(),
        "/etc/berth/berth.toml".to_owned(),
    ];
    for name in example_names() {
        expected_files.push(format!("/etc/berth/examples/{name}"));
    }
    for path in &expected_files[1..] {
        let (mode, owner, _) = entry(path);
        assert_eq!(
            (mode.as_str(), owner.as_str()),
            ("-rw-r--r--", "0/0"),
            "{path}"
        );
    }
    // A package must not start containers on every robot it reaches.
    assert!(
        !contents
            .iter()
            .any(|(_, _, p)| p.starts_with("/etc/berth/deployments.d/")
                && p != "/etc/berth/deployments.d/"),
        "the package ships active deployments"
    );

    // conffiles: everything under /etc, so dpkg keeps an operator's edits.
    let control = package.control_dir();
    let conffiles: BTreeSet<String> = fs::read_to_string(control.join("conffiles"))
        .expect("the package has conffiles")
        .lines()
        .map(str::to_owned)
        .collect();
    let etc: BTreeSet<String> = expected_files
        .iter()
        .filter(|p| p.starts_with("/etc/"))
        .cloned()
        .collect();
    assert_eq!(conffiles, etc);

    // Maintainer scripts: present, executable, valid shell.
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let mode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("no {script} in the package: {e}"))
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111,
            0o111,
            "{script} is not executable"
        );
        run("sh", &["-n", path.to_str().unwrap()]);
    }
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("/var/lib/berth") && postinst.contains("/etc/berth/deployments.d"),
        "postinst creates the state and deployments dirs"
    );
}

#[test]
fn the_packaged_files_are_the_ones_in_the_tree_with_production_paths() {
    let package = Package::build();
    let root = package.unpack();
    let read = |path: &Path| {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    };

    assert_eq!(
        read(&root.join("lib/systemd/system/berth.service")),
        read(&Path::new(MANIFEST_DIR).join("systemd/berth.service"))
    );
    for name in example_names() {
        assert_eq!(
            read(&root.join("etc/berth/examples").join(&name)),
            read(
                &Path::new(MANIFEST_DIR)
                    .join("config/deployments.d")
                    .join(&name)
            )
        );
    }

    // The packaged binary runs.
    let version = stdout(root.join("usr/bin/berth").to_str().unwrap(), &["--version"]);
    assert!(version.contains(VERSION), "berth --version: {version}");

    // The config: production paths, and no device_id until the operator
    // sets one (berth refuses to start without it).
    let config_text = read(&root.join("etc/berth/berth.toml"));
    let config: toml::Table = config_text.parse().expect("berth.toml is TOML");
    assert_eq!(
        config["deployments_dir"].as_str(),
        Some("/etc/berth/deployments.d")
    );
    assert_eq!(config["state_dir"].as_str(), Some("/var/lib/berth"));
    assert_eq!(
        config["docker"]["host"].as_str(),
        Some("unix:///var/run/docker.sock")
    );
    assert!(
        config.get("device_id").is_none(),
        "a packaged device_id would be shared by every robot"
    );

    // Once device_id is set, berth accepts it; the only complaint allowed is
    // a missing /etc/berth/deployments.d on this build machine.
    let edited = root.join("etc/berth/berth-with-id.toml");
    let with_id = config_text.replace("# device_id = \"robot-42\"", "device_id = \"robot-42\"");
    assert_ne!(
        with_id, config_text,
        "the device_id example line changed; update this test"
    );
    fs::write(&edited, with_id).unwrap();
    let out = Command::new(root.join("usr/bin/berth"))
        .args(["check-config", "--config", edited.to_str().unwrap()])
        .env_remove("BERTH_CONFIG")
        .output()
        .expect("run berth check-config");
    let report = String::from_utf8_lossy(&out.stdout);
    let deployments_dir = Path::new("/etc/berth/deployments.d");
    let errors: Vec<&str> = report
        .lines()
        .filter(|l| !l.ends_with(": ok"))
        .filter(|l| deployments_dir.is_dir() || !l.contains("deployments directory does not exist"))
        .collect();
    assert!(
        errors.is_empty(),
        "the packaged config is not valid:\n{report}"
    );
}
